"""Transform benchmarks: ``shmcompute.transform`` against prange, one Numba thread and
the copy-based pools, on the same work in the same run.

    pytest benchmarks/test_transform.py --benchmark-only --benchmark-group-by=group \\
        --benchmark-columns=min,median,mean,rounds

=====================  =============================================================
group                  work per measured call (2 workers everywhere)
=====================  =============================================================
transform-cpu          ``CPU_STEPS`` (32) steps of ``v = v + 0.3 + 0.1*sin(v)*cos(v)``
                       per element over N_CPU float64 (1M at scale 1). shmcompute
                       thread and process pools (share mode, SharedArray input and
                       output created once); Numba ``prange`` (2 threads); the same
                       nogil kernel called directly (one Numba thread); joblib (loky,
                       2 jobs), multiprocessing.Pool.map and
                       ProcessPoolExecutor.map over chunks (each chunk pickled to a
                       worker, its result pickled back, all concatenated)
transform-memory       ``y = 2.5*x + 1`` over N_MEM float64 (16M = 128 MiB at scale
                       1): the same peers, plus prange on shmcompute's SharedArrays
                       (``prange_on_shared_memory``: the same memory as shmcompute,
                       to tell the engine from the page size)
transform-modes        the memory-bound kernel through shmcompute's three modes
                       (share, copy, transfer) on the process backend, at payloads of
                       1 KiB, 1 MiB, 64 MiB and 256 MiB (256 MiB only when
                       SHMCOMPUTE_BENCH_SCALE >= 1 and /dev/shm has room; else
                       skipped). Compare within one payload:
                       ``--benchmark-group-by=group,param:payload``
transform-fixed-cost   FIXED_CALLS sequential transforms of 1,000 float64 elements
                       (one chunk) on the thread and on the process backend; the
                       per-call cost is a call's time / ``extra_info["calls_per_round"]``
=====================  =============================================================

Targets (not asserted: on 2 shared cores timings are noisy; report medians and mins):

* transform-cpu: both backends >= 0.97x prange's throughput and >= 1.9x one Numba
  thread's; >= 1.4x joblib's; >= 1.05x multiprocessing.Pool's and
  ProcessPoolExecutor's.
* transform-memory: both backends >= 0.9x prange's throughput; >= 30x the copy-based
  peers' (multiprocessing.Pool, ProcessPoolExecutor, joblib).
* transform-modes: share and transfer O(1) in the payload beyond the kernel's own pass
  over the data; copy grows with it.
* transform-fixed-cost: <= 100 us per call on processes, <= 30 us on threads.

Measurement rules:

* Numba's OpenMP threads keep spinning ~8-10 ms after each ``prange`` call, which slows
  whatever runs next by ~10%. So prange and shmcompute never alternate inside a
  measured call: each benchmark is its own block, and every side is warmed up (at least
  one call and WARM_SECONDS of calls) right before its timing starts.
* ``prange`` kernels live in the kernel module but are never passed to shmcompute (the
  pool is the parallelism; Numba's threading layer must not be entered from pool
  threads).
* Every result is checked once per benchmark against the NumPy reference, outside the
  timed part: outputs written in place are set to NaN before timing starts and checked
  after, so a broken fast path cannot look good.
* Fairness: every process peer uses the forkserver start method and the same server,
  started before anything is timed, with numpy, numba, shmcompute and the kernel module
  preloaded (what ``ProcessPool`` asks for by default); all workers load the kernels
  from Numba's disk cache during their warm-up. joblib keeps its defaults (loky; inputs
  over 1 MB go through joblib's memmapping, itself a copy). The copy-based peers use the
  same chunks as shmcompute's default ``chunk_size`` (about 16 per worker). Every pool
  is created per benchmark, warmed up, and shut down (workers joined) afterwards.
* prange and one Numba thread run on plain NumPy arrays (what their users pass, and
  NumPy asks for transparent huge pages on large arrays); shmcompute on SharedArrays
  (tmpfs pages: no huge pages while
  /sys/kernel/mm/transparent_hugepage/shmem_enabled is "never", the default).

Sizes: ``SHMCOMPUTE_BENCH_SCALE`` (default 1: the issue's sizes, 1M CPU-bound and 16M
memory-bound elements) scales N_CPU, N_MEM and FIXED_CALLS; the mode payloads are
fixed (64 MiB runs at SCALE >= 0.25, 256 MiB at SCALE >= 1). CI runs
``pytest benchmarks --benchmark-disable``, where each body runs once: this module takes
about 30 s there on 2 cores at scale 1 (mostly making, copying and checking the 128 and
256 MiB arrays), about 7 s with ``SHMCOMPUTE_BENCH_SCALE=0.1``. A full timed run
(``--benchmark-only``) takes about 75 s.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import forkserver
from typing import Any

import numba
import numpy as np
import pytest

import shmcompute as shc
from benchmarks import _transform_kernels as K
from shmcompute.pool import Pool
from shmcompute.transform import default_chunk_size

SCALE = float(os.environ.get("SHMCOMPUTE_BENCH_SCALE", "1"))
WORKERS = 2
TIMEOUT = 120.0  # seconds any single wait may take before the benchmark fails
WARM_SECONDS = 0.05  # each side runs at least this long (and once) before timing

N_CPU = max(8192, int(1_000_000 * SCALE))
N_MEM = max(1 << 16, int((16 << 20) * SCALE))
N_FIXED = 1000
FIXED_CALLS = max(20, int(200 * SCALE))

_KiB, _MiB = 1 << 10, 1 << 20
# payload label -> (bytes, pedantic rounds)
MODE_PAYLOADS = {
    "1KiB": (1 * _KiB, 200),
    "1MiB": (1 * _MiB, 50),
    "64MiB": (64 * _MiB, 10),
    "256MiB": (256 * _MiB, 5),
}
MODES = ("share", "copy", "transfer")

CTX = mp.get_context("forkserver")
# Collection imports every benchmark module before any test runs, so this reaches the
# session's one forkserver before it starts. Append rather than replace: another
# benchmark module may have asked for its own task module already.
_PRELOAD = [
    "numpy",
    "numba",
    "shmcompute.atomics",
    "shmcompute.pool.worker",
    "shmcompute._jobs",
    K.__name__,
]
_current = list(getattr(forkserver._forkserver, "_preload_modules", ["__main__"]))
CTX.set_forkserver_preload(_current + [m for m in _PRELOAD if m not in _current])


@pytest.fixture(scope="module", autouse=True)
def _warm_forkserver() -> None:
    forkserver.ensure_running()
    numba.set_num_threads(WORKERS)  # prange's threads: the same count as every pool


# --- helpers -----------------------------------------------------------------------------
def _warm(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` once, then again until WARM_SECONDS have passed; return the last result."""
    t0 = time.perf_counter()
    result = fn(*args)
    while time.perf_counter() - t0 < WARM_SECONDS:
        result = fn(*args)
    return result


