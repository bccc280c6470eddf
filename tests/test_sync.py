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
                    time.sleep(0)  # let the others run: without the semaphore, they enter
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


def parked(b) -> int:
    """Threads and processes asleep in ``b`` (on whichever of its words)."""
    return sum(at.waiters(b._w, i) for i in range(len(b._w)))


def pause_first_load(request, monkeypatch, thread_name):
    """Stop the named thread right after its first atomic load in sync (a Barrier.wait
    reads the barrier's state there, then counts itself in) until ``go`` is set."""
    read, go = threading.Event(), threading.Event()
    request.addfinalizer(go.set)  # a failed assertion must not leave the thread held

    def load(arr, index):
        value = at.load(arr, index)
        if threading.current_thread().name == thread_name and not read.is_set():
            read.set()
            assert go.wait(BOUND), "the test never let the paused party go on"
        return value

    monkeypatch.setattr(sync, "at", HookedAtomics(load=load))
    return read, go


def barrier_party(b, name, got):
    def run():
        try:
            got[name] = b.wait(BOUND)
        except shc.BrokenBarrierError as e:
            got[name] = e

    return threading.Thread(target=run, name=name)


def test_barrier_late_caller_counts_into_the_next_round(request, monkeypatch):
    """A third caller of Barrier(2) that read the state just before the other two
    passed must wait for the next round. It used to count itself into the finished
    round: it passed alone and left a count of 1, so the next lone wait() passed too."""
    with closing(shc.Barrier(2)) as b:
        read, go = pause_first_load(request, monkeypatch, "late")
        got: dict = {}
        late = barrier_party(b, "late", got)
        late.start()
        assert read.wait(BOUND)  # late has read generation 0, not yet counted itself
        pair = [barrier_party(b, n, got) for n in ("A", "B")]
        for t in pair:
            t.start()
        for t in pair:
            t.join(BOUND)
        assert sorted([got["A"], got["B"]]) == [0, 1]  # generation 0 passed without late
        go.set()
        until(lambda: parked(b) == 1 or not late.is_alive(), "late parked or returned")
        assert "late" not in got, f"the late caller passed alone: {got['late']!r}"
        assert b.n_waiting == 1
        assert b.wait(BOUND) == 1  # the partner late waits for
        late.join(BOUND)
        assert got["late"] == 0
        assert b.statistics() == BarrierStatistics(2, 0, False, 4)


def test_barrier_reset_while_a_party_arrives(request, monkeypatch):
    """reset() between a party reading the state and counting itself: the party counts
    into the new generation and waits for a partner there. It used to raise
    BrokenBarrierError and leave its count behind, so one party then passed alone."""
    with closing(shc.Barrier(2)) as b:
        read, go = pause_first_load(request, monkeypatch, "arriving")
        got: dict = {}
        t = barrier_party(b, "arriving", got)
        t.start()
        assert read.wait(BOUND)
        b.reset()
        go.set()
        until(lambda: parked(b) == 1 or not t.is_alive(), "party parked or returned")
        assert "arriving" not in got, f"the arriving party returned: {got['arriving']!r}"
        assert b.n_waiting == 1 and not b.broken
        assert b.wait(BOUND) == 1
        t.join(BOUND)
        assert got["arriving"] == 0
        assert b.statistics() == BarrierStatistics(2, 0, False, 6)  # reset: +4, pass: +2
        with pytest.raises(shc.BrokenBarrierError, match="timed out"):
            b.wait(0)  # a lone party on Barrier(2) never passes


def test_barrier_timeout_that_loses_to_the_pass_does_not_break(request, monkeypatch):
    """A party whose wait times out just as the last party opens the barrier has
    passed: it returns its index and the next round is not broken."""
    with closing(shc.Barrier(2)) as b:
        timed_out, go = threading.Event(), threading.Event()
        request.addfinalizer(go.set)

        def wait(arr, index, expected, timeout=None):
            if threading.current_thread().name == "slow" and not timed_out.is_set():
                timed_out.set()
                assert go.wait(BOUND)
                return at.TIMED_OUT
            return at.wait(arr, index, expected, timeout)

        monkeypatch.setattr(sync, "at", HookedAtomics(wait=wait))
        got: dict = {}
        slow = barrier_party(b, "slow", got)
        slow.start()
        assert timed_out.wait(BOUND)
        assert b.wait(BOUND) == 1  # opens the barrier while "slow" is timing out
        go.set()
        slow.join(BOUND)
        assert got["slow"] == 0 and not b.broken
        assert b.statistics() == BarrierStatistics(2, 0, False, 2)


def a_held_after_its_wakeup(b, got, request, monkeypatch):
    """Start party "A" on ``b`` and let it park; it will be held right after its
    wake-up, before it looks at the barrier, until ``go`` is set (``woken`` says it got
    there). Returns (thread, woken, go)."""
    woken, go = threading.Event(), threading.Event()
    request.addfinalizer(go.set)

    def wait(arr, index, expected, timeout=None):
        r = at.wait(arr, index, expected, timeout)
        if threading.current_thread().name == "A" and not woken.is_set():
            woken.set()
            assert go.wait(BOUND)
        return r

    monkeypatch.setattr(sync, "at", HookedAtomics(wait=wait))
    a = barrier_party(b, "A", got)
    a.start()
    until(lambda: parked(b) == 1, "A parked")
    return a, woken, go


