"""Small helpers shared by the benchmark notebooks: size parameter, machine line,
timing, and the end-of-notebook leak check."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

import shmcompute as shc
from shmcompute.array import PREFIX, SHM_DIR
from shmcompute.bench import _cpu_name as cpu_model
from shmcompute.bench import _time
from shmcompute.pool.sizing import usable_cores

SCALE_ENV = "SHMCOMPUTE_NB_SCALE"
# Helper processes multiprocessing (and loky) keep for the whole session, not leaks.
_SESSION_HELPERS = ("resource_tracker", "forkserver")


def scale() -> float:
    """The size factor: 1.0 is the full size of the stored run; CI runs a small one."""
    text = os.environ.get(SCALE_ENV, "1.0")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{SCALE_ENV}={text!r} is not a number; use e.g. 1.0 or 0.01") from None
    if not value > 0:
        raise ValueError(f"{SCALE_ENV} must be > 0, got {text!r}")
    return value


def machine() -> str:
    """One paragraph: CPU, cores, load, versions (printed at the top of each notebook)."""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"CPU: {cpu_model()}; {os.cpu_count()} logical CPUs, {usable_cores()} usable by "
        f"this process; load average {load}\n"
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
        f"numpy {np.__version__}, numba {numba.__version__}, shmcompute {shc.__version__}"
    )


def measure(
    fn: Callable[[], Any], repeat: int, setup: Callable[[], Any] | None = None
) -> np.ndarray:
    """Seconds per call, ``repeat`` timed calls after one untimed warm-up (compiles,
    starts workers, faults pages in). ``setup`` runs untimed before every call."""
    return np.array(_time(fn, repeat, setup))


def median(times: np.ndarray) -> float:
    return float(statistics.median(times))


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}"
        n //= 1024
    raise AssertionError("unreachable")


def fmt_s(s: float) -> str:
    """Seconds with a readable unit."""
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def our_segments() -> set[str]:
    """Shared-memory segments created by this process (named shmc_<pid in hex>_...)."""
    mine = f"{PREFIX}{os.getpid():x}_"
    return {n for n in os.listdir(SHM_DIR) if n.startswith(mine)}


def child_processes() -> list[str]:
    """Command lines of this process's live children, session helpers left out."""
    out = []
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
                pids = f.read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue  # exited meanwhile
            if state != "Z" and not any(h in cmd for h in _SESSION_HELPERS):
                out.append(f"{pid}: {cmd[:120]}")
    return out


def check_clean(timeout: float = 10.0) -> None:
    """Print and assert that no segment and no worker process is left behind (workers
    that were told to exit get ``timeout`` seconds to go)."""
    deadline = time.monotonic() + timeout
    while True:
        segs, kids = our_segments(), child_processes()
        if not (segs or kids) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    print(f"segments left behind: {len(segs)}; worker processes left: {len(kids)}")
    assert not segs, f"leaked shared-memory segments: {sorted(segs)}"
    assert not kids, f"processes still running: {kids}"
