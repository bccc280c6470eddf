"""The thread backend: worker threads in this process, handed tasks without a queue.

::

    caller                                   worker thread w
    ------                                   ---------------
    submit: lock; w idle? give it the task;  parked in publish_and_park (no GIL):
            else queue it                      sleeps on doorbell w
            ring doorbell w, notify  ------>   wakes, takes the GIL *after* the caller
    result(): spin on done[w] (no GIL)         released it (the caller is spinning
                                               without it), runs the task, resolves
                          <------------------  the future, releases the GIL, and only
    sees done[w] move, takes the free GIL      then bumps done[w] (publish_and_park)

The ordering is the point: a hand-off through a futex-sleeping worker that signals while
it still holds the GIL costs two GIL round trips and was measured 1.6-4.2x slower than
``ThreadPoolExecutor``. A worker that finishes with more work queued takes it at once.
Tasks cannot be killed in a thread: a task past its ``timeout`` fails its future, its
thread is abandoned (it exits when the call returns) and a replacement starts.

Each worker owns a slot of ``TW_WORDS`` words in a page of the pool's private int64
words, which ends with the ``gil`` word. An abandoned thread keeps its slot until its
call returns (it still bumps its ``done`` word then); when hung calls hold every slot,
the pool adds a page instead of refusing to replace a worker.

Lifetime, as ``ThreadPoolExecutor``: the threads hold the pool only weakly while they
wait, so a pool its owner drops is collected, and its finalizer wakes them to exit; at
interpreter exit, before daemon threads are cut off, every pool runs its queued and
running tasks to completion (``_drain_at_exit``).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import _base as _fb
from typing import Any

import numpy as np

from ..errors import (
    ArgumentError,
    ArgumentTypeError,
    InitializerError,
    PoolTerminatedError,
    TaskTimeoutError,
)
from . import _spin
from ._task import (
    PoolStats,
    WorkerHealth,
    _check_spin,
    _describe,
    _Task,
)
from .base import CLOSED, DRAINING, RUNNING, Pool, _resolve
from .base import log as _log

# Per-worker words in a page of the pool's private int64 words (one cache line each).
TW_BELL = 0  # bumped (and notified) when the worker is given a task or told to exit
TW_DONE = 1  # tasks finished, bumped after the worker released the GIL
TW_WORDS = 8
_INIT_FAILURES_BEFORE_GIVING_UP = 3
_PARK_TIMEOUT = 60.0  # parked workers re-check their state at least this often
_HANDOFF_NS = 30_000  # a woken worker waits this long at most for the caller's GIL


class _Worker:
    """One worker thread (fields under the pool lock)."""

    __slots__ = (
        "abandoned",
        "assigned",
        "base",
        "done",
        "errors",
        "exited",
        "idle",
        "index",
        "ready",
        "restarts",
        "retiring",
        "spare",
        "started_ns",
        "task",
        "thread",
        "words",
    )

    def __init__(self, index: int, restarts: int, words: np.ndarray, base: int) -> None:
        self.index = index
        self.words = words  # the page holding its slot
        self.base = base  # its slot's first word in that page
        self.thread: threading.Thread | None = None
        self.task: _Task | None = None  # given to it, not yet finished
        self.assigned = 0  # tasks given to it; task.target = this count
        self.idle = False  # in the pool's idle list (parked or about to park)
        self.retiring = False  # exit when idle (restart, shutdown)
        self.abandoned = False  # its task timed out; exit when the call returns
        # Started by restart() beside the worker it is to replace, which keeps running
        # until this one is ready: should its initializer fail, it is not replaced (nor
        # counted towards giving up); restart() raises instead.
        self.spare = False
        self.restarts = restarts
        self.done = 0
        self.errors = 0
        self.started_ns = 0
        self.ready = threading.Event()  # initializer done (or failed)
        self.exited = False


class ThreadPool(Pool):
    """Worker threads behind a ``concurrent.futures.Executor``: a drop-in for
    ``ThreadPoolExecutor`` (same positional arguments and keywords). Suits nogil Numba
    kernels and other GIL-releasing code; see ``ProcessPool`` for the shared options.

    A thread cannot be killed. A task past its ``timeout`` fails with
    ``TaskTimeoutError`` and a new thread takes its worker's place; when
    ``shutdown(timeout=...)`` runs out, queued and running tasks fail with
    ``PoolTerminatedError`` and the pool closes, as on the process backend. In both
    cases a running call goes on in the background until it returns, and its result is
    discarded.

    As with ``ThreadPoolExecutor``, tasks still queued or running at interpreter exit
    run to completion (those of timed-out tasks are not waited for), and a pool dropped
    without ``shutdown()`` lets its threads exit once its work is done.
    """

    backend = "thread"

    def __init__(
        self,
        max_workers: int | None = None,
        thread_name_prefix: str = "",
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        task_timeout: float | None = None,
        retries: int = 0,
        queue_warn_after: float | None = 5.0,
        on_queue_backlog: Callable[[PoolStats], Any] | None = None,
        spin: float = 100e-6,
        mp_context: Any = None,
        max_tasks_per_child: int | None = None,
        backend: str | None = None,
    ) -> None:
        for name, value in (
            ("mp_context", mp_context),
            ("max_tasks_per_child", max_tasks_per_child),
        ):
            if value is not None:
                raise ArgumentError(
                    f"{name} applies to the process backend only; drop it, or use "
                    "Pool(backend='process')"
                )
        self._init_common(
            max_workers,
            initializer,
            initargs,
            task_timeout=task_timeout,
            retries=retries,
            queue_warn_after=queue_warn_after,
            on_queue_backlog=on_queue_backlog,
        )
        if not isinstance(thread_name_prefix, str):
            raise ArgumentTypeError(
                f"thread_name_prefix must be a str, got {type(thread_name_prefix).__name__}"
            )
        self._spin_ns = _check_spin(spin)
        self._prefix = thread_name_prefix or f"shmcompute-thread-{id(self):x}"
        _spin.warm_up()
        # Slots per page: room for replacements of abandoned and retiring workers. Indices
        # are reused; slot i lives in page i // capacity, for good (_slot).
        self._capacity = 2 * self._max_workers + 2
        self._words = np.zeros(self._capacity * TW_WORDS + TW_WORDS, np.int64)  # page 0
        self._pages = [self._words]
        # The same offset in every page: bumped by callers entering a nogil spin on a
        # worker of that page (the worker they woke waits for it; see publish_and_park).
        self._gil_i = self._capacity * TW_WORDS
        self._workers: dict[int, _Worker] = {}
        self._free = list(range(self._capacity - 1, -1, -1))
        self._restarts = [0] * self._capacity
        self._idle: list[_Worker] = []
        self._init_failures = 0
        self._last_init_error: BaseException | None = None
        self._wake = threading.Condition(self._lock)  # wakes the supervisor (_poke_locked)
        self._own = threading.local()  # .mine: True in this pool's own threads (_join)
        self._pokes = 0
        # The threads hold only this: a dropped pool is collected, and the finalizer
        # (which must not hold the pool either) wakes them to exit and runs the close
        # callbacks (a transform team's threads end there). It takes the callback list
        # itself: base.py replaces that list only when the pool closes, and _closed
        # detaches the finalizer first.
        self._ref = weakref.ref(self)
        self._finalizer = weakref.finalize(
            self, _dropped, self._pages, self._capacity, self._wake, self._close_callbacks
        )
        self._finalizer.atexit = False  # at exit, _drain_at_exit has closed the pool
        with self._lock:
            for _ in range(self._max_workers):
                self._start_worker_locked()
        self._supervisor = threading.Thread(
            target=_supervise,
            args=(self._ref, self._wake),
            name=f"{self._prefix}-supervisor",
            daemon=True,
        )
        self._supervisor.start()
        with _live_lock:
            _live.add(self)

    # --- workers ------------------------------------------------------------------------
    def _slot(self, index: int) -> tuple[np.ndarray, int]:
        """The page holding worker slot ``index`` and the slot's first word in it."""
        page, local = divmod(index, self._capacity)
        return self._pages[page], local * TW_WORDS

    def _add_page_locked(self) -> None:
        # Every slot is held, by live and retiring workers and by abandoned threads whose
        # timed-out calls have not returned. A hung call may never return: refusing to
        # replace its worker (this raised, and killed the supervisor) broke the pool for
        # good, so the table grows instead, by one page of fresh slots.
        n = len(self._pages)
        self._pages.append(np.zeros_like(self._words))
        cap = self._capacity
        self._free = list(range((n + 1) * cap - 1, n * cap - 1, -1))  # lowest pops first
        self._restarts.extend([0] * cap)
        abandoned = sum(1 for w in self._workers.values() if w.abandoned)
        _log.warning(
            "shmcompute thread pool: %d threads whose tasks timed out are still running "
            "(their calls have not returned); it now keeps room for %d worker threads",
            abandoned,
            (n + 1) * cap,
        )

    def _start_worker_locked(self, spare: bool = False) -> _Worker:
        if not self._free:
            self._add_page_locked()
        index = self._free.pop()
        words, base = self._slot(index)
        words[base : base + TW_WORDS] = 0
        wk = _Worker(index, self._restarts[index], words, base)
        wk.spare = spare
        wk.thread = threading.Thread(
            target=_work, args=(self._ref, wk), name=f"{self._prefix}_{index}", daemon=True
        )
        self._workers[index] = wk
        wk.thread.start()
        return wk

    def _live_locked(self) -> list[_Worker]:
        return [w for w in self._workers.values() if not (w.abandoned or w.retiring)]

    def _next_task_locked(self, wk: _Worker) -> _Task | None:
        while self._queue:
            task = self._queue.popleft()
            if self._assign_locked(wk, task):
                return task
        return None

    def _assign_locked(self, wk: _Worker, task: _Task) -> bool:
        fut = task.future
        # (A requeued task's future is running already. Read without the future's lock,
        # which set_running_or_notify_cancel takes: this thread is the only one that
        # moves a pending future of this pool to running, under the pool lock.)
        if fut._state != _fb.RUNNING and not fut.set_running_or_notify_cancel():
            self._drop_cancelled_locked(task)
            return False
        wk.assigned += 1
        task.target = wk.assigned
        task.worker = wk.index
        task.started_ns = time.monotonic_ns()
        wk.task = task
        wk.started_ns = task.started_ns
        if task.timeout is not None:
            self._poke_locked()
        return True

    def _run_task(self, wk: _Worker, task: _Task) -> None:
        if task.resolved:
            # It failed before this worker got to it (given to it while it slept, then
            # shutdown(timeout=...) ran out, or its own timeout passed): never run it
            # late. (A plain read: resolved just after it, the call runs and its result
            # is discarded, as for any task that fails while running.)
            with self._lock:
                wk.task = None
            return
        t0 = time.monotonic_ns()
        try:
            value = task.fn(*task.args, **task.kwargs)
            ok = True
        except BaseException as e:
            value, ok = e, False
        t1 = time.monotonic_ns()
        with self._lock:  # (the worker's counts and the pool's, in one acquisition)
            wk.task = None
            wk.done += 1
            if not ok:
                wk.errors += 1
            counted = self._count_finished_locked(
                task, ok, (t0 - task.submitted_ns) / 1e9, (t1 - t0) / 1e9
            )
        task.args = ()
        task.kwargs = {}
        if counted:
            _resolve(task.future, ok, value)
        # Break the cycles a finished task leaves (its future refers to it, and a
        # failure's traceback to this frame), as ThreadPoolExecutor's work items do: the
        # future refers to the pool, and a pool its owner dropped is then freed as soon
        # as its worker parks, not at the garbage collector's next pass. (A caller reads
        # future._task only to spin while the future is running.)
        task.future._task = None
        task = value = None  # type: ignore[assignment]
        # A failure's traceback holds this frame, and so its locals: without this the
        # exception a caller keeps (in a future) would keep the pool alive.
        del self, wk

    def _worker_init_failed(self, wk: _Worker, error: BaseException) -> None:
        failed: list[_Task] = []
        with self._lock:
            self._last_init_error = error
            give_up = False
            if not wk.spare:
                self._init_failures += 1
                give_up = self._init_failures >= _INIT_FAILURES_BEFORE_GIVING_UP
                if give_up:
                    failed = list(self._queue)
                    self._queue.clear()
                    self._init_failures = 0
            wk.retiring = True
            # (A restart()'s new worker replaced no one: the old one still runs.)
            self._worker_exited_locked(wk, replace=not (give_up or wk.spare))
        wk.ready.set()
        for task in failed:
            err = InitializerError(
                f"the pool's initializer {_describe(self._initializer)} failed in "
                f"{_INIT_FAILURES_BEFORE_GIVING_UP} workers in a row, so {task.describe()} "
                "could not run; the last failure is attached. The pool tries again when "
                "new tasks arrive"
            )
            err.__cause__ = error
            self._finish(task, False, err)

    def _worker_exited_locked(self, wk: _Worker, replace: bool = False) -> None:
        wk.exited = True
        if wk.idle:
            wk.idle = False
            self._idle.remove(wk)
        if self._workers.get(wk.index) is wk:
            del self._workers[wk.index]
            self._restarts[wk.index] += 1
            self._free.append(wk.index)
        if replace and self._state != CLOSED:
            self._start_worker_locked()
        self._poke_locked()

    # --- submit ------------------------------------------------------------------------
    def _enqueue(self, task: _Task, prepared: Any) -> None:
        while self._idle:
            wk = self._idle.pop()
            wk.idle = False
            if wk.retiring or wk.abandoned or wk.exited:
                continue
            if self._assign_locked(wk, task):
                # Ring after assigning: the worker re-checks wk.task under the lock.
                _spin.ring(wk.words, wk.base + TW_BELL)
            return
        if not self._live_locked():
            # Every worker is gone (the initializer kept failing): try afresh. (The new
            # workers take the task from the queue.)
            for _ in range(self._max_workers):
                self._start_worker_locked()
        self._queue.append(task)
        if len(self._queue) == 1 and self._queue_warn_after is not None:
            self._poke_locked()  # a backlog starts: the supervisor schedules the check

    def _spin_for(self, task: _Task) -> None:
        index = task.worker
        if self._spin_ns <= 0 or index < 0:
            return
        if index < self._capacity:  # page 0: always, unless hung calls added pages
            words, base = self._words, index * TW_WORDS
        else:
            words, base = self._slot(index)
        _spin.spin_until_at_least(words, base + TW_DONE, task.target, self._spin_ns, self._gil_i)

    # --- supervision: timeouts, backlog, shutdown -----------------------------------------
    def _supervise_step(self) -> float | None:
        """One look, with the lock held (dropped while it checks the backlog and fails a
        timed-out task): abandon overdue tasks, report a backlog. Returns seconds until
        the next look is due (0: at once), or None once there is nothing left to watch."""
        if self._state == CLOSED or (self._state == DRAINING and self._outstanding == 0):
            return None
        pokes = self._pokes
        now = time.monotonic_ns()
        due = []
        for wk in list(self._workers.values()):
            task = wk.task
            if task is None or task.timeout is None or wk.abandoned:
                continue
            left = task.timeout - (now - task.started_ns) / 1e9
            if left > 0:
                due.append(left)
                continue
            self._abandon_locked(wk, task)
        self._lock.release()
        try:
            backlog = self._check_backlog(now)
        finally:
            self._lock.acquire()
        if backlog is not None:
            due.append(backlog)
        if self._state == CLOSED or (self._state == DRAINING and self._outstanding == 0):
            return None
        if self._pokes != pokes:  # something changed while the lock was free
            return 0.0
        return max(0.001, min(due)) if due else 60.0

    def _supervisor_failed(self, error: BaseException) -> None:
        # A bug in the supervisor must not leave futures that never resolve and a
        # shutdown that waits for them forever (a failure to replace a worker once
        # killed it and left the pool that way): end the pool, failing what is left.
        _log.error(
            "shmcompute thread pool: its supervisor failed; closing the pool",
            exc_info=error,
        )
        self._terminate(f"the pool's supervisor thread failed ({error!r}; see the log)")

    def _abandon_locked(self, wk: _Worker, task: _Task) -> None:
        wk.abandoned = True
        task.timed_out = True
        if wk.idle:  # pragma: no cover - a worker with a task is never idle
            wk.idle = False
            self._idle.remove(wk)
        # The thread keeps its index until it exits; a new worker takes another. (Not
        # for a retiring worker: restart() has put its successor in place already.)
        if self._state != CLOSED and not wk.retiring:
            self._start_worker_locked()
        err = TaskTimeoutError(
            f"{task.describe()} ran past its timeout of {task.timeout:g} s; a thread cannot "
            "be stopped, so it runs on until the call returns (its result is discarded) and "
            "a new worker thread took its place"
        )
        self._lock.release()
        try:
            self._finish(task, False, err)
        finally:
            self._lock.acquire()

    def _close(self) -> None:
        """After the drain: closed (a second call does nothing)."""
        with self._lock:
            if self._state == CLOSED:
                return
            self._set_state(CLOSED)
        self._closed()

    def _closed(self) -> None:
        """Just closed: run the close callbacks and tell every worker to exit once its
        task is done (each exits at once if idle)."""
        self._finalizer.detach()  # (its work is done here)
        self._run_close_callbacks()
        with self._lock:
            for wk in self._workers.values():
                wk.retiring = True
                _spin.ring(wk.words, wk.base + TW_BELL)
            self._poke_locked()  # the supervisor, if it still runs, exits
        with _live_lock:
            _live.discard(self)

    def _terminate(self, why: str) -> None:
        """Close the pool now: fail every queued and running task with
        ``PoolTerminatedError`` (saying ``why``). A running thread cannot be stopped: its
        call runs on in the background, its result is discarded, and the thread exits
        when it returns."""
        failed: list[_Task] = []
        with self._lock:
            # Closed first: whoever sees a task fail with PoolTerminatedError sees a closed
            # pool. (No new task can arrive, and workers take none from the empty queue.)
            closing = self._state != CLOSED
            if closing:
                self._set_state(CLOSED)
            for task in self._queue:
                if task.future.cancelled():
                    self._drop_cancelled_locked(task)
                else:
                    failed.append(task)
            self._queue.clear()
            failed += [w.task for w in self._workers.values() if w.task is not None]
        for task in failed:  # (one already resolved, by its worker or a timeout, is skipped)
            self._finish(
                task, False, PoolTerminatedError(f"{task.describe()} did not finish: {why}")
            )
        if closing:
            self._closed()

    def _on_drained(self) -> None:
        if self._state == DRAINING:
            self._poke_locked()

    def _begin_shutdown(self) -> None:
        with self._lock:
            self._purge_cancelled_locked()
            self._poke_locked()

    def _poke_locked(self) -> None:
        """Make the supervisor look again. It drops the lock while it checks the backlog,
        and a notify sent then would be lost (a task's timeout missed by up to a minute),
        so it also compares this count before it waits."""
        self._pokes += 1
        self._wake.notify_all()

    def _purge_cancelled_locked(self) -> None:
        for task in [t for t in self._queue if t.future.cancelled()]:
            self._queue.remove(task)
            self._drop_cancelled_locked(task)

    def _join(self, timeout: float | None) -> None:
        if getattr(self._own, "mine", False):
            # A task, or a done-callback run by a worker or the supervisor, would wait
            # for its own thread: the rest of the work needs that worker, the drain
            # needs the supervisor, and the pool deadlocked. Raise, as the stdlib does
            # (ThreadPoolExecutor's join says "cannot join current thread"), rather than
            # return without waiting: the caller asked to wait and must not believe the
            # work is done; code written for ThreadPoolExecutor sees the same error, and
            # as there the shutdown has begun (no new tasks; the work still finishes).
            raise RuntimeError(
                "shutdown(wait=True) was called from one of the pool's own threads (in a "
                "task, or a done-callback the pool ran), and cannot wait for the pool: "
                "it would wait for itself. The shutdown has begun and the pool finishes "
                "its work in the background; call shutdown(wait=False) there, or wait "
                "from another thread"
            )
        self._wait_closed(timeout, abandoned=True)

    def _wait_closed(self, timeout: float | None, abandoned: bool) -> None:
        """Wait (bounded by ``timeout``) for the drain, then for the threads; those of
        timed-out tasks only if ``abandoned``."""
        end = None if timeout is None else time.monotonic() + timeout
        me = threading.current_thread()
        self._supervisor.join(timeout)
        if self._supervisor.is_alive():  # (join(None) returns only once it exited)
            # Out of time. As on the process backend, what is unfinished fails now
            # with PoolTerminatedError and the pool closes: queued tasks never run.
            # Unlike there, a running call cannot be stopped: it runs on in the
            # background and its result is discarded.
            self._terminate(f"shutdown(timeout={timeout}) ran out of time")
        with self._lock:
            threads = [
                (w, w.thread)
                for w in self._workers.values()
                if w.thread is not None and w.thread is not me and (abandoned or not w.abandoned)
            ]
        for _, t in threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
        with self._lock:
            running = [w for w, t in threads if t.is_alive() and w.task is not None]
        if running and end is not None:
            _log.warning(
                "shmcompute thread pool: shutdown(timeout=%s) expired with %d calls still "
                "running; threads cannot be killed, they finish in the background (their "
                "results are discarded)",
                timeout,
                len(running),
            )

    # --- restart, health ----------------------------------------------------------------
    def restart(self, timeout: float | None = 60.0) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._state != RUNNING:
                raise RuntimeError("cannot restart a pool after shutdown")
            old = self._live_locked()
        for wk in old:
            with self._lock:
                new = self._start_worker_locked(spare=True)
            if not new.ready.wait(None if end is None else max(0.0, end - time.monotonic())):
                with self._lock:
                    # The old worker keeps running; the new one must not stay on beside
                    # it as an extra worker: it exits once ready, or now if it became
                    # ready and parked just as this wait timed out (the ring wakes it).
                    new.retiring = True
                    _spin.ring(new.words, new.base + TW_BELL)
                raise TimeoutError("restart(): a new worker thread did not become ready")
            with self._lock:
                if new.exited:
                    raise InitializerError(
                        "restart(): a new worker's initializer failed; the old workers keep running"
                    ) from self._last_init_error
                if wk.abandoned:
                    # The old worker was abandoned meanwhile (a task past its timeout)
                    # and replaced: the new one is one too many, unless that replacement
                    # has gone since. The abandoned thread is not waited for.
                    if len(self._live_locked()) > self._max_workers:
                        new.retiring = True
                        _spin.ring(new.words, new.base + TW_BELL)
                    continue
                wk.retiring = True
                if wk.idle:
                    wk.idle = False
                    self._idle.remove(wk)
                _spin.ring(wk.words, wk.base + TW_BELL)
                # Work queued meanwhile goes to the new worker.
                if self._queue and new.idle:
                    self._idle.remove(new)
                    new.idle = False
                    task = self._next_task_locked(new)
                    if task is not None:
                        _spin.ring(new.words, new.base + TW_BELL)
            assert wk.thread is not None
            wk.thread.join(None if end is None else max(0.0, end - time.monotonic()))
            if wk.thread.is_alive():
                raise TimeoutError("restart(): an old worker did not finish its task in time")

    def _health(self) -> list[WorkerHealth]:
        now = time.monotonic_ns()
        with self._lock:
            if self._state == CLOSED:
                return []
            return [
                WorkerHealth(
                    index=wk.index,
                    pid=None,
                    state="busy"
                    if wk.task is not None
                    else ("idle" if wk.ready.is_set() else "starting"),
                    tasks_done=wk.done,
                    errors=wk.errors,
                    restarts=wk.restarts,
                    task_age=(now - wk.started_ns) / 1e9 if wk.task is not None else None,
                    rss=None,
                    heartbeat_age=None,
                    stalled=False,
                )
                for wk in self._workers.values()
                if not wk.abandoned
            ]


