"""The records and the timing of ``shmcompute bench``: a side's figures (``Row``), a
side that failed (``Failure``), the run's ``Report``; timed runs (``_time``) and sides
interleaved in rounds (``_interleave_rounds``). ``_bench_sections.py`` holds one
function per section, ``bench.py`` the command line, the table and the plots."""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ._bench_pools import PEER_TIMEOUT_S

# What each section's figures count: (unit of a row's size, what one timed run is made of)
UNITS = {
    "cpu": ("elements", "run"),
    "memory": ("elements", "run"),
    "small": ("elements", "call"),
    "mid": ("elements", "call"),
    "cold": ("elements", "call"),
    "roundtrip": ("tasks", "task"),
    "modes": ("bytes", "run"),
}


@dataclass
class Row:
    """One side's figures in one section (a row of the table, of the JSON's ``rows``).

    ``median_s`` / ``best_s``: the median and the fastest of its ``runs`` timed runs,
    each run timed whole. A run is ``per_run`` ``item``s: back-to-back calls (small and
    mid), tasks (roundtrip), or the run itself (``per_run`` 1); ``median_per_item_s``
    and ``best_per_item_s`` divide by it, and are what the table shows. ``size`` counts
    ``size_unit``: float64 elements per call (cpu, memory, small, mid), tasks per run
    (roundtrip) or payload bytes (modes)."""

    section: str
    name: str
    kind: str  # "shmcompute" or "peer"
    median_s: float
    best_s: float
    ok: bool
    note: str = ""
    size: int = 0
    runs: int = 0
    per_run: int = 1
    item: str = "run"
    size_unit: str = "elements"
    median_per_item_s: float = field(init=False)
    best_per_item_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.median_per_item_s = self.median_s / self.per_run
        self.best_per_item_s = self.best_s / self.per_run


@dataclass
class Failure:
    """A side that raised (a crash, a timeout, a wrong answer caught on the way): it has
    no row. A shmcompute side's failure is ours to fix; a peer's means the comparison is
    incomplete. Either fails the run (``shmcompute bench`` exits 1)."""

    section: str
    name: str
    kind: str  # "shmcompute" or "peer"
    error: str  # "TypeName: message"


@dataclass
class Report:
    machine: dict[str, Any]
    settings: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # peers not installed: not a failure
    failed: list[Failure] = field(default_factory=list)


def _say(msg: str) -> None:
    """Progress on stderr: one line rewritten in place on a terminal; elsewhere (a log,
    a pipe) one line per step, without carriage returns and escape codes."""
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K{msg}")
    elif msg:
        sys.stderr.write(f"{msg}\n")
    sys.stderr.flush()


def _time(
    fn: Callable[[], Any],
    repeat: int,
    setup: Callable[[], Any] | None = None,
    warmups: int = 1,
) -> list[float]:
    """``repeat`` timed runs of ``fn`` after ``warmups`` untimed ones (compile, start
    workers, fault pages in); ``setup`` runs untimed before each."""
    for _ in range(warmups):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


class _Bench:
    def __init__(
        self, report: Report, repeat: int, workers: int, peer_timeout: float = PEER_TIMEOUT_S
    ) -> None:
        self.report = report
        self.repeat = repeat
        self.workers = workers
        self.peer_timeout = peer_timeout  # the most one peer run may wait for its results

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
        per_run: int = 1,
    ) -> None:
        _say(f"  {section}: {name} ...")
        try:
            times = _time(fn, repeat or self.repeat, setup)
            ok = bool(check())
        except Exception as e:  # reported; the other sides still run
            self.fail(section, name, kind, e)
            return
        self.row(section, name, kind, times, ok, size, note, per_run)

    def row(
        self,
        section: str,
        name: str,
        kind: str,
        times: list[float],
        ok: bool,
        size: int,
        note: str = "",
        per_run: int = 1,
    ) -> None:
        size_unit, item = UNITS[section]
        self.report.rows.append(
            Row(
                section,
                name,
                kind,
                statistics.median(times),
                min(times),
                ok,
                note,
                size,
                len(times),
                per_run,
                item,
                size_unit,
            )
        )

    def fail(self, section: str, name: str, kind: str, error: BaseException) -> None:
        """Record a side that raised: no figures for it, and the run exits 1."""
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        self.report.failed.append(Failure(section, name, kind, text))


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
    # run() returns the seconds to count: it has untimed work between its calls
    times_itself: bool = False


def _interleave_rounds(
    b: _Bench, section: str, size: int, sides: list[_Side], per_run: int = 1
) -> None:
    """Time ``sides`` in rounds, each round running every side once in a rotated order,
    so that a slow minute of a shared machine lands on all of them rather than on
    whichever ran then: the ratios between sides are what the table shows. Each side's
    output is wiped before its last run and checked right after it. A run is
    ``per_run`` calls (``Row``)."""
    live: list[_Side] = []
    for side in sides:  # warm-up: compile, start workers, fault pages in
        _say(f"  {section}: warming up {side.name} ...")
        try:
            side.run()
        except Exception as e:  # reported; the other sides still run
            b.fail(section, side.name, side.kind, e)
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
                inside = side.run()
                times[side.name].append(inside if side.times_itself else time.perf_counter() - t0)
                time.sleep(side.settle)
                if last:
                    ok[side.name] = bool(side.check())
            except Exception as e:
                b.fail(section, side.name, side.kind, e)
                ok[side.name] = False
                times[side.name] = []
    for side in live:
        if times[side.name]:
            b.row(section, side.name, side.kind, times[side.name], ok[side.name], size, "", per_run)


@contextmanager
def _numba_threads(n: int) -> Iterator[None]:
    """Numba's thread count set to ``n`` (0: left as it is), and restored after."""
    if not n:
        yield
        return
    import numba

    old = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(old)


def _chunks(n: int, parts: int) -> list[slice]:
    step = max(1, math.ceil(n / parts))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _fmt_bytes(n: int) -> str:
    """Bytes in binary units to three significant digits (``1.53 MiB``, ``7.81 KiB``,
    ``64 MiB``): sizes the table tells apart get labels that differ, down to a
    fraction of a percent."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    if value >= 1000:
        text = f"{value:.3g}" if value >= 1e6 else f"{value:.0f}"
    else:
        text = f"{value:.{max(0, 2 - math.floor(math.log10(value)))}f}"
        text = text.rstrip("0").rstrip(".") if "." in text else text
    return f"{text} {unit}"
