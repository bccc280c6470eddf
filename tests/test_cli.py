"""The `shmcompute` command (`python -m shmcompute`)."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmcompute", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_demo_runs_and_verifies():
    out = run("demo", "--size", "200000", "--rounds", "200")
    assert out.returncode == 0, out.stderr
    assert "matches NumPy" in out.stdout and "(exact)" in out.stdout
    assert "segments left behind: 0" in out.stdout
    assert "all checks passed" in out.stdout
    assert "resource_tracker" not in out.stderr


def test_demo_rejects_bad_options():
    out = run("demo", "--workers", "0")
    assert out.returncode == 2 and "--workers must be >= 1" in out.stderr


def test_info_and_reap():
    info = run("info")
    assert info.returncode == 0 and "numba" in info.stdout and "/dev/shm" in info.stdout
    reap = run("reap", "--dry-run")
    assert reap.returncode == 0 and "would remove" in reap.stdout
