"""The `shmcompute` command (`python -m shmcompute`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmcompute", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_script(path: Path, code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a script: its workers import the main module, hence the guard."""
    path.write_text(textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=timeout
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


def test_bench_quick_verifies_and_saves(tmp_path):
    path = tmp_path / "bench.json"
    out = run("bench", "--quick", "--json", str(path), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for section in (
        "CPU-bound",
        "memory-bound",
        "small transform",
        "mid-size transform",
        "task round trip",
        "moving the data",
    ):
        assert section in out.stdout
    assert "WRONG" not in out.stdout and "vs best peer" in out.stdout
    import json

    data = json.loads(path.read_text())
    names = {r["name"] for r in data["rows"]}
    assert {
        "shmcompute thread (share)",
        "shmcompute process (share)",
        "numba, 1 thread",
        "numba, 1 thread (direct call)",
        "ProcessPoolExecutor",
        "multiprocessing.Pipe ping-pong",
    } <= names
    assert all(r["ok"] for r in data["rows"])
    assert "resource_tracker" not in out.stderr


def test_bench_rejects_bad_options():
    out = run("bench", "--sections", "gpu")
    assert out.returncode == 2 and "unknown ['gpu']" in out.stderr
    out = run("bench", "--mode-sizes", "lots")
    assert out.returncode == 2 and "not a size" in out.stderr
    out = run("bench", "--small-calls", "0")
    assert out.returncode == 2 and "--small-calls must be >= 1" in out.stderr
    out = run("bench", "--mid-size", "-5")
    assert out.returncode == 2 and "--mid-size must be >= 1" in out.stderr


BROKEN_SIDES = """
    import sys

    def main():
        import shmcompute.transform as T
        from shmcompute import bench

        def broken(*args, **kwargs):
            raise RuntimeError("simulated shmcompute failure")

        T.transform = broken  # both shmcompute sides of the section call it
        return bench.main(["--sections", "small", "--small-calls", "2", "--repeat", "1"])

    if __name__ == "__main__":
        sys.exit(main())
"""


def test_bench_failed_sides_fail_the_run(tmp_path):
    """A side that raises is listed with its error; the others still run; exit 1."""
    out = run_script(tmp_path / "broken.py", BROKEN_SIDES)
    assert out.returncode == 1, out.stdout + out.stderr[-3000:]
    failed = out.stdout.split("FAILED (no figures):")[1]
    for label in ("thread", "process"):
        assert f"small/shmcompute {label} (share) (shmcompute): RuntimeError: simulated" in failed
    assert "FAILED shmcompute sides:" in out.stdout
    assert "ThreadPoolExecutor (views)" in out.stdout.split("FAILED")[0]  # peers measured
