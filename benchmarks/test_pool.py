"""Worker-pool benchmarks: shmcompute.pool against the stdlib pools and raw IPC.

Each group runs one piece of work on shmcompute and on its peers, in the same run:

    pytest benchmarks/test_pool.py --benchmark-only --benchmark-group-by=group

=======================  =========================================================
group                    work per measured call
=======================  =========================================================
pool-roundtrip-process   N_ROUNDTRIPS sequential ``submit(inc, i).result()`` on 2
                         worker processes; peers: ProcessPoolExecutor,
                         multiprocessing.Pool (apply_async().get()), and a raw
                         multiprocessing.Pipe ping-pong with an echo process (the
                         IPC floor: no pickled call, no future)
pool-burst-10k           submit 10,000 ``inc`` calls, then wait for every result, on
                         2 worker processes; peers: multiprocessing.Pool.apply_async,
                         ProcessPoolExecutor.submit, joblib.Parallel(n_jobs=2) (loky;
                         skipped when joblib is not installed)
pool-roundtrip-thread    N_ROUNDTRIPS sequential ``submit(inc, i).result()`` on 2
                         worker threads; peer: ThreadPoolExecutor
pool-startup             construct a 2-worker pool, get the first result of one
                         ``inc`` call; shutdown is not timed. Peers:
                         ProcessPoolExecutor (which starts workers on demand, so it
                         has started only one by its first result) and
                         multiprocessing.Pool
=======================  =========================================================

Targets (not asserted: on 2 shared cores timings are noisy); per task, i.e. a call's
time divided by ``extra_info["tasks_per_call"]``:

* pool-roundtrip-process: shmcompute <= 0.5x ProcessPoolExecutor, and no slower than
  the raw Pipe ping-pong.
* pool-burst-10k: shmcompute's throughput >= 2x multiprocessing.Pool's.
* pool-roundtrip-thread: shmcompute <= 0.5x ThreadPoolExecutor.
* pool-startup: a shmcompute process pool gives its first result <= 50 ms after
  construction begins.

Fairness: every process peer uses the forkserver start method and the same server,
started before anything is timed with numpy, numba, shmcompute and this benchmark's
task module preloaded (what ``ProcessPool`` asks for by default), so no peer pays for
imports in a fresh worker. Every pool is created once per benchmark, warmed up before
timing and shut down (workers joined) afterwards; every wait is bounded (TIMEOUT).
joblib's loky workers are started by loky's own method, but they are warm before
timing, so that only affects the untimed warm-up.

``multiprocessing.Pool``'s round trips are bimodal on the 2-core VM: ~0.46 ms or ~5 ms
each, from run to run, with the parent at ~125% CPU. Its worker-handler thread waits on
the result pipe too (CPython PR #11488), so while a result is unread it wakes, finds
nothing to do and waits again, spinning against the result-handler thread for the GIL
(5 ms switch interval). That is what its users get; report its median and min.

``SHMCOMPUTE_BENCH_SCALE`` sizes the round-trip batches and the startup rounds (the
burst is 10,000 tasks at any scale: that is the work the group names). CI runs
``pytest benchmarks --benchmark-disable``, where each body runs once, as a test of its
side: there every batch is ``UNTIMED_BATCH`` tasks (the ``batch`` fixture).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import forkserver
from typing import NamedTuple

import pytest

from benchmarks import _pool_workers as W
from shmcompute.pool import Pool

SCALE = float(os.environ.get("SHMCOMPUTE_BENCH_SCALE", "1"))
N_ROUNDTRIPS = max(50, int(2000 * SCALE))
N_BURST = 10_000
STARTUP_ROUNDS = max(3, int(10 * SCALE))
UNTIMED_BATCH = 200  # tasks per call when timing is off (see the ``batch`` fixture)
WORKERS = 2
TIMEOUT = 30.0  # seconds any single wait may take before the benchmark fails
WARM_TASKS = 200

CTX = mp.get_context("forkserver")
# Collection imports every benchmark module before any test runs, so this reaches the
# session's one forkserver even when test_core.py is the first to start it. Without it
# the server could start with the default preload, and each shmcompute worker would
# then import numpy and numba itself (ProcessPool's own preload request is ignored
# once the server runs). Python 3.11's server does not apply the parent's sys.path, so
# this module preloads only when pytest runs from the repository root; elsewhere every
# peer's workers import it during their (untimed) warm-up instead.
CTX.set_forkserver_preload(
    ["numpy", "numba", "shmcompute.atomics", "shmcompute.pool.worker", W.__name__]
)


@pytest.fixture(scope="module", autouse=True)
def _warm_forkserver():
    forkserver.ensure_running()


class Batches(NamedTuple):
    roundtrips: int
    burst: int


@pytest.fixture(scope="module")
def batch(request):
    """Tasks per measured call: the sizes above when timing; with timing off (CI's
    ``--benchmark-disable`` runs each body once, as a test of every side) batches just
    large enough to check every side's results, since a repeat measures nothing there.
    (``multiprocessing.Pool`` round trips alone took 1.5-17 s of a CI run at 2,000.)"""
    if request.config.getoption("benchmark_disable", False):
        return Batches(UNTIMED_BATCH, UNTIMED_BATCH)
    return Batches(N_ROUNDTRIPS, N_BURST)


def _tasks(benchmark, n):
    benchmark.extra_info["tasks_per_call"] = n


def _expected_inc_sum(n):
    return n * (n + 1) // 2  # sum(inc(i) for i in range(n))


# --- how each peer runs the work -------------------------------------------------------
def _roundtrips_submit(executor, n):
    s = 0
    for i in range(n):
        s += executor.submit(W.inc, i).result(TIMEOUT)
    return s


def _roundtrips_apply(pool, n):
    s = 0
    for i in range(n):
        s += pool.apply_async(W.inc, (i,)).get(TIMEOUT)
    return s


def _roundtrips_pipe(conn, n):
    s = 0
    for i in range(n):
        conn.send(i)
        if not conn.poll(TIMEOUT):
            raise TimeoutError("echo process stopped answering")
        s += conn.recv() + 1
    return s


def _burst_submit(executor, n):
    futures = [executor.submit(W.inc, i) for i in range(n)]
    return sum(f.result(TIMEOUT) for f in futures)


def _burst_apply(pool, n):
    results = [pool.apply_async(W.inc, (i,)) for i in range(n)]
    return sum(r.get(TIMEOUT) for r in results)


def _burst_joblib(joblib, n):
    return sum(joblib.Parallel(n_jobs=WORKERS)(joblib.delayed(W.inc)(i) for i in range(n)))


# --- pools: one per benchmark, warm before timing, shut down and joined after ------------
def _warm_executor(executor):
    # Several tasks in flight at once, so an on-demand pool starts all its workers.
    assert _burst_submit(executor, WARM_TASKS) == _expected_inc_sum(WARM_TASKS)
    assert _roundtrips_submit(executor, 20) == _expected_inc_sum(20)


@pytest.fixture
def shm_process_pool():
    pool = Pool(WORKERS, backend="process")
    try:
        _warm_executor(pool)
        yield pool
    finally:
        pool.shutdown(wait=True, timeout=TIMEOUT)


@pytest.fixture
def shm_thread_pool():
    pool = Pool(WORKERS, backend="thread")
    try:
        _warm_executor(pool)
        yield pool
    finally:
        pool.shutdown(wait=True, timeout=TIMEOUT)


@pytest.fixture
def process_pool_executor():
    executor = ProcessPoolExecutor(WORKERS, mp_context=CTX)
    try:
        _warm_executor(executor)
        yield executor
    finally:
        executor.shutdown(wait=True)


@pytest.fixture
def thread_pool_executor():
    executor = ThreadPoolExecutor(WORKERS)
    try:
        _warm_executor(executor)
        yield executor
    finally:
        executor.shutdown(wait=True)


@pytest.fixture
def mp_pool():
    pool = CTX.Pool(WORKERS)
    try:
        assert _burst_apply(pool, WARM_TASKS) == _expected_inc_sum(WARM_TASKS)
        yield pool
    finally:
        pool.close()
        pool.join()


@pytest.fixture
def pipe_echo():
    conn, child_end = CTX.Pipe()
    child = CTX.Process(target=W.echo_pipe, args=(child_end,), daemon=True)
    child.start()
    child_end.close()  # the child holds its own copy; ours would keep the pipe open
    try:
        assert _roundtrips_pipe(conn, 20) == _expected_inc_sum(20)
        yield conn
    finally:
        try:
            conn.send(None)
        finally:
            child.join(TIMEOUT)
            if child.is_alive():  # pragma: no cover - only if the echo loop hangs
                child.kill()
                child.join(TIMEOUT)
            conn.close()


@pytest.fixture
def joblib_warm():
    joblib = pytest.importorskip("joblib")
    from joblib.externals.loky import get_reusable_executor

    try:
        assert _burst_joblib(joblib, WARM_TASKS) == _expected_inc_sum(WARM_TASKS)
        yield joblib
    finally:
        # joblib keeps its loky workers for reuse (300 s idle); stop them now.
        get_reusable_executor(reuse=True).shutdown(wait=True)


# --- pool-roundtrip-process ---------------------------------------------------------------
@pytest.mark.benchmark(group="pool-roundtrip-process")
def test_roundtrip_process_shmcompute(benchmark, shm_process_pool, batch):
    _tasks(benchmark, batch.roundtrips)
    s = benchmark(_roundtrips_submit, shm_process_pool, batch.roundtrips)
    assert s == _expected_inc_sum(batch.roundtrips)


@pytest.mark.benchmark(group="pool-roundtrip-process")
def test_roundtrip_process_pool_executor(benchmark, process_pool_executor, batch):
    _tasks(benchmark, batch.roundtrips)
    s = benchmark(_roundtrips_submit, process_pool_executor, batch.roundtrips)
    assert s == _expected_inc_sum(batch.roundtrips)


@pytest.mark.benchmark(group="pool-roundtrip-process")
def test_roundtrip_process_mp_pool(benchmark, mp_pool, batch):
    _tasks(benchmark, batch.roundtrips)
    s = benchmark(_roundtrips_apply, mp_pool, batch.roundtrips)
    assert s == _expected_inc_sum(batch.roundtrips)


@pytest.mark.benchmark(group="pool-roundtrip-process")
def test_roundtrip_process_pipe(benchmark, pipe_echo, batch):
    _tasks(benchmark, batch.roundtrips)
    s = benchmark(_roundtrips_pipe, pipe_echo, batch.roundtrips)
    assert s == _expected_inc_sum(batch.roundtrips)


# --- pool-burst-10k -------------------------------------------------------------------------
@pytest.mark.benchmark(group="pool-burst-10k")
def test_burst_shmcompute(benchmark, shm_process_pool, batch):
    _tasks(benchmark, batch.burst)
    s = benchmark(_burst_submit, shm_process_pool, batch.burst)
    assert s == _expected_inc_sum(batch.burst)


@pytest.mark.benchmark(group="pool-burst-10k")
def test_burst_mp_pool(benchmark, mp_pool, batch):
    _tasks(benchmark, batch.burst)
    s = benchmark(_burst_apply, mp_pool, batch.burst)
    assert s == _expected_inc_sum(batch.burst)


@pytest.mark.benchmark(group="pool-burst-10k")
def test_burst_process_pool_executor(benchmark, process_pool_executor, batch):
    _tasks(benchmark, batch.burst)
    s = benchmark(_burst_submit, process_pool_executor, batch.burst)
    assert s == _expected_inc_sum(batch.burst)


@pytest.mark.benchmark(group="pool-burst-10k")
def test_burst_joblib(benchmark, joblib_warm, batch):
    _tasks(benchmark, batch.burst)
    s = benchmark(_burst_joblib, joblib_warm, batch.burst)
    assert s == _expected_inc_sum(batch.burst)


# --- pool-roundtrip-thread ------------------------------------------------------------------
@pytest.mark.benchmark(group="pool-roundtrip-thread")
def test_roundtrip_thread_shmcompute(benchmark, shm_thread_pool, batch):
    _tasks(benchmark, batch.roundtrips)
    s = benchmark(_roundtrips_submit, shm_thread_pool, batch.roundtrips)
    assert s == _expected_inc_sum(batch.roundtrips)


@pytest.mark.benchmark(group="pool-roundtrip-thread")
def test_roundtrip_thread_pool_executor(benchmark, thread_pool_executor, batch):
    _tasks(benchmark, batch.roundtrips)
    s = benchmark(_roundtrips_submit, thread_pool_executor, batch.roundtrips)
    assert s == _expected_inc_sum(batch.roundtrips)


# --- pool-startup ---------------------------------------------------------------------------
def _start_to_first_result(benchmark, make_pool, first_result, close):
    """Time ``make_pool()`` + ``first_result(pool)``; ``close(pool)`` runs untimed."""
    live = []

    def start():
        pool = make_pool()
        live.append(pool)  # before the first result: a failed start is still closed
        return first_result(pool)

    def close_all():
        while live:
            close(live.pop())

    _tasks(benchmark, 1)
    try:
        # pedantic: setup/teardown run outside the timer. (With --benchmark-disable it
        # runs start() once and skips teardown, hence the finally.)
        result = benchmark.pedantic(
            start, teardown=close_all, rounds=STARTUP_ROUNDS, warmup_rounds=1
        )
    finally:
        close_all()
    assert result == W.inc(1)


def _close_mp_pool(pool):
    pool.close()
    pool.join()


@pytest.mark.benchmark(group="pool-startup")
def test_startup_shmcompute(benchmark):
    _start_to_first_result(
        benchmark,
        lambda: Pool(WORKERS, backend="process"),
        lambda pool: pool.submit(W.inc, 1).result(TIMEOUT),
        lambda pool: pool.shutdown(wait=True, timeout=TIMEOUT),
    )


@pytest.mark.benchmark(group="pool-startup")
def test_startup_process_pool_executor(benchmark):
    _start_to_first_result(
        benchmark,
        lambda: ProcessPoolExecutor(WORKERS, mp_context=CTX),
        lambda executor: executor.submit(W.inc, 1).result(TIMEOUT),
        lambda executor: executor.shutdown(wait=True),
    )


@pytest.mark.benchmark(group="pool-startup")
def test_startup_mp_pool(benchmark):
    _start_to_first_result(
        benchmark,
        lambda: CTX.Pool(WORKERS),
        lambda pool: pool.apply_async(W.inc, (1,)).get(TIMEOUT),
        _close_mp_pool,
    )