def _chunks(x: np.ndarray) -> list[np.ndarray]:
    """The copy-based peers' chunks: the same as shmcompute's default chunk_size."""
    step = default_chunk_size(x.shape[0], x.itemsize, WORKERS)
    return [x[i : i + step] for i in range(0, x.shape[0], step)]


def _check(got: Any, want: np.ndarray) -> None:
    """``got`` equals ``want`` to 1e-12 relative (NaN, i.e. unwritten, fails). A few
    passes over the data: assert_allclose takes seconds on 256 MiB."""
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == want.dtype
    err = np.abs(got - want)
    bad = ~(err <= 1e-12 * np.abs(want))
    assert not bad.any(), (
        f"{int(bad.sum())} of {got.size} elements differ from the NumPy reference; first "
        f"at {int(np.argmax(bad))}: {got.flat[int(np.argmax(bad))]!r} != "
        f"{want.flat[int(np.argmax(bad))]!r}"
    )


def _shm_free() -> int:
    return shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0


def _require_shm(nbytes: int) -> None:
    """Skip (rather than fail with SegmentTooLargeError) where /dev/shm is small, e.g. a
    container's default 64 MiB; SHMCOMPUTE_BENCH_SCALE=0.1 fits there."""
    free = _shm_free()
    if os.path.isdir("/dev/shm") and free < nbytes:
        pytest.skip(f"needs {nbytes >> 20} MiB of /dev/shm, {free >> 20} MiB free")


def _free(sa: shc.SharedArray) -> None:
    if sa.owner:
        sa.unlink()
    sa.close()


