"""Semaphore, Event and Barrier that work across threads and processes.

Each primitive is a few int64 words in a small SharedArray, driven by
:mod:`shmcompute.atomics` (compare-exchange for the fast paths, wait/notify to
block). Pickling one sends its handle; the receiver attaches, as with SharedArray.
The creating process owns the memory, so keep the creator's object alive while
others use it. Every blocking call takes a timeout and has a non-blocking twin;
``statistics()`` returns a frozen snapshot.

Example::

    sem = shc.Semaphore(2)
    pool.submit(worker, sem)           # pickles the handle; the worker attaches
    with sem:                          # acquire/release
        ...
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from . import atomics as at
from .array import SharedArray, SharedArrayHandle
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    BrokenBarrierError,
    ClosedError,
    WouldBlock,
)

__all__ = [
    "Barrier",
    "BarrierStatistics",
    "Event",
    "EventStatistics",
    "Semaphore",
    "SemaphoreStatistics",
]


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    # Any real number, as atomics.wait takes (np.int64, np.float32, Fraction...); a bool
    # is a number to Python but almost surely a mistaken ``blocking`` argument.
    if not isinstance(timeout, numbers.Real) or isinstance(timeout, (bool, np.bool_)):
        raise ArgumentTypeError(f"timeout must be seconds (a number) or None, got {timeout!r}")
    t = float(timeout)
    if not t >= 0:  # also rejects NaN
        raise ArgumentError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
    return time.monotonic() + t


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


@dataclass(frozen=True, slots=True)
class SyncHandle:
    """Picklable handle of a sync primitive: its kind, parameters and memory."""

    kind: str
    array: SharedArrayHandle
    param: int

    def __reduce__(self) -> tuple[Any, ...]:
        return (SyncHandle, (self.kind, self.array, self.param))  # fast: see SharedArrayHandle


class _Shared:
    """Common plumbing: the backing SharedArray, handles, pickling, closing."""

    _kind: ClassVar[str]
    _nslots: ClassVar[int]
    __slots__ = ("_param", "_shared", "_w")
    _param: int
    _shared: SharedArray
    _w: NDArray[np.int64] | None  # the words; None once closed (every use then raises)

    def _init_new(self, param: int) -> None:
        self._shared = SharedArray.create(self._nslots, np.int64)
        self._w = self._shared.array
        self._param = param

    @classmethod
    def attach(cls, handle: SyncHandle) -> Any:
        """Attach to a primitive created elsewhere (what unpickling does)."""
        if not isinstance(handle, SyncHandle) or handle.kind != cls._kind:
            raise ArgumentTypeError(
                f"{cls.__name__}.attach needs a {cls.__name__} handle, got {handle!r}"
            )
        self = object.__new__(cls)
        self._shared = SharedArray.attach(handle.array)
        self._w = self._shared.array
        self._param = handle.param
        return self

    def _words(self) -> NDArray[np.int64]:
        w = self._w
        if w is None:
            # Checked by every operation: the view would keep the memory mapped (and
            # the primitive working) after close(), hiding a use-after-close bug.
            raise ClosedError(
                f"this {type(self).__name__} is closed (close() was called in this "
                "process); keep it open while it is used, or attach its handle again"
            )
        return w

    @property
    def closed(self) -> bool:
        return self._w is None

    @property
    def handle(self) -> SyncHandle:
        self._words()
        return SyncHandle(self._kind, self._shared.handle, self._param)

    def __reduce__(self) -> tuple[Any, tuple[SyncHandle]]:
        return (type(self).attach, (self.handle,))

    def close(self) -> None:
        """Release this object's mapping; the creator's close also frees the memory.

        Idempotent; any other use afterwards raises :class:`ClosedError`. Threads of
        this process already blocked in a wait keep their own reference and finish.
        """
        if self._w is None:
            return
        self._w = None
        if self._shared.owner:
            self._shared.unlink()
        self._shared.close()


@dataclass(frozen=True, slots=True)
class SemaphoreStatistics:
    value: int
    waiters: int


class Semaphore(_Shared):
    """A counting semaphore (like ``threading.Semaphore``) across processes."""

    _kind = "semaphore"
    _nslots = 1
    __slots__ = ()
    _VALUE = 0

    def __init__(self, value: int = 1) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ArgumentTypeError(f"value must be an int, got {type(value).__name__}")
        if value < 0:
            raise ArgumentError(f"value must be >= 0, got {value}")
        self._init_new(0)
        self._words()[self._VALUE] = value

    def _try_acquire(self, w: NDArray[np.int64]) -> bool:
        v = at.load(w, self._VALUE)
        while v > 0:
            seen = at.compare_exchange(w, self._VALUE, v, v - 1)
            if seen == v:
                return True
            v = seen
        return False

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take one unit; True on success, False if non-blocking or timed out."""
        w = self._words()
        if self._try_acquire(w):
            return True
        if not blocking:
            return False
        deadline = _deadline(timeout)
        while True:
            # Sleep only while the value is 0; a release in between makes wait return
            # NOT_EQUAL at once, so no release is missed.
            r = at.wait(w, self._VALUE, 0, _remaining(deadline))
            if self._try_acquire(w):
                return True
            if r == at.TIMED_OUT or (deadline is not None and time.monotonic() >= deadline):
                return False

    def acquire_nowait(self) -> None:
        """Take one unit now or raise :class:`WouldBlock`."""
        if not self._try_acquire(self._words()):
            raise WouldBlock("semaphore value is 0")

    def release(self, n: int = 1) -> None:
        """Return ``n`` units and wake up to ``n`` waiters."""
        w = self._words()
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ArgumentError(f"n must be an int >= 1, got {n!r}")
        at.add(w, self._VALUE, n)
        at.notify(w, self._VALUE, n)

    @property
    def value(self) -> int:
        return at.load(self._words(), self._VALUE)

    def statistics(self) -> SemaphoreStatistics:
        w = self._words()
        return SemaphoreStatistics(at.load(w, self._VALUE), at.waiters(w, self._VALUE))

    def __enter__(self) -> Semaphore:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        if self.closed:
            return "<shmcompute.Semaphore closed>"
        return f"<shmcompute.Semaphore value={self.value}>"


