"""wait/notify: Atomics.wait semantics across threads, processes and kernels."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from numba.core.errors import TypingError

import shmcompute as shc
import shmcompute.atomics as at
from shmcompute import _layout as L
from tests import _helpers as H

BOUND = 30.0  # every wait in these tests is bounded


def until(pred, what: str, timeout: float = BOUND) -> None:
    """Poll a condition read from shared memory, bounded (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.0005)


@pytest.fixture(params=["shared", "plain"])
def slots(request):
    if request.param == "plain":
        yield np.zeros(8, np.int64)
        return
    with shc.zeros(8, np.int64) as a:
        yield a.array


def test_not_equal_returns_at_once(slots):
    slots[0] = 5
    t = time.perf_counter()
    assert at.wait(slots, 0, 4, BOUND) is at.NOT_EQUAL
    assert time.perf_counter() - t < 1.0
    assert at.waiters(slots, 0) == 0


@pytest.mark.parametrize("timeout", [0, 0.05])
def test_timed_out(slots, timeout):
    t = time.perf_counter()
    assert at.wait(slots, 0, 0, timeout) is at.TIMED_OUT
    assert time.perf_counter() - t >= timeout
    assert at.waiters(slots, 0) == 0  # the waiter withdrew


def test_notify_without_waiters_wakes_none(slots):
    assert at.notify(slots, 0) == 0
    assert at.notify(slots, 0, 0) == 0


@pytest.mark.parametrize("k", [0, 1, 2, 4])
def test_notify_k_wakes_exactly_k_of_n_threads(slots, k):
    n = 4
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(at.wait(slots, 3, 0, BOUND)))
        for _ in range(n)
    ]
    for t in threads:
        t.start()
    until(lambda: at.waiters(slots, 3) == n, "all waiters parked")  # GIL released
    assert at.notify(slots, 3, k) == k
    until(lambda: len(results) == k, f"{k} wake-ups")
    assert results == [at.OK] * k
    assert at.waiters(slots, 3) == n - k  # no more woke: no spurious returns
    assert at.notify(slots, 3) == n - k
    for t in threads:
        t.join(BOUND)
    assert results == [at.OK] * n


def test_notify_is_fifo(slots):
    order: list[int] = []

    def waiter(i: int) -> None:
        assert at.wait(slots, 0, 0, BOUND) is at.OK
        order.append(i)

    threads = []
    for i in range(3):  # enqueue one at a time, so the arrival order is known
        threads.append(threading.Thread(target=waiter, args=(i,)))
        threads[-1].start()
        until(lambda i=i: at.waiters(slots, 0) == i + 1, "waiter parked")
    for i in range(3):
        assert at.notify(slots, 0, 1) == 1
        until(lambda i=i: len(order) == i + 1, "one wake-up")
    assert order == [0, 1, 2]
    for t in threads:
        t.join(BOUND)


def test_waiters_on_other_elements_are_not_woken(slots):
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(at.wait(slots, 1, 0, BOUND)))
    t.start()
    until(lambda: at.waiters(slots, 1) == 1, "waiter parked")
    assert at.notify(slots, 2) == 0
    assert at.waiters(slots, 1) == 1 and got == []
    assert at.notify(slots, 1) == 1
    t.join(BOUND)
    assert got == [at.OK]


def test_int32_elements(slots):
    a32 = np.zeros(4, np.int32) if slots.base is None else slots.view(np.int32)
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(at.wait(a32, 1, 0, BOUND)))
    t.start()
    until(lambda: at.waiters(a32, 1) == 1, "waiter parked")
    assert at.waiters(a32, 0) == 0  # a different int32 element of the same int64 word
    at.store(a32, 1, 1)
    assert at.notify(a32, 1) == 1
    t.join(BOUND)
    assert got == [at.OK]