@pytest.fixture(scope="module")
def cpu_data() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    x = np.random.default_rng(1).uniform(-3.0, 3.0, N_CPU)
    yield x, K.cpu_reference(x)


@pytest.fixture(scope="module")
def mem_data() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    x = np.random.default_rng(2).uniform(-1.0, 1.0, N_MEM)
    yield x, K.affine_reference(x)


@pytest.fixture
def shared_io() -> Iterator[Callable[[np.ndarray], tuple[shc.SharedArray, shc.SharedArray]]]:
    """Make a SharedArray input (a copy of x) and output; freed after the test."""
    made: list[shc.SharedArray] = []

    def make(x: np.ndarray) -> tuple[shc.SharedArray, shc.SharedArray]:
        _require_shm(2 * x.nbytes + (1 << 20))
        xs = shc.from_numpy(x)
        made.append(xs)
        out = shc.empty(x.shape, x.dtype)
        made.append(out)
        return xs, out

    try:
        yield make
    finally:
        for sa in made:
            _free(sa)


# --- pools: one per benchmark, shut down and joined after; warmed in each test ----------
@pytest.fixture(params=["thread", "process"])
def shm_pool(request: pytest.FixtureRequest) -> Iterator[Pool]:
    pool = Pool(WORKERS, backend=request.param)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, timeout=TIMEOUT)


@pytest.fixture
def shm_process_pool() -> Iterator[Pool]:
    pool = Pool(WORKERS, backend="process")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, timeout=TIMEOUT)


@pytest.fixture
def mp_pool() -> Iterator[Any]:
    pool = CTX.Pool(WORKERS)
    try:
        yield pool
    finally:
        pool.close()
        pool.join()


@pytest.fixture
def process_pool_executor() -> Iterator[ProcessPoolExecutor]:
    executor = ProcessPoolExecutor(WORKERS, mp_context=CTX)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True)


@pytest.fixture
def joblib_mod() -> Iterator[Any]:
    joblib = pytest.importorskip("joblib")
    from joblib.externals.loky import get_reusable_executor

    try:
        yield joblib
    finally:
        # joblib keeps its loky workers for reuse (300 s idle); stop them now.
        get_reusable_executor(reuse=True).shutdown(wait=True)


# --- how each side runs the work ------------------------------------------------------------
def _shm_runner(kernel: Any, pool: Pool, xs: shc.SharedArray, out: shc.SharedArray) -> Any:
    def run() -> Any:
        return shc.transform(kernel, xs, out=out, pool=pool, timeout=TIMEOUT)

    return run


def _direct_runner(kernel: Any, x: np.ndarray, out: np.ndarray) -> Any:
    def run() -> np.ndarray:
        kernel(x, out)
        return out

    return run


def _mp_pool_runner(task: Any, pool: Any, x: np.ndarray) -> Any:
    def run() -> np.ndarray:
        return np.concatenate(pool.map_async(task, _chunks(x), chunksize=1).get(TIMEOUT))

    return run


def _executor_runner(task: Any, executor: ProcessPoolExecutor, x: np.ndarray) -> Any:
    def run() -> np.ndarray:
        return np.concatenate(list(executor.map(task, _chunks(x), timeout=TIMEOUT)))

    return run


def _joblib_runner(task: Any, joblib: Any, x: np.ndarray) -> Any:
    def run() -> np.ndarray:
        parallel = joblib.Parallel(n_jobs=WORKERS, backend="loky", timeout=TIMEOUT)
        return np.concatenate(parallel(joblib.delayed(task)(c) for c in _chunks(x)))

    return run


def _bench_in_place(benchmark: Any, run: Callable[[], Any], out: np.ndarray, want: Any) -> None:
    """Warm up, poison the output, time, then check what the timed calls wrote."""
    _warm(run)
    out[...] = np.nan
    benchmark(run)
    _check(out, want)


def _bench_returning(benchmark: Any, run: Callable[[], Any], want: np.ndarray) -> None:
    _warm(run)
    _check(benchmark(run), want)


def _elements(benchmark: Any, n: int) -> None:
    benchmark.extra_info["elements"] = n


