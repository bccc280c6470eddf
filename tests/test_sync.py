"""Semaphore, Event, Barrier across threads and processes."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction

import numpy as np
import pytest

import shmcompute as shc
import shmcompute.atomics as at
from shmcompute import sync
from shmcompute.sync import BarrierStatistics, EventStatistics, SemaphoreStatistics
from tests import _helpers as H
from tests.test_wait import BOUND, until


@pytest.fixture
def pool():
    with ProcessPoolExecutor(2, mp_context=mp.get_context("forkserver")) as ex:
        yield ex


class HookedAtomics:
    """What sync sees as ``shmcompute.atomics``, with some functions replaced: a test
    installs it (monkeypatch ``sync.at``) to force one interleaving of two callers at a
    chosen step, instead of hoping a sleep produces it."""

    def __init__(self, **hooks):
        self._hooks = hooks

    def __getattr__(self, name):
        return self._hooks[name] if name in self._hooks else getattr(at, name)


def closing(obj):
    class _C:
        def __enter__(self):
            return obj

        def __exit__(self, *a):
            obj.close()

    return _C()


# --- Semaphore -----------------------------------------------------------------------
def test_semaphore_counts_and_nowait():
    with closing(shc.Semaphore(2)) as s:
        assert s.acquire() and s.acquire(timeout=0)
        assert not s.acquire(blocking=False)
        with pytest.raises(shc.WouldBlock):
            s.acquire_nowait()
        t = time.perf_counter()
        assert not s.acquire(timeout=0.05)
        assert time.perf_counter() - t >= 0.05
        s.release(2)
        assert s.value == 2
        s.acquire_nowait()
        assert s.statistics() == SemaphoreStatistics(value=1, waiters=0)


def test_semaphore_release_wakes_a_blocked_thread():
    with closing(shc.Semaphore(0)) as s:
        got: list[bool] = []
        t = threading.Thread(target=lambda: got.append(s.acquire(timeout=BOUND)))
        t.start()
        until(lambda: s.statistics().waiters == 1, "acquirer parked")
        s.release()
        t.join(BOUND)
        assert got == [True] and s.value == 0


def test_semaphore_across_processes(pool):
    with closing(shc.Semaphore(0)) as s:
        fut = pool.submit(H.child_sync, "semaphore", s, BOUND)  # pickled by handle
        until(lambda: s.statistics().waiters == 1, "child parked")
        s.release()
        assert fut.result(BOUND) is True
        assert pool.submit(H.child_sync, "semaphore", s, 0.01).result(BOUND) is False


def test_semaphore_mutual_exclusion_threads():
    with closing(shc.Semaphore(1)) as s:
        inside = [0]
        worst = [0]

        def work():
            for _ in range(2000):
                with s:
                    inside[0] += 1
                    worst[0] = max(worst[0], inside[0])
                    inside[0] -= 1

        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(BOUND)
        assert worst[0] == 1 and s.value == 1


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_semaphore_bad_value(bad):
    with pytest.raises((shc.ArgumentError, shc.ArgumentTypeError), match="value"):
        shc.Semaphore(bad)


# --- Event ---------------------------------------------------------------------------
def test_event_set_clear_wait():
    with closing(shc.Event()) as e:
        assert not e.is_set() and not e.wait(0.01)
        e.set()
        assert e.is_set() and e.wait(0) and e.wait()
        e.clear()
        assert e.statistics() == EventStatistics(is_set=False, waiters=0)


def test_event_wakes_every_waiter_threads_and_processes(pool):
    with closing(shc.Event()) as e:
        got: list[bool] = []
        threads = [threading.Thread(target=lambda: got.append(e.wait(BOUND))) for _ in range(3)]
        for t in threads:
            t.start()
        futs = [pool.submit(H.child_sync, "event", e, BOUND) for _ in range(2)]
        until(lambda: e.statistics().waiters == 5, "all waiters parked")
        e.set()
        for t in threads:
            t.join(BOUND)
        assert got == [True] * 3
        assert [f.result(BOUND) for f in futs] == [True, True]


def test_event_wait_returns_true_after_a_set_clear_pulse(monkeypatch):
    """threading.Event.wait returns True when set() and clear() both happen while it
    waits. The worst case is forced: clear() lands between set()'s store and its notify,
    so the woken waiter finds the flag already cleared."""
    with closing(shc.Event()) as e:
        got: list[bool] = []
        t = threading.Thread(target=lambda: got.append(e.wait(BOUND)))
        t.start()
        until(lambda: e.statistics().waiters == 1, "waiter parked")

        def notify(arr, index, count=at.ALL):
            e.clear()  # another thread's clear(), just before set() notifies
            return at.notify(arr, index, count)

        monkeypatch.setattr(sync, "at", HookedAtomics(notify=notify))
        e.set()
        monkeypatch.undo()
        t.join(BOUND)
        assert got == [True] and not e.is_set()


def test_event_set_clear_pulse_wakes_a_waiting_process(pool):
    with closing(shc.Event()) as e:
        fut = pool.submit(H.child_sync, "event", e, BOUND)
        until(lambda: e.statistics().waiters == 1, "child parked")
        e.set()
        e.clear()
        assert fut.result(BOUND) is True
        assert not e.is_set() and not pool.submit(H.child_sync, "event", e, 0.01).result(BOUND)


# --- Barrier -------------------------------------------------------------------------
def test_barrier_threads_cyclic():
    with closing(shc.Barrier(3)) as b:
        indices: list[int] = []
        lock = threading.Lock()

        def party():
            for _ in range(5):
                i = b.wait(BOUND)
                with lock:
                    indices.append(i)

        threads = [threading.Thread(target=party) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(BOUND)
        assert sorted(indices) == sorted([0, 1, 2] * 5)
        assert b.statistics() == BarrierStatistics(3, 0, False, 10)


def test_barrier_across_processes(pool):
    with closing(shc.Barrier(3)) as b:
        futs = [pool.submit(H.child_sync, "barrier", b, BOUND) for _ in range(2)]
        until(lambda: b.n_waiting == 2, "children arrived")
        assert b.wait(BOUND) == 2  # last to arrive
        assert sorted(f.result(BOUND) for f in futs) == [0, 1]


def test_barrier_timeout_breaks_it_for_everyone():
    with closing(shc.Barrier(3)) as b:
        errors: list[BaseException] = []

        def party():
            try:
                b.wait(BOUND)
            except shc.BrokenBarrierError as e:
                errors.append(e)

        t = threading.Thread(target=party)
        t.start()
        until(lambda: b.n_waiting == 1, "one party waiting")
        with pytest.raises(threading.BrokenBarrierError, match="timed out"):
            b.wait(0.05)
        t.join(BOUND)
        assert len(errors) == 1 and b.broken
        with pytest.raises(shc.BrokenBarrierError, match="reset"):
            b.wait(BOUND)
        b.reset()
        assert not b.broken and b.n_waiting == 0


def test_barrier_reset_breaks_current_waiters():
    with closing(shc.Barrier(2)) as b:
        errors: list[BaseException] = []

        def party():
            with pytest.raises(shc.BrokenBarrierError) as info:
                b.wait(BOUND)
            errors.append(info.value)

        t = threading.Thread(target=party)
        t.start()
        until(lambda: b.n_waiting == 1, "party waiting")
        b.reset()
        t.join(BOUND)
        assert len(errors) == 1 and not b.broken
        # and it works again afterwards
        t = threading.Thread(target=b.wait, args=(BOUND,))
        t.start()
        assert b.wait(BOUND) in (0, 1)
        t.join(BOUND)


def test_barrier_bad_parties():
    with pytest.raises(shc.ArgumentError, match="parties"):
        shc.Barrier(0)


def test_attach_checks_the_kind():
    with closing(shc.Event()) as e:
        with pytest.raises(shc.ArgumentTypeError, match="Semaphore"):
            shc.Semaphore.attach(e.handle)
        f = pickle.loads(pickle.dumps(e))
        f.set()
        assert e.is_set()
        f.close()


def test_bad_timeouts():
    with closing(shc.Event()) as e:
        with pytest.raises(shc.ArgumentError, match="timeout"):
            e.wait(-1)
        with pytest.raises(shc.ArgumentTypeError, match="timeout"):
            e.wait("soon")


@pytest.mark.parametrize(
    "timeout", [np.int64(0), np.float64(0.0), np.float32(0.001), np.uint8(0), Fraction(1, 1000)]
)
def test_timeouts_accept_any_real_number(timeout):
    """The same timeouts atomics.wait takes: NumPy scalars are real numbers too."""
    with closing(shc.Event()) as e, closing(shc.Semaphore(0)) as s, closing(shc.Barrier(2)) as b:
        assert e.wait(timeout) is False
        assert s.acquire(timeout=timeout) is False
        with pytest.raises(shc.BrokenBarrierError, match="timed out"):
            b.wait(timeout)


@pytest.mark.parametrize("bad", [True, np.bool_(False), "1", 1j])
def test_timeouts_reject_what_is_not_seconds(bad):
    with closing(shc.Semaphore(0)) as s, pytest.raises(shc.ArgumentTypeError, match="timeout"):
        s.acquire(timeout=bad)


@pytest.mark.parametrize("bad", [-1, np.float64("nan"), np.int64(-1)])
def test_timeouts_reject_negative_and_nan(bad):
    with closing(shc.Event()) as e, pytest.raises(shc.ArgumentError, match=">= 0"):
        e.wait(bad)


# --- use after close -----------------------------------------------------------------
USES_AFTER_CLOSE = {
    "semaphore": (
        lambda: shc.Semaphore(1),
        [
            lambda s: s.acquire(timeout=0.1),
            lambda s: s.acquire(blocking=False),
            lambda s: s.acquire_nowait(),
            lambda s: s.release(),
            lambda s: s.value,
            lambda s: s.statistics(),
            lambda s: s.__enter__(),
        ],
    ),
    "event": (
        shc.Event,
        [
            lambda e: e.set(),
            lambda e: e.clear(),
            lambda e: e.is_set(),
            lambda e: e.wait(0.1),
            lambda e: e.statistics(),
        ],
    ),
    "barrier": (
        lambda: shc.Barrier(1),
        [
            lambda b: b.wait(0.1),
            lambda b: b.abort(),
            lambda b: b.reset(),
            lambda b: b.broken,
            lambda b: b.n_waiting,
            lambda b: b.statistics(),
        ],
    ),
}


@pytest.mark.parametrize("kind", sorted(USES_AFTER_CLOSE))
@pytest.mark.parametrize("attached", [False, True], ids=["creator", "attacher"])
def test_every_use_after_close_raises_closed_error(kind, attached):
    make, uses = USES_AFTER_CLOSE[kind]
    with closing(make()) as creator:
        obj = pickle.loads(pickle.dumps(creator)) if attached else creator
        obj.close()
        obj.close()  # idempotent
        assert obj.closed and "closed" in repr(obj)
        for use in [*uses, lambda o: o.handle, pickle.dumps]:
            with pytest.raises(shc.ClosedError, match=f"this {type(obj).__name__} is closed"):
                use(obj)
        if attached:  # an attacher's close leaves the creator's object working
            assert not creator.closed and creator.statistics()