# --- the threads: they hold the pool weakly while they wait --------------------------------
def _work(ref: weakref.ref[ThreadPool], wk: _Worker) -> None:
    """A worker thread's life. Parked, it holds no reference to the pool (nor to a task,
    whose future refers to it): a pool its owner dropped is collected, and its finalizer
    rings this worker's bell; the worker then finds the pool gone and exits."""
    pool = ref()
    if pool is None:  # pragma: no cover - the pool holds itself alive while it starts us
        return
    pool._own.mine = True
    words = wk.words
    bell_i = wk.base + TW_BELL
    done_i = wk.base + TW_DONE
    gil_i = pool._gil_i
    if pool._initializer is not None:
        try:
            pool._initializer(*pool._initargs)
        except BaseException as e:
            pool._worker_init_failed(wk, e)
            return
    with pool._lock:
        pool._init_failures = 0
    wk.ready.set()
    publish = -1  # TW_DONE index to bump once the GIL is released, or -1
    while True:
        with pool._lock:
            task = wk.task
            if task is None and not (wk.retiring or wk.abandoned):
                task = pool._next_task_locked(wk)
            if task is None:
                if wk.retiring or wk.abandoned or pool._state == CLOSED:
                    break
                if not wk.idle:
                    wk.idle = True
                    pool._idle.append(wk)
                bell = int(words[bell_i])
        if task is None:
            # (If this was the last reference, the finalizer has run, in this thread, and
            # moved the bell: the park below returns at once. Run by another thread, it
            # moves the bell that was read under the lock: the same.)
            del pool
            # Release the GIL, then publish the finished task, then sleep.
            _spin.publish_and_park(words, publish, bell_i, bell, _PARK_TIMEOUT, gil_i, _HANDOFF_NS)
            publish = -1
            pool = ref()
            if pool is None:
                return  # dropped by its owner and collected
            continue
        if publish >= 0:
            _spin.publish_and_park(words, publish, bell_i, -1, 0.0, gil_i, 0)
            publish = -1
        pool._run_task(wk, task)
        publish = done_i
    if publish >= 0:
        _spin.publish_and_park(words, publish, bell_i, -1, 0.0, gil_i, 0)
    with pool._lock:
        pool._worker_exited_locked(wk)


