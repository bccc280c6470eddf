"""Supervision of process workers: the half of ``ProcessPool`` that watches them.

One supervisor thread per pool waits on the workers' exit sentinels and a wake-up pipe
(never polling): it replaces workers that die and decides the fate of their tasks
(``_on_exit``: results they published are delivered, the task they were running crashed,
the rest go back to the front of the queue), kills overdue and stalled workers
(``_checks``), reports backlogs, and tears the pool down after a drain (``_teardown``).
``restart()`` and ``_health()`` live here too. ``ProcessPool`` mixes this in; the
methods take ``self: ProcessPool``.

The supervisor and collector threads hold the pool by a weak reference, and only while
they act on it: a pool dropped without ``shutdown()`` finishes the work it was given,
is collected, and its finalizer has the supervisor release what it left
(``_Remains``): workers, threads, the control segment, the pipe.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _layout as L
from .. import atomics as at
from ..errors import InitializerError, PoolTerminatedError, TaskTimeoutError, WorkerCrashedError
from ._ring import Rings, release_spill
from ._task import (
    WorkerHealth,
    _check_timeout,
    _describe,
    _Task,
)
from .base import CLOSED, DRAINING, RUNNING, Pool
from .base import log as _log
from .worker import EXIT_INIT_FAILED, EXIT_ORPHANED

if TYPE_CHECKING:
    from ..array import SharedArray

_STATE_NAMES = {
    L.WS_EMPTY: "starting",
    L.WS_STARTING: "starting",
    L.WS_IDLE: "idle",
    L.WS_BUSY: "busy",
    L.WS_EXITING: "exiting",
    L.WS_INIT_FAILED: "exiting",
}
_INIT_FAILURES_BEFORE_GIVING_UP = 3
_STOP_GRACE = 5.0  # seconds a stopping worker gets before terminate, then kill
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "unknown exit status"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = {
            signal.SIGKILL: " (an outside kill, or the kernel's OOM killer)",
            signal.SIGSEGV: " (a segmentation fault in native code)",
            signal.SIGBUS: " (a bus error: often a shared-memory file that ran out of space)",
            signal.SIGABRT: " (an abort in native code)",
        }.get(-code, "")  # type: ignore[call-overload]
        return f"killed by {name}{hint}"
    if code == EXIT_ORPHANED:
        return "exited because its owner process died"
    return f"exited with code {code} (os._exit or sys.exit in the task?)"


class _Proc:
    """The parent's record of one worker process (all fields under the pool lock)."""

    __slots__ = (
        "inflight",
        "init_error",
        "kill_reason",
        "pid",
        "process",
        "reaped",
        "replaced",
        "res_head",
        "restarts",
        "retiring",
        "sent",
        "slot",
        "spare",
        "stall_reported",
        "tail",
    )

    def __init__(self, slot: int, process: Any, restarts: int) -> None:
        self.slot = slot
        self.process = process
        self.pid: int = process.pid
        self.inflight: deque[_Task] = deque()  # pushed, result not yet collected; in order
        self.tail = 0  # tasks pushed (mirror of W_TASK_TAIL)
        self.res_head = 0  # results consumed (mirror of W_RES_HEAD)
        self.retiring = False  # restart()/shutdown: no new tasks, exit once drained
        self.restarts = restarts
        self.sent = 0  # tasks ever pushed (max_tasks_per_child)
        self.reaped = False
        self.replaced = False  # reaped, and the supervisor starts another in its place
        self.stall_reported = False
        self.kill_reason: str | None = None  # why the supervisor killed it, if it did
        self.init_error: BaseException | None = None
        # Started by restart() beside the worker it is to replace, which keeps running
        # until this one is ready: should it fail to start, it is not replaced (nor
        # counted towards giving up); restart() raises instead.
        self.spare = False


