"""`benchmarks/scaling.py`, the scaling benchmark script, run as a script."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SIDES = ("prange", "thread", "process") + (
    ("joblib",) if importlib.util.find_spec("joblib") else ()
)


# subprocess.run's timeout (300 s) must fire before pytest-timeout's (120 s by default).
@pytest.mark.timeout(330)
def test_scaling_quick_verifies_and_saves(tmp_path):
    path = tmp_path / "scaling.json"
    out = subprocess.run(
        [sys.executable, "benchmarks/scaling.py", "--quick", "--workers", "1,2", "--json", path],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    tables = out.stdout.split("\n## ")[1:]
    assert [t.split(":", 1)[0] for t in tables] == ["cpu", "memory"]
    for table in tables:
        rows = [line for line in table.splitlines() if line.startswith("| ")]
        assert [r.split("|")[1].strip() for r in rows[1:]] == ["1", "2"]  # [0]: the header
        assert all(r.endswith("| ok |") for r in rows[1:])
    assert "FAIL" not in out.stdout and "resource_tracker" not in out.stderr

    data = json.loads(path.read_text())
    points = {(p["workload"], p["side"], p["workers"]): p for p in data["points"]}
    want = {(wl, "numba-1-thread", 1) for wl in ("cpu", "memory")} | {
        (wl, side, w) for wl in ("cpu", "memory") for side in SIDES for w in (1, 2)
    }
    assert set(points) == want
    for p in points.values():
        assert p["ok"], p
        assert len(p["times_s"]) == 2 and p["median_s"] > 0


# Every run of every side counted (shmcompute's through shc.transform, which also sees
# runs made outside the measurement), and the process side broken in its second,
# untimed, run. Also what --quick leaves alone.
COUNTED = """
    import collections, json, sys

    def main():
        import shmcompute as shc
        from benchmarks import scaling as S

        given = S._parse(["--quick", "--repeat", "3", "--cpu-size", "1000"])
        print("QUICK", json.dumps([given.repeat, given.cpu_size, given.mem_size]))
        calls = collections.Counter()
        transform, measure = shc.transform, S._Runner.measure

        def counted_transform(*args, pool, **kwargs):
            backend = pool.stats.backend
            calls[backend] += 1
            if backend == "process" and calls[backend] == 2:
                raise RuntimeError("simulated failure in a warm-up run")
            return transform(*args, pool=pool, **kwargs)

        def counted_measure(self, workload, side, workers, run, *args, **kwargs):
            def counted():
                calls[side] += 1
                return run()

            plain = side in ("numba-1-thread", "prange")  # not a transform
            run_ = counted if plain else run
            return measure(self, workload, side, workers, run_, *args, **kwargs)

        shc.transform = counted_transform
        S._Runner.measure = counted_measure
        S.WORKLOADS = S.WORKLOADS[:1]  # cpu
        S._optional_joblib = lambda: None  # its loky workers take seconds to start
        rc = S.main(["--workers", "1", "--repeat", "2", "--cpu-size", "2000"])
        print("CALLS", json.dumps([S.WARM_RUNS, dict(calls)]))
        return rc

    if __name__ == "__main__":
        sys.exit(main())
"""


def test_scaling_warms_every_side_alike_and_reports_a_failed_warm_up(tmp_path):
    script = tmp_path / "counted.py"
    script.write_text(textwrap.dedent(COUNTED))
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]  # 1: a side failed
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert json.loads(lines["QUICK"]) == [3, 1000, 200_000]  # given values win over --quick
    warm_runs, calls = json.loads(lines["CALLS"])
    runs = warm_runs + 2  # and 2 timed ones
    assert warm_runs >= 1
    assert calls == {"numba-1-thread": runs, "prange": runs, "thread": runs, "process": 2}
    assert (
        "FAIL cpu/process at 1 worker(s): RuntimeError: simulated failure in a warm-up run"
        in out.stdout
    )