@dataclass(frozen=True, slots=True)
class EventStatistics:
    is_set: bool
    waiters: int


class Event(_Shared):
    """A flag that threads and processes wait for (like ``threading.Event``)."""

    _kind = "event"
    _nslots = 2
    __slots__ = ()
    # _FLAG is 1 while set. _GEN counts set() calls: waiters sleep on it, so a waiter
    # woken by a set() that a clear() already undid still knows it was set, as with
    # threading.Event (whose set() hands each waiter its answer).
    _FLAG = 0
    _GEN = 1

    def __init__(self) -> None:
        self._init_new(0)

    def set(self) -> None:
        w = self._words()
        at.store(w, self._FLAG, 1)
        at.add(w, self._GEN, 1)  # after the flag: a waiter that sees the new gen is done
        at.notify(w, self._GEN)

    def clear(self) -> None:
        at.store(self._words(), self._FLAG, 0)

    def is_set(self) -> bool:
        """The non-blocking twin of :meth:`wait`."""
        return at.load(self._words(), self._FLAG) == 1

    def wait(self, timeout: float | None = None) -> bool:
        """Block until set; True if set (even if cleared again since), False on timeout."""
        w = self._words()
        deadline = _deadline(timeout)
        # The generation is read before the flag: a set() after this read either shows
        # in the flag or moves the generation, so a set(); clear() pulse while we sleep
        # (or before we sleep) still returns True. Waiting on the flag instead, the
        # woken waiter found it cleared and slept again.
        gen = at.load(w, self._GEN)
        while not at.load(w, self._FLAG) and at.load(w, self._GEN) == gen:
            if at.wait(w, self._GEN, gen, _remaining(deadline)) == at.TIMED_OUT:
                break
        return at.load(w, self._FLAG) == 1 or at.load(w, self._GEN) != gen

    def statistics(self) -> EventStatistics:
        w = self._words()
        return EventStatistics(at.load(w, self._FLAG) == 1, at.waiters(w, self._GEN))

    def __repr__(self) -> str:
        if self.closed:
            return "<shmcompute.Event closed>"
        return f"<shmcompute.Event set={self.is_set()}>"


@dataclass(frozen=True, slots=True)
class BarrierStatistics:
    parties: int
    n_waiting: int
    broken: bool
    generation: int


