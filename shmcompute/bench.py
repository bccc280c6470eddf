"""``shmcompute bench``: shmcompute against its peers, on the same work, in one run.

Sections (each verified against a reference before its figures are shown):

* ``cpu``: 32 steps of ``v = v + 0.3 + 0.1*sin(v)*cos(v)`` per float64 element;
* ``memory``: ``y = 2.5*x + 1`` (bandwidth-bound);
* ``small``: the same on 1,000 elements, call after call: each tool's fixed cost per
  call (a direct call of the kernel in one thread is the floor);
* ``roundtrip``: submit a trivial task and wait for its result, one at a time;
* ``modes``: share / copy / transfer over payload sizes.

Peers: NumPy, one Numba thread, Numba ``prange``, ``ThreadPoolExecutor``,
``ProcessPoolExecutor``, ``multiprocessing.Pool`` and joblib (skipped when not
installed). Every figure is a median over ``--repeat`` runs after a warm-up; the table
gives each row's speed relative to the best peer (2.00x = twice as fast). The ``cpu``,
``memory`` and ``small`` sides run interleaved, in rounds (each round runs every side
once, in a rotated order), so that a slow spell of a shared machine falls on all of
them alike.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SECTIONS = ("cpu", "memory", "small", "roundtrip", "modes")
_PRELOAD = [
    "numpy",
    "numba",
    "shmcompute.atomics",
    "shmcompute.pool.worker",
    "shmcompute._bench_kernels",
    "shmcompute._jobs",
]


@dataclass
class Row:
    section: str
    name: str
    kind: str  # "shmcompute" or "peer"
    median_s: float
    best_s: float
    ok: bool
    note: str = ""
    size: int = 0


@dataclass
class Report:
    machine: dict[str, Any]
    settings: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _say(msg: str) -> None:
    sys.stderr.write(f"\r\033[K{msg}")
    sys.stderr.flush()


def _time(
    fn: Callable[[], Any], repeat: int, setup: Callable[[], Any] | None = None
) -> list[float]:
    if setup is not None:
        setup()
    fn()  # warm-up: compile, start workers, fault pages in
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


class _Bench:
    def __init__(self, report: Report, repeat: int, workers: int) -> None:
        self.report = report
        self.repeat = repeat
        self.workers = workers

    def measure(
        self,
        section: str,
        name: str,
        kind: str,
        fn: Callable[[], Any],
        check: Callable[[], bool],
        size: int = 0,
        repeat: int | None = None,
        setup: Callable[[], Any] | None = None,
        note: str = "",
    ) -> None:
        _say(f"  {section}: {name} ...")
        try:
            times = _time(fn, repeat or self.repeat, setup)
            ok = bool(check())
        except Exception as e:  # a peer that breaks is reported, not fatal
            self.report.skipped.append(f"{section}/{name}: {type(e).__name__}: {e}")
            return
        self.report.rows.append(
            Row(section, name, kind, statistics.median(times), min(times), ok, note, size)
        )


@dataclass
class _Side:
    """One side of an interleaved comparison (see ``_Bench.interleave``)."""

    name: str
    kind: str
    run: Callable[[], Any]
    check: Callable[[], bool]  # after its last run: is the output right?
    clear: Callable[[], Any]  # untimed, before its last run: wipe the output
    repeat: int
    settle: float = 0.0  # untimed pause after each run (prange's threads spin on)


def _interleave_rounds(b: _Bench, section: str, size: int, sides: list[_Side]) -> None:
    """Time ``sides`` in rounds, each round running every side once in a rotated order,
    so that a slow minute of a shared machine lands on all of them rather than on
    whichever ran then: the ratios between sides are what the table shows. Each side's
    output is wiped before its last run and checked right after it."""
    live: list[_Side] = []
    for side in sides:  # warm-up: compile, start workers, fault pages in
        _say(f"  {section}: warming up {side.name} ...")
        try:
            side.run()
        except Exception as e:  # a peer that breaks is reported, not fatal
            b.report.skipped.append(f"{section}/{side.name}: {type(e).__name__}: {e}")
            continue
        time.sleep(side.settle)
        live.append(side)
    times: dict[str, list[float]] = {side.name: [] for side in live}
    ok: dict[str, bool] = {}
    rounds = max((side.repeat for side in live), default=0)
    for r in range(rounds):
        _say(f"  {section}: round {r + 1} of {rounds} ...")
        k = r % max(1, len(live))
        for side in live[k:] + live[:k]:
            if r >= side.repeat or side.name in ok:
                continue
            last = r == side.repeat - 1
            try:
                if last:
                    side.clear()
                t0 = time.perf_counter()
                side.run()
                times[side.name].append(time.perf_counter() - t0)
                time.sleep(side.settle)
                if last:
                    ok[side.name] = bool(side.check())
            except Exception as e:
                b.report.skipped.append(f"{section}/{side.name}: {type(e).__name__}: {e}")
                ok[side.name] = False
                times[side.name] = []
    for side in live:
        t = times[side.name]
        if t:
            b.report.rows.append(
                Row(
                    section,
                    side.name,
                    side.kind,
                    statistics.median(t),
                    min(t),
                    ok[side.name],
                    "",
                    size,
                )
            )


@contextmanager
def _forkserver_pools(workers: int) -> Iterator[dict[str, Any]]:
    from .pool import Pool

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    pools: dict[str, Any] = {}
    try:
        pools["shm-process"] = Pool(workers, backend="process")
        pools["shm-thread"] = Pool(workers, backend="thread")
        pools["ppe"] = ProcessPoolExecutor(workers, mp_context=ctx)
        pools["mp"] = ctx.Pool(workers)
        pools["tpe"] = ThreadPoolExecutor(workers)
        yield pools
    finally:
        for key, p in pools.items():
            if key == "mp":
                p.close()
                p.join()
            elif key.startswith("shm"):
                p.shutdown(wait=True, timeout=60)
            else:
                p.shutdown(wait=True)


def _chunks(n: int, parts: int) -> list[slice]:
    step = max(1, math.ceil(n / parts))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


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
        old = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            prange_kernel(x, out)
        finally:
            numba.set_num_threads(old)

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
                lambda: gather(pools["ppe"].map(chunk_fn, [x[s] for s in parts])),
                same,
                wipe,
                slow,
            )
        )
        sides.append(
            _Side(
                "multiprocessing.Pool.map (copy)",
                "peer",
                lambda: gather(pools["mp"].map(chunk_fn, [x[s] for s in parts])),
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
            par = joblib.Parallel(n_jobs=w)
            sides.append(
                _Side(
                    "joblib (loky, copy)",
                    "peer",
                    lambda: gather(par(joblib.delayed(chunk_fn)(x[s]) for s in parts)),
                    same,
                    wipe,
                    slow,
                )
            )
        _interleave_rounds(b, section, n, sides)


def _small_section(b: _Bench, pools: dict[str, Any], n: int, calls: int) -> None:
    """The fixed cost of a call: ``calls`` back-to-back transforms of ``n`` elements
    per run, reported per call. Parallelism cannot pay off at this size; what is left is
    each tool's own overhead, and a direct call of the kernel is the floor."""
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

    def repeated(call: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(calls):
                call()

        return run

    def prange_call() -> None:
        old = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            K.affine_prange(x, out)
        finally:
            numba.set_num_threads(old)

    def tpe_call() -> None:
        list(pools["tpe"].map(lambda s: K.affine(x[s], out[s]), parts))

    def copy_call(pool: Any) -> Callable[[], None]:
        def call() -> None:
            for s, r in zip(parts, pool.map(K.affine_chunk, [x[s] for s in parts]), strict=True):
                out[s] = r

        return call

    with from_numpy(x) as sx, SharedArray.create(n, np.float64) as so:

        def shm_same() -> bool:
            return bool(np.allclose(so.array, ref))

        def shm_wipe() -> None:
            so.array.fill(np.nan)

        def side(
            name: str, kind: str, call: Callable[[], Any], shm: bool = False, settle: float = 0
        ) -> _Side:
            check, clear = (shm_same, shm_wipe) if shm else (same, wipe)
            return _Side(name, kind, repeated(call), check, clear, b.repeat, settle)

        sides = [
            side("numba, 1 thread (direct call)", "peer", lambda: K.affine(x, out)),
            # Numba's threads spin ~10 ms after a prange call: let them settle.
            side(f"numba prange, {threads} threads", "peer", prange_call, settle=0.05),
            side("ThreadPoolExecutor (views)", "peer", tpe_call),
            side("ProcessPoolExecutor.map (copy)", "peer", copy_call(pools["ppe"])),
            side("multiprocessing.Pool.map (copy)", "peer", copy_call(pools["mp"])),
        ]
        for key, label in (("shm-thread", "thread"), ("shm-process", "process")):
            call = functools.partial(transform, K.affine, sx, out=so, pool=pools[key])
            sides.append(side(f"shmcompute {label} (share)", "shmcompute", call, shm=True))
        _interleave_rounds(b, "small", n, sides)


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

        b.measure("roundtrip", "multiprocessing.Pipe ping-pong", "peer", loop(pipe), ok, rounds)
    finally:
        parent.send(None)
        proc.join(30)
        parent.close()
        child_end.close()


def _expect(got: Any, want: Any) -> None:
    if got != want:
        raise AssertionError(f"wrong answer: {got!r} != {want!r}")


def _modes_section(b: _Bench, pools: dict[str, Any], sizes: list[int]) -> None:
    for nbytes in sizes:
        _modes_one(b, pools["shm-process"], max(1, nbytes // 8))


def _modes_one(b: _Bench, pool: Any, n: int) -> None:
    """The data path alone: a kernel that touches one element per chunk, so what is
    timed is getting the data to the workers (and the results back), per mode."""
    from . import _bench_kernels as K
    from .array import SharedArray
    from .transform import transform

    x = np.random.default_rng(1).random(n)
    chunk = max(1, -(-n // (4 * b.workers)))
    starts = np.arange(0, n, chunk)
    want = 2.5 * x[starts] + 1.0
    label = _fmt_bytes(n * 8)
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


def _num(v: float) -> str:
    """Three significant digits, without scientific notation for table-sized values."""
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}"
        n //= 1024
    return f"{n} GiB"  # pragma: no cover


def _parse_size(text: str) -> int:
    t = text.strip().lower().replace("ib", "").replace("b", "")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "kmg" else t
    try:
        value = int(float(num) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use 1KiB, 1MiB, 64MiB)") from None
    if value < 8:
        raise argparse.ArgumentTypeError(f"size must be at least 8 bytes, got {text!r}")
    return value


def _machine() -> dict[str, Any]:
    import numba

    from . import __version__
    from .pool.sizing import usable_cores

    return {
        "shmcompute": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu": _cpu_name(),
        "cores_usable": usable_cores(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _table(report: Report) -> str:
    lines = []
    titles = {
        "cpu": "CPU-bound transform (32 sin/cos steps per element)",
        "memory": "memory-bound transform (y = 2.5x + 1)",
        "small": "small transform (y = 2.5x + 1), call after call, per call",
        "roundtrip": "task round trip (submit, wait for the result), per task",
        "modes": "moving the data, process backend (share / copy / transfer; O(1) kernel)",
    }
    for section in SECTIONS:
        rows = [r for r in report.rows if r.section == section]
        if not rows:
            continue
        size = rows[0].size
        what = (
            f"{size:,} tasks"
            if section == "roundtrip"
            else f"{size:,} float64 ({_fmt_bytes(size * 8)})"
            if section != "modes"
            else ""
        )
        lines.append(f"\n{titles[section]}{': ' + what if what else ''}")
        peers = [r.median_s for r in rows if r.kind == "peer"]
        best_peer = min(peers) if peers else None
        per, scale, unit = _per(report, section, rows)
        lines.append(f"  {'':40s} {'median':>10s} {'best':>10s} {'vs best peer':>13s}  check")
        for r in sorted(rows, key=lambda r: r.median_s) if section != "modes" else rows:
            vs = f"{_num(best_peer / r.median_s)}x" if best_peer else "-"
            lines.append(
                f"  {r.name:40s} {_num(r.median_s / per * scale):>8s}{unit:>2s} "
                f"{_num(r.best_s / per * scale):>8s}{unit:>2s} {vs:>13s}  "
                f"{'ok' if r.ok else 'WRONG'}"
            )
    if report.skipped:
        lines.append("\nskipped: " + "; ".join(report.skipped))
    return "\n".join(lines)


def _per(report: Report, section: str, rows: list[Row]) -> tuple[int, float, str]:
    """How a section's times are shown: (divide by, scale, unit)."""
    if section == "roundtrip":
        return rows[0].size, 1e6, "us"
    if section == "small":
        return report.settings["small_calls"], 1e6, "us"
    return 1, 1e3, "ms"


def _plot(report: Report, folder: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'shmcompute[notebooks]'") from None
    os.makedirs(folder, exist_ok=True)
    paths = []
    for section in SECTIONS:
        rows = [r for r in report.rows if r.section == section]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
        per, scale, unit = _per(report, section, rows)
        unit = {"us": "us per task" if section == "roundtrip" else "us per call"}.get(unit, unit)
        names = [r.name for r in rows]
        values = [r.median_s / per * scale for r in rows]
        colors = ["tab:blue" if r.kind == "shmcompute" else "tab:gray" for r in rows]
        ax.barh(names, values, color=colors)
        ax.invert_yaxis()
        ax.set_xlabel(f"median, {unit} (lower is better)")
        ax.set_title(f"shmcompute bench: {section}")
        if section == "modes":
            ax.set_xscale("log")
        fig.tight_layout()
        path = os.path.join(folder, f"bench_{section}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="shmcompute bench",
        description="Compare shmcompute with NumPy, Numba, the stdlib pools and joblib on "
        "the same work; every result is verified.",
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="workers for every parallel peer (default: usable cores)",
    )
    parser.add_argument("--cpu-size", type=int, default=1_000_000)
    parser.add_argument("--mem-size", type=int, default=16_000_000)
    parser.add_argument("--small-size", type=int, default=1000)
    parser.add_argument("--small-calls", type=int, default=200, help="calls per timed run")
    parser.add_argument("--roundtrips", type=int, default=2000)
    parser.add_argument("--mode-sizes", default="1KiB,1MiB,64MiB")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (a smoke test in seconds, figures meaningless)",
    )
    parser.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    parser.add_argument("--plot", metavar="DIR", help="also save PNG bar charts (matplotlib)")
    args = parser.parse_args(argv)

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        parser.error(f"--sections: unknown {bad}; choose from {','.join(SECTIONS)}")
    for name in ("cpu_size", "mem_size", "small_size", "small_calls", "roundtrips", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        mode_sizes = [_parse_size(s) for s in args.mode_sizes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as e:
        parser.error(f"--mode-sizes: {e}")
    from .pool.sizing import usable_cores

    workers = args.workers if args.workers is not None else usable_cores()
    if workers < 1:
        parser.error("--workers must be >= 1")
    if args.quick:
        args.cpu_size, args.mem_size, args.roundtrips, args.repeat = 20_000, 200_000, 100, 2
        args.small_calls = 20
        mode_sizes = [1024, 1 << 20]

    report = Report(
        _machine(),
        {
            "sections": sections,
            "workers": workers,
            "cpu_size": args.cpu_size,
            "mem_size": args.mem_size,
            "small_size": args.small_size,
            "small_calls": args.small_calls,
            "roundtrips": args.roundtrips,
            "mode_sizes": mode_sizes,
            "repeat": args.repeat,
        },
    )
    m = report.machine
    print(
        f"shmcompute bench: {m['cpu']}, {m['cores_usable']} usable cores, Python "
        f"{m['python']}, numpy {m['numpy']}, numba {m['numba']}; {workers} workers"
    )
    t0 = time.perf_counter()
    from . import _bench_kernels as K

    _say("  compiling kernels (cached after the first run) ...")
    K.warm_up()
    b = _Bench(report, args.repeat, workers)
    with _forkserver_pools(workers) as pools:
        for section in sections:
            if section in ("cpu", "memory"):
                _array_section(
                    b, pools, section, args.cpu_size if section == "cpu" else args.mem_size
                )
            elif section == "small":
                _small_section(b, pools, args.small_size, args.small_calls)
            elif section == "roundtrip":
                _roundtrip_section(b, pools, args.roundtrips)
            else:
                _modes_section(b, pools, mode_sizes)
    _say("")
    print(_table(report))
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**asdict(report)}, f, indent=2)
        print(f"saved {args.json}")
    if args.plot:
        for path in _plot(report, args.plot):
            print(f"saved {path}")
    wrong = [r for r in report.rows if not r.ok]
    if wrong:
        print(f"WRONG RESULTS: {[r.name for r in wrong]}")
        return 1
    return 0
