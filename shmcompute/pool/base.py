"""What both backends share: the Executor API, the task record, lifecycle, stats.

A backend (``thread.py``, ``process.py``) supplies how tasks reach workers and how
results come back; everything a caller sees is decided here, once:

* ``submit``/``map``/``run``/``options`` build a :class:`_Task` and hand it to the
  backend's ``_enqueue``; ``map`` with ``chunksize > 1`` batches calls like the stdlib.
* Results, errors, crashes and timeouts all end in :meth:`Pool._finish` /
  :meth:`Pool._crashed`, which apply ``retries``, count, and resolve the future.
* One lock (``self._lock``) guards the queue, the worker table and the lifecycle; user
  code (future callbacks, unpickling results) never runs while it is held.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, InvalidStateError
from typing import Any, ClassVar, TypeVar

from ..errors import ArgumentError, ArgumentTypeError
from ._task import (
    PoolStats,
    TaskFuture,
    WorkerHealth,
    _chain,
    _check_chunksize,
    _check_retries,
    _check_timeout,
    _chunks,
    _deadline,
    _Latencies,
    _Partial,
    _PrepareFailed,
    _results_in_order,
    _Task,
)
from .sizing import resolve_max_workers

T = TypeVar("T")
log = logging.getLogger("shmcompute.pool")

# Lifecycle, changed only under Pool._lock by Pool._set_state.
RUNNING = "running"  # accepting tasks
DRAINING = "draining"  # shutdown() called: no new tasks; queued and running ones finish
CLOSED = "closed"  # workers gone, resources released

_BACKLOG_DEFAULT = 5.0


class Pool(Executor):
    """A supervised worker pool; a drop-in ``concurrent.futures.Executor``.

    ``Pool(max_workers, backend="process")`` runs tasks in worker processes started from
    a forkserver with numpy and numba preloaded; ``backend="thread"`` in threads of this
    process (for nogil kernels and other GIL-releasing code). Both take the stdlib
    executors' keywords and raise the stdlib's exception types; see ``ProcessPool`` and
    ``ThreadPool`` for the backend-specific options.

    >>> with Pool(2) as pool:
    ...     print(pool.submit(pow, 2, 10).result())
    1024
    """

    backend: ClassVar[str] = ""
    _backends: ClassVar[dict[str, type[Pool]]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.backend:
            Pool._backends[cls.backend] = cls

    def __new__(cls, *args: Any, backend: str | None = None, **kwargs: Any) -> Pool:
        if cls is Pool:
            name = "process" if backend is None else backend
            if name not in Pool._backends:
                raise ArgumentError(f"backend must be 'process' or 'thread', got {backend!r}")
            cls = Pool._backends[name]
        elif backend not in (None, cls.backend):
            raise ArgumentError(
                f"{cls.__name__} is the {cls.backend!r} backend; got backend={backend!r}"
            )
        return super().__new__(cls)

    def _init_common(
        self,
        max_workers: int | None,
        initializer: Callable[..., Any] | None,
        initargs: tuple[Any, ...],
        *,
        task_timeout: float | None,
        retries: int,
        queue_warn_after: float | None,
        on_queue_backlog: Callable[[PoolStats], Any] | None,
    ) -> None:
        self._max_workers = resolve_max_workers(max_workers)
        if initializer is not None and not callable(initializer):
            raise ArgumentTypeError(
                f"initializer must be callable or None, got {type(initializer).__name__}"
            )
        if not isinstance(initargs, tuple):
            raise ArgumentTypeError(f"initargs must be a tuple, got {type(initargs).__name__}")
        if on_queue_backlog is not None and not callable(on_queue_backlog):
            raise ArgumentTypeError("on_queue_backlog must be callable or None")
        self._initializer = initializer
        self._initargs = initargs
        self._task_timeout = _check_timeout("task_timeout", task_timeout)
        self._retries = _check_retries(retries)
        self._queue_warn_after = _check_timeout("queue_warn_after", queue_warn_after)
        self._on_queue_backlog = on_queue_backlog
        self._backlog_reported_ns = 0

        self._lock = threading.RLock()
        self._futures_cond = threading.Condition()  # shared by this pool's futures
        self._state = RUNNING
        self._seq = itertools.count()
        self._queue: collections.deque[_Task] = collections.deque()  # not yet dispatched
        self._outstanding = 0  # tasks submitted and not yet resolved
        self._drained = threading.Condition(self._lock)  # notified when _outstanding == 0
        self._completed = 0
        self._failed = 0
        self._crashes = 0
        # Per worker slot, the workers that have left it (the backend sizes it and adds
        # one as each worker leaves). stats.restarts is their sum: restarts and
        # replacements rotate workers through the slots, so no one slot's count (nor
        # the current workers' counts) says how many the pool replaced.
        self._restarts: list[int] = []
        # Their sum when the pool closed: the workers stopped then were not replaced.
        self._restarts_at_close = 0
        # (._latencies.start: the typical submit-to-start time, what one more worker
        # costs a caller before it helps; transforms size their helper count by it)
        self._latencies = _Latencies()
        self._sigterm_installed = False
        self._close_callbacks: list[Callable[[], Any]] = []

    def _collecting(self) -> contextlib.AbstractContextManager[None]:
        """Around a caller's wait for results it collects itself (a transform's tasks);
        the process backend uses it to keep its collector thread out of the way."""
        return contextlib.nullcontext()

    def _on_close(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` when the pool releases its resources (shutdown)."""
        with self._lock:
            self._close_callbacks.append(callback)

    def _run_close_callbacks(self) -> None:
        with self._lock:
            callbacks, self._close_callbacks = self._close_callbacks, []
        for cb in callbacks:
            try:
                cb()
            except Exception:  # pragma: no cover - a release must not stop the others
                log.exception("shmcompute pool: a close callback failed")

    # --- lifecycle (the only place _state changes) -----------------------------------
    def _set_state(self, state: str) -> None:
        # invariant: RUNNING -> DRAINING -> CLOSED, never backwards
        order = (RUNNING, DRAINING, CLOSED)
        assert order.index(state) >= order.index(self._state), (self._state, state)
        if state == CLOSED and self._state != CLOSED:
            self._restarts_at_close = sum(self._restarts)
        self._state = state

    # --- submitting -------------------------------------------------------------------
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)``; return its future.

        Raises ``RuntimeError`` after ``shutdown()``. An argument that cannot be pickled
        (process backend) fails the future, as with ``ProcessPoolExecutor``.
        """
        return self._submit(fn, args, kwargs, self._task_timeout, self._retries)

    def _submit_spread(
        self, fn: Callable[..., T], /, *args: Any, prepared: Any = None
    ) -> Future[T]:
        """``submit`` for a transform's driver tasks, meant to run at the same time as
        their siblings: the process backend never packs such a task onto a worker that
        already has one, even when recent tasks were tiny. ``prepared``: what
        ``_reusable`` made of this very call before (a job sends the same call again and
        again), or None.

        Never retried by the pool: a driver task re-run from the start after a crash
        would find the chunk its first run was writing claimed, and leave it unwritten.
        The transform re-runs lost chunks itself (its own ``retries``)."""
        return self._submit(fn, args, {}, self._task_timeout, 0, spread=True, prepared=prepared)

    def options(self, *, timeout: float | None = None, retries: int | None = None) -> _Options:
        """Per-task options: ``pool.options(timeout=5, retries=2).submit(fn, x)``.

        ``timeout``: seconds a task may run; past it the task fails with
        ``TaskTimeoutError`` (a ``TimeoutError``) and, on the process backend, its
        worker is killed and replaced. ``retries``: how many times a task whose worker
        crashed is run again before it fails with ``WorkerCrashedError``.
        """
        return _Options(
            self,
            _check_timeout("timeout", timeout) if timeout is not None else self._task_timeout,
            _check_retries(retries) if retries is not None else self._retries,
        )

    def _submit(
        self,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        retries: int,
        spread: bool = False,
        prepared: Any = None,
    ) -> Future[T]:
        if not callable(fn):
            raise ArgumentTypeError(f"fn must be callable, got {type(fn).__name__}")
        if self._state != RUNNING:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if prepared is None:
            try:
                prepared = self._prepare(fn, args, kwargs)
            except _PrepareFailed as e:
                # Like ProcessPoolExecutor: an argument that cannot be sent fails its future.
                with self._lock:
                    self._failed += 1
                failed: TaskFuture[T] = TaskFuture(self._futures_cond)
                failed.set_exception(e.error)
                return failed
        return self._add_task(fn, args, kwargs, timeout, retries, spread, prepared)

    def _add_task(
        self,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        retries: int,
        spread: bool,
        prepared: Any,
    ) -> Future[T]:
        """``_submit``'s second half, once the call is prepared: make the task and hand
        it to the backend's ``_enqueue``, under the lock."""
        future: TaskFuture[T] = TaskFuture(self._futures_cond)
        with self._lock:
            if self._state != RUNNING:
                self._unprepare(prepared)
                raise RuntimeError("cannot schedule new futures after shutdown")
            task = _Task(next(self._seq), fn, args, kwargs, future, timeout, retries)
            task.spread = spread
            future._pool = self
            future._task = task
            self._outstanding += 1
            self._enqueue(task, prepared)
        return future

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """Like ``Executor.map``; ``chunksize > 1`` sends calls in batches (one task each),
        which cuts per-task overhead for many small calls."""
        if _check_chunksize(chunksize) == 1:
            return super().map(fn, *iterables, timeout=timeout)
        batches = super().map(_Partial(fn), _chunks(iterables, chunksize), timeout=timeout)
        return _chain(batches)

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``await pool.run(fn, *args)``: run on the pool without blocking the event loop.
        Cancelling the awaiting task cancels the call if it has not started."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    # --- results (called by backends, without the lock) --------------------------------
    def _finish(
        self,
        task: _Task,
        ok: bool,
        value: Any,
        wait_s: float | None = None,
        run_s: float | None = None,
    ) -> None:
        """Resolve ``task`` with a result (``ok``) or an exception (``value``)."""
        with self._lock:
            counted = self._count_finished_locked(task, ok, wait_s, run_s)
        if counted:
            _resolve(task.future, ok, value)

    def _finish_many(
        self, done: Sequence[tuple[_Task, bool, Any, float | None, float | None]]
    ) -> None:
        """Resolve tasks: ``(task, ok, value, wait_s, run_s)`` each; counters under one
        lock acquisition, futures (and so user callbacks) outside it."""
        with self._lock:
            done = [d for d in done if self._count_finished_locked(d[0], d[1], d[3], d[4])]
        for task, ok, value, _, _ in done:
            _resolve(task.future, ok, value)

    def _count_finished_locked(
        self, task: _Task, ok: bool, wait_s: float | None, run_s: float | None
    ) -> bool:
        """Count a finished task, under the lock; False if it was resolved already (a
        timeout and a late result can race for it: a task is resolved once). The
        caller resolves its future (``_resolve``) after releasing the lock."""
        if task.resolved:
            return False
        task.resolved = True
        if wait_s is not None and run_s is not None:
            self._latencies.add(wait_s, run_s)
        if ok:
            self._completed += 1
        else:
            self._failed += 1
        self._outstanding -= 1
        if self._outstanding == 0:
            self._drained.notify_all()
            self._on_drained()
        return True

    def _crashed(self, task: _Task, error: BaseException) -> bool:
        """The worker running ``task`` died. Requeue it if it has retries left (returns
        True), else fail it with ``error``."""
        with self._lock:
            self._crashes += 1
            if task.retries > 0 and not task.timed_out and self._state != CLOSED:
                task.retries -= 1
                task.worker = -1
                task.started_ns = 0
                self._queue.appendleft(task)
                return True
        self._finish(task, False, error)
        return False

    # --- shutdown ---------------------------------------------------------------------
    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None
    ) -> None:
        """Stop accepting tasks; finish the queued and running ones; release everything.

        ``wait=False`` returns at once (the pool drains in the background).
        ``cancel_futures=True`` cancels queued tasks first. ``timeout`` bounds the wait:
        past it the workers are terminated (then killed), and unfinished tasks fail
        with ``PoolTerminatedError``. Calling it again is harmless.
        """
        timeout = _check_timeout("timeout", timeout)
        cancelled: list[_Task] = []
        with self._lock:
            if self._state == RUNNING:
                self._set_state(DRAINING)
            if cancel_futures:
                while self._queue:
                    cancelled.append(self._queue.popleft())
        for task in cancelled:
            if task.future.cancel():
                with self._lock:
                    self._drop_cancelled_locked(task)
            else:  # pragma: no cover - queued futures are always PENDING
                self._finish(task, False, RuntimeError("cancelled"))
        self._begin_shutdown()
        if wait:
            self._join(timeout)

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)

    def drain_on_sigterm(self, timeout: float | None = None) -> None:
        """Opt in: on SIGTERM, stop accepting tasks, drain (bounded by ``timeout``),
        then let SIGTERM do what it did before (by default: end the process). A second
        SIGTERM during the drain is not delayed.

        Call from the main thread. The handler itself only starts a drain thread, so it
        never blocks the code it interrupted.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("drain_on_sigterm() must be called from the main thread")
        timeout = _check_timeout("timeout", timeout)
        previous = signal.getsignal(signal.SIGTERM)

        def drain_then_exit() -> None:
            try:
                self.shutdown(wait=True, timeout=timeout)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # now handled as before

        def handler(signum: int, frame: Any) -> None:
            # Only the main thread may change handlers, so restore the old one here: a
            # second SIGTERM during the drain acts at once (by default: ends the process).
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            threading.Thread(target=drain_then_exit, name="shmcompute-sigterm-drain").start()

        signal.signal(signal.SIGTERM, handler)
        self._sigterm_installed = True

    # --- introspection ------------------------------------------------------------------
    @property
    def max_workers(self) -> int:
        return self._max_workers

    @property
    def stats(self) -> PoolStats:
        """Live counters: total, idle, busy, queued, completed, failed, latencies and
        per-worker health (see :class:`PoolStats`)."""
        workers = self._health()
        with self._lock:
            lat = self._latencies
            closed = self._state == CLOSED
            return PoolStats(
                backend=self.backend,
                state=self._state,
                total=len(workers),
                idle=sum(1 for w in workers if w.state == "idle"),
                busy=sum(1 for w in workers if w.state == "busy"),
                queued=self._queued_locked(),
                completed=self._completed,
                failed=self._failed,
                crashed=self._crashes,
                restarts=self._restarts_at_close if closed else sum(self._restarts),
                wait_p50=lat.pct(lat.wait, 0.50),
                wait_p99=lat.pct(lat.wait, 0.99),
                run_p50=lat.pct(lat.run, 0.50),
                run_p99=lat.pct(lat.run, 0.99),
                workers=tuple(workers),
            )

    def _check_backlog(self, now_ns: int) -> float | None:
        """Report a backlog if the oldest queued task not cancelled waited longer than
        ``queue_warn_after``; return seconds until the next check is due (None: none)."""
        limit = self._queue_warn_after
        if limit is None:
            return None
        with self._lock:
            queue = self._queue
            # Forget tasks cancelled while queued (dispatch would, later): measured from
            # one of those, a queue with nothing left to run was reported as a backlog.
            while queue and queue[0].future.cancelled():
                self._drop_cancelled_locked(queue.popleft())
            if not queue:
                return None
            waited = (now_ns - queue[0].submitted_ns) / 1e9
            due = waited >= limit and now_ns - self._backlog_reported_ns >= limit * 1e9
            if due:
                self._backlog_reported_ns = now_ns
        if not due:
            return max(0.0, limit - waited) if waited < limit else limit
        stats = self.stats
        if self._on_queue_backlog is not None:
            try:
                self._on_queue_backlog(stats)
            except Exception:
                log.exception("on_queue_backlog callback raised")
        else:
            log.warning(
                "shmcompute pool undersized: %d tasks queued, the oldest for %.1f s, with "
                "%d of %d workers busy; raise max_workers or submit less at once",
                stats.queued,
                waited,
                stats.busy,
                stats.total,
            )
        return limit

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} backend={self.backend!r} state={self._state} "
            f"max_workers={self._max_workers}>"
        )

    # --- backend hooks ------------------------------------------------------------------
    def _prepare(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Turn a call into what the backend sends, before the lock is taken; raise
        :class:`_PrepareFailed` to fail just this call's future."""
        return None

    def _unprepare(self, prepared: Any) -> None:
        """Release what ``_prepare`` made, for a call that was not queued after all."""

    def _reusable(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """What ``_prepare`` makes of ``fn(*args)``, if it can be sent again and again
        (``_submit_spread``'s ``prepared``); None when it cannot, or need not be."""
        return None

    def _enqueue(self, task: _Task, prepared: Any) -> None:  # called with the lock held
        raise NotImplementedError

    def _on_drained(self) -> None:
        """No task is outstanding any more (called with the lock held)."""

    def _release(self, task: _Task) -> None:
        """Free what the backend holds for a task that will not run (lock held)."""

    def _drop_cancelled_locked(self, task: _Task) -> None:
        """Forget a task whose future was cancelled before it ran."""
        if task.resolved:
            return
        task.resolved = True
        self._release(task)
        self._outstanding -= 1
        if self._outstanding == 0:
            self._drained.notify_all()
            self._on_drained()

    def _spin_for(self, task: _Task) -> None:
        """Called by ``TaskFuture.result()`` before it blocks; may spin briefly."""

    def _queued_locked(self) -> int:
        return sum(1 for t in self._queue if not t.future.cancelled())

    def _health(self) -> list[WorkerHealth]:
        raise NotImplementedError

    def _begin_shutdown(self) -> None:
        raise NotImplementedError

    def _join(self, timeout: float | None) -> None:
        raise NotImplementedError

    def restart(self, timeout: float | None = 60.0) -> None:
        """Rolling restart: replace every worker, one at a time, each new one ready
        before the old one retires; no task is lost or failed."""
        raise NotImplementedError


class _Options:
    """``pool.options(...)``: the same submit/map/run with per-task options."""

    __slots__ = ("_pool", "_retries", "_timeout")

    def __init__(self, pool: Pool, timeout: float | None, retries: int) -> None:
        self._pool = pool
        self._timeout = timeout
        self._retries = retries

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return self._pool._submit(fn, args, kwargs, self._timeout, self._retries)

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """``Pool.map`` with these options applied to every task (one per chunk)."""
        chunksize = _check_chunksize(chunksize)
        end = _deadline(timeout)  # from the call, like Executor.map: submitting counts
        if chunksize == 1:
            futures = [self.submit(fn, *args) for args in zip(*iterables, strict=False)]
            return _results_in_order(futures, end)
        batches = [self.submit(_Partial(fn), chunk) for chunk in _chunks(iterables, chunksize)]
        return _chain(_results_in_order(batches, end))


def _resolve(fut: Future[Any], ok: bool, value: Any) -> None:
    """Give a counted task's future its result (``ok``) or exception (``value``)."""
    try:
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
    except InvalidStateError:  # already failed by a timeout, or cancelled
        pass
    # A resolved future needs its pool and task no more (result() spins on them only
    # while the task runs): a future the caller keeps must not keep a pool it dropped,
    # as with the stdlib's executors.
    fut._pool = fut._task = None  # type: ignore[attr-defined]


__all__ = ["Pool", "PoolStats", "TaskFuture", "WorkerHealth"]
