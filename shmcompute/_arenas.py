"""Job arenas: the control words (and work list) of a transform's job, reused across
the jobs of one pool.

An arena is busy from the moment a job takes it until every driver of that job has
left: a driver task or team thread that woke after the others had done every chunk
still reads it, and one that has not started yet will. Drivers count themselves out in
the arena (``_drivers.left``); a process task does however it ends, and the pool counts
out the tasks whose worker died (``count_out``, on the task's future). A job returns
at its last chunk, usually before that: its arena then waits in ``left`` until the count
is complete, and goes back to ``free``. Invariant: ``busy + len(free)`` arenas exist
for a pool; ``left`` holds busy arenas whose jobs have returned.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _drivers as D
from ._jobs import PackedJob, evict_oldest
from ._team import RING as TEAM_RING
from .array import SharedArray
from .pool import Pool


class Arena:
    """A job's control words (and work list), reused across jobs of one pool: making a
    segment per call would cost ~300 us, more than a small job itself."""

    def __init__(self, process: bool, words: int) -> None:
        self.process = process
        self.shared = SharedArray.create(words, np.int64) if process else None
        self.words = self.shared.array if self.shared is not None else np.zeros(words, np.int64)
        # Process jobs this arena ran, pickled (see recall).
        self.jobs: dict[tuple[Any, ...], tuple[tuple[Any, ...], PackedJob]] = {}

    def recall(self, key: tuple[Any, ...], sas: tuple[Any, ...]) -> PackedJob | None:
        """The pickled job this arena ran before with the same kernel, sizes and
        SharedArray objects (``key`` holds their ids; weak references confirm they are
        the same objects, not new ones at a freed one's address): back-to-back calls
        over the same arrays find their job by identity (~1 us) instead of building it
        from handles and looking it up by value (~6 us)."""
        hit = self.jobs.get(key)
        if hit is None:
            return None
        refs, packed = hit
        for r, sa in zip(refs, sas, strict=True):
            if (r() if r is not None else None) is not sa:
                del self.jobs[key]
                return None
        return packed

    def remember(self, key: tuple[Any, ...], sas: tuple[Any, ...], packed: PackedJob) -> None:
        if len(self.jobs) >= ARENA_JOBS:
            evict_oldest(self.jobs)
        refs = tuple(weakref.ref(sa) if sa is not None else None for sa in sas)
        self.jobs[key] = (refs, packed)

    def close(self) -> None:
        if self.shared is not None:
            self.shared.unlink()
            self.shared.close()


ARENAS = 4  # made together, on a pool's first job
ARENA_JOBS = 16  # pickled jobs an arena remembers
ARENA_WAIT = 0.05  # seconds to wait for a busy arena before making one more
ARENA_WORDS = D.ctrl_words(4096)  # the usual size: jobs of up to 4096 chunks


class Arenas:
    """A pool's arenas. Invariant: ``busy + len(free)`` arenas exist for this pool;
    ``left`` holds busy ones (with their jobs' pool tasks) whose jobs have returned,
    free once every driver has left."""

    def __init__(self, lock: Any) -> None:
        self.free: list[Arena] = []
        self.left: list[tuple[Arena, Sequence[Any]]] = []
        self.busy = 0
        self.cond = threading.Condition(lock)


def arena(pool: Pool, words: int) -> Arena:
    """A free arena of at least ``words``. An arena stays busy until every driver of its
    job has left (see ``release_when_left``), which is usually after the job returned:
    the job ends at its last chunk, and its drivers leave a little later (a task that
    woke after the others had done every chunk still has to). So a pool gets four arenas
    at once and back-to-back jobs rotate through them without waiting (with two, a tight
    loop of 200k-element jobs waited for one in 10-15% of calls); a job that finds none
    free waits a little for one to come back (the futures of its pool tasks resolving
    wake it, ``count_out``) before it makes another. It does not wait for arenas that
    only a team's lagging thread still holds (nothing would wake it when that thread
    leaves, and the job need not wait for it): it makes another at once, up to a team
    thread's ring of them. The pool frees them all when it closes."""
    with pool._lock:
        state: Arenas | None = pool.__dict__.get("_arenas")
        if state is None:
            state = pool.__dict__["_arenas"] = Arenas(pool._lock)
        deadline = None
        while True:
            if state.left:  # (jobs whose last drivers have left since)
                _free_left(state)
            for i, a in enumerate(state.free):
                if a.words.shape[0] >= words:
                    state.busy += 1
                    return state.free.pop(i)
            now = time.monotonic()
            deadline = now + ARENA_WAIT if deadline is None else deadline
            have = state.busy + len(state.free)
            if (
                have < ARENAS
                or (have < ARENAS + TEAM_RING and any(not f for _, f in state.left))
                or now >= deadline
                or words > ARENA_WORDS  # a busy arena of the usual size would not do
            ):
                break
            state.cond.wait(deadline - now)
        state.busy += 1
        spares = max(0, ARENAS - state.busy - len(state.free))
    size = max(words, ARENA_WORDS)
    for _ in range(spares):
        release(pool, _new_arena(pool, size), busy=False)
    return _new_arena(pool, size)


def _new_arena(pool: Pool, words: int) -> Arena:
    """A new arena of ``words``, freed when the pool closes."""
    a = Arena(pool.backend == "process", words)
    pool._on_close(a.close)
    return a


def release(pool: Pool, a: Arena, busy: bool = True) -> None:
    with pool._lock:
        state: Arenas = pool.__dict__["_arenas"]
        state.free.append(a)
        state.busy -= busy
        state.cond.notify()


def release_when_left(
    pool: Pool, a: Arena, futures: Sequence[Any] = (), left: bool = False
) -> None:
    """Give the arena back once every driver of its job has left: now, when its last
    pool task's future resolves (``count_out``), or when a job next looks for an arena
    (team threads tell no one when they leave). A driver task or team thread that
    woke after the others had done every chunk still reads it, and one that has not
    started yet will. ``futures``: the job's pool tasks (a task whose future resolved
    is done with the arena, even if it never counted itself out: its worker died).
    ``left``: the caller saw every driver leave already (no need to look again)."""
    with pool._lock:
        state: Arenas = pool.__dict__["_arenas"]
        # Checked under the lock: a last task's callback that counts the job out now
        # either ran before this (all left: release it here) or finds it in ``left``.
        if left or D.status(a.words) & D.ALL_LEFT:
            release(pool, a)  # (the lock is re-entrant)
        else:
            state.left.append((a, futures))


def count_out(state: Arenas, ctrl: np.ndarray, t: int, attempt: int, future: Any) -> None:
    """A driver task's future resolved: count the task out if it did not count itself
    (its worker died, or it failed before its driver ran), and so wake a caller
    waiting for every task to leave. Its job may have returned, and the arena have
    gone to another job, since: then this does nothing (``left_if``). If it was the
    last of a returned job's tasks, the arena is free: hand it to a job waiting for
    one."""
    D.left_if(ctrl, t, attempt)
    if state.left and D.status(ctrl) & D.ALL_LEFT:
        # Its job returned before its last task left: the arena waits in ``left``, and
        # this is the first moment the pool knows it is free. (The job may be putting it
        # there just now: then it finds it free itself, or the next job does.)
        with state.cond:
            freed = _free_left(state)
            if freed:
                state.cond.notify(freed)


def _free_left(state: Arenas) -> int:
    """Move the arenas whose drivers have all left (or whose tasks have all resolved)
    to the free list; return how many. Under the pool lock."""
    freed = 0
    for entry in list(state.left):
        a, futures = entry
        if D.status(a.words) & D.ALL_LEFT or (futures and all(f.done() for f in futures)):
            state.left.remove(entry)
            state.free.append(a)
            state.busy -= 1
            freed += 1
    return freed
