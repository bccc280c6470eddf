"""transform and reduce: results equal NumPy on both backends and in all three modes.

Sizes that do and do not divide by the chunk size, empty and 1-element arrays, 2-D
arrays, halos, in place, hypothesis over shapes and chunk sizes; errors before work;
kernel errors that name the chunk; a worker crash that re-runs only the lost chunks.
"""

from __future__ import annotations

import gc
import math
import operator
import os
import subprocess
import sys
import textwrap
import threading
import time
import types
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmcompute as shc
from shmcompute._arenas import ARENAS
from shmcompute.errors import (
    ArgumentError,
    ArgumentTypeError,
    DetachedError,
    TransformError,
    WorkerCrashedError,
)
from shmcompute.pool import Pool
from shmcompute.sync import Event
from shmcompute.transform import default_chunk_size, reduce, transform, work_rows
from tests import _kernels as K
from tests import _pool_tasks as T

MODES = ["share", "copy", "transfer"]


@pytest.fixture(scope="module", params=["thread", "process"])
def pool(request: pytest.FixtureRequest) -> Iterator[Pool]:
    p = Pool(2, backend=request.param)
    # Creates the pool's job arenas (segments it keeps until shutdown) before any
    # test's leak snapshot.
    transform(K.affine, np.arange(4.0), out=np.empty(4), pool=p)
    yield p
    p.shutdown(wait=True, timeout=30)


@pytest.fixture(autouse=True)
def _keep_module_pool_out_of_leak_check(request: pytest.FixtureRequest) -> None:
    """The module-scoped pool lives across tests on purpose (the leak check runs per
    test and would count its workers as new); start it before the check's snapshot."""
    if "pool" in request.fixturenames:
        request.getfixturevalue("pool")


def _affine_ref(x: np.ndarray) -> np.ndarray:
    return 2.5 * x + 1.0


def _blur_ref(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    out = np.empty_like(x)
    for i in range(n):
        lo, hi = max(i - 1, 0), min(i + 2, n)
        out[i] = x[lo:hi].mean()
    return out


def _run(fn: Any, mode: str, *arrays: np.ndarray, **kw: Any) -> np.ndarray:
    """Run in ``mode`` on SharedArray copies; return the result as a plain array."""
    shared = [shc.from_numpy(a) for a in arrays]
    try:
        out = fn(*shared, mode=mode, **kw)
        result = np.array(out.array if isinstance(out, shc.SharedArray) else out)
        if isinstance(out, shc.SharedArray):
            out.unlink()
            out.close()
        if mode == "transfer":
            assert all(s.detached for s in shared)
        return result
    finally:
        for s in shared:
            if not s.detached:
                s.unlink()
                s.close()


# --- correctness: elementwise, multi-input, 2-D, halo, reductions -----------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("n", "chunk"), [(0, 4), (1, 4), (7, 3), (1000, 100), (1001, 100)])
def test_elementwise_matches_numpy(pool: Pool, mode: str, n: int, chunk: int) -> None:
    x = np.random.default_rng(n).standard_normal(n)
    got = _run(lambda a, **kw: transform(K.affine, a, pool=pool, chunk_size=chunk, **kw), mode, x)
    np.testing.assert_allclose(got, _affine_ref(x))


@pytest.mark.parametrize("mode", MODES)
def test_two_and_three_inputs(pool: Pool, mode: str) -> None:
    rng = np.random.default_rng(1)
    a, b, c = (rng.standard_normal(5003) for _ in range(3))
    got2 = _run(lambda *s, **kw: transform(K.add2, *s, pool=pool, chunk_size=512, **kw), mode, a, b)
    np.testing.assert_allclose(got2, a + b)
    got3 = _run(
        lambda *s, **kw: transform(K.fma3, *s, pool=pool, chunk_size=700, **kw), mode, a, b, c
    )
    np.testing.assert_allclose(got3, a * b + c)
    # a two-input halo kernel, a three-input reduction
    got_halo = _run(
        lambda *s, **kw: transform(K.blur_pair, *s, pool=pool, chunk_size=600, overlap=1, **kw),
        mode,
        a,
        b,
    )
    np.testing.assert_allclose(got_halo, np.r_[0.0, a[:-1]] + np.r_[b[1:], 0.0])
    dot3 = _run(
        lambda *s, **kw: np.float64(
            reduce(K.dot3_partial, *s, pool=pool, chunk_size=700, combine=operator.add, **kw)
        ),
        mode,
        a,
        b,
        c,
    )
    assert dot3 == pytest.approx(np.sum(a * b * c))


@pytest.mark.parametrize("mode", MODES)
def test_image_by_rows(pool: Pool, mode: str) -> None:
    img = np.random.default_rng(2).random((301, 64))
    got = _run(
        lambda s, **kw: transform(K.rows_plus_colsum, s, pool=pool, chunk_size=32, **kw), mode, img
    )
    np.testing.assert_allclose(got, img * 2.0 + np.arange(64))


def _vblur5_ref(img: np.ndarray) -> np.ndarray:
    n = img.shape[0]
    return np.array([img[max(i - 2, 0) : i + 3].mean(axis=0) for i in range(n)]).reshape(img.shape)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("n", "chunk"), [(0, 5), (1, 5), (2, 5), (50, 5), (1003, 100)])
def test_halo_blur(pool: Pool, mode: str, n: int, chunk: int) -> None:
    x = np.random.default_rng(3).standard_normal(n)
    got = _run(
        lambda s, **kw: transform(K.blur3, s, pool=pool, chunk_size=chunk, overlap=1, **kw), mode, x
    )
    np.testing.assert_allclose(got, _blur_ref(x))


@pytest.mark.parametrize("mode", MODES)
def test_image_blur_by_rows_with_a_halo(pool: Pool, mode: str) -> None:
    img = np.random.default_rng(8).random((203, 17))
    got = _run(
        lambda s, **kw: transform(K.vblur5, s, pool=pool, chunk_size=20, overlap=2, **kw),
        mode,
        img,
    )
    np.testing.assert_allclose(got, _vblur5_ref(img))


@pytest.mark.parametrize("mode", MODES)
def test_reductions(pool: Pool, mode: str) -> None:
    x = np.random.default_rng(4).standard_normal(100_003) * 40
    y = np.random.default_rng(5).standard_normal(100_003)

    def red(kernel: Any, *arrays: np.ndarray, **kw: Any) -> Any:
        shared = [shc.from_numpy(a) for a in arrays]
        try:
            return reduce(kernel, *shared, pool=pool, chunk_size=4096, mode=mode, **kw)
        finally:
            for s in shared:
                if not s.detached:
                    s.unlink()
                    s.close()

    assert red(K.chunk_sum, x, combine=operator.add, identity=0.0) == pytest.approx(x.sum())
    assert red(K.chunk_min, x, combine=min) == x.min()
    hist = red(K.histogram16, x, combine=np.add)
    np.testing.assert_array_equal(hist, np.bincount(x.astype(np.int64) & 15, minlength=16))
    assert red(K.dot_partial, x, y, combine=operator.add, identity=0.0) == pytest.approx(x @ y)
    assert reduce(K.chunk_sum, np.zeros(0), combine=operator.add, identity=0.0, pool=pool) == 0
    with pytest.raises(ArgumentError, match="reduce of an empty input needs identity="):
        reduce(K.chunk_sum, np.zeros(0), combine=operator.add, pool=pool)
    assert red(K.chunk_sum, x[:1], combine=operator.add) == x[0]  # one element, one chunk