def test_barrier_next_round_waits_for_a_released_party_to_look(request, monkeypatch):
    """Barrier(2): A waits, B opens the barrier, and A is held right after its wake-up,
    before it looks. Two more callers must not pass the next round meanwhile: A would
    then see generation 4 instead of 2 and raise BrokenBarrierError although it passed."""
    with closing(shc.Barrier(2)) as b:
        got: dict = {}
        a, woken, go = a_held_after_its_wakeup(b, got, request, monkeypatch)
        assert b.wait(BOUND) == 1  # B: opens generation 0
        assert woken.wait(BOUND)  # A is awake but has not looked
        later = [barrier_party(b, n, got) for n in ("C", "D")]
        for t in later:
            t.start()
        until(lambda: parked(b) == 2 or not all(t.is_alive() for t in later), "C, D")
        assert "C" not in got and "D" not in got, got  # they wait for A to leave
        go.set()
        for t in (a, *later):
            t.join(BOUND)
        assert got["A"] == 0 and sorted([got["C"], got["D"]]) == [0, 1], got
        assert b.statistics() == BarrierStatistics(2, 0, False, 4)


def test_barrier_timeout_waiting_for_leavers_fails_only_that_caller(request, monkeypatch):
    """Barrier(2): A waits, B opens the barrier and calls wait(timeout) again at once,
    while A, woken, has not looked yet. B times out waiting for A to leave: B alone
    raises; the round A passed is not reported broken to A, and the barrier works on."""
    with closing(shc.Barrier(2)) as b:
        got: dict = {}
        a, woken, go = a_held_after_its_wakeup(b, got, request, monkeypatch)
        assert b.wait(BOUND) == 1  # B opens generation 0
        assert woken.wait(BOUND)  # A is awake but has not left
        with pytest.raises(shc.BrokenBarrierError, match="the barrier is not broken"):
            b.wait(0.05)
        assert not b.broken
        go.set()
        a.join(BOUND)
        assert got["A"] == 0, got  # its round passed
        monkeypatch.undo()
        c = barrier_party(b, "C", got)
        c.start()
        assert b.wait(BOUND) in (0, 1)
        c.join(BOUND)
        assert got["C"] in (0, 1) and not b.broken


@pytest.mark.parametrize("when", ["before the pass", "after the pass"])
def test_barrier_party_interrupted_in_its_wait_leaves_no_count_behind(request, monkeypatch, when):
    """A party interrupted inside its wait (Ctrl-C: atomics.wait runs signal handlers)
    must not stay counted. Before the pass its count let the round pass a party short
    (here: B alone); after it, the next round waited for ever for it to leave."""
    with closing(shc.Barrier(2)) as b:
        asleep, go = threading.Event(), threading.Event()
        request.addfinalizer(go.set)

        def wait(arr, index, expected, timeout=None):
            if threading.current_thread().name != "A":
                return at.wait(arr, index, expected, timeout)
            if when == "before the pass":
                asleep.set()
                assert go.wait(BOUND)
                raise KeyboardInterrupt
            at.wait(arr, index, expected, timeout)  # woken by the pass
            raise KeyboardInterrupt  # ...and interrupted before it looked

        monkeypatch.setattr(sync, "at", HookedAtomics(wait=wait))
        got: dict = {}

        def run_a():
            try:
                got["A"] = b.wait(BOUND)
            except KeyboardInterrupt as e:
                got["A"] = e

        a = threading.Thread(target=run_a, name="A")
        a.start()
        if when == "before the pass":
            assert asleep.wait(BOUND)
            go.set()
            a.join(BOUND)
            assert isinstance(got["A"], KeyboardInterrupt)
            # as threading.Barrier: an exception in a party breaks the round
            assert b.broken
            with pytest.raises(shc.BrokenBarrierError):
                b.wait(BOUND)
            b.reset()
        else:
            until(lambda: parked(b) == 1, "A parked")
            assert b.wait(BOUND) == 1  # B passes with A
            a.join(BOUND)
            assert isinstance(got["A"], KeyboardInterrupt)
            assert not b.broken
        # either way the next round passes with two parties, no more and no less
        monkeypatch.undo()
        c = barrier_party(b, "C", got)
        c.start()
        assert b.wait(BOUND) in (0, 1)
        c.join(BOUND)
        assert got["C"] in (0, 1), got


def test_barrier_more_callers_than_parties_pair_up():
    """3 threads call wait() on Barrier(2) over and over: every wait passes with exactly
    one partner (a party released late is not mistaken for broken when the next round
    passes first) until abort() ends it."""
    with closing(shc.Barrier(2)) as b:
        got: list = []  # arrival indices, then one error per thread

        def party():
            while True:
                try:
                    got.append(b.wait(BOUND))
                except shc.BrokenBarrierError as e:
                    got.append(e)
                    return

        threads = [threading.Thread(target=party) for _ in range(3)]
        for t in threads:
            t.start()
        until(lambda: b.statistics().generation >= 2 * 300, "300 passes")
        b.abort()
        for t in threads:
            t.join(BOUND)
        passes = b.statistics().generation // 2  # abort added 1
        errors = [e for e in got if isinstance(e, Exception)]
        assert len(errors) == 3 and not any("timed out" in str(e) for e in errors), errors
        assert got.count(1) == passes  # the last arriver of each round
        # the party released by the last pass may see the abort before it looked, and
        # raise, as in threading.Barrier
        assert passes - 1 <= got.count(0) <= passes


@pytest.mark.parametrize("bad", [0, -1, 2**21 + 1])
def test_barrier_bad_parties(bad):
    with pytest.raises(shc.ArgumentError, match="parties"):
        shc.Barrier(bad)


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
