"""The task record, the future, the statistics records and the argument checks that the
pool base and both backends share (see ``base.py`` for how a task flows)."""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import _base as _fb
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ArgumentError, ArgumentTypeError

if TYPE_CHECKING:
    from .base import Pool

T = TypeVar("T")


def _describe(fn: Any) -> str:
    if isinstance(fn, _Partial):
        return repr(fn)
    mod = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    return f"{mod}.{name}" if mod else str(name)


class _Task:
    """One submitted call; lives from submit until its future resolves."""

    __slots__ = (
        "args",
        "fn",
        "future",
        "kwargs",
        "payload",
        "resolved",
        "retries",
        "seq",
        "spill",
        "spread",
        "started_ns",
        "submitted_ns",
        "target",
        "timed_out",
        "timeout",
        "worker",
    )

    def __init__(
        self,
        seq: int,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        future: TaskFuture[Any],
        timeout: float | None,
        retries: int,
    ) -> None:
        self.seq = seq
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.future = future
        self.timeout = timeout
        self.retries = retries  # attempts left after a crash
        self.submitted_ns = time.monotonic_ns()
        self.started_ns = 0  # set when a worker is known to have started it
        self.worker = -1  # worker slot it was dispatched to, -1 while queued
        self.payload: bytes | None = None  # process backend: pickled (fn, args, kwargs)
        self.spill: Any = None  # process backend: SharedArray holding a large payload
        self.timed_out = False
        self.target = 0  # thread backend: the worker's done-count that means "finished"
        self.resolved = False  # set once, under the pool lock, by whoever resolves it
        self.spread = False  # process backend: never packed onto a busy worker (see below)

    def describe(self) -> str:
        return f"task #{self.seq} {_describe(self.fn)}"


_FUTURE_FIELDS = {"_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks"}
# Our futures set Future's fields themselves (see TaskFuture.__init__); if this Python's
# Future has others, fall back to its own __init__.
_LIGHT_INIT = set(vars(Future())) == _FUTURE_FIELDS


class TaskFuture(Future[T]):
    """A ``concurrent.futures.Future`` whose ``result()`` first spins briefly without
    the GIL, so a short task's result is picked up within microseconds.

    All futures of a pool share one condition variable instead of one each: a burst of
    10,000 tasks otherwise leaves 20,000 more long-lived objects (a Condition and its
    deque per future) for the garbage collector's full passes, which was most of the
    parent's cost per task. ``result()`` and ``exception()`` re-check their own state
    after every wake-up, so a notify meant for another future is harmless.
    """

    _pool: Pool | None = None
    _task: _Task | None = None

    def __init__(self, condition: threading.Condition | None = None) -> None:
        if condition is None or not _LIGHT_INIT:
            super().__init__()
            if condition is not None:
                self._condition = condition
            return
        self._condition = condition
        self._state = _fb.PENDING
        self._result = None
        self._exception = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Callable[[Future[T]], object]] = []

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        self._pool = self._task = None  # (as _resolve: a kept future keeps no pool)
        return True

    def _wait_finished(self, timeout: float | None) -> None:
        """Block until finished or cancelled (raises CancelledError, TimeoutError)."""
        pool, task = self._pool, self._task
        if pool is not None and task is not None and self._state == _fb.RUNNING:
            pool._spin_for(task)
        end = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while True:
                if self._state in (_fb.CANCELLED, _fb.CANCELLED_AND_NOTIFIED):
                    raise _fb.CancelledError()
                if self._state == _fb.FINISHED:
                    return
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError()
                self._condition.wait(left)

    def result(self, timeout: float | None = None) -> T:
        try:
            self._wait_finished(timeout)
            if self._exception is not None:
                raise self._exception
            return self._result  # type: ignore[return-value]
        finally:
            self = None  # type: ignore[assignment]  # break a cycle with the traceback

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait_finished(timeout)
        return self._exception


