"""``shmcompute bench``: shmcompute against its peers, on the same work, in one run.

Sections (each verified against a reference before its figures are shown):

* ``cpu``: 32 steps of ``v = v + 0.3 + 0.1*sin(v)*cos(v)`` per float64 element;
* ``memory``: ``y = 2.5*x + 1`` (bandwidth-bound);
* ``small``: the same on 1,000 elements, call after call: each tool's fixed cost per
  call (a direct call of the kernel in one thread is the floor);
* ``mid``: the same on 200,000 elements (1.53 MiB in, 1.53 MiB out), call after call:
  where starting the workers is a large part of each call;
* ``cold``: the small call again, each after ~1 ms of unrelated Python (untimed): the
  fixed cost of a call when the caller's code and data are no longer in the CPU's
  caches, as in a program that calls now and then rather than in a tight loop;
* ``roundtrip``: submit a trivial task and wait for its result, one at a time;
* ``modes``: share / copy / transfer over payload sizes.

Peers: NumPy, one Numba thread, Numba ``prange``, ``ThreadPoolExecutor``,
``ProcessPoolExecutor``, ``multiprocessing.Pool`` and joblib (skipped when not
installed). Each row's figures are the median and the best of its timed runs, after
an untimed warm-up; the ``runs`` column says how many: ``--repeat``, except NumPy's
``cpu`` side (1: the slowest side, about a second a run at the default size) and, at
64 MiB and more, the copy-mode peers (``max(2, repeat // 2)``: they move the whole
array twice a run). The table gives each row's speed relative to the best peer whose
result was right (2.00x = twice as fast). The ``cpu``, ``memory``, ``small``, ``mid``
and ``cold`` sides run interleaved, in rounds (each round runs every side once, in a
rotated order), so that a slow spell of a shared machine falls on all of them alike.

``--json`` saves the settings, the machine, the rows, the skipped peers and the failed
sides. Each row (``_bench_timing.Row``) has ``median_s`` / ``best_s`` per timed run,
as measured, and ``runs``; a run is ``per_run`` ``item``s (calls of the small, mid and
cold sections, tasks of roundtrip, else 1 run), and ``median_per_item_s`` /
``best_per_item_s`` (the table's figures) divide by it. ``size`` counts ``size_unit``:
float64 elements (cpu, memory, small, mid, cold, per call), tasks (roundtrip, per run) or
payload bytes (modes).

A side that raises (a crash, a timeout) is listed under FAILED with its error, and the
others still run. Exit status: 1 when any side failed or gave a wrong result, whether
it is shmcompute's (ours to fix) or a peer's (the comparison is incomplete); peers
that are not installed are skipped and do not count. A pool peer's run that gets no
result within ``--peer-timeout`` fails (a worker died or hung). Ctrl-C ends the run
within seconds (exit status 130): the peers' workers ignore it, as shmcompute's do,
and their pools are terminated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from ._bench_pools import PEER_TIMEOUT_S, forkserver_pools
from ._bench_sections import _array_section, _modes_section, _roundtrip_section, _small_section
from ._bench_timing import Report, Row, _Bench, _fmt_bytes, _say

# Also used by benchmarks/scaling.py and the notebooks (re-exported):
from ._bench_timing import _chunks as _chunks
from ._bench_timing import _time as _time

__all__ = ["SECTIONS", "Report", "Row", "main"]

SECTIONS = ("cpu", "memory", "small", "mid", "cold", "roundtrip", "modes")


def _num(v: float) -> str:
    """Three significant digits, without scientific notation for table-sized values."""
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _parse_size(text: str) -> int:
    t = text.strip().lower().replace("ib", "").replace("b", "")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "kmg" else t
    try:
        number = float(num) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use 1KiB, 1MiB, 64MiB)") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"not a finite size: {text!r} (use 1KiB, 1MiB, 64MiB)")
    value = int(number)
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
        "mid": "mid-size transform (y = 2.5x + 1), call after call, per call",
        "cold": "small transform, each call after ~1 ms of other Python work, per call",
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
        peers = [r.median_s for r in rows if r.kind == "peer" and r.ok]  # not a WRONG one
        best_peer = min(peers) if peers else None
        scale, unit = _scale(section)
        lines.append(
            f"  {'':40s} {'median':>10s} {'best':>10s} {'runs':>5s} {'vs best peer':>13s}  check"
        )
        for r in sorted(rows, key=lambda r: r.median_s) if section != "modes" else rows:
            vs = f"{_num(best_peer / r.median_s)}x" if best_peer else "-"
            lines.append(
                f"  {r.name:40s} {_num(r.median_per_item_s * scale):>8s}{unit:>2s} "
                f"{_num(r.best_per_item_s * scale):>8s}{unit:>2s} {r.runs:>5d} {vs:>13s}  "
                f"{'ok' if r.ok else 'WRONG'}"
            )
    if report.skipped:
        lines.append("\nskipped: " + "; ".join(report.skipped))
    if report.failed:
        lines.append("\nFAILED (no figures):")
        lines += [f"  {f.section}/{f.name} ({f.kind}): {f.error}" for f in report.failed]
    return "\n".join(lines)


def _scale(section: str) -> tuple[float, str]:
    """How a section's times per item (``Row.median_per_item_s``) are shown."""
    if section in ("roundtrip", "small", "mid", "cold"):
        return 1e6, "us"
    return 1e3, "ms"


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
        scale, unit = _scale(section)
        unit = {"us": "us per task" if section == "roundtrip" else "us per call"}.get(unit, unit)
        names = [r.name for r in rows]
        values = [r.median_per_item_s * scale for r in rows]
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