def test_kernel_wait_woken_from_python_and_python_from_kernel(slots):
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(H.kernel_wait(slots, 0, 0, BOUND)))
    t.start()
    until(lambda: at.waiters(slots, 0) == 1, "kernel waiter parked")
    assert at.notify(slots, 0) == 1
    t.join(BOUND)
    assert got == [at.OK]

    t = threading.Thread(target=lambda: got.append(at.wait(slots, 1, 0, BOUND)))
    t.start()
    until(lambda: at.waiters(slots, 1) == 1, "python waiter parked")
    assert H.kernel_notify(slots, 1, 1) == 1
    t.join(BOUND)
    assert got == [at.OK, at.OK]


@pytest.mark.parametrize("count", [1.5, float("nan"), True, "1", None])
def test_notify_count_must_be_an_integer(slots, count):
    with pytest.raises(shc.ArgumentTypeError, match="count must be an int"):
        at.notify(slots, 0, count)
    assert at.notify(slots, 0, np.int64(1)) == 0  # NumPy integers are integers
    if isinstance(count, float):
        with pytest.raises(TypingError, match="count must be an integer"):
            H.kernel_notify(slots, 0, count)


def test_kernel_wait_timeouts():
    arr = np.zeros(2, np.int64)
    assert H.kernel_wait(arr, 0, 1, 1.0) == at.NOT_EQUAL
    assert H.kernel_wait(arr, 0, 0, 0.01) == at.TIMED_OUT


def test_signal_interrupts_a_python_wait_and_withdraws_it():
    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    arr = np.zeros(2, np.int64)
    old = signal.signal(signal.SIGUSR1, handler)
    try:
        t = threading.Thread(
            target=lambda: (
                until(lambda: at.waiters(arr, 0) == 1, "main thread parked"),
                os.kill(os.getpid(), signal.SIGUSR1),
            )
        )
        t.start()
        with pytest.raises(Interrupted):
            at.wait(arr, 0, 0, BOUND)
        t.join(BOUND)
        assert at.waiters(arr, 0) == 0
    finally:
        signal.signal(signal.SIGUSR1, old)


@pytest.mark.stress
def test_wait_table_full_is_a_clear_error():
    with shc.zeros(1, np.int64) as a:
        threads = [
            threading.Thread(target=at.wait, args=(a.array, 0, 0, BOUND))
            for _ in range(L.LOT_NSLOTS)
        ]
        for t in threads:
            t.start()
        until(lambda: at.waiters(a, 0) == L.LOT_NSLOTS, "table filled")
        with pytest.raises(shc.WaitTableFullError, match="waiters already block"):
            at.wait(a, 0, 0, BOUND)
        # in compiled code too, with or without a timeout (never a code taken for OK)
        for call in (
            lambda: H.kernel_wait(a.array, 0, 0, BOUND),
            lambda: H.kernel_wait_forever(a.array, 0, 0),
        ):
            with pytest.raises(RuntimeError, match="wait table full"):
                call()
        assert at.notify(a, 0) == L.LOT_NSLOTS
        for t in threads:
            t.join(BOUND)


def _dead_waiters(a: shc.SharedArray, n: int) -> None:
    """``n`` waiters on a[0] in a process that is then SIGKILLed while they wait."""
    child = mp.get_context("forkserver").Process(
        target=H.child_park_and_hang, args=(a.handle, 0, n)
    )
    child.start()
    try:
        until(lambda: at.waiters(a, 0) == n, f"{n} waiters parked in the child")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(BOUND)
    assert at.waiters(a, 0) == 0  # the dead are not counted


@pytest.mark.crash
@pytest.mark.parametrize("dead", [1, L.LOT_NSLOTS])
def test_a_dead_waiter_takes_no_wakeup_and_no_slot(dead):
    # A process killed while it waited (a pool kills a worker whose task timed out)
    # never frees its slot nor takes a wake-up: notify passes over it to a live waiter,
    # and a full table of dead waiters makes room for a live one.
    with shc.zeros(1, np.int64) as a:
        _dead_waiters(a, dead)
        got = []
        live = threading.Thread(target=lambda: got.append(at.wait(a.array, 0, 0, BOUND)))
        live.start()
        until(lambda: at.waiters(a, 0) == 1, "the live waiter parked")
        assert at.notify(a, 0, 1) == 1
        live.join(BOUND)
        assert got == [at.OK]
        assert at.notify(a, 0) == 0  # and no dead slot is left to 'wake'