@dataclass(frozen=True, slots=True)
class WorkerHealth:
    """One worker, as seen now. Times in seconds; ``None`` where it does not apply."""

    index: int
    pid: int | None  # None for a thread worker
    state: str  # "starting", "idle", "busy", "exiting"
    tasks_done: int
    errors: int
    restarts: int  # how many workers this slot had before this one
    task_age: float | None  # how long the current task has run
    rss: int | None  # resident memory in bytes (process workers)
    heartbeat_age: float | None  # since the worker's last heartbeat (process workers)
    stalled: bool  # heartbeat older than the pool's stall_timeout


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of the pool, read from counters without pausing any worker.

    ``wait_*`` is submit-to-start and ``run_*`` start-to-finish, in seconds, over the
    last 4,096 finished tasks (``nan`` before the first).
    """

    backend: str
    state: str
    total: int
    idle: int
    busy: int
    queued: int
    completed: int
    failed: int
    crashed: int
    restarts: int
    wait_p50: float
    wait_p99: float
    run_p50: float
    run_p99: float
    workers: tuple[WorkerHealth, ...]


START_STEP = 1.1


class _Latencies:
    """The last ``size`` submit-to-start (``wait``) and start-to-finish (``run``) times,
    and ``start``: the typical submit-to-start time, a running median (``add``)."""

    def __init__(self, size: int = 4096, start: float = 20e-6) -> None:
        self.wait: collections.deque[float] = collections.deque(maxlen=size)
        self.run: collections.deque[float] = collections.deque(maxlen=size)
        self.start = start

    def add(self, wait_s: float, run_s: float) -> None:
        self.wait.append(wait_s)
        self.run.append(run_s)
        # Each sample moves ``start`` by START_STEP towards its side, so it settles where
        # half the samples lie above and half below. Not a mean: a task queued behind a
        # busy worker (one still mapping a new array's pages, say) starts milliseconds
        # late, and a mean pulled up by a few of those made transforms, which size their
        # helper count by it, use fewer workers than they should (measured on 16 cores:
        # 16M-element ``y = 2.5x + 1`` jobs on 2-16 process workers ran on one or two of
        # them, 27-31 ms at any worker count; 4.2 ms at 16 with the median).
        self.start = self.start * START_STEP if wait_s > self.start else self.start / START_STEP

    @staticmethod
    def pct(values: collections.deque[float], q: float) -> float:
        if not values:
            return float("nan")
        s = sorted(values)
        return s[min(len(s) - 1, int(q * len(s)))]


def _check_timeout(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{name} must be seconds (a number) or None, got {value!r}")
    if not value > 0:
        raise ArgumentError(f"{name} must be > 0 seconds or None, got {value!r}")
    return float(value)


def _check_spin(value: Any) -> int:
    """The ``spin`` argument (seconds) as nanoseconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 0.01:
        raise ArgumentError(f"spin must be seconds in [0, 0.01], got {value!r}")
    return int(value * 1e9)


def _check_chunksize(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"chunksize must be an int, got {type(value).__name__}")
    if value < 1:
        raise ArgumentError(f"chunksize must be >= 1, got {value}")
    return value


def _check_retries(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"retries must be an int, got {type(value).__name__}")
    if value < 0:
        raise ArgumentError(f"retries must be >= 0, got {value}")
    return value


def _run_chunk(fn: Callable[..., T], chunk: list[tuple[Any, ...]]) -> list[T]:
    return [fn(*args) for args in chunk]


def _chunks(iterables: tuple[Iterable[Any], ...], size: int) -> Iterator[list[tuple[Any, ...]]]:
    it = zip(*iterables, strict=False)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _chain(results: Iterator[list[T]]) -> Iterator[T]:
    for part in results:
        yield from part


class _PrepareFailed(Exception):
    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _Partial:
    """``functools.partial(_run_chunk, fn)`` that pickles by reference to this module."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, chunk: list[tuple[Any, ...]]) -> list[Any]:
        return _run_chunk(self.fn, chunk)

    def __repr__(self) -> str:
        return f"map({_describe(self.fn)})"


def _deadline(timeout: float | None) -> float | None:
    """``timeout`` seconds from now, as a ``time.monotonic()`` value (None: no limit)."""
    return None if timeout is None else time.monotonic() + timeout


def _results_in_order(futures: list[Future[T]], end: float | None) -> Iterator[T]:
    """``Executor.map``'s result iterator: the results in order, all by ``end`` (from
    ``_deadline``, taken before the tasks were submitted, as the stdlib does: a deadline
    taken here would start only at the first ``next()``). Every future whose result is
    not taken is cancelled, the one that timed out included (the stdlib's
    ``_result_or_cancel``: one popped before the ``finally`` below used to run anyway)."""
    try:
        futures.reverse()
        while futures:
            yield _result_or_cancel(futures.pop(), end)
    finally:
        for f in futures:
            f.cancel()


def _result_or_cancel(f: Future[T], end: float | None) -> T:
    try:
        return f.result(None if end is None else end - time.monotonic())
    finally:
        f.cancel()  # (a no-op once it finished)