class Barrier(_Shared):
    """A cyclic barrier for ``parties`` threads or processes (like ``threading.Barrier``).

    ``wait`` returns the arrival index (0 .. parties-1; ``parties - 1`` arrived last).
    A timeout, :meth:`abort` or :meth:`reset` breaks the barrier for everyone waiting:
    they raise :class:`BrokenBarrierError`, and so does every later ``wait`` until
    :meth:`reset`. More callers than ``parties`` may wait: the extra ones form the next
    round. As in ``threading.Barrier``, a round starts filling only once every party of
    the previous one has seen it pass (a party killed in between holds the barrier up
    until :meth:`reset`).
    """

    _kind = "barrier"
    _nslots = 1
    __slots__ = ()
    # The whole state is one int64 word, _STATE = gen << 42 | leaving << 21 | count,
    # changed only by compare-exchange, so a party counts itself into exactly the
    # generation it saw. (With the count and the generation in two words, a party that
    # read the generation and then counted itself after that round had passed, or after
    # a reset, passed alone or left its count in the next round.)
    # * gen (21 bits, wrapping) is even while the barrier works and odd once broken. A
    #   pass adds 2, abort adds 1, reset goes from g to the even g + 4 (g + 3 if broken).
    # * count: parties that arrived at this generation (0 <= count < parties).
    # * leaving: parties released by the last pass that have not yet seen it. New parties
    #   wait until it is 0, so a party that arrived at g sees exactly g + 2 iff its round
    #   passed: the next pass cannot happen before it looked, and any other generation
    #   means broken or reset (without this, a third caller of a Barrier(2) could pass
    #   the next round before a released party woke, which then took g + 4 for a break).
    #   A break or reset zeroes it, so a dead leaver cannot block the next round: a
    #   released party that had not looked yet then raises BrokenBarrierError, as it
    #   would in threading.Barrier.
    _STATE = 0
    _MASK = (1 << 21) - 1
    _LEAVING_SHIFT = 21
    _GEN_SHIFT = 42
    _MAX_PARTIES = 1 << 21  # count and leaving stay below it

    def __init__(self, parties: int) -> None:
        if isinstance(parties, bool) or not isinstance(parties, (int, np.integer)):
            raise ArgumentTypeError(f"parties must be an int, got {type(parties).__name__}")
        if not 1 <= parties <= self._MAX_PARTIES:
            raise ArgumentError(f"parties must be >= 1 and <= {self._MAX_PARTIES}, got {parties}")
        self._init_new(int(parties))

    @classmethod
    def _pack(cls, gen: int, leaving: int = 0) -> int:
        """The state at the start of generation ``gen``: nobody arrived yet."""
        return (gen & cls._MASK) << cls._GEN_SHIFT | leaving << cls._LEAVING_SHIFT

    @property
    def parties(self) -> int:
        return self._param

    def wait(self, timeout: float | None = None) -> int:
        """Block until ``parties`` callers have called ``wait``; returns this caller's
        arrival index. Raises :class:`BrokenBarrierError` if the barrier is or gets
        broken (abort, reset, or a timeout here or in another party)."""
        w = self._words()
        deadline = _deadline(timeout)  # checked before arriving: a bad timeout counts nothing
        state = at.load(w, self._STATE)
        while True:  # arrive: count this party into the generation the CAS confirms
            gen, index = state >> self._GEN_SHIFT, state & self._MASK
            if gen & 1:
                raise BrokenBarrierError("the barrier is broken; reset() it first")
            if (state >> self._LEAVING_SHIFT) & self._MASK:
                # The last round's parties are still leaving; the last one notifies.
                if at.wait(w, self._STATE, state, _remaining(deadline)) == at.TIMED_OUT:
                    # This caller only: nobody has arrived in the new round, and breaking
                    # it would tell the leavers their round (which passed) broke.
                    raise BrokenBarrierError(
                        f"timed out after {timeout} s before this party could arrive: the "
                        "previous round's parties had not all left (the barrier is not broken)"
                    )
                state = at.load(w, self._STATE)
                continue
            last = index == self._param - 1
            new = self._pack(gen + 2, self._param - 1) if last else state + 1
            seen = at.compare_exchange(w, self._STATE, state, new)
            if seen == state:
                break
            state = seen
        if last:  # our CAS opened the barrier for this generation
            at.notify(w, self._STATE)
            return index
        passed = (gen + 2) & self._MASK
        try:
            while True:
                now = at.load(w, self._STATE)
                if now >> self._GEN_SHIFT != gen:
                    if now >> self._GEN_SHIFT == passed:
                        self._leave(w, passed)
                        return index
                    raise BrokenBarrierError(
                        "the barrier was broken or reset while this party waited"
                    )
                # Later arrivals change the word without a notify: wait then returns
                # NOT_EQUAL and we wait again on the new value. A pass, abort or reset
                # notifies after its CAS, so none is missed.
                if at.wait(w, self._STATE, now, _remaining(deadline)) == at.TIMED_OUT:
                    arrived = self._break(w, gen)
                    if arrived is not None:
                        raise BrokenBarrierError(
                            f"timed out after {timeout} s with {arrived} of {self._param} "
                            "parties arrived; the barrier is now broken"
                        )
                    # else the generation moved just as we timed out: the loop says how
        except BrokenBarrierError:
            raise
        except BaseException:
            # Anything else out of the wait (Ctrl-C: at.wait runs signal handlers) must
            # not leave this party counted: before the pass, its count would let the
            # round pass a party short; after it, the next round would wait for ever for
            # it to leave. Break an unpassed round (as threading.Barrier does on an
            # exception), or leave a passed one, then re-raise.
            g = at.load(w, self._STATE) >> self._GEN_SHIFT
            if g == gen:
                self._break(w, gen)
            elif g == passed:
                self._leave(w, passed)
            raise

    def _leave(self, w: NDArray[np.int64], gen: int) -> None:
        """Count this released party out of generation ``gen``'s leavers; the last one
        lets the next round in. A break or reset since then zeroed the count: no-op."""
        state = at.load(w, self._STATE)
        while state >> self._GEN_SHIFT == gen:
            leaving = (state >> self._LEAVING_SHIFT) & self._MASK
            if not leaving:  # pragma: no cover - only a bug could get here
                return
            seen = at.compare_exchange(w, self._STATE, state, state - (1 << self._LEAVING_SHIFT))
            if seen == state:
                if leaving == 1:
                    at.notify(w, self._STATE)
                return
            state = seen

    def _break(self, w: NDArray[np.int64], gen: int) -> int | None:
        """Break generation ``gen`` if it is still current (a timed-out party must not
        break the next round after a pass it lost the race to). Returns how many parties
        had arrived, or None if ``gen`` is no longer current."""
        state = at.load(w, self._STATE)
        while state >> self._GEN_SHIFT == gen:
            seen = at.compare_exchange(w, self._STATE, state, self._pack(gen + 1))
            if seen == state:
                at.notify(w, self._STATE)
                return state & self._MASK
            state = seen
        return None

    def abort(self) -> None:
        """Break the barrier: current and later waiters raise BrokenBarrierError."""
        w = self._words()
        state = at.load(w, self._STATE)
        while not (state >> self._GEN_SHIFT) & 1:
            if self._break(w, state >> self._GEN_SHIFT) is not None:
                return
            state = at.load(w, self._STATE)

    def reset(self) -> None:
        """Break it for current waiters and make it usable again, empty, in one step.

        A party arriving at the same time counts either in the old generation (and
        raises BrokenBarrierError) or in the new one (and waits there): never in both.
        """
        w = self._words()
        state = at.load(w, self._STATE)
        while True:
            gen = state >> self._GEN_SHIFT
            new = self._pack(gen + (3 if gen & 1 else 4))
            seen = at.compare_exchange(w, self._STATE, state, new)
            if seen == state:
                break
            state = seen
        at.notify(w, self._STATE)

    @property
    def broken(self) -> bool:
        return self.statistics().broken

    @property
    def n_waiting(self) -> int:
        return self.statistics().n_waiting

    def statistics(self) -> BarrierStatistics:
        state = at.load(self._words(), self._STATE)
        gen = state >> self._GEN_SHIFT
        return BarrierStatistics(self._param, state & self._MASK, bool(gen & 1), gen)

    def __repr__(self) -> str:
        if self.closed:
            return f"<shmcompute.Barrier parties={self.parties} closed>"
        return f"<shmcompute.Barrier parties={self.parties} waiting={self.n_waiting}>"
