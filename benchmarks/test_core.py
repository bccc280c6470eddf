"""Core benchmarks: atomics in kernels and from Python, cross-process wake-up latency.

Each group compares shmcompute with its peers on the same work, in the same run:

    pytest benchmarks/test_core.py --benchmark-only --benchmark-group-by=group

Targets (issue 2): in-kernel uncontended atomic add <= 10 ns; Python-level atomic add
faster than multiprocessing.Value (with its lock) and the `atomics` package;
cross-process wait/notify round trip <= 0.5x a multiprocessing.Pipe ping-pong.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading

import numpy as np
import pytest

import shmcompute as shc
import shmcompute.atomics as at
from benchmarks import _core_workers as W

SCALE = float(os.environ.get("SHMCOMPUTE_BENCH_SCALE", "1"))
N_ADDS = max(1000, int(1_000_000 * SCALE))


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    W.warm_up()


# --- in-kernel atomic add -------------------------------------------------------------
@pytest.fixture
def slot():
    return np.zeros(2, np.int64), np.zeros(1024, np.int64)


def _per_add(benchmark, n):
    benchmark.extra_info["adds_per_call"] = n


@pytest.mark.benchmark(group="kernel-add-uncontended")
def test_kernel_plain_add(benchmark, slot):
    arr, idx = slot
    _per_add(benchmark, N_ADDS)
    benchmark(W.plain_adds, arr, idx, N_ADDS)
    assert arr[0] > 0


@pytest.mark.benchmark(group="kernel-add-uncontended")
def test_kernel_atomic_add(benchmark, slot):
    arr, idx = slot
    _per_add(benchmark, N_ADDS)
    benchmark(_counted(W.atomic_adds), arr, idx, N_ADDS)
    assert arr[0] == _calls(W.atomic_adds) * N_ADDS  # exact: every add landed


_CALLS: dict[object, list[None]] = {}


def _counted(kernel):
    """``kernel``, counting its calls (the benchmark decides how many rounds run; a
    list's append is one step under the GIL, so threads count exactly)."""
    calls = _CALLS[kernel] = []

    def call(*args):
        calls.append(None)
        return kernel(*args)

    return call


def _calls(kernel) -> int:
    return len(_CALLS[kernel])


def _two_threads(kernel, arr, idx, n):
    errors: list[BaseException] = []

    def run():
        try:
            kernel(arr, idx, n)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread did not finish within 60 s"
    if errors:
        raise errors[0]


@pytest.mark.benchmark(group="kernel-add-2-workers-one-slot")
def test_kernel_plain_add_two_threads(benchmark, slot):
    arr, idx = slot
    _per_add(benchmark, 2 * N_ADDS)
    benchmark(_two_threads, W.plain_adds, arr, idx, N_ADDS)


@pytest.mark.benchmark(group="kernel-add-2-workers-one-slot")
def test_kernel_atomic_add_two_threads(benchmark, slot):
    arr, idx = slot
    _per_add(benchmark, 2 * N_ADDS)
    benchmark(_two_threads, _counted(W.atomic_adds), arr, idx, N_ADDS)
    assert arr[0] == _calls(W.atomic_adds) * N_ADDS  # exact, unlike the plain add beside it


# --- Python-level atomic add -------------------------------------------------------------
@pytest.mark.benchmark(group="python-add")
def test_python_atomic_add_ndarray(benchmark):
    with shc.zeros(1, np.int64) as a:
        benchmark(at.add, a.array, 0, 1)
        assert a.array[0] > 0


@pytest.mark.benchmark(group="python-add")
def test_python_atomic_add_shared_array(benchmark):
    with shc.zeros(1, np.int64) as a:
        benchmark(at.add, a, 0, 1)
        assert a.array[0] > 0


@pytest.mark.benchmark(group="python-add")
def test_python_mp_value_with_lock(benchmark):
    v = mp.Value("q", 0)

    def locked_add():
        with v.get_lock():
            v.value += 1

    benchmark(locked_add)
    assert v.value > 0


@pytest.mark.benchmark(group="python-add")
def test_python_atomics_package(benchmark):
    atomics = pytest.importorskip("atomics")
    buf = bytearray(8)
    with atomics.atomicview(buffer=buf, atype=atomics.INT) as a:
        benchmark(a.fetch_add, 1)


# --- cross-process wake-up round trip ------------------------------------------------------
CTX = mp.get_context("forkserver")


@pytest.mark.benchmark(group="wakeup-roundtrip")
def test_roundtrip_wait_notify(benchmark):
    with shc.zeros(2, np.int64) as a:
        ctrl = a.array
        child = CTX.Process(target=W.echo_wait_notify, args=(a,), daemon=True)
        child.start()
        try:

            def round_trip():
                t = at.load(ctrl, W.TURN) + 1
                at.store(ctrl, W.TURN, t)
                at.notify(ctrl, W.TURN, 1)
                while at.load(ctrl, W.TURN) == t:
                    if at.wait(ctrl, W.TURN, t, 10.0) == at.TIMED_OUT:
                        raise TimeoutError("echo process stopped answering")

            benchmark(round_trip)
        finally:
            at.store(ctrl, W.STOP, 1)
            at.add(ctrl, W.TURN, 2)
            at.notify(ctrl, W.TURN)
            child.join(10)


@pytest.mark.benchmark(group="wakeup-roundtrip")
def test_roundtrip_pipe(benchmark):
    parent, child_end = CTX.Pipe()
    child = CTX.Process(target=W.echo_pipe, args=(child_end,), daemon=True)
    child.start()
    try:

        def round_trip():
            parent.send(1)
            if not parent.poll(10):
                raise TimeoutError("echo process stopped answering")
            parent.recv()

        benchmark(round_trip)
    finally:
        parent.send(None)
        child.join(10)


@pytest.mark.benchmark(group="wakeup-roundtrip")
def test_roundtrip_queue(benchmark):
    q_in, q_out = CTX.Queue(), CTX.Queue()
    child = CTX.Process(target=W.echo_queue, args=(q_in, q_out), daemon=True)
    child.start()
    try:

        def round_trip():
            q_in.put(1)
            q_out.get(timeout=10)

        benchmark(round_trip)
    finally:
        q_in.put(None)
        child.join(10)
        q_in.close()
        q_out.close()
        q_in.join_thread()
        q_out.join_thread()