# Sizes, counts and repeats: the full run's, and --quick's where it differs. Options
# start as None so that a value the user gave wins over --quick's.
DEFAULTS: dict[str, Any] = {
    "cpu_size": 1_000_000,
    "mem_size": 16_000_000,
    "small_size": 1000,
    "small_calls": 200,
    "mid_size": 200_000,
    "mid_calls": 20,
    "cold_calls": 50,
    "roundtrips": 2000,
    "mode_sizes": "1KiB,1MiB,64MiB",
    "repeat": 5,
}
QUICK: dict[str, Any] = {
    "cpu_size": 20_000,
    "mem_size": 200_000,
    "small_calls": 20,
    "mid_size": 20_000,
    "mid_calls": 5,
    "cold_calls": 5,
    "roundtrips": 100,
    "mode_sizes": "1KiB,1MiB",
    "repeat": 2,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmcompute bench",
        description="Compare shmcompute with NumPy, Numba, the stdlib pools and joblib on "
        "the same work; every result is verified.",
        epilog="Exit status: 0 when every side ran and matched the reference; 1 when any "
        "side failed or gave a wrong result (a peer's too; peers not installed are "
        "skipped); 2 for bad options; 130 on Ctrl-C.",
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="workers for every parallel peer (default: usable cores)",
    )

    def sized(name: str, what: str, metavar: str = "N") -> None:
        quick = f"; --quick {QUICK[name]:,}" if name in QUICK else ""
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=None,
            metavar=metavar,
            help=f"{what} (default {DEFAULTS[name]:,}{quick})",
        )

    sized("cpu_size", "float64 elements of the cpu section")
    sized("mem_size", "float64 elements of the memory section")
    sized("small_size", "float64 elements of each small call")
    sized("small_calls", "small calls per timed run")
    sized("mid_size", "float64 elements of each mid call")
    sized("mid_calls", "mid calls per timed run")
    sized("cold_calls", "cold calls per timed run (each after ~1 ms of other work)")
    sized("roundtrips", "tasks per timed run of the roundtrip section")
    parser.add_argument(
        "--mode-sizes",
        default=None,
        metavar="SIZES",
        help=f"payload sizes of the modes section (default {DEFAULTS['mode_sizes']}; "
        f"--quick {QUICK['mode_sizes']})",
    )
    sized("repeat", "timed runs of each side", metavar="RUNS")
    parser.add_argument(
        "--peer-timeout",
        type=float,
        default=PEER_TIMEOUT_S,
        metavar="SECONDS",
        help="the most one run of a pool peer may wait for its results; past it the peer "
        f"fails (a worker died or hung) and the others go on (default {PEER_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and 2 repeats for the options not given (a smoke test in "
        "seconds, figures meaningless)",
    )
    parser.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    parser.add_argument("--plot", metavar="DIR", help="also save PNG bar charts (matplotlib)")
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The options, checked, with defaults filled in: ``sections`` a list,
    ``mode_sizes`` a list of bytes, ``workers`` a number. Everything that would fail
    only after the measurements (a --json path that cannot be written, no matplotlib
    for --plot, sizes that cannot fit) is a usage error here, before any."""
    parser = _parser()
    args = parser.parse_args(argv)
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK.get(name, value) if args.quick else value)

    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if not args.sections:
        parser.error(f"--sections: none given; choose one or more of {','.join(SECTIONS)}")
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        parser.error(f"--sections: unknown {bad}; choose from {','.join(SECTIONS)}")
    for name in DEFAULTS:
        if name != "mode_sizes" and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        args.mode_sizes = [_parse_size(s) for s in args.mode_sizes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as e:
        parser.error(f"--mode-sizes: {e}")
    if not args.mode_sizes:
        parser.error("--mode-sizes: none given; use e.g. 1KiB,1MiB,64MiB")
    from .pool.sizing import usable_cores

    if args.workers is None:
        args.workers = usable_cores()
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if not 0 < args.peer_timeout < math.inf:
        parser.error(f"--peer-timeout must be a number of seconds > 0, got {args.peer_timeout}")
    problem = _too_big(args) or _unwritable(args)
    if problem:
        parser.error(problem)
    return args


def _too_big(args: argparse.Namespace) -> str | None:
    """Sizes that cannot fit, named by their option: shared arrays beyond the free space
    of /dev/shm, or all arrays beyond the memory available (lower bounds of what each
    section holds at once; sections run one after the other)."""
    from .array import SHM_DIR, _shm_free_bytes

    needs = []  # (option, shared bytes, all bytes, what)
    for name, section in (
        ("cpu_size", "cpu"),
        ("mem_size", "memory"),
        ("small_size", "small"),
        ("mid_size", "mid"),
        ("small_size", "cold"),
    ):
        if section in args.sections:  # input and output shared; x, ref, out private
            n = getattr(args, name) * 8
            needs.append((name, 2 * n, 5 * n, "its input and output"))
    if "modes" in args.sections:  # input, output and a transfer's fresh input
        n = max(args.mode_sizes)
        needs.append(("mode_sizes", 3 * n, 4 * n, "three arrays of the largest size"))
    shm_free, mem_free = _shm_free_bytes(), _available_memory()
    for name, shared, total, what in needs:
        option = f"--{name.replace('_', '-')}"
        if shm_free is not None and shared > shm_free:
            return (
                f"{option}: needs at least {_fmt_bytes(shared)} of shared memory ({what}), "
                f"and {SHM_DIR} has {_fmt_bytes(shm_free)} free; use a smaller size"
            )
        if mem_free is not None and total > mem_free:
            return (
                f"{option}: needs at least {_fmt_bytes(total)} of memory, and "
                f"{_fmt_bytes(mem_free)} is available; use a smaller size"
            )
    return None


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _unwritable(args: argparse.Namespace) -> str | None:
    """Why --json or --plot could not be saved at the end, or None."""
    if args.json:
        path = os.path.abspath(args.json)
        folder = os.path.dirname(path)
        if os.path.isdir(path):
            return f"--json: {args.json} is a folder; give a file name"
        if not os.path.isdir(folder):
            return f"--json: the folder {folder} does not exist; create it or choose another"
        if not os.access(path if os.path.exists(path) else folder, os.W_OK):
            return f"--json: {args.json} cannot be written (permissions); choose another path"
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return "--plot needs matplotlib: pip install 'shmcompute[notebooks]'"
        try:
            os.makedirs(args.plot, exist_ok=True)
        except OSError as e:
            return f"--plot: cannot make the folder {args.plot}: {e.strerror}"
        if not os.access(args.plot, os.W_OK):
            return f"--plot: {args.plot} cannot be written (permissions); choose another folder"
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    report = Report(
        _machine(),
        {
            "sections": args.sections,
            "workers": args.workers,
            **{name: getattr(args, name) for name in DEFAULTS},
            "peer_timeout_s": args.peer_timeout,
        },
    )
    m = report.machine
    print(
        f"shmcompute bench: {m['cpu']}, {m['cores_usable']} usable cores, Python "
        f"{m['python']}, numpy {m['numpy']}, numba {m['numba']}; {args.workers} workers"
    )
    t0 = time.perf_counter()
    try:
        _measure(report, args)
    except KeyboardInterrupt:
        _say("")
        print("interrupted", file=sys.stderr)
        return 130
    _say("")
    print(_table(report))
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    saved = True
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump({**asdict(report)}, f, indent=2)
            print(f"saved {args.json}")
        except OSError as e:  # checked before the run; the disk may have filled since
            print(f"--json: could not save {args.json}: {e}", file=sys.stderr)
            saved = False
    if args.plot:
        for path in _plot(report, args.plot):
            print(f"saved {path}")
    return _verdict(report) or (0 if saved else 1)


def _measure(report: Report, args: argparse.Namespace) -> None:
    from . import _bench_kernels as K

    _say("  compiling kernels (cached after the first run) ...")
    K.warm_up()
    b = _Bench(report, args.repeat, args.workers, args.peer_timeout)
    with forkserver_pools(args.workers) as pools:
        for section in args.sections:
            if section in ("cpu", "memory"):
                _array_section(
                    b, pools, section, args.cpu_size if section == "cpu" else args.mem_size
                )
            elif section == "small":
                _small_section(b, pools, args.small_size, args.small_calls)
            elif section == "mid":
                _small_section(b, pools, args.mid_size, args.mid_calls, "mid")
            elif section == "cold":
                _small_section(b, pools, args.small_size, args.cold_calls, "cold")
            elif section == "roundtrip":
                _roundtrip_section(b, pools, args.roundtrips)
            else:
                _modes_section(b, pools, args.mode_sizes)


def _verdict(report: Report) -> int:
    """The exit status, with a last line saying why when it is 1: any side that failed
    (shmcompute's or a peer's) or gave a wrong result fails the run."""
    wrong = [f"{r.section}/{r.name}" for r in report.rows if not r.ok]
    if wrong:
        print(f"WRONG RESULTS: {wrong}")
    for kind in ("shmcompute", "peer"):
        failed = [f"{f.section}/{f.name}" for f in report.failed if f.kind == kind]
        if failed:
            print(f"FAILED {'shmcompute sides' if kind == 'shmcompute' else 'peers'}: {failed}")
    return 1 if wrong or report.failed else 0