def _supervise(ref: weakref.ref[ThreadPool], wake: threading.Condition) -> None:
    """The supervisor thread's life (``ThreadPool._supervise_step``). It holds the pool
    only while it looks, not while it waits; the finalizer of a dropped pool wakes it."""
    pool = ref()
    if pool is None:  # pragma: no cover - the pool holds itself alive while it starts us
        return
    pool._own.mine = True
    failure = None
    with wake:  # the pool's lock
        while True:
            try:
                wait_s = pool._supervise_step()
            except BaseException as e:
                failure = e
                break
            if wait_s is None:
                break
            if wait_s > 0:
                # (If this was the last reference, the finalizer ran here, under the
                # lock, which is re-entrant; it found no one waiting, hence the look
                # below. Run by another thread, it takes the lock, so it notifies only
                # once this thread waits.)
                del pool
                if ref() is None:
                    return
                wake.wait(wait_s)
                pool = ref()
                if pool is None:
                    return  # dropped by its owner and collected
    # Without the lock: both end in futures resolving, and so in user callbacks.
    if failure is not None:
        pool._supervisor_failed(failure)
    else:
        pool._close()


def _dropped(
    pages: list[np.ndarray],
    capacity: int,
    wake: threading.Condition,
    callbacks: list[Callable[[], Any]],
) -> None:
    """A pool was collected without shutdown(): wake its threads so they exit (each
    finds the pool gone), and run its close callbacks. Rings every slot's bell: a free
    slot's is reset at its next start. (It may run in the supervisor, holding the pool's
    lock: the close callbacks are shmcompute's own, and none takes that lock.)"""
    for words in pages:
        for i in range(capacity):
            _spin.ring(words, i * TW_WORDS + TW_BELL)
    with wake:
        wake.notify_all()
    for cb in callbacks:
        try:
            cb()
        except Exception:  # pragma: no cover - a release must not stop the others
            _log.exception("shmcompute thread pool: a close callback failed")