# --- transform-cpu ---------------------------------------------------------------------------
@pytest.mark.benchmark(group="transform-cpu")
def test_cpu_shmcompute(benchmark, shm_pool, cpu_data, shared_io):
    x, want = cpu_data
    xs, out = shared_io(x)
    _elements(benchmark, N_CPU)
    _bench_in_place(benchmark, _shm_runner(K.cpu_steps, shm_pool, xs, out), out.array, want)


@pytest.mark.benchmark(group="transform-cpu")
def test_cpu_prange(benchmark, cpu_data):
    x, want = cpu_data
    out = np.empty_like(x)
    _elements(benchmark, N_CPU)
    _bench_in_place(benchmark, _direct_runner(K.cpu_steps_prange, x, out), out, want)


@pytest.mark.benchmark(group="transform-cpu")
def test_cpu_one_numba_thread(benchmark, cpu_data):
    x, want = cpu_data
    out = np.empty_like(x)
    _elements(benchmark, N_CPU)
    _bench_in_place(benchmark, _direct_runner(K.cpu_steps, x, out), out, want)


@pytest.mark.benchmark(group="transform-cpu")
def test_cpu_joblib(benchmark, joblib_mod, cpu_data):
    x, want = cpu_data
    _elements(benchmark, N_CPU)
    _bench_returning(benchmark, _joblib_runner(K.cpu_chunk, joblib_mod, x), want)


@pytest.mark.benchmark(group="transform-cpu")
def test_cpu_mp_pool(benchmark, mp_pool, cpu_data):
    x, want = cpu_data
    _elements(benchmark, N_CPU)
    _bench_returning(benchmark, _mp_pool_runner(K.cpu_chunk, mp_pool, x), want)


@pytest.mark.benchmark(group="transform-cpu")
def test_cpu_process_pool_executor(benchmark, process_pool_executor, cpu_data):
    x, want = cpu_data
    _elements(benchmark, N_CPU)
    _bench_returning(benchmark, _executor_runner(K.cpu_chunk, process_pool_executor, x), want)


# --- transform-memory ------------------------------------------------------------------------
@pytest.mark.benchmark(group="transform-memory")
def test_memory_shmcompute(benchmark, shm_pool, mem_data, shared_io):
    x, want = mem_data
    xs, out = shared_io(x)
    _elements(benchmark, N_MEM)
    _bench_in_place(benchmark, _shm_runner(K.affine, shm_pool, xs, out), out.array, want)


@pytest.mark.benchmark(group="transform-memory")
def test_memory_prange(benchmark, mem_data):
    x, want = mem_data
    out = np.empty_like(x)
    _elements(benchmark, N_MEM)
    _bench_in_place(benchmark, _direct_runner(K.affine_prange, x, out), out, want)


@pytest.mark.benchmark(group="transform-memory")
def test_memory_prange_on_shared_memory(benchmark, mem_data, shared_io):
    """prange on the SharedArrays shmcompute uses: separates the engine from the memory
    (tmpfs pages get no transparent huge pages; NumPy's large arrays do)."""
    x, want = mem_data
    xs, out = shared_io(x)
    _elements(benchmark, N_MEM)
    _bench_in_place(
        benchmark, _direct_runner(K.affine_prange, xs.array, out.array), out.array, want
    )


@pytest.mark.benchmark(group="transform-memory")
def test_memory_one_numba_thread(benchmark, mem_data):
    x, want = mem_data
    out = np.empty_like(x)
    _elements(benchmark, N_MEM)
    _bench_in_place(benchmark, _direct_runner(K.affine, x, out), out, want)


@pytest.mark.benchmark(group="transform-memory")
def test_memory_joblib(benchmark, joblib_mod, mem_data):
    x, want = mem_data
    _elements(benchmark, N_MEM)
    _bench_returning(benchmark, _joblib_runner(K.affine_chunk, joblib_mod, x), want)


@pytest.mark.benchmark(group="transform-memory")
def test_memory_mp_pool(benchmark, mp_pool, mem_data):
    x, want = mem_data
    _elements(benchmark, N_MEM)
    _bench_returning(benchmark, _mp_pool_runner(K.affine_chunk, mp_pool, x), want)


@pytest.mark.benchmark(group="transform-memory")
def test_memory_process_pool_executor(benchmark, process_pool_executor, mem_data):
    x, want = mem_data
    _elements(benchmark, N_MEM)
    _bench_returning(benchmark, _executor_runner(K.affine_chunk, process_pool_executor, x), want)