def test_reduce_is_deterministic_across_workers_and_modes() -> None:
    x = np.random.default_rng(6).standard_normal(200_001) * 1e6
    results = set()
    for workers in (1, 2, 3):
        for backend in ("thread", "process"):
            with Pool(workers, backend=backend) as p, shc.from_numpy(x) as sx:
                for mode in ("share", "copy"):
                    results.add(
                        reduce(
                            K.chunk_sum,
                            sx,
                            combine=operator.add,
                            identity=0.0,
                            pool=p,
                            chunk_size=1000,
                            mode=mode,
                        )
                    )
    assert len(results) == 1  # bit-identical: the fold order is fixed by chunk_size
    (total,) = results
    # ...and it is that fold: each chunk summed in order (the kernel's loop; NumPy's
    # accumulate adds in order too), the partials added in chunk order.
    in_chunk_order = 0.0
    for lo in range(0, x.shape[0], 1000):
        in_chunk_order += np.add.accumulate(x[lo : lo + 1000])[-1]
    assert total == in_chunk_order
    assert total == pytest.approx(math.fsum(x), rel=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_in_place(pool: Pool, mode: str) -> None:
    x = np.arange(10_000, dtype=np.float64)
    sx = shc.from_numpy(x)
    out = transform(K.affine, sx, out=sx, pool=pool, chunk_size=999, mode=mode)
    try:
        if mode == "transfer":  # the one segment moved to the job and back
            assert sx.detached and out is not sx and out.owner
        else:
            assert out is sx
        np.testing.assert_allclose(out.array, _affine_ref(x))
    finally:
        out.unlink()
        out.close()
    if mode != "share":
        return
    plain = x.copy()
    transform(K.affine, plain, out=plain, pool=pool, chunk_size=999)  # NumPy in, NumPy out
    np.testing.assert_allclose(plain, _affine_ref(x))


def test_plain_numpy_inputs_and_out(pool: Pool) -> None:
    x = np.random.default_rng(7).standard_normal(4097)
    out = np.zeros_like(x)
    assert transform(K.affine, x, out=out, pool=pool) is out
    np.testing.assert_allclose(out, _affine_ref(x))
    res = transform(K.affine, x, pool=pool, dtype=np.float32)
    assert isinstance(res, shc.SharedArray) and res.dtype == np.float32
    np.testing.assert_allclose(res.array, _affine_ref(x).astype(np.float32), rtol=1e-6)
    res.unlink()
    res.close()


def test_repeat_calls_follow_the_array_types(pool: Pool) -> None:
    # transform keeps what it compiled per kernel and array types (transform._prepared):
    # a call with other types must compile for them, never reuse a driver built for
    # the last call's types (its entry point does not check them: wrong answers).
    from shmcompute import transform as transform_module

    x = np.linspace(-3.0, 3.0, 3001)
    readonly = x.copy()
    readonly.flags.writeable = False
    cases = [
        (x, np.float64),
        (x.astype(np.float32), np.float32),
        (np.arange(3001, dtype=np.int64), np.float64),
        (readonly, np.float64),
        (x, np.float32),
        (x, np.float64),  # the first case again
    ]
    for inp, out_dtype in cases:
        out = np.full(inp.shape, np.nan, out_dtype)
        transform(K.affine, inp, out=out, pool=pool, chunk_size=500)
        want = (2.5 * inp.astype(np.float64) + 1.0).astype(out_dtype)
        np.testing.assert_allclose(out, want, rtol=1e-6)
    img = np.arange(60.0).reshape(12, 5)
    out2 = np.empty_like(img)
    transform(K.rows_plus_colsum, img, out=out2, pool=pool, chunk_size=5)
    np.testing.assert_allclose(out2, img * 2.0 + np.arange(5.0))
    # Repeating a call reuses its entry: the cache does not grow.
    size = len(transform_module._prepared)
    for _ in range(3):
        transform(K.affine, x, out=np.empty_like(x), pool=pool)
    assert len(transform_module._prepared) == size


@pytest.mark.parametrize("backend", ["thread", "process"])
@pytest.mark.parametrize("factor", [1e12, 1e-12])
def test_helper_count_follows_the_measured_work(
    backend: str, factor: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A job gets as many drivers as pay for themselves by the pool's measure of the
    # kernel's work per row: HELP_FACTOR times what starting one costs (a task's start,
    # or a team driver's publish). The first call of a kernel on a pool uses every
    # worker (nothing measured). The job is ~2 ms of work: longer than a helper can
    # take to start, so with HELP_FACTOR ~0 helping always pays.
    from shmcompute import _runner

    monkeypatch.setattr(_runner, "HELP_FACTOR", factor)  # 1e12: never worth it; ~0: always
    x = np.linspace(0.0, 1.0, 4000)
    ref = np.empty_like(x)
    K.cpu_heavy(x, ref)
    out = np.empty_like(x)
    with Pool(2, backend=backend) as pool:
        for _ in range(6):
            transform(K.cpu_heavy, x, out=out, pool=pool, chunk_size=500, timeout=30)
            np.testing.assert_allclose(out, ref)
        pool.shutdown(wait=True, timeout=30)
        helpers = _helper_runs(pool)
    per_call = 1 if factor > 1 else 2  # after the first call, which used both workers
    # On threads the caller runs one of the drivers itself (not a helper).
    caller = 1 if backend == "thread" else 0
    assert helpers == (2 - caller) + 5 * (per_call - caller)


def _helper_runs(pool: Pool) -> int:
    """Drivers given to others than the caller: the pool's tasks, and on threads the
    ones handed to its team."""
    team = pool.__dict__.get("_team")
    return pool.stats.completed + (team.handed if team is not None else 0)


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_heavy_kernels_get_smaller_default_chunks_once_measured(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A kernel that does much per row needs far fewer rows than 64 KiB for a chunk's
    # fixed cost to vanish: once the pool has measured it, transform's default chunks
    # hold ~50 us of work (not less than a page), so a small array is shared among the
    # workers. reduce (whose result depends on the chunk size) and copy mode keep the
    # fixed floor.
    from shmcompute import _runner
    from shmcompute import transform as transform_module

    monkeypatch.setattr(_runner, "HELP_FACTOR", 1e-12)  # every job is worth splitting
    chunks: list[tuple[str, str, int]] = []
    real_job, real_copy = transform_module.run_job, transform_module.run_copy

    def job(w: Any, *a: Any, **kw: Any) -> Any:
        chunks.append((w.kind, "share", w.chunk))
        return real_job(w, *a, **kw)

    def copy(w: Any, *a: Any, **kw: Any) -> Any:
        chunks.append((w.kind, "copy", w.chunk))
        return real_copy(w, *a, **kw)

    monkeypatch.setattr(transform_module, "run_job", job)
    monkeypatch.setattr(transform_module, "run_copy", copy)
    x = np.linspace(0.0, 1.0, 4000)  # 31 KiB: one chunk under the 64 KiB floor
    ref = np.empty_like(x)
    K.cpu_heavy(x, ref)  # ~0.6 us a row: 512 rows hold 50 us of work
    sums = []
    with Pool(2, backend=backend) as pool:
        for mode in ("share", "share", "share", "copy"):
            out = transform(K.cpu_heavy, x, pool=pool, mode=mode, timeout=60)
            np.testing.assert_allclose(out.array, ref)
            out.unlink()
            out.close()
        for _ in range(3):
            sums.append(reduce(K.cpu_heavy_sum, x, combine=operator.add, pool=pool, timeout=60))
    page = 4096 // x.itemsize
    assert chunks[0] == ("map", "share", 8192)  # nothing measured yet
    assert [c[1:] for c in chunks[1:3]] == [("share", page)] * 2
    assert chunks[3] == ("map", "copy", 8192)
    assert chunks[4:] == [("reduce", "share", 8192)] * 3
    assert sums == [sums[0]] * 3 and sums[0] == pytest.approx(ref.sum())


def test_work_estimate_follows_lower_measures_at_once_and_higher_ones_slowly() -> None:
    # Each measure of a job's work per row is an upper bound (fixed costs, a core taken
    # away): one slow job must not pass a cheap kernel for an expensive one.
    from types import SimpleNamespace

    from shmcompute import _runner

    pool: Any = SimpleNamespace()
    prep: Any = object()
    _runner._measured(prep, pool, 100.0)
    _runner._measured(prep, pool, 1000.0)  # one slow job
    assert _runner.row_ns(prep, pool) == pytest.approx(100.0 * _runner.COST_DRIFT)
    _runner._measured(prep, pool, 40.0)
    assert _runner.row_ns(prep, pool) == 40.0
    for _ in range(30):  # the kernel really got slower (other data): followed
        _runner._measured(prep, pool, 1000.0)
    assert _runner.row_ns(prep, pool) == 1000.0


def test_prepared_calls_work_with_the_fallback_key(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without Numba's private compute_fingerprint, transform keys prepared calls by its
    # own array_key: the same behaviour, a little slower.
    from shmcompute import _jobs
    from shmcompute import transform as transform_module

    monkeypatch.setattr(transform_module, "_fingerprint", _jobs.array_key)
    monkeypatch.setattr(transform_module, "_prepared", {})
    x = np.linspace(-1.0, 1.0, 2001)
    for inp in (x, x.astype(np.float32), x):
        out = np.empty(inp.shape, np.float64)
        transform(K.affine, inp, out=out, pool=pool, chunk_size=300)
        np.testing.assert_allclose(out, 2.5 * inp.astype(np.float64) + 1.0, rtol=1e-6)
    assert len(transform_module._prepared) == 2


def test_transforms_from_several_threads_at_once(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Callers in several threads share the pool (its arenas) and transform's caches; a
    # tiny cache bound makes them evict each other's entries while they run.
    from concurrent.futures import ThreadPoolExecutor

    from shmcompute import transform as transform_module

    monkeypatch.setattr(transform_module, "_PREPARED_MAX", 2)
    dtypes = [np.float64, np.float32, np.int64, np.int32]

    def one(i: int) -> bool:
        x = np.arange(5000 + i, dtype=dtypes[i % len(dtypes)])
        out = np.empty(x.shape, np.float64)
        for _ in range(20):
            out.fill(np.nan)
            transform(K.affine, x, out=out, pool=pool, chunk_size=700, timeout=60)
            np.testing.assert_allclose(out, 2.5 * x.astype(np.float64) + 1.0, rtol=1e-6)
        return True

    with ThreadPoolExecutor(4) as callers:
        assert all(callers.map(one, range(8), timeout=120))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.integers(0, 300),
    cols=st.integers(1, 5),
    chunk=st.integers(1, 80),
    mode=st.sampled_from(MODES),
)
def test_hypothesis_shapes_and_chunks(
    pool: Pool, rows: int, cols: int, chunk: int, mode: str
) -> None:
    img = np.arange(rows * cols, dtype=np.float64).reshape(rows, cols)
    got = _run(
        lambda s, **kw: transform(K.rows_plus_colsum, s, pool=pool, chunk_size=chunk, **kw),
        mode,
        img,
    )
    np.testing.assert_allclose(got, img * 2.0 + np.arange(cols))


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.integers(0, 200),
    cols=st.integers(1, 4),
    chunk=st.integers(3, 60),
    mode=st.sampled_from(MODES),
)
def test_hypothesis_halos_and_reductions(
    pool: Pool, rows: int, cols: int, chunk: int, mode: str
) -> None:
    img = np.random.default_rng(rows * 7 + cols).random((rows, cols))
    got = _run(
        lambda s, **kw: transform(K.vblur5, s, pool=pool, chunk_size=chunk, overlap=2, **kw),
        mode,
        img,
    )
    np.testing.assert_allclose(got, _vblur5_ref(img))
    sums = _run(
        lambda s, **kw: np.asarray(
            reduce(K.col_sums, s, pool=pool, chunk_size=chunk, combine=np.add, identity=0.0, **kw)
        ),
        mode,
        img,
    )
    np.testing.assert_allclose(sums, img.sum(axis=0) if rows else 0.0)


def test_default_chunk_size_rule() -> None:
    assert default_chunk_size(1000, 8, 2) == 8192  # small: one chunk (64 KiB floor)
    assert default_chunk_size(1_000_000, 8, 2) == 31_250  # 16 chunks per worker
    assert default_chunk_size(16_000_000, 8, 2) == 131_072  # large: 1 MiB chunks
    assert default_chunk_size(4000, 4000 * 8, 2) == 32  # an image: 1 MiB of rows
    assert default_chunk_size(10**6, 10**6, 2) == 1  # a row over 1 MiB: one per chunk
    assert default_chunk_size(4000, 4000 * 8, 2, overlap=10) == 80  # >= 8 halos
    assert default_chunk_size(0, 8, 4) >= 1
    # A measured kernel: the floor falls to 50 us of work, but not below a page.
    assert default_chunk_size(50_000, 8, 16, work_rows=64) == 512  # a page of float64
    assert default_chunk_size(50_000, 8, 2, work_rows=2048) == 2048
    assert default_chunk_size(1_000_000, 8, 2, work_rows=64) == 31_250  # 16 per worker
    assert default_chunk_size(1000, 8, 2, work_rows=1 << 17) == 8192  # cheap: 64 KiB
    assert default_chunk_size(4000, 4000 * 8, 2, overlap=10, work_rows=1) == 80


def test_work_rows_is_a_power_of_two_holding_50_us() -> None:
    assert work_rows(1000.0) == 64  # 50 rows of 1 us, rounded up
    assert work_rows(600.0) == 128
    assert work_rows(1.5) == 1 << 16  # 33,334 rows
    assert work_rows(1e9) == 1  # a row over 50 us
    assert work_rows(0.0) >= 1


def test_default_pool_is_used() -> None:
    x = np.arange(100.0)
    out = np.empty_like(x)
    import shmcompute.transform as module

    try:
        shc.transform(K.affine, x, out=out)  # the package attribute may be the module
        np.testing.assert_allclose(out, _affine_ref(x))
        assert module.default_pool().backend == "thread"
        out2 = module(K.affine, x)  # calling the module calls the function
        np.testing.assert_allclose(out2.array, _affine_ref(x))
        out2.unlink()
        out2.close()
    finally:
        module.default_pool().shutdown()


@pytest.mark.parametrize("mode", ["share", "copy"])
def test_progress_bar(
    pool: Pool, mode: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the built-in fallback line
    x = np.arange(5000.0)
    out = np.empty_like(x)
    transform(K.affine, x, out=out, pool=pool, chunk_size=100, progress=True, mode=mode)
    np.testing.assert_allclose(out, _affine_ref(x))
    err = capsys.readouterr().err
    assert "shmcompute: 50/50 chunks" in err  # ends at the total, fed from the counter


@pytest.mark.parametrize("mode", ["share", "transfer"])
def test_progress_bar_moves_while_the_job_runs(
    pool: Pool, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every chunk but the first waits at a gate the test opens only once the bar has
    # shown that first chunk: a bar fed only at the end (on threads the caller runs
    # chunks itself) never shows it, and the job then fails after the kernel's 30 s.
    from shmcompute import modes

    monkeypatch.setitem(sys.modules, "tqdm", None)
    shown: list[int] = []
    real = modes.Progress.update_to

    def spy(self: Any, n: int) -> None:
        shown.append(min(n, self.total))
        real(self, n)

    monkeypatch.setattr(modes.Progress, "update_to", spy)
    n, chunk = 100, 10
    x = shc.from_numpy(np.arange(float(n)))
    gate = shc.zeros(n, np.int64)
    opener = shc.SharedArray.attach(gate.handle)  # (a transfer detaches gate itself)
    done: list[Any] = []
    job = threading.Thread(
        target=lambda: done.append(
            transform(
                K.gated_copy,
                x,
                gate,
                pool=pool,
                chunk_size=chunk,
                overlap=1,
                mode=mode,
                progress=True,
            )
        )
    )
    job.start()
    try:
        deadline = time.monotonic() + 30
        while not any(0 < v < n // chunk for v in shown) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any(0 < v < n // chunk for v in shown), f"the bar showed only {set(shown)}"
    finally:
        for i in range(n):
            shc.atomics.store(opener.array, i, 1)
            shc.atomics.notify(opener.array, i)
        job.join(60)
        opener.close()
    assert not job.is_alive() and done
    out = done[0]
    try:
        np.testing.assert_array_equal(out.array, np.arange(float(n)))
        assert shown[-1] == n // chunk
    finally:
        out.unlink()
        out.close()
        for sa in (x, gate):
            if not sa.detached:
                sa.unlink()
                sa.close()


def test_progress_bar_uses_tqdm_when_installed(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    updates: list[int] = []

    class FakeTqdm:
        def __init__(self, total: int, unit: str) -> None:
            assert total == 20 and unit == "chunk"

        def update(self, n: int) -> None:
            updates.append(n)

        def close(self) -> None:
            updates.append(-1)

    fake = types.ModuleType("tqdm")
    fake.tqdm = FakeTqdm  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tqdm", fake)
    x = np.arange(2000.0)
    transform(K.affine, x, out=np.empty_like(x), pool=pool, chunk_size=100, progress=True)
    assert sum(u for u in updates if u > 0) == 20 and updates[-1] == -1


# --- transfer mode ---------------------------------------------------------------------------
def test_transfer_detaches_the_sender(pool: Pool) -> None:
    x = shc.from_numpy(np.arange(1000.0))
    name = x.name
    out = transform(K.affine, x, pool=pool, mode="transfer")
    try:
        with pytest.raises(DetachedError):
            x.array
        assert out.owner and not os.path.exists(f"/dev/shm/{name}")  # consumed input freed
        np.testing.assert_allclose(out.array, _affine_ref(np.arange(1000.0)))
    finally:
        out.unlink()
        out.close()
    with pytest.raises(ArgumentTypeError, match="transfer mode moves SharedArrays"):
        transform(K.affine, np.arange(3.0), pool=pool, mode="transfer")


def test_a_transfer_that_fails_before_any_work_leaves_the_arrays_with_the_caller(
    pool: Pool,
) -> None:
    x = np.arange(1000.0)
    with shc.from_numpy(x) as a, shc.from_numpy(x) as b, shc.from_numpy(x) as out:
        attached = shc.SharedArray.attach(b.handle)
        try:
            failing = [
                # the kernel does not compile for these inputs (found before the move)
                (lambda: transform(K.add2, a, pool=pool, mode="transfer"), TransformError),
                (
                    lambda: transform(K.returns_value, a, out=out, pool=pool, mode="transfer"),
                    TransformError,
                ),
                (
                    lambda: transform(K.add2, a, b, pool=pool, dtype=3, mode="transfer"),
                    ArgumentTypeError,
                ),
                # the second input cannot be moved: the first one must not be either
                (lambda: transform(K.add2, a, x, pool=pool, mode="transfer"), ArgumentTypeError),
                (lambda: transform(K.add2, a, attached, pool=pool, mode="transfer"), ArgumentError),
                (
                    lambda: transform(K.add2, a, b, out=np.empty(1000), pool=pool, mode="transfer"),
                    ArgumentTypeError,
                ),
            ]
            for call, error in failing:
                with pytest.raises(error):
                    call()
                for sa in (a, b, out):
                    assert not sa.detached and sa.owner
                    np.testing.assert_array_equal(sa.array, x)
        finally:
            attached.close()
        # and they still move when nothing is wrong
        res = transform(K.add2, a, b, pool=pool, mode="transfer")
        try:
            assert a.detached and b.detached
            np.testing.assert_allclose(res.array, 2 * x)
        finally:
            res.unlink()
            res.close()


# --- errors before any work -------------------------------------------------------------------
def test_argument_errors(pool: Pool) -> None:
    x = np.arange(10.0)
    buf = np.arange(11.0)
    cases: list[tuple[Any, type[Exception], str]] = [
        (
            lambda: transform(lambda a, o: None, x, pool=pool),
            ArgumentTypeError,
            "kernel must be a Numba function",
        ),
        (lambda: transform(K.holds_gil, x, pool=pool), ArgumentError, "nogil=True"),
        (
            lambda: transform(K.affine, x, np.arange(9.0), pool=pool),
            ArgumentError,
            "input 0 has 10 rows, input 1 has 9",
        ),
        (lambda: transform(K.affine, x[::2], pool=pool), ArgumentError, "not C-contiguous"),
        (
            lambda: transform(K.affine, x, out=np.empty(20)[::2], pool=pool),
            ArgumentError,
            "out is not C-contiguous (strides (16,)); pass a C-contiguous out",
        ),
        (lambda: transform(K.affine, x, pool=pool, timeout=0), ArgumentError, "timeout must be"),
        (lambda: transform(K.affine, x, pool=pool, retries=-1), ArgumentError, "retries must be"),
        (
            lambda: transform(K.affine, np.array([object()] * 3), pool=pool),
            ArgumentTypeError,
            "dtype object",
        ),
        (
            lambda: transform(K.affine, x, out=np.empty(5), pool=pool),
            ArgumentError,
            "out has 5 rows",
        ),
        (
            lambda: transform(K.affine, x, pool=pool, mode="move"),
            ArgumentError,
            "mode must be one of",
        ),
        (
            lambda: transform(K.affine, x, pool=pool, chunk_size=0),
            ArgumentError,
            "chunk_size must be >= 1",
        ),
        (
            lambda: transform(K.blur3, x, pool=pool, chunk_size=2, overlap=2),
            ArgumentError,
            "overlap (2) must be smaller than chunk_size (2); use chunk_size > 2",
        ),
        (lambda: transform(K.affine, x, x, x, x, pool=pool), ArgumentError, "at most 3"),
        (
            lambda: transform(K.blur3, x, out=x, pool=pool, chunk_size=5, overlap=1),
            ArgumentError,
            "out shares memory with an input, and overlap=1",
        ),
        (
            lambda: transform(K.blur3, buf[:10], out=buf[1:], pool=pool, overlap=1),
            ArgumentError,
            "pass a separate out",
        ),
        (lambda: transform(K.affine, x, pool=pool, dtype="float65"), ArgumentTypeError, "dtype"),
        (lambda: transform(K.affine, x, pool=pool, dtype=object), ArgumentTypeError, "objects"),
        (
            lambda: transform(K.affine, np.float64(1.0), pool=pool),
            ArgumentTypeError,
            "input 0 must be a NumPy array",
        ),
        (lambda: transform(K.affine, x, pool="mine"), ArgumentTypeError, "pool must be"),
        (lambda: transform(K.affine, pool=pool), ArgumentError, "transform needs at least one"),
        (
            lambda: reduce(K.chunk_sum, combine=operator.add, pool=pool),
            ArgumentError,
            "reduce needs at least one input",
        ),
        (
            lambda: reduce(K.chunk_sum, x, combine=3, pool=pool),
            ArgumentTypeError,
            "combine must be callable",
        ),
    ]
    ro = np.empty(10)
    ro.flags.writeable = False
    cases.append(
        (lambda: transform(K.affine, x, out=ro, pool=pool), ArgumentError, "out is read-only")
    )
    for call, error, match in cases:
        with pytest.raises(error) as info:
            call()
        assert match in str(info.value), (match, str(info.value))


def test_kernel_that_does_not_compile_or_returns_a_value(pool: Pool) -> None:
    with pytest.raises(TransformError, match=r"tests._kernels.add2 does not compile"):
        transform(K.add2, np.arange(4.0), pool=pool)  # 2 inputs + out expected, got 1 + out
    with pytest.raises(TransformError) as info:
        transform(K.does_not_type, np.arange(4.0), pool=pool)
    msg = str(info.value)  # what Numba found wrong and where, past its pipeline headers
    assert "Failed in" not in msg and "No implementation of function" in msg
    assert "add(float64, " in msg and "_kernels.py line" in msg and 'x[i] + "a"' in msg
    with pytest.raises(TransformError, match="returns float64"):
        transform(K.returns_value, np.arange(4.0), pool=pool)
    with pytest.raises(TransformError, match="returns nothing"):
        reduce(K.returns_nothing, np.arange(4.0), combine=operator.add, pool=pool)


@pytest.mark.parametrize("mode", MODES)
def test_kernel_error_names_kernel_and_chunk(pool: Pool, mode: str) -> None:
    x = np.arange(1000.0)
    x[734] = -1.0
    with shc.from_numpy(x) as sx:
        with pytest.raises(TransformError) as info:
            transform(K.fails_on_negative, sx, pool=pool, chunk_size=100, mode=mode)
        if mode == "transfer":
            assert sx.detached  # (consumed by the job, whatever its end)
    msg = str(info.value)
    assert "tests._kernels.fails_on_negative" in msg and "chunk 7 (rows 700:800)" in msg
    assert "negative input" in msg
    out = np.empty_like(x)
    transform(K.affine, x, out=out, pool=pool)  # the pool is still usable
    np.testing.assert_allclose(out, _affine_ref(x))


# --- scheduling: the output is complete when its last chunk is written --------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", [0, 734])
@pytest.mark.parametrize("kernel", [K.sum_fails_on_negative, K.hist_fails_on_negative])
def test_reduce_kernel_error_names_kernel_and_chunk(
    pool: Pool, mode: str, where: int, kernel: Any
) -> None:
    x = np.arange(1000.0)
    x[where] = -1.0
    with shc.from_numpy(x) as sx, pytest.raises(TransformError) as info:
        reduce(kernel, sx, combine=operator.add, pool=pool, chunk_size=100, mode=mode)
    i = where // 100
    msg = str(info.value)
    name = kernel.py_func.__name__
    assert f"tests._kernels.{name}" in msg and f"chunk {i} (rows {i * 100}:{i * 100 + 100})" in msg
    assert "ValueError: negative input" in msg and info.value.__cause__ is not None


def test_caller_does_not_wait_for_tasks_that_never_started() -> None:
    # Both workers are busy, so the job's worker tasks queue behind them; the caller runs
    # driver 0 itself and writes every chunk. It returns then, not when the queued tasks
    # get a worker (they start later, find nothing to claim, and leave).
    gate = Event()
    x = np.arange(50_000.0)
    with Pool(2, backend="thread") as pool:
        blockers = [pool.submit(T.block, gate, 30.0) for _ in range(2)]
        try:
            out = np.empty_like(x)
            transform(K.affine, x, out=out, pool=pool, chunk_size=1000, timeout=30)
            np.testing.assert_allclose(out, _affine_ref(x))
            assert not any(b.done() for b in blockers)  # it did not wait for them
        finally:
            gate.set()
        assert all(b.result(timeout=30) for b in blockers)
        for _ in range(2 * ARENAS):  # the arenas come back; the stragglers left cleanly
            out2 = np.empty_like(x)
            transform(K.affine, x, out=out2, pool=pool, chunk_size=1000, timeout=30)
            np.testing.assert_allclose(out2, _affine_ref(x))
        pool.shutdown(wait=True, timeout=30)
        assert pool.stats.failed == 0
    gate.close()


def test_drivers_claim_their_own_block_first_then_help_the_others() -> None:
    from shmcompute import _drivers as D

    ctrl = np.zeros(D.ctrl_words(10), np.int64)
    D.reset(ctrl, 10)
    D.begin_attempt(ctrl, 10, 3, 1)  # blocks [0, 3), [3, 6), [6, 10)
    got, emptied = [], 0
    while True:
        j, emptied = D.claim(ctrl, 1, emptied, 10)
        if j < 0:
            break
        got.append(j)
    assert got == [3, 4, 5, 6, 7, 8, 9, 0, 1, 2]
    assert D.exhausted(ctrl, 10)
    assert D.claim(ctrl, 0, 0, 10)[0] == -1


def test_interleaved_claims_take_every_chunk_exactly_once() -> None:
    from shmcompute import _drivers as D

    rng = np.random.default_rng(7)
    for nwork, ntasks in [(1, 1), (5, 3), (3, 5), (100, 7), (4096, 16)]:
        ctrl = np.zeros(D.ctrl_words(nwork), np.int64)
        D.reset(ctrl, nwork)
        D.begin_attempt(ctrl, nwork, ntasks, 1)
        emptied = [0] * ntasks
        live = list(range(ntasks))
        got = []
        while live:
            t = live[rng.integers(len(live))]
            j, emptied[t] = D.claim(ctrl, t, emptied[t], nwork)
            if j < 0:
                live.remove(t)
            else:
                got.append(j)
        assert sorted(got) == list(range(nwork)), (nwork, ntasks)
        assert D.exhausted(ctrl, nwork)


def test_a_stopped_job_has_nothing_to_claim() -> None:
    from shmcompute import _drivers as D

    ctrl = np.zeros(D.ctrl_words(8), np.int64)
    D.reset(ctrl, 8)
    D.begin_attempt(ctrl, 8, 2, 1)
    assert D.claim(ctrl, 0, 0, 8)[0] == 0 and not D.exhausted(ctrl, 8)
    ctrl[D.J_CLAIM] = D.STOP
    assert D.claim(ctrl, 1, 0, 8)[0] == -1 and D.exhausted(ctrl, 8)


def test_a_late_process_task_leaves_without_attaching() -> None:
    # A process task that starts after the others did every chunk returns at once: it
    # must not attach the job's arrays (the caller may have freed them by then).
    from shmcompute import _drivers as D
    from shmcompute._jobs import Job, kernel_ref, pack, run_task

    with Pool(1, backend="process") as pool, shc.zeros(D.ctrl_words(4), np.int64) as ctrl:
        ctrl.array[D.J_NTASKS] = 1
        ctrl.array[D.J_BLOCK] = 4  # every chunk of the one block claimed
        gone = shc.zeros(4, np.float64)
        handle = gone.handle
        gone.unlink()
        gone.close()
        ref = kernel_ref(K.affine)
        job = pack(Job("map", ref, ctrl.handle, None, (handle,), handle, 4, 1, 4, 0, True))
        assert pool.submit(run_task, job, 0).result(timeout=60) == 0
        # However a task ends, it counts itself out (the caller reuses the arena then).
        assert ctrl.array[D.J_EXIT] == 1 and ctrl.array[D.J_EXITED] == 1
        ctrl.array[D.J_BLOCK] = 3  # one chunk left: now it must attach, and cannot
        ctrl.array[D.J_EXIT] = ctrl.array[D.J_EXITED] = 0
        with pytest.raises(FileNotFoundError):
            pool.submit(run_task, job, 0).result(timeout=60)
        assert ctrl.array[D.J_EXIT] == 1 and ctrl.array[D.J_EXITED] == 1


def test_an_arena_recalls_a_job_only_for_the_same_array_objects() -> None:
    from shmcompute._arenas import Arena
    from shmcompute._jobs import PackedJob

    a = Arena(process=False, words=64)
    x, y = shc.zeros(4, np.float64), shc.zeros(4, np.float64)
    packed = PackedJob.__new__(PackedJob)  # (the arena only hands it back)
    key = ("map", None, *map(id, (None, x, y)))
    a.remember(key, (None, x, y), packed)
    assert a.recall(key, (None, x, y)) is packed
    y2 = shc.zeros(4, np.float64)
    assert a.recall(key, (None, x, y2)) is None  # another object: a miss (and forgotten)
    assert a.recall(key, (None, x, y)) is None
    a.remember(key, (None, x, y), packed)
    for sa in (x, y, y2):
        sa.unlink()
        sa.close()
    del x, y, sa
    gc.collect()
    z = shc.zeros(4, np.float64)  # (may reuse a freed object's address: the key's id)
    assert a.recall(key, (None, z, z)) is None
    z.unlink()
    z.close()


def test_a_late_future_counts_its_task_out_only_of_its_own_attempt() -> None:
    # A driver task's future can resolve after its job returned and the arena went to
    # another job: counting the task out then would count out the new job's task of the
    # same number, and free the arena under it.
    from shmcompute import _drivers as D

    ctrl = np.zeros(D.ctrl_words(4), np.int64)
    D.reset(ctrl, 4)
    D.begin_attempt(ctrl, 4, 2, 8)  # the arena's new job (attempt 8)
    D.left_if(ctrl, 1, 7)  # the old job's task 1, late
    assert ctrl[D.J_EXITED] == 0 and ctrl[D.J_EXIT + 1] == 0
    D.left_if(ctrl, 1, 8)
    assert ctrl[D.J_EXITED] == 1 and ctrl[D.J_EXIT + 1] == 1
    D.left_if(ctrl, 1, 8)  # once only
    assert ctrl[D.J_EXITED] == 1


def _arenas_after_drivers_left(pool: Pool, timeout: float = 30.0) -> Any:
    """The pool's arenas once the drivers of its past jobs have left (or ``timeout``
    passed): a job looking for an arena collects the ones left behind, and a round trip
    through the pool lets straggling tasks finish."""
    from shmcompute import _arenas

    state = pool.__dict__["_arenas"]
    deadline = time.monotonic() + timeout
    while True:
        _arenas.release(pool, _arenas.arena(pool, _arenas.ARENA_WORDS))
        if not state.left or time.monotonic() > deadline:
            return state
        pool.submit(T.ident, 0).result(timeout=timeout)


def test_every_arena_comes_back_after_back_to_back_jobs(pool: Pool) -> None:
    # Arenas go back once every driver has left (process tasks count themselves out;
    # nothing else tells the pool): after 200 jobs and a quiet moment, every arena the
    # pool has is free again.

    x = np.arange(20_000.0)
    out = np.empty_like(x)
    for i in range(200):
        transform(K.affine, x, out=out, pool=pool, chunk_size=1000 if i % 2 else None)
    np.testing.assert_allclose(out, _affine_ref(x))
    state = _arenas_after_drivers_left(pool)
    assert not state.left and state.busy == 0


def test_a_process_task_that_loses_the_race_to_the_last_chunk_leaves_quietly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A task that starts while chunks remain can find the arrays gone while it attaches
    # them: the other tasks wrote every chunk meanwhile and the caller, done, freed its
    # temporary copies (seen in a clean-clone run: a spurious FileNotFoundError counted
    # as a failed task). It leaves quietly then; with chunks still unclaimed, the error
    # stands. (run_task runs here, in the test process, to order the race.)
    from shmcompute import _drivers as D
    from shmcompute import _jobs

    with shc.zeros(D.ctrl_words(4), np.int64) as ctrl:
        ctrl.array[D.J_NTASKS] = 1
        gone = shc.zeros(4, np.float64)
        handle = gone.handle
        gone.unlink()
        gone.close()
        job = _jobs.Job(
            "map",
            _jobs.kernel_ref(K.affine),
            ctrl.handle,
            None,
            (handle,),
            handle,
            4,
            1,
            4,
            0,
            True,
        )
        real_view = _jobs.view

        def view_while_the_others_finish(h: Any, populate: bool = True) -> np.ndarray:
            if h.name == handle.name:
                ctrl.array[D.J_BLOCK] = 4  # meanwhile, every chunk was claimed
            return real_view(h, populate)

        try:
            monkeypatch.setattr(_jobs, "view", view_while_the_others_finish)
            assert _jobs.run_task(_jobs.PackedJob(job), 0) == 0
            ctrl.array[D.J_BLOCK] = 0
            monkeypatch.setattr(_jobs, "view", real_view)
            with pytest.raises(FileNotFoundError):
                _jobs.run_task(_jobs.PackedJob(job), 0)
        finally:
            hit = _jobs._attached.pop(ctrl.handle.name, None)  # this process's view of ctrl
            if hit is not None:
                hit[0].close()


def test_process_workers_let_go_of_freed_arrays() -> None:
    # Workers keep a repeated job's arrays attached (a job over the same arrays costs a
    # lookup), but never keep freed memory alive for long: a segment the caller unlinked
    # is unmapped by every worker at its next job after 0.1 s.
    def mapped(pid: int, name: str) -> bool:
        with open(f"/proc/{pid}/maps") as f:
            return name in f.read()

    with Pool(1, backend="process") as pool:
        x = shc.from_numpy(np.arange(10_000.0))
        y = transform(K.affine, x, pool=pool)
        (pid,) = (w.pid for w in pool.stats.workers)
        assert pid is not None and mapped(pid, x.name) and mapped(pid, y.name)
        names = (x.name, y.name)
        for a in (x, y):
            a.unlink()
            a.close()
        time.sleep(0.15)
        with shc.from_numpy(np.arange(100.0)) as z:
            out = transform(K.affine, z, pool=pool)
            np.testing.assert_allclose(out.array, _affine_ref(z.array))
            out.unlink()
            out.close()
        assert not any(mapped(pid, name) for name in names)


def test_workers_map_a_cached_array_up_front() -> None:
    # Process workers claim different chunks from job to job; unless a cached segment's
    # pages are mapped when it is attached, every job takes page faults on pages this
    # process has not touched yet (thousands per job for large arrays).
    import resource

    from shmcompute import _jobs

    with shc.zeros(4 << 20, np.float64) as owner:  # 32 MiB, 8,192 pages
        view = _jobs.view(owner.handle)  # what a worker does (a second mapping)
        try:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            view[:] = 1.0
            total = float(view.sum())
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        finally:
            del view
            _jobs._attached.pop(owner.name)[0].close()
            _jobs._unpacked.clear()
        assert total == 4 << 20
        assert faults < 100, faults  # without it: one per page, 8,192


def test_an_interrupted_job_stops_its_drivers(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C in the caller (here: in its wait, or as its own driver returns) fails the
    # job; the other drivers must stop claiming chunks rather than finish the job
    # unseen (process workers ignore SIGINT). 256 chunks of ~2 ms: stopped at once,
    # each driver writes a chunk or two; left alone, they would write all of them.
    from shmcompute import _runner

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    if pool.backend == "process":
        monkeypatch.setattr(_runner, "wait_bell", interrupted)
    else:
        real = _runner.drive
        monkeypatch.setattr(
            _runner,
            "drive",
            lambda p, name, ctrl, t, *rest: (
                interrupted() if t == 0 else real(p, name, ctrl, t, *rest)
            ),
        )
    # (SharedArrays: with NumPy arrays a process job writes a temporary copy, which a
    # failed job never copies back.)
    x = shc.from_numpy(np.linspace(0.0, 1.0, 512_000))
    out_sa = shc.from_numpy(np.full(512_000, np.nan))
    out = out_sa.array
    with pytest.raises(KeyboardInterrupt):
        transform(K.cpu_heavy, x, out=out_sa, pool=pool, chunk_size=2000)
    monkeypatch.undo()
    assert not _arenas_after_drivers_left(pool).left
    written = np.count_nonzero(~np.isnan(out)) // 2000
    del out
    for sa in (x, out_sa):
        sa.unlink()
        sa.close()
    assert written < 256 // 4, f"{written} of 256 chunks written after the interrupt"


def test_a_kernel_error_is_not_held_past_the_deadline_nor_hidden_by_it() -> None:
    # The caller's own chunk fails at once while the team's thread is in a 1.5 s chunk:
    # the caller lets the others leave (nothing writes after the error is raised) but
    # only until the job's deadline, and the error raised is the kernel's.
    n = 4096
    with Pool(2, backend="thread") as pool:
        slow = np.zeros(n)
        slow[0] = slow[n // 2] = 0.05
        transform(K.wait_then_fail, slow, out=np.empty(n), pool=pool, chunk_size=n // 2)
        x = np.zeros(n)
        x[1] = -1.0  # chunk 0 (the caller's own block) fails at once
        x[n // 2] = 1.5  # chunk 1 (the team's) takes 1.5 s
        t0 = time.monotonic()
        with pytest.raises(TransformError, match="this chunk fails on chunk 0"):
            transform(
                K.wait_then_fail, x, out=np.empty(n), pool=pool, chunk_size=n // 2, timeout=0.3
            )
        assert time.monotonic() - t0 < 1.2


def test_a_thread_pools_task_timeout_neither_fails_a_transform_nor_frees_its_arena() -> None:
    # A driver task on a thread pool (the team cannot take misaligned arrays) that ran
    # past the pool's task_timeout had its future failed while its thread, which cannot
    # be stopped, went on in its chunk: the job failed with TaskTimeoutError, the driver
    # was counted out and the arena went to the next jobs, whose counters the stray
    # driver then moved (they returned with rows unwritten, or failed). A transform is
    # bounded by its own timeout=, whose drivers stop after their chunk.
    n = 4096

    def misaligned(x: np.ndarray) -> np.ndarray:  # (so not on the team)
        buf = np.empty(x.nbytes + 1, np.uint8)
        y = np.frombuffer(buf.data, x.dtype, count=x.size, offset=1)
        y[...] = x
        return y

    with Pool(2, backend="thread", task_timeout=0.2) as pool:
        x = np.arange(n, dtype=np.float64)
        x[0] = 0.05  # chunk 0 (the caller's block) takes 50 ms
        x[n // 2] = 0.6  # chunk 1 (the driver task's) 0.6 s, past the task_timeout
        out = np.full(n, np.nan)
        transform(K.wait_then_fail, misaligned(x.copy()), out=out, pool=pool, chunk_size=n // 2)
        np.testing.assert_array_equal(out, x)
        with pytest.raises(TimeoutError, match="did not finish within its timeout"):
            xm = misaligned(x.copy())
            transform(K.wait_then_fail, xm, out=out, pool=pool, chunk_size=n // 2, timeout=0.2)
        # The next jobs, on the same arenas while that driver finishes its chunk, are
        # whole and right.
        for k in range(40):
            y = np.arange(n, dtype=np.float64) + k
            y[:: n // 8] = 0.0  # (each chunk's first row: no waiting)
            got = np.full(n, np.nan)
            transform(K.wait_then_fail, misaligned(y.copy()), out=got, pool=pool, chunk_size=n // 8)
            np.testing.assert_array_equal(got, y)


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_copy_mode_chunk_past_the_pools_task_timeout_says_so(backend: str) -> None:
    # Copy-mode chunks are ordinary pool tasks: the pool's task_timeout applies (their
    # copies are their own). Past it, the job said it "did not finish within its
    # timeout" though it had none; the error names the chunk and the pool's limit.
    n = 4096
    x = np.arange(n, dtype=np.float64)
    quick = x.copy()
    quick[:: n // 16] = 0.0  # (no chunk waits)
    x[0] = 0.0
    x[n // 2] = 3.0  # chunk 1 takes 3 s
    late = r"chunk 1 \(rows 2048:4096\).*task_timeout"
    with Pool(2, backend=backend, task_timeout=1.0) as pool:
        for _ in range(2):  # each worker loads the kernel first (else it can take 1 s, loaded)
            transform(
                K.wait_then_fail, quick, out=np.empty(n), pool=pool, chunk_size=n // 16, mode="copy"
            )
        with pytest.raises(shc.TaskTimeoutError, match=late):
            transform(
                K.wait_then_fail, x, out=np.empty(n), pool=pool, chunk_size=n // 2, mode="copy"
            )


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("timeout", [1e10, math.inf])
def test_a_timeout_beyond_any_clock_is_no_timeout(pool: Pool, timeout: float) -> None:
    x = np.arange(10_000.0)
    out = np.empty_like(x)
    transform(K.affine, x, out=out, pool=pool, chunk_size=1000, timeout=timeout)
    np.testing.assert_allclose(out, 2.5 * x + 1.0)


def test_timed_jobs_share_one_deadline_thread_that_keeps_nothing_of_ended_jobs() -> None:
    from shmcompute import _runner

    x = np.arange(1000.0)
    out = np.empty_like(x)
    with Pool(2, backend="thread") as pool:
        for _ in range(500):
            transform(K.affine, x, out=out, pool=pool, timeout=30.0)
    names = [t.name for t in threading.enumerate()]
    assert names.count(_runner._Deadlines.NAME) == 1
    assert len(_runner._deadlines._heap) <= 2  # (each call's entry goes at the next)
    np.testing.assert_allclose(out, 2.5 * x + 1.0)


TIMED_OUT_AND_DROPPED = textwrap.dedent(
    """
    import gc, sys, time
    import numpy as np
    import shmcompute as shc
    from tests import _kernels as K

    if __name__ == "__main__":
        with shc.Pool(2, backend="thread") as pool:
            shc.transform(K.slow_copy, np.arange(40.0), out=np.empty(40), pool=pool,
                          chunk_size=10)
            for mode in ("transfer", "share") * 12:
                x = shc.from_numpy(np.arange(8000.0))
                try:
                    shc.transform(K.slow_copy, x, pool=pool, chunk_size=10, mode=mode,
                                  timeout=0.05)
                except TimeoutError:
                    pass  # (the traceback, which kept the job's arrays, goes here)
                else:
                    sys.exit("no TimeoutError")
                if not x.detached:
                    x.unlink()
                    x.close()
                del x
                gc.collect()
                time.sleep(0.03)  # the team's thread ends its chunk meanwhile
        print("ok")
    """
)


def test_arrays_of_a_timed_out_job_outlive_the_drivers_still_in_it() -> None:
    # On threads a timed-out job raises while the team's thread is inside a chunk,
    # writing to the new output (and reading the inputs) by address; the caller then
    # frees them. They must stay mapped until that thread has left, or it writes to
    # freed memory: this script segfaulted (exit -11) before. In a child: within
    # pytest, the exception kept (and its traceback's frames) hold the arrays anyway.
    proc = subprocess.run(
        [sys.executable, "-c", TIMED_OUT_AND_DROPPED],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stderr[-3000:])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["transform", "reduce"])
def test_a_job_past_its_timeout_raises_timeout_error_and_stops(
    pool: Pool, kind: str, mode: str
) -> None:
    # timeout= bounds the whole job: past it TimeoutError, and the job stops (its
    # output is not returned: nothing may go on working on it unseen). 800 chunks of
    # 20 ms: 8 s on two workers; stopped, a chunk or two more per worker. On threads
    # the caller runs chunks itself and looked at the clock only once none was left:
    # such a job ran to its end and returned.
    n, chunk = 8000, 10
    nchunks = n // chunk
    x = shc.from_numpy(np.arange(float(n)))
    out = shc.from_numpy(np.full(n, np.nan))

    def job(x: Any, out: Any, mode: str, timeout: float | None) -> Any:
        if kind == "reduce":
            return reduce(
                K.slow_sum,
                x,
                combine=operator.add,
                pool=pool,
                chunk_size=chunk,
                mode=mode,
                timeout=timeout,
            )
        return transform(
            K.slow_copy, x, out=out, pool=pool, chunk_size=chunk, mode=mode, timeout=timeout
        )

    try:
        # Compiled before the clock starts (with a cold cache that takes seconds).
        job(x.array[: 4 * chunk], out.array[: 4 * chunk], "share", None)
        out.array[:] = np.nan
        completed = pool.stats.completed
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="did not finish within its timeout"):
            job(x, out, mode, 0.2)
        took = time.monotonic() - t0
        assert took < 3.0, f"TimeoutError after {took:.1f} s"
        state = _arenas_after_drivers_left(pool)  # (a round trip: the pool runs tasks)
        assert not state.left
        if mode == "share" and kind == "transform":
            written = np.count_nonzero(~np.isnan(out.array)) // chunk
            assert written < nchunks // 4, f"{written} of {nchunks} chunks written"
        if mode == "copy":  # (a chunk is a task: those not started were cancelled)
            ran = pool.stats.completed - completed
            assert ran < nchunks // 4, f"{ran} of {nchunks} chunk tasks ran"
    finally:
        for sa in (x, out):
            if not sa.detached:  # (a transfer's arrays were the job's, and went with it)
                sa.unlink()
                sa.close()
    y = np.arange(1000.0)  # the pool is as usable as before
    got = transform(K.affine, y, out=np.empty_like(y), pool=pool, chunk_size=100)
    np.testing.assert_allclose(got, _affine_ref(y))


# --- a worker crash mid-job --------------------------------------------------------------------
@pytest.mark.crash
def test_crash_reruns_only_the_lost_chunks() -> None:
    x = np.arange(20_000, dtype=np.float64)
    x[12_345] = -1.0
    with (
        Pool(2, backend="process") as pool,
        shc.from_numpy(x) as sx,
        shc.zeros(x.shape[0], np.int64) as latch,
    ):
        out = transform(K.dies_once_on_marker, sx, latch, pool=pool, chunk_size=1000)
        try:
            np.testing.assert_allclose(out.array, 2.0 * x)
            assert pool.stats.crashed == 1 and pool.stats.total == 2
        finally:
            out.unlink()
            out.close()
        latch.array[:] = 0
        with pytest.raises(WorkerCrashedError, match=r"chunks \[12\] were lost"):
            transform(K.dies_once_on_marker, sx, latch, pool=pool, chunk_size=1000, retries=0)


@pytest.mark.crash
def test_crash_in_transfer_mode_reruns_only_the_lost_chunks() -> None:
    # The job owns the moved arrays, and its one-shot tasks unmap them as they end: the
    # re-run of the lost chunk attaches them again.
    x = np.arange(20_000, dtype=np.float64)
    x[12_345] = -1.0
    with Pool(2, backend="process") as pool:
        sx, latch = shc.from_numpy(x), shc.zeros(x.shape[0], np.int64)
        out = transform(
            K.dies_once_on_marker, sx, latch, pool=pool, chunk_size=1000, mode="transfer"
        )
        try:
            assert sx.detached and latch.detached
            np.testing.assert_allclose(out.array, 2.0 * x)
            assert pool.stats.crashed == 1
        finally:
            out.unlink()
            out.close()


@pytest.mark.crash
def test_a_pool_that_retries_tasks_leaves_lost_chunks_to_the_transform() -> None:
    # A pool's own retries re-run a crashed task from the start. A driver task re-run
    # that way finds the chunk its first run was writing claimed and leaves it unwritten
    # (the job then failed with "no error reported"): driver tasks are never retried by
    # the pool; the transform re-runs the lost chunks itself.
    x = np.arange(20_000, dtype=np.float64)
    x[12_345] = -1.0
    with (
        Pool(2, backend="process", retries=2) as pool,
        shc.from_numpy(x) as sx,
        shc.zeros(x.shape[0], np.int64) as latch,
    ):
        out = transform(K.dies_once_on_marker, sx, latch, pool=pool, chunk_size=1000)
        try:
            np.testing.assert_allclose(out.array, 2.0 * x)
            assert pool.stats.crashed == 1
        finally:
            out.unlink()
            out.close()


@pytest.mark.crash
def test_copy_mode_runs_a_crashed_chunk_again_up_to_retries() -> None:
    # A copy-mode chunk is a task with its own copy of the rows: running it again is
    # safe, and each run here dies again, so the job fails after 1 + retries runs.
    x = np.arange(5000, dtype=np.float64)
    x[2345] = -1.0
    with Pool(2, backend="process") as pool:
        for retries, runs in ((0, 1), (2, 3)):
            before = pool.stats.crashed
            with pytest.raises(WorkerCrashedError) as info:
                transform(
                    K.dies_on_marker, x, pool=pool, chunk_size=1000, mode="copy", retries=retries
                )
            assert pool.stats.crashed - before == runs
            msg = str(info.value)
            assert "tests._kernels.dies_on_marker's job on chunk 2 (rows 2000:3000)" in msg
            assert f"retries ran out ({retries})" in msg and info.value.exitcode == 9
        x[2345] = 1.0  # the pool is still usable
        out = transform(K.dies_on_marker, x, pool=pool, mode="copy")
        try:
            np.testing.assert_allclose(out.array, 2.0 * x)
        finally:
            out.unlink()
            out.close()


def test_process_drivers_compile_in_the_caller() -> None:
    # A kernel and dtype the process workers have not seen: the caller compiles the
    # driver for the workers' array types (writing Numba's cache) before any worker
    # needs it, rather than every worker compiling it at once on its first job and
    # racing to write the cache. The workers load it.
    from shmcompute import _jobs

    def planned(kernel: Any) -> bool:
        return any(key[1] == id(kernel) for key in _jobs._plans)

    x = np.arange(5000, dtype=np.int16)
    out = np.empty_like(x)
    with Pool(2, backend="process") as pool:
        # (The first call of a kernel on a pool gives every worker a driver.)
        transform(K.only_for_caller_compile, x, out=out, pool=pool, chunk_size=500)
        np.testing.assert_array_equal(out, 3 * x)
        total = reduce(
            K.only_for_caller_compile_sum, x, combine=operator.add, pool=pool, chunk_size=500
        )
        assert total == x.astype(np.int64).sum()
        f32 = reduce(
            K.only_for_caller_compile_f32, x, combine=operator.add, pool=pool, chunk_size=500
        )
        assert f32 == x.astype(np.int64).sum()
        for k in (K.only_for_caller_compile, K.only_for_caller_compile_sum):
            assert planned(k)
        # (for the partials' dtype the job uses: float64, the float Numba returns)
        assert any(
            key[1] == id(K.only_for_caller_compile_f32) and key[-1][0] == "<f8"
            for key in _jobs._plans
        )
        # Workers that ran a driver loaded it from the cache. (A cache warm from earlier
        # runs would hide a worker's own compile: the caller-side check above is the
        # one that fails without the caller's compile. A worker whose task came late
        # for both jobs loaded nothing: it left without attaching.)
        for _, _, misses in pool.map(T.driver_cache_stats_of, range(4), timeout=30):
            assert misses == 0, "a worker compiled a driver itself"


# --- kernels without an importable name --------------------------------------------------------
def test_script_kernels_go_by_reference_unless_a_worker_cannot_import_them(
    tmp_path: Any,
) -> None:
    # A worker imports the script as __mp_main__: a kernel at its top level is found
    # there (by reference, from Numba's cache); one under `if __name__ == "__main__":`
    # is not, so it is shipped by value.
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import numpy as np, numba
            import shmcompute as shc
            from shmcompute._jobs import kernel_ref

            @numba.njit(nogil=True, cache=True)
            def top(x, out):
                for i in range(x.shape[0]):
                    out[i] = 2 * x[i]

            if __name__ == "__main__":
                @numba.njit(nogil=True, cache=True)
                def guarded(x, out):
                    for i in range(x.shape[0]):
                        out[i] = 3 * x[i]

                with shc.Pool(2, backend="process") as pool:
                    for k, factor in ((top, 2), (guarded, 3)):
                        y = shc.transform(k, np.arange(5000.0), pool=pool, chunk_size=500)
                        assert np.array_equal(y.array, factor * np.arange(5000.0))
                        y.unlink(); y.close()
                        print(k.py_func.__name__, kernel_ref(k).by_value is None)
            """
        )
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": root},
    )
    assert proc.stdout.split() == ["top", "True", "guarded", "False"], proc.stderr[-2000:]
    assert "leaked" not in proc.stderr


def test_a_kernel_without_a_disk_cache_is_worth_a_warning_on_processes(pool: Pool) -> None:
    from shmcompute import transform as module

    module._warned_uncached.discard("tests._kernels.affine_uncached")
    x = np.arange(100.0)
    out = np.empty_like(x)
    if pool.backend == "process":  # each worker would compile it for itself
        with pytest.warns(RuntimeWarning, match="affine_uncached has no cache=True") as got:
            transform(K.affine_uncached, x, out=out, pool=pool)
        assert got[0].filename == __file__  # (points at the call)
    else:  # threads run what the caller compiled
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            transform(K.affine_uncached, x, out=out, pool=pool)
    np.testing.assert_allclose(out, _affine_ref(x))
    with warnings.catch_warnings():  # once per kernel
        warnings.simplefilter("error")
        transform(K.affine_uncached, x.astype(np.float32), out=out, pool=pool)


def test_a_kernel_a_worker_cannot_import_is_a_clear_error() -> None:
    from shmcompute._jobs import KernelRef, resolve

    with pytest.raises(TransformError, match=r"kernel tests._kernels.gone cannot be found"):
        resolve(KernelRef("tests._kernels", "gone", None, "tests._kernels.gone"))


def test_kernel_defined_in_main_is_shipped_by_value() -> None:
    code = textwrap.dedent(
        """
        import numpy as np, numba
        import shmcompute as shc
        from shmcompute.pool import Pool

        @numba.njit(nogil=True)
        def triple(x, out):
            for i in range(x.shape[0]):
                out[i] = 3 * x[i]

        with Pool(2, backend="process") as pool, shc.from_numpy(np.arange(50000.0)) as x:
            y = shc.transform(triple, x, pool=pool, chunk_size=5000)
            assert np.array_equal(y.array, 3 * np.arange(50000.0))
            y.unlink(); y.close()
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert "leaked" not in proc.stderr
