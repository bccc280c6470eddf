"""The sections of ``shmcompute bench``: one function per section, each timing its
sides (shmcompute and the peers) on the same data. ``_bench_timing.py`` holds the
records and the timing, ``_bench_pools.py`` the pools every side shares (and every wait
on a peer), ``bench.py`` the command line, the table and the plots."""

from __future__ import annotations

import functools
import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ._bench_pools import joblib_map, mp_map, ppe_map
from ._bench_timing import (
    _Bench,
    _chunks,
    _fmt_bytes,
    _interleave_rounds,
    _numba_threads,
    _Side,
)


def _array_section(b: _Bench, pools: dict[str, Any], section: str, n: int) -> None:
    import numba

    from . import _bench_kernels as K
    from .array import SharedArray, from_numpy
    from .transform import transform

    kernel, prange_kernel, chunk_fn = (
        (K.cpu_steps, K.cpu_steps_prange, K.cpu_chunk)
        if section == "cpu"
        else (K.affine, K.affine_prange, K.affine_chunk)
    )
    rng = np.random.default_rng(0)
    x = rng.random(n) * 3.0
    ref = np.empty(n)
    kernel(x, ref)
    out = np.empty(n)
    w = b.workers
    repeat = b.repeat
    limit = b.peer_timeout
    # Copy-mode peers move the whole array twice per run: fewer rounds at large sizes.
    slow = max(2, repeat // 2) if n * 8 >= 64 << 20 else repeat
    parts = _chunks(n, 4 * w)

    def same() -> bool:
        return bool(np.allclose(out, ref))

    def wipe() -> None:
        out.fill(np.nan)

    def numpy_run() -> None:
        out[:] = K.cpu_numpy(x) if section == "cpu" else 2.5 * x + 1.0

    threads = min(w, numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]

    def prange_run() -> None:
        with _numba_threads(threads):
            prange_kernel(x, out)

    def tpe_run() -> None:
        list(pools["tpe"].map(lambda s: kernel(x[s], out[s]), parts))

    def gather(results: Any) -> None:
        for s, r in zip(parts, results, strict=True):
            out[s] = r

    with from_numpy(x) as sx, SharedArray.create(n, np.float64) as so:

        def shm_same() -> bool:
            return bool(np.allclose(so.array, ref))

        def shm_wipe() -> None:
            so.array.fill(np.nan)

        sides = [
            _Side("numpy", "peer", numpy_run, same, wipe, 1 if section == "cpu" else repeat),
            _Side("numba, 1 thread", "peer", lambda: kernel(x, out), same, wipe, repeat),
            # Numba's threads spin ~10 ms after a prange call: let them settle.
            _Side(f"numba prange, {threads} threads", "peer", prange_run, same, wipe, repeat, 0.05),
        ]
        for key, label in (("shm-thread", "thread"), ("shm-process", "process")):
            run = functools.partial(transform, kernel, sx, out=so, pool=pools[key])
            sides.append(
                _Side(f"shmcompute {label} (share)", "shmcompute", run, shm_same, shm_wipe, repeat)
            )
        # Threads need no shared memory: the caller's NumPy arrays (which, unlike /dev/shm
        # segments, can get transparent huge pages) work as they are.
        sides.append(
            _Side(
                "shmcompute thread (NumPy arrays)",
                "shmcompute",
                functools.partial(transform, kernel, x, out=out, pool=pools["shm-thread"]),
                same,
                wipe,
                repeat,
            )
        )
        sides.append(_Side("ThreadPoolExecutor (views)", "peer", tpe_run, same, wipe, repeat))
        sides.append(
            _Side(
                "ProcessPoolExecutor.map (copy)",
                "peer",
                lambda: gather(ppe_map(pools["ppe"], chunk_fn, [x[s] for s in parts], limit)),
                same,
                wipe,
                slow,
            )
        )
        sides.append(
            _Side(
                "multiprocessing.Pool.map (copy)",
                "peer",
                lambda: gather(mp_map(pools["mp"], chunk_fn, [x[s] for s in parts], limit)),
                same,
                wipe,
                slow,
            )
        )
        try:
            import joblib
        except ImportError:
            b.report.skipped.append(f"{section}/joblib: not installed")
        else:
            # (n_jobs=1 runs in this process, and joblib warns that it has no timeout then)
            par = joblib.Parallel(n_jobs=w, timeout=limit if w > 1 else None)
            sides.append(
                _Side(
                    "joblib (loky, copy)",
                    "peer",
                    lambda: gather(
                        joblib_map(par, (joblib.delayed(chunk_fn)(x[s]) for s in parts), limit)
                    ),
                    same,
                    wipe,
                    slow,
                )
            )
        _interleave_rounds(b, section, n, sides)


_OTHER: list[str] = []


def _other_work() -> int:
    """About a millisecond of unrelated Python, run untimed before each call of the
    ``cold`` section: a walk over 25,000 of 200,000 small objects spread over ~10 MiB.
    It moves the caller's code and data out of the CPU's caches, as an application's
    own work between two calls does (an idle pause does too, on a VM more so)."""
    if not _OTHER:
        _OTHER.extend(str(i) for i in range(200_000))
    total = 0
    for v in _OTHER[::8]:
        total += len(v)
    return total


def _small_section(
    b: _Bench, pools: dict[str, Any], n: int, calls: int, section: str = "small"
) -> None:
    """``calls`` back-to-back transforms of ``n`` elements per run, reported per call.
    ``small``: the fixed cost of a call; parallelism cannot pay off at that size, what
    is left is each tool's own overhead, and a direct call of the kernel is the floor.
    ``mid``: sizes where starting workers is a large part of the job (the data fits in
    the cores' caches, so a tool that keeps each core on the same rows gains more).
    ``cold``: the small call again, each after ``_other_work`` (untimed): the fixed
    cost a program pays that calls now and then rather than in a tight loop."""
    import numba

    from . import _bench_kernels as K
    from .array import SharedArray, from_numpy
    from .transform import transform

    x = np.random.default_rng(1).random(n)
    ref = 2.5 * x + 1.0
    out = np.empty(n)
    w = b.workers
    parts = _chunks(n, w)
    threads = min(w, numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]

    def same() -> bool:
        return bool(np.allclose(out, ref))

    def wipe() -> None:
        out.fill(np.nan)

    cold = section == "cold"

    def repeated(call: Callable[[], Any], numba_threads: int = 0) -> Callable[[], float]:
        def run() -> float:
            with _numba_threads(numba_threads):
                if not cold:
                    for _ in range(calls):
                        call()
                    return 0.0  # (timed whole by _interleave_rounds)
                took = 0.0
                for _ in range(calls):
                    _other_work()
                    t0 = time.perf_counter()
                    call()
                    took += time.perf_counter() - t0
                return took

        return run

    def tpe_call() -> None:
        list(pools["tpe"].map(lambda s: K.affine(x[s], out[s]), parts))

    def copy_call(pool: Any, peer_map: Callable[..., list[Any]]) -> Callable[[], None]:
        def call() -> None:
            results = peer_map(pool, K.affine_chunk, [x[s] for s in parts], b.peer_timeout)
            for s, r in zip(parts, results, strict=True):
                out[s] = r

        return call

    with from_numpy(x) as sx, SharedArray.create(n, np.float64) as so:

        def shm_same() -> bool:
            return bool(np.allclose(so.array, ref))

        def shm_wipe() -> None:
            so.array.fill(np.nan)

        def side(
            name: str,
            kind: str,
            call: Callable[[], Any],
            shm: bool = False,
            settle: float = 0,
            numba_threads: int = 0,
        ) -> _Side:
            check, clear = (shm_same, shm_wipe) if shm else (same, wipe)
            run = repeated(call, numba_threads)
            return _Side(name, kind, run, check, clear, b.repeat, settle, times_itself=cold)

        sides = [
            side("numba, 1 thread (direct call)", "peer", lambda: K.affine(x, out)),
            # Numba's threads spin ~10 ms after a prange call: let them settle.
            # The thread count is set once per run: per call, setting and restoring it
            # took 3-5 us of prange's ~10 us.
            side(
                f"numba prange, {threads} threads",
                "peer",
                lambda: K.affine_prange(x, out),
                settle=0.05,
                numba_threads=threads,
            ),
            side("ThreadPoolExecutor (views)", "peer", tpe_call),
            side("ProcessPoolExecutor.map (copy)", "peer", copy_call(pools["ppe"], ppe_map)),
            side("multiprocessing.Pool.map (copy)", "peer", copy_call(pools["mp"], mp_map)),
        ]
        for key, label in (("shm-thread", "thread"), ("shm-process", "process")):
            call = functools.partial(transform, K.affine, sx, out=so, pool=pools[key])
            sides.append(side(f"shmcompute {label} (share)", "shmcompute", call, shm=True))
        _interleave_rounds(b, section, n, sides, per_run=calls)


def _roundtrip_section(b: _Bench, pools: dict[str, Any], rounds: int) -> None:
    from . import _bench_kernels as K

    def loop(submit: Callable[[int], Any]) -> Callable[[], None]:
        def run() -> None:
            for i in range(rounds):
                submit(i)

        return run

    def ok() -> bool:
        return True  # each loop checks its own answers (_expect)

    checks = {
        "shmcompute process": lambda i: _expect(
            pools["shm-process"].submit(K.trivial, i).result(30), i
        ),
        "shmcompute thread": lambda i: _expect(
            pools["shm-thread"].submit(K.trivial, i).result(30), i
        ),
        "ProcessPoolExecutor": lambda i: _expect(pools["ppe"].submit(K.trivial, i).result(30), i),
        "multiprocessing.Pool": lambda i: _expect(
            pools["mp"].apply_async(K.trivial, (i,)).get(30), i
        ),
        "ThreadPoolExecutor": lambda i: _expect(pools["tpe"].submit(K.trivial, i).result(30), i),
    }
    for name, fn in checks.items():
        b.measure(
            "roundtrip",
            name,
            "shmcompute" if name.startswith("shm") else "peer",
            loop(fn),
            ok,
            rounds,
            per_run=rounds,
        )
    ctx = mp.get_context("forkserver")
    parent, child_end = ctx.Pipe()
    proc = ctx.Process(target=K.echo, args=(child_end,))
    proc.start()
    try:

        def pipe(i: int) -> None:
            parent.send(i)
            if not parent.poll(30):
                raise TimeoutError("echo process stopped answering")
            _expect(parent.recv(), i)

        b.measure(
            "roundtrip",
            "multiprocessing.Pipe ping-pong",
            "peer",
            loop(pipe),
            ok,
            rounds,
            per_run=rounds,
        )
    finally:
        try:
            parent.send(None)
        except OSError:  # it is gone already
            pass
        proc.join(30)
        if proc.exitcode is None:
            proc.kill()
            proc.join(30)
        parent.close()
        child_end.close()


def _expect(got: Any, want: Any) -> None:
    if got != want:
        raise AssertionError(f"wrong answer: {got!r} != {want!r}")


def _modes_section(b: _Bench, pools: dict[str, Any], sizes: list[int]) -> None:
    lengths = list(dict.fromkeys(max(1, nbytes // 8) for nbytes in sizes))  # float64s
    labels = [_fmt_bytes(n * 8) for n in lengths]
    for n, label in zip(lengths, labels, strict=True):
        if labels.count(label) > 1:  # sizes too close for three digits: name the bytes
            label = f"{n * 8:,} B"
        _modes_one(b, pools["shm-process"], n, label)


def _modes_one(b: _Bench, pool: Any, n: int, label: str) -> None:
    """The data path alone: a kernel that touches one element per chunk, so what is
    timed is getting the data to the workers (and the results back), per mode."""
    from . import _bench_kernels as K
    from .array import SharedArray
    from .transform import transform

    x = np.random.default_rng(1).random(n)
    chunk = max(1, -(-n // (4 * b.workers)))
    starts = np.arange(0, n, chunk)
    want = 2.5 * x[starts] + 1.0
    with SharedArray.create(n, np.float64) as sx, SharedArray.create(n, np.float64) as so:
        sx.array[:] = x
        for mode in ("share", "copy"):
            b.measure(
                "modes",
                f"{mode} {label}",
                "shmcompute",
                functools.partial(
                    transform, K.touch, sx, out=so, pool=pool, mode=mode, chunk_size=chunk
                ),
                lambda: bool(np.allclose(so.array[starts], want)),
                n * 8,
                note=mode,
            )
            so.array[:] = 0
    state: dict[str, Any] = {}

    def fresh() -> None:  # untimed: a new input per round (transfer consumes it)
        old = state.pop("out", None)
        if old is not None:
            old.unlink()
            old.close()
        sa = SharedArray.create(n, np.float64)
        sa.array[:] = x
        state["in"] = sa

    def run() -> None:  # in place: the input moves to the job and comes back as the output
        sa = state["in"]
        state["out"] = transform(K.touch, sa, out=sa, pool=pool, mode="transfer", chunk_size=chunk)

    def check() -> bool:
        good = bool(np.allclose(state["out"].array[starts], want)) and state["in"].detached
        fresh()
        sa = state.pop("in")
        sa.unlink()
        sa.close()
        return good

    b.measure(
        "modes", f"transfer {label}", "shmcompute", run, check, n * 8, setup=fresh, note="transfer"
    )