# Pools not yet closed, for the exit hook (weakly: the hook must not keep them alive).
# The lock: a set must not change while the hook copies it (a pool closing in another
# thread); entries of collected pools leave by themselves, safely during a copy.
_live: weakref.WeakSet[ThreadPool] = weakref.WeakSet()
_live_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # The child has none of the parent's threads: its pools are not the child's to
    # drain at exit (their threads are gone), and the lock may have been held by one of
    # those threads at the fork, for ever in the child (its exit hook would hang).
    global _live_lock
    _live_lock = threading.Lock()
    _live.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _drain_at_exit() -> None:
    """At interpreter exit, before daemon threads are cut off, let every pool finish its
    queued and running tasks, as ``ThreadPoolExecutor`` does; threads whose tasks timed
    out are not waited for (their tasks failed already, and their calls may never
    return)."""
    with _live_lock:
        pools = list(_live)
    for pool in pools:  # all drain at once
        pool.shutdown(wait=False)
    for pool in pools:
        pool._wait_closed(None, abandoned=False)


try:
    # Runs before the interpreter joins non-daemon threads; ThreadPoolExecutor's own
    # exit hook is registered the same way.
    threading._register_atexit(_drain_at_exit)  # type: ignore[attr-defined]
except RuntimeError:  # pragma: no cover - imported while the interpreter exits
    pass