# --- transform-modes ---------------------------------------------------------------------------
def _payload_params() -> list[Any]:
    params = []
    for label, (nbytes, _) in MODE_PAYLOADS.items():
        marks = []
        if nbytes >= 256 * _MiB:
            free = _shm_free()
            if SCALE < 1:
                marks.append(pytest.mark.skip(reason="256 MiB runs at SHMCOMPUTE_BENCH_SCALE >= 1"))
            elif free < 6 * nbytes:  # input, output, a fresh input per round, copies
                marks.append(pytest.mark.skip(reason=f"/dev/shm has only {free >> 20} MiB free"))
        elif nbytes >= 64 * _MiB and SCALE < 0.25:
            marks.append(pytest.mark.skip(reason="64 MiB runs at SHMCOMPUTE_BENCH_SCALE >= 0.25"))
        params.append(pytest.param(label, id=label, marks=marks))
    return params


@pytest.fixture(scope="module")
def mode_data() -> Iterator[Callable[[int], tuple[np.ndarray, np.ndarray]]]:
    """Input and reference per payload size, made once for the three modes."""
    made: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def get(n: int) -> tuple[np.ndarray, np.ndarray]:
        if n not in made:
            made.clear()  # one payload at a time: the tests run payload by payload
            x = np.linspace(-1.0, 1.0, n)
            made[n] = (x, K.affine_reference(x))
        return made[n]

    yield get
    made.clear()


@pytest.mark.benchmark(group="transform-modes")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("payload", _payload_params())
def test_modes(benchmark, shm_process_pool, mode_data, payload, mode):
    nbytes, rounds = MODE_PAYLOADS[payload]
    _require_shm(4 * nbytes + (1 << 20))  # input, output, a fresh input, copy's spills
    n = nbytes // 8
    x, want = mode_data(n)
    pool = shm_process_pool
    benchmark.extra_info["payload_bytes"] = nbytes
    made: list[shc.SharedArray] = []  # everything this test owns, freed at the end
    checked = False

    def check_once(result: Any) -> None:
        nonlocal checked
        if not checked:
            _check(result.array, want)
            checked = True

    try:
        if mode == "transfer":
            # The job consumes (detaches and frees) its input and hands back a new
            # output: a fresh input per round, made and filled outside the timer.
            def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
                xs = shc.from_numpy(x)
                made.append(xs)
                return (xs,), {}

            def run(xs: shc.SharedArray) -> Any:
                result = shc.transform(K.affine, xs, pool=pool, mode="transfer", timeout=TIMEOUT)
                made.append(result)
                return result

            def free_all() -> None:
                while made:
                    _free(made.pop())

            def teardown(xs: shc.SharedArray) -> None:
                assert xs.detached
                check_once(made[-1])
                free_all()

            def warm_once() -> None:
                (xs,), _ = setup()
                run(xs)
                free_all()

            _warm(warm_once)
            result = benchmark.pedantic(
                run, setup=setup, teardown=teardown, rounds=rounds, warmup_rounds=1
            )
            check_once(result)
        else:
            xs = shc.from_numpy(x)
            made.append(xs)
            out = shc.empty(n)
            made.append(out)

            def run_in_place() -> Any:
                return shc.transform(K.affine, xs, out=out, pool=pool, mode=mode, timeout=TIMEOUT)

            _warm(run_in_place)
            out.array[...] = np.nan
            result = benchmark.pedantic(run_in_place, rounds=rounds, warmup_rounds=1)
            assert result is out
            _check(out.array, want)
    finally:
        while made:
            _free(made.pop())


# --- transform-fixed-cost ----------------------------------------------------------------------
@pytest.mark.benchmark(group="transform-fixed-cost")
def test_fixed_cost(benchmark, shm_pool, shared_io):
    x = np.random.default_rng(4).uniform(-1.0, 1.0, N_FIXED)
    want = K.affine_reference(x)
    xs, out = shared_io(x)
    pool = shm_pool

    def calls() -> None:
        for _ in range(FIXED_CALLS):
            shc.transform(K.affine, xs, out=out, pool=pool, timeout=TIMEOUT)

    benchmark.extra_info["calls_per_round"] = FIXED_CALLS
    _elements(benchmark, N_FIXED)
    _bench_in_place(benchmark, calls, out.array, want)