# --- across processes ----------------------------------------------------------------
ROUNDS = 10_000


def _parent_pingpong(ctrl: np.ndarray, rounds: int) -> list[int]:
    seen = []
    for r in range(rounds):
        at.store(ctrl, 0, 2 * r + 1)
        at.notify(ctrl, 0, 1)
        while at.load(ctrl, 0) == 2 * r + 1:
            assert at.wait(ctrl, 0, 2 * r + 1, BOUND) != at.TIMED_OUT, f"stuck at round {r}"
        seen.append(at.load(ctrl, 0))
    return seen


@pytest.mark.parametrize("child", [H.child_pingpong_python, H.child_pingpong_kernel])
def test_cross_process_pingpong_in_exact_sequence(child):
    with (
        shc.zeros(2, np.int64) as a,
        ProcessPoolExecutor(1, mp_context=mp.get_context("forkserver")) as ex,
    ):
        fut = ex.submit(child, a.handle, ROUNDS)
        mine = _parent_pingpong(a.array, ROUNDS)
        theirs = fut.result(timeout=120)
    assert theirs == [2 * r + 1 for r in range(ROUNDS)]
    assert mine == [2 * r + 2 for r in range(ROUNDS)]


@pytest.mark.parametrize("in_kernel", [False, True])
def test_notify_k_wakes_exactly_k_of_n_processes(in_kernel):
    n, k = 3, 2
    with (
        shc.zeros(2, np.int64) as a,
        ProcessPoolExecutor(n, mp_context=mp.get_context("forkserver")) as ex,
    ):
        futs = [ex.submit(H.child_wait, a.handle, 0, 0, BOUND, in_kernel) for _ in range(n)]
        until(lambda: at.waiters(a, 0) == n, "all processes parked")
        assert at.notify(a, 0, k) == k
        until(lambda: sum(f.done() for f in futs) == k, f"{k} processes woken")
        assert at.waiters(a, 0) == n - k
        assert sorted(f.result(0) for f in futs if f.done()) == [at.OK] * k
        assert at.notify(a, 0) == n - k
        assert [f.result(timeout=BOUND) for f in futs] == [at.OK] * n


def test_cross_process_timeout_and_not_equal():
    with (
        shc.zeros(2, np.int64) as a,
        ProcessPoolExecutor(1, mp_context=mp.get_context("forkserver")) as ex,
    ):
        assert ex.submit(H.child_wait, a.handle, 0, 0, 0.05, False).result(BOUND) == at.TIMED_OUT
        assert ex.submit(H.child_wait, a.handle, 0, 1, BOUND, True).result(BOUND) == at.NOT_EQUAL
        assert at.waiters(a, 0) == 0


def test_notify_without_waiters_takes_no_lock_and_makes_no_call():
    """A fresh segment's wait table is initialized lazily by the first waiter. A notify
    with no waiters must leave it untouched: no lock, no semaphore, so no system call."""
    with shc.zeros(4, np.int64) as a:
        raw = np.frombuffer(a._state.mm, dtype=np.uint8, count=L.DATA_OFFSET)
        table = raw[L.SEG_LOT : L.SEG_LOT + L.LOT_SIZE]
        for _ in range(100):
            assert at.notify(a, 0) == 0
            assert H.kernel_notify(a.array, 1, 1) == 0
        assert not table.any()  # still all zero bytes: never initialized, never locked
        assert at.wait(a, 0, 0, 0) is at.TIMED_OUT  # the first waiter initializes it
        assert table.any()
        del raw, table
