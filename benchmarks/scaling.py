"""Strong scaling: shmcompute's thread and process pools against Numba ``prange`` and
joblib, at 1, 2, 4, ... workers, on the same work and the same machine in one run.

    PYTHONPATH=. python3 benchmarks/scaling.py --json "$OUT/scaling.json" \\
        | tee "$OUT/scaling.txt"

(from the repository root; ``$OUT`` is the folder whose files come back from the
device machine, any folder elsewhere.)

Workloads (float64 in, float64 out, each result checked with ``np.allclose`` against
one Numba thread's):

* ``cpu``: 32 steps of ``v = v + 0.3 + 0.1*sin(v)*cos(v)`` per element
  (``_bench_kernels.cpu_steps``), 1,000,000 elements by default;
* ``memory``: ``y = 2.5*x + 1`` (``_bench_kernels.affine``, bandwidth-bound),
  16,000,000 elements (122 MiB in, 122 MiB out) by default.

Sides, at each worker count ``w``:

* ``prange``: the ``parallel=True`` twin of the kernel on NumPy arrays, after
  ``numba.set_num_threads(w)``; skipped above ``NUMBA_NUM_THREADS``, which Numba
  cannot exceed;
* ``thread`` / ``process``: ``shmcompute.transform(kernel, sx, out=so, pool=pool)`` on
  ``Pool(w, backend=...)``, input and output SharedArrays made once per workload;
* ``joblib``: ``Parallel(n_jobs=w)`` over ``4*w`` chunks of ``cpu_chunk`` /
  ``affine_chunk``, results gathered into the output (joblib's defaults: inputs over
  1 MB are memory-mapped, results pickled back; ``n_jobs=1`` runs in this process).

Each figure is the median of ``--repeat`` timed runs after ``WARM_RUNS`` (3) untimed
ones, for every side alike: each process worker maps the pages of the chunks it claims
on first touch, and the chunks each one claims differ from run to run, so one run does
not fault in the pages of the next; the others get as many, so that no side has more
chances than another to warm caches and clocks. The output is filled with NaN (untimed)
before every run, so a run that writes nothing fails its check. The baseline ``t1`` is
one Numba thread calling the kernel directly.

Efficiency of a side at ``w`` workers is ``t1 / (w * t_side(w))``: 1.00 is perfect
linear scaling from one Numba thread, 0.50 means half of the ``w`` cores is wasted.
``thread/prange`` and ``process/prange`` are throughput ratios,
``t_prange(w) / t_side(w)``: above 1.00 shmcompute is faster than prange.
``drivers/job`` is how many compiled driver loops ran each timed transform (the pool's
tasks, plus the caller on threads), as the helper-count policy chose them
(``_runner.helpers``): below ``w`` on a job too short to be worth every worker.

Sizes: every side runs ``3 + repeat`` times at every worker count, so the time goes
to the low worker counts: about ``5 * (3 + repeat) * t1`` at 1 worker (4 sides and the
baseline), and about as much again for all the others together. One Numba thread takes
1-1.5 s for the default cpu size, so a 16-worker cpu run still lasts ~100 ms (long
enough to time, next to ~1 ms of pool overhead). When only the thread and process
sides had three warm-up runs (the others one), the default run took an estimated
1.5-2 minutes on 16 cores and 77 s on 2 cores; the others' extra runs add about a
fifth. The cpu size is not scaled up with the core count because that would mostly
lengthen the 1-worker points.

Prints a header naming the machine and one markdown table per workload to stdout,
progress to stderr; exits 1 if any check failed or a side raised (in a warm-up run
too: the side is reported, the others still run), else 0. ``--quick`` gives tiny sizes
and 2 repeats to the options not given.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numba
import numpy as np

import shmcompute as shc
from shmcompute import _bench_kernels as K
from shmcompute.bench import _chunks, _fmt_bytes, _machine, _num, _time
from shmcompute.pool.sizing import usable_cores

DEFAULT_WORKERS = (1, 2, 4, 8, 16)
BASELINE = "numba-1-thread"
SIDES = ("prange", "thread", "process", "joblib")
# Numba's pool threads keep spinning ~10 ms after a prange call returns: let them stop
# before the next side's threads compete with them for the cores.
PRANGE_SETTLE_S = 0.05
WARM_RUNS = 3  # untimed runs before the timed ones, for every side (see the docstring)
DEFAULTS = {"cpu_size": 1_000_000, "mem_size": 16_000_000, "repeat": 5}
QUICK = {"cpu_size": 20_000, "mem_size": 200_000, "repeat": 2}


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    kernel: Callable[..., None]
    prange_kernel: Callable[..., None]
    chunk_fn: Callable[[np.ndarray], np.ndarray]


WORKLOADS = (
    Workload(
        "cpu",
        "CPU-bound, 32 steps of v = v + 0.3 + 0.1*sin(v)*cos(v) per element",
        K.cpu_steps,
        K.cpu_steps_prange,
        K.cpu_chunk,
    ),
    Workload(
        "memory",
        "memory-bound, y = 2.5x + 1",
        K.affine,
        K.affine_prange,
        K.affine_chunk,
    ),
)


@dataclass
class Point:
    """One side at one worker count. ``median_s`` is None when the side raised."""

    workload: str
    side: str  # BASELINE or one of SIDES
    workers: int
    times_s: list[float]
    median_s: float | None
    ok: bool
    note: str = ""
    # thread/process: drivers per transform (the pool's tasks, plus the caller on threads)
    drivers_per_job: float | None = None


@dataclass
class Results:
    points: list[Point] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class _Runner:
    def __init__(self, repeat: int) -> None:
        self.repeat = repeat
        self.results = Results()
        self.start = time.perf_counter()

    def progress(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    def measure(
        self,
        workload: str,
        side: str,
        workers: int,
        run: Callable[[], Any],
        out: np.ndarray,
        ref: np.ndarray,
        pool: shc.Pool | None = None,
    ) -> None:
        self.progress(f"{workload}: {side}, {workers} worker(s)")

        def wipe() -> None:
            out.fill(np.nan)

        try:  # warm-up runs included: a side that breaks in one is reported too
            _time(run, 0, setup=wipe, warmups=WARM_RUNS)
            before = _tasks_done(pool)
            times = _time(run, self.repeat, setup=wipe, warmups=0)
        except Exception as e:  # a side that breaks is reported; the others still run
            note = f"{type(e).__name__}: {e}"
            self.results.points.append(Point(workload, side, workers, [], None, False, note))
            return
        ok = bool(np.allclose(out, ref))
        note = "" if ok else "differs from the 1-thread reference"
        per_job = None
        if pool is not None:  # over the timed runs only
            per_job = (_tasks_done(pool) - before) / self.repeat
            if pool.stats.backend == "thread":
                per_job += 1  # the caller runs one driver itself, not as a pool task
        self.results.points.append(
            Point(workload, side, workers, times, statistics.median(times), ok, note, per_job)
        )


def _tasks_done(pool: shc.Pool | None, timeout: float = 2.0) -> int:
    """The pool's finished tasks, once none is left running. A transform returns when
    its last chunk is written, and a task that started too late to claim one resolves
    a little after: wait for those (bounded; a snapshot is not worth a hang)."""
    if pool is None:
        return 0
    deadline = time.monotonic() + timeout
    while True:
        st = pool.stats
        if (st.busy == 0 and st.queued == 0) or time.monotonic() > deadline:
            return st.completed + st.failed
        time.sleep(0.001)


def _run_workload(r: _Runner, wl: Workload, n: int, workers: list[int]) -> None:
    x = np.random.default_rng(0).random(n) * 3.0
    ref = np.empty(n)
    wl.kernel(x, ref)
    out = np.empty(n)
    r.measure(wl.name, BASELINE, 1, functools.partial(wl.kernel, x, out), out, ref)
    joblib = _optional_joblib()
    if joblib is None:
        r.results.skipped.append(f"{wl.name}/joblib: not installed")
    numba_max: int = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    with shc.from_numpy(x) as sx, shc.zeros(n, np.float64) as so:
        for w in workers:
            if w > numba_max:
                r.results.skipped.append(
                    f"{wl.name}/prange at {w} workers: above NUMBA_NUM_THREADS={numba_max}"
                )
            else:
                old = numba.get_num_threads()
                numba.set_num_threads(w)
                try:
                    r.measure(
                        wl.name, "prange", w, functools.partial(wl.prange_kernel, x, out), out, ref
                    )
                finally:
                    numba.set_num_threads(old)
                    time.sleep(PRANGE_SETTLE_S)
            for backend in ("thread", "process"):
                with shc.Pool(w, backend=backend) as pool:
                    run = functools.partial(shc.transform, wl.kernel, sx, out=so, pool=pool)
                    r.measure(wl.name, backend, w, run, so.array, ref, pool)
            if joblib is not None:
                r.measure(wl.name, "joblib", w, _joblib_run(joblib, wl, x, out, w), out, ref)


def _optional_joblib() -> Any:
    """The joblib module, or None when it is not installed."""
    try:
        import joblib
    except ImportError:
        return None
    return joblib


def _joblib_run(
    joblib: Any, wl: Workload, x: np.ndarray, out: np.ndarray, workers: int
) -> Callable[[], None]:
    parts = _chunks(len(x), 4 * workers)
    parallel = joblib.Parallel(n_jobs=workers)

    def run() -> None:
        results = parallel(joblib.delayed(wl.chunk_fn)(x[s]) for s in parts)
        for s, chunk in zip(parts, results, strict=True):
            out[s] = chunk

    return run


def _shutdown_loky() -> None:
    try:
        from joblib.externals.loky import get_reusable_executor
    except ImportError:
        return
    get_reusable_executor().shutdown(wait=True)


def _table(wl: Workload, n: int, results: Results, workers: list[int]) -> str:
    by_key = {(p.side, p.workers): p for p in results.points if p.workload == wl.name}
    base = by_key[(BASELINE, 1)]
    t1 = base.median_s
    base_text = "failed" if t1 is None else f"{_num(t1 * 1e3)} ms"
    lines = [
        f"## {wl.name}: {wl.title}; {n:,} float64 ({_fmt_bytes(n * 8)})",
        "",
        f"1 Numba thread (t1): {base_text}, check {'ok' if base.ok else 'FAIL'}",
        "",
        "| workers | "
        + " | ".join(f"{s} ms" for s in SIDES)
        + " | "
        + " | ".join(f"eff {s}" for s in SIDES)
        + " | thread/prange | process/prange | drivers/job thread, process | check |",
        "|" + "---:|" * (1 + 2 * len(SIDES) + 3) + ":---|",
    ]
    for w in workers:
        medians = {s: by_key[(s, w)].median_s if (s, w) in by_key else None for s in SIDES}
        times = [_num(m * 1e3) if m is not None else "-" for m in medians.values()]
        effs = [
            f"{t1 / (w * m):.2f}" if t1 is not None and m is not None else "-"
            for m in medians.values()
        ]
        prange_s = medians["prange"]
        ratios = [
            f"{prange_s / m:.2f}" if prange_s is not None and m is not None else "-"
            for m in (medians["thread"], medians["process"])
        ]
        per_job = [by_key[(s, w)].drivers_per_job if (s, w) in by_key else None for s in SIDES[1:3]]
        drivers = ", ".join("-" if t is None else f"{t:.1f}" for t in per_job)
        failed = [s for s in SIDES if (s, w) in by_key and not by_key[(s, w)].ok]
        check = "FAIL: " + ", ".join(failed) if failed else "ok"
        lines.append("| " + " | ".join([str(w), *times, *effs, *ratios, drivers, check]) + " |")
    return "\n".join(lines)


def _parse_workers(text: str) -> list[int]:
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of worker counts: {text!r} (e.g. 1,2,4)"
        ) from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"worker counts must be >= 1, got {text!r}")
    return counts


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Scaling of shmcompute's thread and process pools against Numba prange "
        "and joblib, from 1 worker up; every result is verified."
    )
    parser.add_argument(
        "--workers",
        type=_parse_workers,
        default=None,
        help="comma-separated worker counts (default: 1,2,4,8,16 up to the usable cores, "
        "plus the usable core count)",
    )
    for name, what in (
        ("cpu_size", "float64 elements of the cpu workload"),
        ("mem_size", "float64 elements of the memory workload"),
        ("repeat", "timed runs of each side at each worker count"),
    ):
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=None,  # None: not given, so --quick may fill it in
            help=f"{what} (default {DEFAULTS[name]:,}; --quick {QUICK[name]:,})",
        )
    parser.add_argument("--json", metavar="PATH", help="also save every timing as JSON")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, 2 repeats, for the options not given"
    )
    args = parser.parse_args(argv)
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK[name] if args.quick else value)
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    cores = usable_cores()
    workers: list[int] = args.workers or sorted(
        {w for w in DEFAULT_WORKERS if w <= cores} | {cores}
    )

    K.warm_up()  # compiles (or loads from the cache) every kernel, prange included
    machine = _machine()
    settings = {
        "workers": workers,
        "cpu_size": args.cpu_size,
        "mem_size": args.mem_size,
        "repeat": args.repeat,
        "numba_num_threads": numba.config.NUMBA_NUM_THREADS,  # type: ignore[attr-defined]
        "numba_threading_layer": numba.threading_layer(),  # type: ignore[attr-defined]
    }
    print(
        f"shmcompute scaling: {machine['cpu']}, {machine['cores_usable']} usable cores, "
        f"{machine['platform']}; Python {machine['python']}, numpy {machine['numpy']}, "
        f"numba {machine['numba']} (NUMBA_NUM_THREADS={settings['numba_num_threads']}, "
        f"{settings['numba_threading_layer']} layer), shmcompute {machine['shmcompute']}"
    )
    print(
        f"workers {','.join(map(str, workers))}; median of {args.repeat} runs after "
        f"{WARM_RUNS} untimed ones"
    )
    runner = _Runner(args.repeat)
    sizes = {"cpu": args.cpu_size, "memory": args.mem_size}
    try:
        for wl in WORKLOADS:
            _run_workload(runner, wl, sizes[wl.name], workers)
    finally:
        _shutdown_loky()
    total_s = time.perf_counter() - runner.start
    results = runner.results
    for wl in WORKLOADS:
        print(f"\n{_table(wl, sizes[wl.name], results, workers)}")
    if results.skipped:
        print("\nskipped: " + "; ".join(results.skipped))
    print(f"\n{total_s:.0f} s in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine,
                    "settings": settings,
                    "total_s": total_s,
                    **asdict(results),
                },
                f,
                indent=2,
            )
        print(f"saved {args.json}")
    failed = [p for p in results.points if not p.ok]
    for p in failed:
        print(f"FAIL {p.workload}/{p.side} at {p.workers} worker(s): {p.note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
