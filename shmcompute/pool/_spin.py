"""Compiled nogil helpers for the pools' hot paths.

A caller blocked in ``Future.result()`` spins here *without the GIL* for a bounded time,
so a worker thread can take the GIL and finish the task, and a worker process's result
is seen within a microsecond instead of after a futex wake-up of a collector thread.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .. import _layout as L
from .. import _native as N
from .. import atomics as at
from .._atomics_core import _now_ns

_NOGIL = {"cache": True, "nogil": True}
# Sub-microsecond helpers keep the GIL: releasing it on entry hands it to any thread
# that is waiting for it (the collector), and taking it back then costs a GIL hand-off
# (~5 us here), many times the work itself.
_KEEP_GIL = {"cache": True}


@njit(**_NOGIL)
def spin_while_equal(words, index, value, spin_ns):  # type: ignore[no-untyped-def]
    """Spin while ``words[index] == value``, for at most ``spin_ns``; return the last
    value read (unchanged means the budget ran out)."""
    ts = np.empty(2, np.int64)
    v = at.load(words, index)
    if v != value or spin_ns <= 0:
        return v
    stop = _now_ns(ts) + spin_ns
    k = 0
    while True:
        N.cpu_relax()
        v = at.load(words, index)
        if v != value:
            return v
        k += 1
        if (k & 63) == 0 and _now_ns(ts) >= stop:
            return v


@njit(**_NOGIL)
def publish_and_park(words, done_index, bell_index, bell_expected, timeout, gil_index, handoff_ns):  # type: ignore[no-untyped-def]
    """A worker thread's hand-off: count a finished task, then (if ``bell_expected >= 0``)
    sleep until the doorbell moves past ``bell_expected``.

    Both run after the GIL was released (this function is nogil), so a caller spinning
    on ``done_index`` never wakes up just to wait for the GIL the worker still holds.
    Once woken, wait up to ``handoff_ns`` for a caller to release the GIL (a caller
    entering ``spin_until_at_least`` bumps ``words[gil_index]``): taking a free GIL is
    a few nanoseconds, queueing for a held one a futex sleep of tens of microseconds.
    """
    if done_index >= 0:
        at.add(words, done_index, 1)
    if bell_expected < 0:
        return 1
    g0 = at.load(words, gil_index)
    code = at.wait(words, bell_index, bell_expected, timeout)
    if code != 2 and handoff_ns > 0:
        ts = np.empty(2, np.int64)
        stop = _now_ns(ts) + handoff_ns
        k = 0
        while at.load(words, gil_index) == g0:
            N.cpu_relax()
            k += 1
            if (k & 63) == 0 and _now_ns(ts) >= stop:
                break
    return code


def warm_up() -> None:
    """Compile (or load from the disk cache) every helper for int64 words."""
    w = np.zeros(4, np.int64)
    spin_while_equal(w, 0, 1, 0)
    publish_and_park(w, 0, 1, -1, 0.0, 2, 0)
    publish_and_park(w, -1, 1, 5, 0.0, 2, 0)
    publish_task(w, 0, 0, 1)
    ring(w, 1)
    spin_until_at_least(w, 0, 0, 0, 2)
    worker_begin(w, 0, 0, 0, 0, 1, 2, 3)
    worker_end(w, 0, False, 0, 0, 0, 1, 2, 3, 0, 1, 2)
    results_waiting(w, 0, 1, 0, np.zeros(1, np.int64))


@njit(**_KEEP_GIL)
def publish_task(words, tail_index, tail, bell_index):  # type: ignore[no-untyped-def]
    """Publish a pushed task (the ring tail), ring the worker's doorbell, wake it if it
    sleeps: one call instead of three from Python."""
    at.store(words, tail_index, tail)
    at.add(words, bell_index, 1)
    return at.notify(words, bell_index, 1)


@njit(**_KEEP_GIL)
def ring(words, bell_index):  # type: ignore[no-untyped-def]
    """Ring a parked worker thread's doorbell and wake it if it sleeps."""
    at.add(words, bell_index, 1)
    return at.notify(words, bell_index, 1)


@njit(**_KEEP_GIL)
def results_waiting(words, first_rec, rec_words, tail_offset, heads):  # type: ignore[no-untyped-def]
    """True if any worker's result tail is past the head the parent consumed
    (``heads[w]``); one compiled scan over every worker record."""
    for w in range(heads.shape[0]):
        if at.load(words, first_rec + w * rec_words + tail_offset) != heads[w]:
            return True
    return False


@njit(**_NOGIL)
def spin_until_at_least(words, index, target, spin_ns, gil_index):  # type: ignore[no-untyped-def]
    """Spin while ``words[index] < target``, for at most ``spin_ns``; True if reached.
    Bumps ``words[gil_index]`` first: this thread has released the GIL."""
    at.add(words, gil_index, 1)
    ts = np.empty(2, np.int64)
    if at.load(words, index) >= target:
        return True
    if spin_ns <= 0:
        return False
    stop = _now_ns(ts) + spin_ns
    k = 0
    while True:
        N.cpu_relax()
        if at.load(words, index) >= target:
            return True
        k += 1
        if (k & 63) == 0 and _now_ns(ts) >= stop:
            return False


# --- a process worker's per-task bookkeeping, one compiled call each side of the task ----
@njit(**_KEEP_GIL)
def worker_begin(words, rec, seq, t0, state_i, started_i, current_i, busy):  # type: ignore[no-untyped-def]
    at.add(words, L.PC_BUSY, 1)
    at.store(words, rec + state_i, busy)
    at.store(words, rec + started_i, t0)
    at.store(words, rec + current_i, seq)  # last: "seq is running since t0"


@njit(**_KEEP_GIL)
def worker_end(
    words,
    rec,
    failed,
    res_tail,
    head,
    done_i,
    errors_i,
    res_tail_i,
    head_i,
    current_i,
    spinners_i,
    result_seq_i,
):  # type: ignore[no-untyped-def]
    """Count the task, publish its result (already in the ring), and wake the parent's
    collector unless a caller is spinning on the result tails."""
    at.add(words, rec + done_i, 1)  # counters first: whoever sees the result sees them
    if failed:
        at.add(words, rec + errors_i, 1)
    at.store(words, rec + res_tail_i, res_tail)
    at.store(words, rec + head_i, head)
    at.store(words, rec + current_i, -1)
    at.sub(words, L.PC_BUSY, 1)
    # A caller spinning in result() sees the tail move; waking the collector thread too
    # would only make it fight that caller for the GIL. The caller re-checks every ring
    # after it stops spinning, so no result is stranded (the store above and the load
    # below are seq_cst, as are the caller's decrement and its re-check).
    if at.load(words, spinners_i) == 0:
        at.add(words, result_seq_i, 1)
        at.notify(words, result_seq_i)
