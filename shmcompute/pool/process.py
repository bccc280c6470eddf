"""The process backend: supervised worker processes fed through shared memory.

::

    caller threads                  parent threads                  worker processes
    --------------                  --------------                  ----------------
    submit(fn, *a)                                                  (forkserver children,
      pickle (fn, a, k)                                              numpy+numba preloaded)
      lock: queue.append ---------> dispatch: push to the least
            dispatch                 loaded worker's task ring --->  worker.main: pop, run,
                                     (<= prefetch outstanding)        push result
    future.result()                                                    |
      spin <=100 us on that  <------------------------------------------+ result ring
      worker's result tail,          collector thread: waits on
      collect it yourself            RESULT_SEQ, collects every ring,
                                     resolves futures, refills rings
                                    supervisor thread: waits on the
                                     workers' sentinels; replaces the
                                     dead, kills the overdue and the
                                     stalled, reports backlogs, and
                                     tears the pool down after drain

Who knows what: the parent's ``_Proc.inflight`` lists the tasks pushed to a worker in
order; results come back in the same order. When a worker dies, results it published
are delivered, the task named by its ``W_CURRENT`` (started, no result) crashed, and
the rest never started: they go back to the front of the queue. So a crash costs
exactly one task (or none, with ``retries``).
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _layout as L
from .. import atomics as at
from ..array import SharedArray, _identity
from ..errors import (
    ArgumentError,
    ArgumentTypeError,
    InitializerError,
    PoolTerminatedError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from . import _spin
from ._ring import RemoteTraceback, Rings, load_exception, spill, unspill
from .base import (
    CLOSED,
    DRAINING,
    RUNNING,
    Pool,
    PoolStats,
    WorkerHealth,
    _check_timeout,
    _PrepareFailed,
    _Task,
)
from .base import log as _log
from .sizing import usable_cores
from .worker import EXIT_INIT_FAILED, EXIT_ORPHANED, WorkerSpec
from .worker import main as _worker_main

_PROTOCOL = pickle.HIGHEST_PROTOCOL
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
_PRELOAD = ["numpy", "numba", "shmcompute.atomics", "shmcompute.pool.worker"]


def _forkserver_context() -> Any:
    ctx = mp.get_context("forkserver")
    from multiprocessing import forkserver

    current = list(getattr(forkserver._forkserver, "_preload_modules", ["__main__"]))
    wanted = current + [m for m in _PRELOAD if m not in current]
    if wanted != current:
        ctx.set_forkserver_preload(wanted)  # takes effect if the server is not yet running
    return ctx


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
        "res_head",
        "restarts",
        "retiring",
        "sent",
        "slot",
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
        self.stall_reported = False
        self.kill_reason: str | None = None  # why the supervisor killed it, if it did
        self.init_error: BaseException | None = None


class ProcessPool(Pool):
    """Worker processes behind a ``concurrent.futures.Executor``: a drop-in for
    ``ProcessPoolExecutor`` (same positional arguments and keywords).

    Args:
        max_workers: worker count; default ``pool_size("cpu")`` or ``SHMCOMPUTE_WORKERS``.
        mp_context: a multiprocessing context; default forkserver with numpy, numba and
            shmcompute preloaded (a worker is ready in ~20 ms, not ~300 ms with spawn).
        initializer, initargs: run once in each worker before its first task.
        max_tasks_per_child: replace a worker after this many tasks.
        task_timeout: default per-task run-time limit in seconds (see ``options``).
        retries: default re-runs of a task whose worker crashed.
        heartbeat_interval: seconds between a worker's heartbeats.
        stall_timeout: report a worker whose heartbeat is older than this (its
            interpreter is stuck holding the GIL, or it was stopped); with
            ``replace_stalled=True`` also kill and replace it.
        queue_warn_after: log a warning (or call ``on_queue_backlog(stats)``) when a task
            has waited this long in the queue: the pool is undersized. None: off.
        spin: seconds ``result()`` spins without the GIL before it blocks.
    """

    backend = "process"

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        task_timeout: float | None = None,
        retries: int = 0,
        heartbeat_interval: float = 1.0,
        stall_timeout: float | None = None,
        replace_stalled: bool = False,
        queue_warn_after: float | None = 5.0,
        on_queue_backlog: Callable[[PoolStats], Any] | None = None,
        spin: float = 100e-6,
        backend: str | None = None,
    ) -> None:
        self._init_common(
            max_workers,
            initializer,
            initargs,
            task_timeout=task_timeout,
            retries=retries,
            queue_warn_after=queue_warn_after,
            on_queue_backlog=on_queue_backlog,
        )
        if max_tasks_per_child is not None:
            if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
                raise ArgumentTypeError(
                    f"max_tasks_per_child must be an int or None, got "
                    f"{type(max_tasks_per_child).__name__}"
                )
            if max_tasks_per_child < 1:
                raise ArgumentError(f"max_tasks_per_child must be >= 1, got {max_tasks_per_child}")
        self._max_tasks = max_tasks_per_child or 0
        hb = _check_timeout("heartbeat_interval", heartbeat_interval)
        assert hb is not None
        self._heartbeat = hb
        self._stall_timeout = _check_timeout("stall_timeout", stall_timeout)
        self._replace_stalled = bool(replace_stalled)
        if isinstance(spin, bool) or not isinstance(spin, (int, float)) or not 0 <= spin <= 0.01:
            raise ArgumentError(f"spin must be seconds in [0, 0.01], got {spin!r}")
        self._spin_ns = int(spin * 1e9)
        self._cores = usable_cores()
        if mp_context is None:
            mp_context = _forkserver_context()
        elif not hasattr(mp_context, "Process"):
            raise ArgumentTypeError(
                "mp_context must be a multiprocessing context (multiprocessing.get_context("
                f"'forkserver')), got {type(mp_context).__name__}"
            )
        self._ctx = mp_context

        _spin.warm_up()  # compile/load before any worker needs the cache
        self._nslots = self._max_workers + 1  # one spare: rolling restart overlaps
        self._ctrl = SharedArray.create(L.pool_bytes(self._nslots) // 8, np.int64)
        self._words = self._ctrl.array
        self._words[L.PC_CORES] = self._cores
        self._rings = Rings(self._words, self._nslots)
        self._owner = _identity()
        self._procs: dict[int, _Proc] = {}
        self._dispatchable: list[_Proc] | None = None  # live, not retiring; None: rebuild
        self._heads = np.zeros(self._nslots, np.int64)  # results consumed, per slot
        self._free = list(range(self._nslots - 1, -1, -1))
        self._restarts = [0] * self._nslots
        # Seconds per task (moving average); sets how many tasks a worker's ring may hold.
        # Start by assuming long tasks: one at a time, so queued tasks stay cancellable in
        # the parent until short tasks have been measured. Like ProcessPoolExecutor's
        # call queue, a task pushed to a ring counts as running for Future.cancel().
        self._run_ewma = 10e-3
        self._cap = 2
        self._update_capacity()
        self._init_failures = 0
        self._last_init_error: BaseException | None = None
        self._force = False
        self._stop_collector = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

        try:
            with self._lock:
                for _ in range(self._max_workers):
                    self._start_worker_locked()
        except BaseException:
            self._abort_start()
            raise
        self._collector = threading.Thread(
            target=self._collect_loop, name="shmcompute-collector", daemon=True
        )
        self._supervisor = threading.Thread(
            target=self._supervise, name="shmcompute-supervisor", daemon=True
        )
        self._collector.start()
        self._supervisor.start()
        ref = weakref.ref(self)
        threading._register_atexit(lambda: _shutdown_at_exit(ref))  # type: ignore[attr-defined]

    # --- workers ------------------------------------------------------------------------
    def _start_worker_locked(self) -> _Proc:
        slot = self._free.pop()
        rec = Rings.rec(slot)
        w = self._words
        w[rec : rec + L.W_WORDS] = 0
        w[rec + L.W_CURRENT] = -1
        w[rec + L.W_STATE] = L.WS_STARTING
        w[rec + L.W_HEARTBEAT_NS] = time.monotonic_ns()
        self._heads[slot] = 0
        spec = WorkerSpec(
            handle=self._ctrl.handle,
            nslots=self._nslots,
            slot=slot,
            owner_pid=self._owner[0],
            owner_start=self._owner[1],
            initializer=self._initializer,
            initargs=self._initargs,
            max_tasks=self._max_tasks,
            heartbeat_interval=self._heartbeat,
            spin=self._spin_ns / 1e9,
        )
        process = self._ctx.Process(
            target=_worker_main, args=(spec,), name=f"shmcompute-worker-{slot}"
        )
        try:
            process.start()
        except BaseException:
            self._free.append(slot)
            raise
        proc = _Proc(slot, process, self._restarts[slot])
        self._procs[slot] = proc
        self._dispatchable = None
        self._wake_supervisor()
        return proc

    def _abort_start(self) -> None:
        for p in self._procs.values():
            p.process.kill()
            p.process.join(5)
        self._procs.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._ctrl.unlink()
        self._ctrl.close()

    def _wake_supervisor(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is already pending) or closed

    # --- submit and dispatch ------------------------------------------------------------
    def _prepare(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[bytes, SharedArray | None]:
        # Pickle in the caller's thread, before the lock is taken.
        try:
            payload = pickle.dumps((fn, args, kwargs), protocol=_PROTOCOL)
        except Exception as e:
            e.add_note(f"(while pickling the call {_describe_fn(fn)} to send it to a worker)")
            raise _PrepareFailed(e) from None
        if len(payload) <= L.SLOT_INLINE:
            return payload, None
        seg = spill(payload)
        return pickle.dumps(seg.handle, protocol=_PROTOCOL), seg

    def _unprepare(self, prepared: tuple[bytes, SharedArray | None]) -> None:
        seg = prepared[1]
        if seg is not None:
            seg.unlink()
            seg.close()

    def _submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        retries: int,
    ) -> Any:
        # A burst: every worker's ring is full. This thread collects results itself, so
        # rings refill at once, and while it does, workers skip waking the collector
        # thread: that thread would only take the GIL from us (it gets it every switch
        # interval, 5 ms) while the workers sit idle with their results uncollected.
        if self._state != RUNNING:
            raise RuntimeError("cannot schedule new futures after shutdown")
        words = self._words
        at.add(words, L.PC_SPINNERS, 1)
        try:
            fut = super()._submit(fn, args, kwargs, timeout, retries)
            self._collect_all()
        finally:
            at.sub(words, L.PC_SPINNERS, 1)
        self._collect_all()  # results published while workers skipped the notify
        return fut

    def _enqueue(self, task: _Task, prepared: tuple[bytes, SharedArray | None]) -> None:
        if not self._procs:
            # Every worker failed to start and the pool gave up on the queued tasks:
            # new work gets fresh workers.
            for _ in range(self._max_workers):
                self._start_worker_locked()
        task.payload, task.spill = prepared
        task.args = ()  # the payload holds them; do not keep large arguments alive twice
        task.kwargs = {}
        self._queue.append(task)
        self._dispatch_locked()
        if len(self._queue) == 1 and self._queue_warn_after is not None:
            self._wake_supervisor()  # a backlog starts: it schedules the check

    def _update_capacity(self) -> None:
        # Short tasks: keep several queued in a worker's ring so it never waits for the
        # parent; long ones: one at a time, so a free worker is never stuck behind a busy
        # one's backlog.
        self._cap = max(1, min(L.RING_SLOTS // 2, int(2e-3 / max(self._run_ewma, 1e-6))))

    def _dispatch_locked(self) -> None:
        queue = self._queue
        if not queue:
            return
        procs = self._dispatchable
        if procs is None:  # rebuilt only after the worker set changed
            procs = self._dispatchable = [
                p for p in self._procs.values() if not (p.retiring or p.reaped)
            ]
        cap = self._cap
        # Tiny tasks: pack them onto a worker that is already awake (it spins between
        # tasks), so the others stay asleep and no push pays for a wake-up. Longer
        # tasks: spread to the least loaded worker.
        pack = self._run_ewma < 20e-6
        while queue:
            best = None
            best_n = -1 if pack else cap
            for p in procs:
                n = len(p.inflight)
                if n >= cap or (self._max_tasks and p.sent >= self._max_tasks):
                    continue
                if (n > best_n) if pack else (n < best_n):
                    best, best_n = p, n
            if best is None:
                return
            task = queue.popleft()
            fut = task.future
            if not fut.running() and not fut.set_running_or_notify_cancel():
                self._drop_cancelled_locked(task)  # cancelled while queued
                continue
            self._push_locked(best, task)

    def _purge_cancelled_locked(self) -> None:
        for task in [t for t in self._queue if t.future.cancelled()]:
            self._queue.remove(task)
            self._drop_cancelled_locked(task)

    def _release(self, task: _Task) -> None:
        _release_spill(task)

    def _push_locked(self, p: _Proc, task: _Task) -> None:
        assert task.payload is not None
        flags = L.SF_SPILL if task.spill is not None else 0
        self._rings.write(p.slot, False, p.tail, task.seq, flags, task.payload)
        p.tail += 1
        p.sent += 1
        task.worker = p.slot
        p.inflight.append(task)
        rec = Rings.rec(p.slot)
        # tail, doorbell and wake-up in one compiled call (no system call unless the
        # worker sleeps)
        _spin.publish_task(self._words, rec + L.W_TASK_TAIL, p.tail, rec + L.W_DOORBELL)
        if task.timeout is not None:
            self._wake_supervisor()  # it computes the deadline

    # --- results ------------------------------------------------------------------------
    def _collect_locked(self, p: _Proc, out: list[tuple[_Task, int, bytes, int, int]]) -> None:
        rec = Rings.rec(p.slot)
        tail = at.load(self._words, rec + L.W_RES_TAIL)
        if p.res_head == tail:
            return
        while p.res_head < tail:
            seq, flags, t0, t1, data = self._rings.read(p.slot, True, p.res_head)
            payload = bytes(data)
            del data
            p.res_head += 1
            if flags & L.SF_INIT:
                p.init_error = _load_error(flags, payload)
                continue
            task = p.inflight.popleft()
            assert task.seq == seq, (task.seq, seq)  # invariant: results come in push order
            out.append((task, flags, payload, t0, t1))
            if t1 > t0:
                self._run_ewma += 0.1 * ((t1 - t0) / 1e9 - self._run_ewma)
        self._heads[p.slot] = p.res_head
        self._update_capacity()

    def _collect_all(self) -> bool:
        if not _spin.results_waiting(
            self._words, L.PC_HEADER_WORDS, L.W_WORDS, L.W_RES_TAIL, self._heads
        ):
            return False  # nothing published since we last looked (no lock taken)
        out: list[tuple[_Task, int, bytes, int, int]] = []
        with self._lock:
            for p in self._procs.values():
                self._collect_locked(p, out)
            if out:
                self._dispatch_locked()
        self._deliver(out)
        return bool(out)

    def _deliver(self, batch: list[tuple[_Task, int, bytes, int, int]]) -> None:
        done = []
        for task, flags, payload, t0, t1 in batch:
            if task.spill is not None:
                _release_spill(task)
            try:
                if flags & L.SF_ERROR:
                    ok, value = False, _load_error(flags, payload)
                else:
                    if flags & L.SF_SPILL:
                        payload = unspill(payload)
                    ok, value = True, pickle.loads(payload)
            except Exception as e:
                e.add_note(f"(while unpickling the result of {task.describe()})")
                ok, value = False, e
            if task.timed_out:
                continue  # already failed with TaskTimeoutError
            done.append((task, ok, value, (t0 - task.submitted_ns) / 1e9, (t1 - t0) / 1e9))
        if done:
            self._finish_many(done)

    def _collect_loop(self) -> None:
        words = self._words
        while True:
            seq = at.load(words, L.PC_RESULT_SEQ)
            if self._collect_all():
                continue
            if self._stop_collector:
                return
            at.wait(words, L.PC_RESULT_SEQ, seq, 1.0)

    def _spin_for(self, task: _Task) -> None:
        if self._spin_ns <= 0 or task.worker < 0 or self._state == CLOSED:
            return
        p = self._procs.get(task.worker)
        if p is None:
            return
        # Spin only while a core is free for it: with every core running a task, a
        # spinning caller would take one from a worker and delay the very result it
        # waits for (measured: two short tasks on 2 cores took +0.3 ms).
        words = self._words
        if at.load(words, L.PC_BUSY) >= self._cores:
            return
        idx = Rings.rec(p.slot) + L.W_RES_TAIL
        stop = time.monotonic_ns() + self._spin_ns
        at.add(words, L.PC_SPINNERS, 1)
        try:
            while not task.future.done():
                left = stop - time.monotonic_ns()
                if left <= 0:
                    break
                seen = p.res_head
                if _spin.spin_while_equal(words, idx, seen, left) != seen:
                    self._collect_all()
        finally:
            at.sub(words, L.PC_SPINNERS, 1)
            # Workers skipped the notify while we spun: collect what they published.
            self._collect_all()

    # --- supervision ----------------------------------------------------------------------
    def _supervise(self) -> None:
        try:
            while True:
                with self._lock:
                    live = {p.process.sentinel: p for p in self._procs.values() if not p.reaped}
                    if self._state == DRAINING:
                        self._purge_cancelled_locked()
                    finished = self._state == DRAINING and self._outstanding == 0
                if finished or self._force:
                    break
                timeout = self._checks(time.monotonic_ns())
                ready = mp.connection.wait([self._wake_r, *live], timeout)
                for r in ready:
                    if r == self._wake_r:
                        os.read(self._wake_r, 4096)
                    else:
                        self._on_exit(live[r])
        except BaseException:  # pragma: no cover - a bug here must not hang the pool
            _log.exception("shmcompute pool supervisor failed; terminating the pool")
            self._force = True
        self._teardown()

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
            if init_failed:
                self._init_failures += 1
                self._last_init_error = p.init_error
            elif state in (L.WS_IDLE, L.WS_BUSY, L.WS_EXITING):
                self._init_failures = 0
            give_up = init_failed and self._init_failures >= _INIT_FAILURES_BEFORE_GIVING_UP
            replace = (
                not p.retiring
                and not give_up
                and (self._state == RUNNING or (self._state == DRAINING and self._outstanding > 0))
            )
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
                    f"the pool's initializer {_describe_fn(self._initializer)} failed"
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
            _release_spill(task)
        self._crashed(task, err)

    # --- shutdown -------------------------------------------------------------------------
    def _begin_shutdown(self) -> None:
        self._wake_supervisor()

    def _on_drained(self) -> None:
        if self._state == DRAINING:
            self._wake_supervisor()

    def _join(self, timeout: float | None) -> None:
        if threading.current_thread() is self._supervisor:
            return
        self._supervisor.join(timeout)
        if self._supervisor.is_alive():
            self._force = True
            self._wake_supervisor()
            self._supervisor.join(_STOP_GRACE * 2 + 5)

    def _teardown(self) -> None:
        force = self._force
        with self._lock:
            procs = list(self._procs.values())
            for p in procs:
                p.retiring = True
                self._dispatchable = None
        words = self._words
        for p in procs:
            rec = Rings.rec(p.slot)
            at.store(words, rec + L.W_STOP, 1)
            at.add(words, rec + L.W_DOORBELL, 1)
            at.notify(words, rec + L.W_DOORBELL)
        deadline = time.monotonic() + (0 if force else _STOP_GRACE)
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
                _release_spill(task)
            self._finish(
                task,
                False,
                PoolTerminatedError(
                    f"{task.describe()} did not finish: shutdown(timeout=...) ran out of time and "
                    "terminated the workers"
                ),
            )
        self._stop_collector = True
        at.add(words, L.PC_RESULT_SEQ, 1)
        at.notify(words, L.PC_RESULT_SEQ)
        self._collector.join(10.0)
        with self._lock:
            self._set_state(CLOSED)
        self._run_close_callbacks()
        os.close(self._wake_r)
        os.close(self._wake_w)
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
            with self._lock:
                if p.reaped:
                    continue
                new = self._start_worker_locked()
            self._wait_ready(new, end)
            with self._lock:
                p.retiring = True
                self._dispatchable = None
                # Its queued tasks stay: it drains its ring before it exits.
                rec = Rings.rec(p.slot)
                at.store(self._words, rec + L.W_STOP, 1)
                at.add(self._words, rec + L.W_DOORBELL, 1)
                at.notify(self._words, rec + L.W_DOORBELL)
                self._dispatch_locked()
            p.process.join(None if end is None else max(0.0, end - time.monotonic()))
            if p.process.is_alive():
                raise TimeoutError(
                    f"restart(): worker {p.pid} did not finish its tasks within the timeout"
                )
            # The supervisor saw its sentinel, or will: either way wait for the slot.
            while not p.reaped:
                self._on_exit(p)

    def _wait_ready(self, p: _Proc, end: float | None) -> None:
        idx = Rings.rec(p.slot) + L.W_STATE
        while True:
            state = at.load(self._words, idx)
            if state not in (L.WS_EMPTY, L.WS_STARTING):
                if state == L.WS_INIT_FAILED:
                    raise InitializerError(
                        "restart(): a new worker's initializer failed; the old workers keep running"
                    ) from p.init_error
                return
            if p.reaped or not p.process.is_alive():
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

    def _queued_locked(self) -> int:
        # Tasks waiting in a worker's ring behind its current one count as queued.
        words = self._words
        n = sum(1 for t in self._queue if not t.future.cancelled())
        for p in self._procs.values():
            if p.inflight and not p.reaped:
                cur = at.load(words, Rings.rec(p.slot) + L.W_CURRENT)
                n += len(p.inflight) - (1 if cur == p.inflight[0].seq else 0)
        return n


def _describe_fn(fn: Any) -> str:
    from .base import _describe

    return _describe(fn)


def _release_spill(task: _Task) -> None:
    seg, task.spill = task.spill, None
    if seg is not None:
        seg.unlink()
        seg.close()


def _load_error(flags: int, payload: bytes) -> BaseException:
    if flags & L.SF_SPILL:
        payload = unspill(payload)
    try:
        return load_exception(payload)
    except Exception as e:  # pragma: no cover - the exception type is not importable here
        err = RuntimeError(f"a worker raised an exception that cannot be unpickled here: {e}")
        err.__cause__ = RemoteTraceback(str(e))
        return err


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _shutdown_at_exit(ref: weakref.ReferenceType[ProcessPool]) -> None:
    pool = ref()
    if pool is not None and pool._state != CLOSED:
        pool.shutdown(wait=True, timeout=30.0)