class Supervision(Pool):
    """``ProcessPool``'s supervision, shutdown, restart and health (it subclasses this)."""

    if TYPE_CHECKING:  # set and defined by ProcessPool
        _procs: dict[int, _Proc]
        _dispatchable: list[_Proc] | None
        _words: np.ndarray
        _rings: Rings
        _ctrl: SharedArray
        _force: bool
        _broken: BaseException | None
        _stop_collector: bool
        _stall_timeout: float | None
        _replace_stalled: bool
        _collector: threading.Thread
        _supervisor: threading.Thread
        _finalizer: weakref.finalize[..., Any]
        _wake_r: int
        _wake_w: int
        _restarts: list[int]
        _free: list[int]
        _init_failures: int
        _last_init_error: BaseException | None
        _nslots: int

        def _collect_locked(
            self, p: _Proc, out: list[tuple[_Task, int, bytes, int, int]]
        ) -> None: ...
        def _collect_all(self) -> bool: ...
        def _deliver(self, batch: list[tuple[_Task, int, bytes, int, int]]) -> None: ...
        def _dispatch_locked(self) -> None: ...
        def _start_worker_locked(self, spare: bool = False) -> _Proc: ...
        def _wake_supervisor(self) -> None: ...
        def _close_wake_pipe(self) -> None: ...
        def _purge_cancelled_locked(self) -> None: ...

    # --- supervision ----------------------------------------------------------------------
    def _supervise_once(self) -> tuple[dict[int, _Proc], float | None] | None:
        """The supervisor's round: the live workers (by exit sentinel) and the seconds
        until the next check is due, for it to wait on; None: tear the pool down."""
        with self._lock:
            live = {p.process.sentinel: p for p in self._procs.values() if not p.reaped}
            if self._state == DRAINING:
                self._purge_cancelled_locked()
            finished = self._state == DRAINING and self._outstanding == 0
        if finished or self._force:
            return None
        return live, self._checks(time.monotonic_ns())

    def _on_ready(self, ready: list[Any], live: dict[int, _Proc]) -> None:
        for r in ready:
            if r == self._wake_r:
                os.read(self._wake_r, 4096)
            else:
                self._on_exit(live[r])

    def _checks(self, now: int) -> float | None:
        """Task deadlines, stalled heartbeats and backlog; returns seconds until the
        next check is due (None: nothing to watch)."""
        due: list[float] = []
        kill: list[tuple[_Proc, str]] = []
        words = self._words
        with self._lock:
            for p in self._procs.values():
                if p.reaped or p.kill_reason is not None:
                    continue
                rec = Rings.rec(p.slot)
                if p.inflight and p.inflight[0].timeout is not None:
                    task = p.inflight[0]
                    assert task.timeout is not None
                    if at.load(words, rec + L.W_CURRENT) == task.seq:
                        started = at.load(words, rec + L.W_STARTED_NS)
                        left = task.timeout - (now - started) / 1e9
                        if left <= 0:
                            task.timed_out = True
                            kill.append((p, "timeout"))
                            continue
                        due.append(left)
                    else:
                        due.append(task.timeout)
                if self._stall_timeout is not None:
                    age = (now - at.load(words, rec + L.W_HEARTBEAT_NS)) / 1e9
                    if age > self._stall_timeout:
                        if not p.stall_reported:
                            p.stall_reported = True
                            _log.warning(
                                "shmcompute worker %d (pid %d) stalled: no heartbeat for "
                                "%.1f s (stuck holding the GIL, or stopped)%s",
                                p.slot,
                                p.pid,
                                age,
                                "; replacing it" if self._replace_stalled else "",
                            )
                        if self._replace_stalled:
                            kill.append((p, f"its heartbeat stalled for {age:.1f} s"))
                            continue
                    else:
                        p.stall_reported = False
                    due.append(self._stall_timeout / 2)
            if self._state == DRAINING:
                for p in self._procs.values():
                    if not p.retiring and not p.inflight:
                        pass  # idle workers are stopped together at teardown
        for p, reason in kill:
            with self._lock:
                p.kill_reason = reason
            try:
                p.process.kill()
            except Exception:  # pragma: no cover - already gone
                pass
        backlog = self._check_backlog(now)
        if backlog is not None:
            due.append(backlog)
        return max(0.001, min(due)) if due else None

    def _on_exit(self, p: _Proc) -> None:
        p.process.join(5)
        code = p.process.exitcode
        out: list[tuple[_Task, int, bytes, int, int]] = []
        crashed: _Task | None = None
        with self._lock:
            if p.reaped:
                return
            p.reaped = True
            self._collect_locked(p, out)
            rec = Rings.rec(p.slot)
            state = at.load(self._words, rec + L.W_STATE)
            current = at.load(self._words, rec + L.W_CURRENT)
            requeue = []
            for task in p.inflight:
                if task.seq == current and crashed is None:
                    crashed = task
                else:
                    requeue.append(task)  # never started: run it elsewhere
            p.inflight.clear()
            for task in reversed(requeue):
                task.worker = -1
                self._queue.appendleft(task)
            del self._procs[p.slot]
            self._dispatchable = None
            self._restarts[p.slot] += 1
            self._free.append(p.slot)
            # A worker that dies before it is ready (its initializer raised, or the main
            # module exits when a worker imports it) counts towards giving up: replacing
            # it forever would only spin.
            died_starting = state in (L.WS_EMPTY, L.WS_STARTING) and not p.retiring
            if died_starting and p.init_error is None and code != EXIT_ORPHANED:
                p.init_error = WorkerCrashedError(
                    f"worker process {p.pid} {_exit_reason(code)} while starting, before it "
                    "could run a task. If the main module is a script, guard its top-level "
                    "code with `if __name__ == '__main__':` (workers import it)",
                    pid=p.pid,
                    exitcode=code,
                )
            init_failed = state == L.WS_INIT_FAILED or code == EXIT_INIT_FAILED or died_starting
            expected = p.retiring or (state == L.WS_EXITING and code == 0)
            # A restart()'s new worker that failed to start replaced no one: the old
            # worker still runs, and restart() reports the failure.
            spare_failed = init_failed and p.spare
            if init_failed and not spare_failed:
                self._init_failures += 1
                self._last_init_error = p.init_error
            elif state in (L.WS_IDLE, L.WS_BUSY, L.WS_EXITING):
                self._init_failures = 0
            give_up = init_failed and self._init_failures >= _INIT_FAILURES_BEFORE_GIVING_UP
            replace = (
                not p.retiring
                and not spare_failed
                and not give_up
                and (self._state == RUNNING or (self._state == DRAINING and self._outstanding > 0))
            )
            p.replaced = replace
            failed_queue: list[_Task] = []
            if give_up:
                failed_queue = list(self._queue)
                self._queue.clear()
        self._deliver(out)
        if crashed is not None:
            self._on_crash(p, crashed, code)
        elif not expected and not init_failed:
            _log.warning(
                "shmcompute worker %d (pid %d) %s while idle; replacing it",
                p.slot,
                p.pid,
                _exit_reason(code),
            )
        if failed_queue:
            cause = self._last_init_error
            for task in failed_queue:
                what = (
                    f"the pool's initializer {_describe(self._initializer)} failed"
                    if self._initializer is not None
                    else "worker processes died while starting"
                )
                err = InitializerError(
                    f"{what} in {_INIT_FAILURES_BEFORE_GIVING_UP} workers in a row, so "
                    f"{task.describe()} could not run; the last failure is attached. The "
                    "pool tries again when new tasks arrive"
                )
                err.__cause__ = cause
                self._finish(task, False, err)
            with self._lock:
                self._init_failures = 0  # new submits get fresh attempts
        with self._lock:
            if replace or (
                self._queue and self._state != CLOSED and not self._force and not self._procs
            ):
                self._start_worker_locked()
            self._dispatch_locked()

    def _on_crash(self, p: _Proc, task: _Task, code: int | None) -> None:
        if task.timed_out:
            err: BaseException = TaskTimeoutError(
                f"{task.describe()} ran past its timeout of {task.timeout:g} s; its worker "
                f"(pid {p.pid}) was killed and replaced"
            )
        else:
            reason = _exit_reason(code)
            if p.kill_reason is not None:
                reason = f"was killed because {p.kill_reason}"
            err = WorkerCrashedError(
                f"worker process {p.pid} {reason} while running {task.describe()}; the "
                "worker was replaced and the pool is still usable (pass retries=n to "
                "re-run such tasks)",
                pid=p.pid,
                exitcode=code,
                task=task.describe(),
            )
        if task.spill is not None and (task.timed_out or task.retries == 0):
            release_spill(task)
        self._crashed(task, err)

    # --- shutdown -------------------------------------------------------------------------
    def _begin_shutdown(self) -> None:
        self._wake_supervisor()  # (nothing, once the pool is closed: shutdown() again)

    def _on_drained(self) -> None:
        if self._state == DRAINING:
            self._wake_supervisor()

    def _join(self, timeout: float | None) -> None:
        me = threading.current_thread()
        if me is self._supervisor:
            return
        if me is self._collector:
            # A done-callback run by the collector: the drain needs this very thread to
            # collect the results still out, so waiting here deadlocked. Raise, as the
            # thread backend and ThreadPoolExecutor do; the shutdown has begun.
            raise RuntimeError(
                "shutdown(wait=True) was called from one of the pool's own threads (a "
                "done-callback the pool's collector ran), and cannot wait for the pool: "
                "it would wait for itself. The shutdown has begun and the pool finishes "
                "its work in the background; call shutdown(wait=False) there, or wait "
                "from another thread"
            )
        self._supervisor.join(timeout)
        if self._supervisor.is_alive():
            self._force = True
            self._wake_supervisor()
            self._supervisor.join(_STOP_GRACE * 2 + 5)

    def _teardown(self) -> None:
        force = self._force
        with self._lock:
            # No new tasks from here on: a forced teardown (the pool broke while running)
            # comes in RUNNING, and a task submitted after the leftovers below are taken
            # would never resolve.
            if self._state == RUNNING:
                self._set_state(DRAINING)
            procs = list(self._procs.values())
            for p in procs:
                p.retiring = True
                self._dispatchable = None
        words = self._words
        _stop_workers(procs, words, 0 if force else _STOP_GRACE)
        # Collect what finished, then fail what never will (only after a forced stop).
        self._collect_all()
        with self._lock:
            leftover = [t for p in procs for t in p.inflight] + list(self._queue)
            self._queue.clear()
            for p in procs:
                p.inflight.clear()
            self._procs.clear()
        for task in leftover:
            if task.spill is not None:
                release_spill(task)
            why = (
                "shutdown(timeout=...) ran out of time and terminated the workers"
                if self._broken is None
                else "the pool terminated itself after collecting results failed "
                f"({self._broken!r}; see the shmcompute.pool log)"
            )
            self._finish(
                task, False, PoolTerminatedError(f"{task.describe()} did not finish: {why}")
            )
        self._stop_collector = True
        at.add(words, L.PC_RESULT_SEQ, 1)
        at.notify(words, L.PC_RESULT_SEQ)
        self._collector.join(10.0)
        with self._lock:
            self._set_state(CLOSED)
        self._run_close_callbacks()
        # Before the pipe closes: once this thread lets go of the pool, its finalizer
        # would write a wake-up into a closed pipe's fd (see _on_drop).
        self._finalizer.detach()
        self._close_wake_pipe()
        del words
        # Late readers (stats, a racing submit) see an all-zero block, not a dead mapping.
        self._words = np.zeros(L.PC_HEADER_WORDS + self._nslots * L.W_WORDS, np.int64)
        self._rings = None  # type: ignore[assignment]
        self._ctrl.unlink()
        self._ctrl.close()

    # --- restart, health --------------------------------------------------------------
    def restart(self, timeout: float | None = 60.0) -> None:
        timeout = _check_timeout("timeout", timeout)
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._state != RUNNING:
                raise RuntimeError("cannot restart a pool after shutdown")
            old = [p for p in self._procs.values() if not p.retiring]
        for p in old:
            new = self._start_replacement(p, end)
            if new is None:
                continue  # it died meanwhile, and the supervisor replaced it
            try:
                self._wait_ready(new, end)
            except BaseException:
                # The old worker keeps running; the new one must not stay on as an
                # extra worker holding the spare slot (the next restart() found no slot).
                self._retire(new)
                raise
            with self._lock:
                # The old worker died meanwhile and the supervisor replaced it: the new
                # one is one too many (it would hold the spare slot for good). Decided
                # and retired under one hold of the lock: a worker that dies once it is
                # retiring is not replaced.
                surplus = p.reaped and p.replaced
                # (the old one's queued tasks stay: it drains its ring before it exits)
                self._retire(new if surplus else p)
            if surplus:
                continue
            p.process.join(None if end is None else max(0.0, end - time.monotonic()))
            if p.process.is_alive():
                raise TimeoutError(
                    f"restart(): worker {p.pid} did not finish its tasks within the "
                    "timeout; it takes no new tasks and exits once they are done"
                )
            # The supervisor saw its sentinel, or will: either way wait for the slot.
            while not p.reaped:
                self._on_exit(p)

    def _start_replacement(self, p: _Proc, end: float | None) -> _Proc | None:
        """Start the worker that replaces ``p`` (None if ``p`` is gone already).

        The pool has one spare slot, for the worker starting while the one it replaces
        drains. A worker retired by an earlier ``restart()`` that did not finish in time
        holds it until its task is done: wait for that one to exit, within this
        restart's time.
        """
        while True:
            with self._lock:
                if p.reaped:
                    return None
                if self._free:
                    return self._start_worker_locked(spare=True)
                retiring = [q for q in self._procs.values() if q.retiring and not q.reaped]
            if not retiring:
                raise RuntimeError(
                    "restart(): no worker slot is free; restart() is already running in "
                    "another thread: let it finish first"
                )
            q = retiring[0]
            q.process.join(None if end is None else max(0.0, end - time.monotonic()))
            if q.process.is_alive():
                raise TimeoutError(
                    f"restart(): worker {q.pid}, retired by an earlier restart() that did "
                    "not finish in time, is still finishing its task, and a new worker "
                    "needs the slot it holds; call restart() again once that task is done, "
                    "or with a longer timeout"
                )
            while not q.reaped:
                self._on_exit(q)

    def _retire(self, p: _Proc) -> None:
        """Dispatch no more tasks to ``p`` and tell it to exit once its ring is empty."""
        with self._lock:
            if p.reaped:
                return  # gone: its slot may hold a new worker already, leave it be
            p.retiring = True
            self._dispatchable = None
            rec = Rings.rec(p.slot)
            at.store(self._words, rec + L.W_STOP, 1)
            at.add(self._words, rec + L.W_DOORBELL, 1)
            at.notify(self._words, rec + L.W_DOORBELL)
            self._dispatch_locked()

    def _wait_ready(self, p: _Proc, end: float | None) -> None:
        idx = Rings.rec(p.slot) + L.W_STATE
        while True:
            # Whether it died, before its state: a worker whose initializer fails stores
            # WS_INIT_FAILED and exits, and read the other way round, that state could
            # be missed and the failure reported as a death.
            died = p.reaped or not p.process.is_alive()
            state = at.load(self._words, idx)
            if state not in (L.WS_EMPTY, L.WS_STARTING):
                if state == L.WS_INIT_FAILED:
                    # Its error went to the result ring before that state: collect it
                    # (the collector may not have yet), or the cause would be missing.
                    self._collect_all()
                    raise InitializerError(
                        "restart(): a new worker's initializer failed; the old workers keep running"
                    ) from p.init_error
                with self._lock:
                    # Ready: it takes tasks (queued ones at once), and from now on an
                    # exit is a worker's like any other.
                    p.spare = False
                    self._dispatchable = None
                    self._dispatch_locked()
                return
            if died:
                raise WorkerCrashedError(
                    f"restart(): new worker {p.pid} died while starting "
                    f"({_exit_reason(p.process.exitcode)})",
                    pid=p.pid,
                    exitcode=p.process.exitcode,
                )
            left = 1.0 if end is None else end - time.monotonic()
            if left <= 0:
                raise TimeoutError("restart(): a new worker did not become ready in time")
            at.wait(self._words, idx, state, min(left, 0.1))

    def _health(self) -> list[WorkerHealth]:
        now = time.monotonic_ns()
        words = self._words
        out = []
        with self._lock:
            procs = [p for p in self._procs.values() if not p.reaped]
            if self._state == CLOSED:
                procs = []
            for p in procs:
                rec = Rings.rec(p.slot)
                state = at.load(words, rec + L.W_STATE)
                current = at.load(words, rec + L.W_CURRENT)
                age = (now - at.load(words, rec + L.W_HEARTBEAT_NS)) / 1e9
                out.append(
                    WorkerHealth(
                        index=p.slot,
                        pid=p.pid,
                        state=_STATE_NAMES.get(state, "unknown"),
                        tasks_done=at.load(words, rec + L.W_DONE),
                        errors=at.load(words, rec + L.W_ERRORS),
                        restarts=p.restarts,
                        task_age=(now - at.load(words, rec + L.W_STARTED_NS)) / 1e9
                        if current >= 0
                        else None,
                        rss=_rss(p.pid),
                        heartbeat_age=age,
                        stalled=self._stall_timeout is not None and age > self._stall_timeout,
                    )
                )
        return out


