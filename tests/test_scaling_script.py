"""`benchmarks/scaling.py`, the scaling benchmark script, run as a script."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
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