def _supervise(ref: weakref.ReferenceType[Supervision], remains: _Remains) -> None:
    """The supervisor thread. It holds the pool only while it acts on it, never while
    it waits: a pool dropped without ``shutdown()`` can then be collected, and its
    finalizer (``_on_drop``) wakes this thread, which releases what the pool left."""
    pool = ref()
    try:
        while pool is not None:
            step = pool._supervise_once()
            if step is None:
                break
            live, timeout = step
            wake_r = pool._wake_r
            pool = None
            # (live holds the workers' records, and through their tasks in flight the
            # pool: a busy pool stays alive)
            ready = mp.connection.wait([wake_r, *live], timeout)
            pool = ref()
            if pool is not None:
                pool._on_ready(ready, live)
    except BaseException:  # pragma: no cover - a bug here must not hang the pool
        _log.exception("shmcompute pool supervisor failed; terminating the pool")
        pool = ref()
        if pool is not None:
            pool._force = True
    if pool is not None:
        pool._teardown()
    else:
        remains.release()


def _on_drop(wake_w: int) -> None:
    """A pool's finalizer: it was dropped without ``shutdown()``. Wake its supervisor,
    which releases the rest (here, in whichever thread let go of the pool last, it must
    not wait: that may be the supervisor itself). The pipe is still open: the teardown,
    which closes it, detaches this finalizer first."""
    try:
        os.write(wake_w, b"x")
    except OSError:
        pass  # the pipe is full: a wake-up is already pending


class _Remains:
    """What a pool's supervisor thread holds besides a weak reference to the pool: what
    it releases should the pool be dropped without ``shutdown()``. Holding the worker
    table and the queue also keeps the pool alive while a task is outstanding (through
    the task's future), so a dropped pool finishes its work first, as
    ``ProcessPoolExecutor`` does, and is then released with its workers idle."""

    __slots__ = ("close_callbacks", "collector", "ctrl", "procs", "queue", "wake")

    def __init__(
        self,
        procs: dict[int, _Proc],
        queue: deque[_Task],
        ctrl: SharedArray,
        close_callbacks: list[Callable[[], Any]],
        wake: tuple[int, int],
        collector: threading.Thread,
    ) -> None:
        self.procs = procs
        self.queue = queue
        self.ctrl = ctrl
        self.close_callbacks = close_callbacks
        self.wake = wake
        self.collector = collector

    def release(self) -> None:
        """The teardown of a pool that no longer exists (no task is outstanding)."""
        procs = list(self.procs.values())
        self.procs.clear()
        words = self.ctrl.array
        _stop_workers(procs, words, _STOP_GRACE)
        at.add(words, L.PC_RESULT_SEQ, 1)  # the collector finds its pool gone and returns
        at.notify(words, L.PC_RESULT_SEQ)
        del words
        self.collector.join(10.0)
        callbacks = list(self.close_callbacks)
        self.close_callbacks.clear()
        for cb in callbacks:
            try:
                cb()
            except Exception:  # pragma: no cover - a release must not stop the others
                _log.exception("shmcompute pool: a close callback failed")
        for fd in self.wake:
            os.close(fd)
        self.ctrl.unlink()
        self.ctrl.close()


def _stop_workers(procs: list[_Proc], words: np.ndarray, grace: float) -> None:
    """Tell the workers to stop; after ``grace`` seconds terminate, then kill, those
    still running; reap them all."""
    for p in procs:
        rec = Rings.rec(p.slot)
        at.store(words, rec + L.W_STOP, 1)
        at.add(words, rec + L.W_DOORBELL, 1)
        at.notify(words, rec + L.W_DOORBELL)
    deadline = time.monotonic() + grace
    for p in procs:
        p.process.join(max(0.0, deadline - time.monotonic()))
    for sig in ("terminate", "kill"):
        alive = [p for p in procs if p.process.is_alive()]
        if not alive:
            break
        for p in alive:
            getattr(p.process, sig)()
        end = time.monotonic() + 1.0
        for p in alive:
            p.process.join(max(0.0, end - time.monotonic()))
    for p in procs:
        p.process.join(1.0)
        p.process.close() if p.process.exitcode is not None else None


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None
