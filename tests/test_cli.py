"""The `shmcompute` command (`python -m shmcompute`)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from shmcompute.array import PREFIX, SHM_DIR


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmcompute", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_script(path: Path, code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a script (its workers import the main module, hence the guard in
    each) in a process group of its own, and check that it leaves nothing behind."""
    path.write_text(textwrap.dedent(code))
    proc = subprocess.Popen(
        [sys.executable, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        left = _group_ended(proc)
    assert not left, f"left running: {left}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _group_ended(proc: subprocess.Popen[str], wait: float = 5.0) -> list[str]:
    """What ``proc``'s process group still runs, and its segments, ``wait`` seconds at
    most after it exits (its forkserver and trackers leave once it is gone); then
    SIGKILL whatever is left, ``proc`` included, so that a failure leaks nothing."""
    deadline = time.monotonic() + wait
    while True:
        left = [f"process {p}" for p in _group(proc.pid)] + [
            f"segment {n}" for n in os.listdir(SHM_DIR) if n.startswith(f"{PREFIX}{proc.pid:x}_")
        ]
        if proc.poll() is None or not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # bounded: helpers leave on their own schedule
    if proc.poll() is None or left:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate(timeout=30)
    return left


def _group(pgid: int) -> list[str]:
    out = []
    for p in psutil.process_iter(["status", "cmdline"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:120]}")
        except (OSError, psutil.Error):  # gone meanwhile
            continue
    return out


def test_demo_runs_and_verifies():
    out = run("demo", "--size", "200000", "--rounds", "200")
    assert out.returncode == 0, out.stderr
    assert "matches NumPy" in out.stdout and "(exact)" in out.stdout
    # Step 1 times warm workers (it used to time each one's first kernel call), and
    # step 3's ratio says which way it goes.
    assert "2 workers started, kernels loaded in each" in out.stdout
    assert "1. square 1.5 MiB in place across warm processes" in out.stdout
    assert re.search(r"\(wait/notify at \d+\.\d\dx Pipe's speed\)", out.stdout), out.stdout
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
    out = run(
        "bench", "--quick", "--mode-sizes", "1KiB,1MiB,1.9MiB", "--json", str(path), timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for section in (
        "CPU-bound",
        "memory-bound",
        "small transform",
        "mid-size transform",
        "each call after ~1 ms of other Python work",
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
    assert data["failed"] == [] and "FAILED" not in out.stdout
    assert "\r" not in out.stderr and "\033" not in out.stderr  # not a terminal: plain lines

    # What each row's figures mean (Row): per run as timed, per item as tabled.
    quick = data["settings"]
    assert (quick["repeat"], quick["small_calls"], quick["roundtrips"]) == (2, 20, 100)
    per_run = {
        "small": quick["small_calls"],
        "mid": quick["mid_calls"],
        "cold": quick["cold_calls"],
        "roundtrip": 100,
    }
    units = {"roundtrip": ("tasks", "task"), "modes": ("bytes", "run")}
    for r in data["rows"]:
        section = r["section"]
        assert r["per_run"] == per_run.get(section, 1), r
        want = units.get(section, ("elements", "call" if section in per_run else "run"))
        assert (r["size_unit"], r["item"]) == want, r
        assert r["median_per_item_s"] == pytest.approx(r["median_s"] / r["per_run"]), r
        assert r["best_per_item_s"] <= r["median_per_item_s"], r
        numpy_cpu = (section, r["name"]) == ("cpu", "numpy")
        assert r["runs"] == (1 if numpy_cpu else 2), r  # no copy peer at 64 MiB here
    modes = [r["name"] for r in data["rows"] if r["section"] == "modes"]
    assert [m for m in modes if m.startswith("share")] == [
        "share 1 KiB",
        "share 1 MiB",
        "share 1.9 MiB",
    ]


def test_bench_labels_and_best_peer():
    from shmcompute import bench
    from shmcompute._bench_timing import Report, Row, _fmt_bytes

    assert _fmt_bytes(200_000 * 8) == "1.53 MiB"  # was "1 MiB"
    assert [_fmt_bytes(n) for n in (8, 8000, 1 << 20, int(1.9 * 2**20), 64 << 20)] == [
        "8 B",
        "7.81 KiB",
        "1 MiB",
        "1.9 MiB",
        "64 MiB",
    ]
    rows = [  # the fastest peer gave a wrong result: it is not the one to beat
        Row("cpu", "fast but wrong", "peer", 1.0, 1.0, False, runs=5),
        Row("cpu", "right", "peer", 4.0, 4.0, True, runs=5),
        Row("cpu", "ours", "shmcompute", 2.0, 2.0, True, runs=5),
    ]
    table = bench._table(Report({}, {}, rows))
    assert [line.split()[-2:] for line in table.splitlines()[-3:]] == [
        ["4.00x", "WRONG"],
        ["2.00x", "ok"],
        ["1.00x", "ok"],
    ]


def test_bench_cold_calls_are_timed_without_the_work_between_them(monkeypatch):
    """The cold section times each call alone: the ~1 ms of other work before it is not
    in its figures. Here that work is made 20 ms and each call ~0 ms: the rows must
    say microseconds, where timing the run whole would say 20 ms a call."""
    from shmcompute import _bench_sections as S
    from shmcompute import bench

    def slow_other_work():
        time.sleep(0.02)
        return 0

    monkeypatch.setattr(S, "_other_work", slow_other_work)
    args = ["--sections", "cold", "--cold-calls", "3", "--repeat", "1", "--workers", "1"]
    report = bench.Report({}, {})
    bench._measure(report, bench._parse(args))
    rows = {r.name: r for r in report.rows}
    assert not report.failed and all(r.ok for r in report.rows)
    assert {"numba, 1 thread (direct call)", "shmcompute thread (share)"} <= rows.keys()
    direct = rows["numba, 1 thread (direct call)"]
    assert direct.per_run == 3 and direct.median_per_item_s < 0.01, direct


def test_bench_quick_fills_in_only_the_options_not_given():
    from shmcompute import bench

    args = bench._parse(
        ["--quick", "--mid-size", "300000", "--repeat", "4", "--mode-sizes", "2KiB"]
    )
    assert (args.mid_size, args.repeat, args.mode_sizes) == (300_000, 4, [2048])
    assert (args.cpu_size, args.mid_calls) == (bench.QUICK["cpu_size"], bench.QUICK["mid_calls"])
    full = bench._parse(["--mid-calls", "7"])
    assert (full.mid_size, full.mid_calls) == (bench.DEFAULTS["mid_size"], 7)
    assert full.sections == list(bench.SECTIONS) and full.mode_sizes == [1 << 10, 1 << 20, 64 << 20]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sections", "gpu"], "unknown ['gpu']"),
        (["--sections", ""], "--sections: none given; choose one or more of cpu,memory,"),
        (["--sections", " , "], "--sections: none given"),
        (["--mode-sizes", "lots"], "not a size"),
        (["--mode-sizes", "inf"], "--mode-sizes: not a finite size: 'inf'"),
        (["--mode-sizes", "1e30"], "--mode-sizes: needs at least"),
        (["--mem-size", str(10**15)], "--mem-size: needs at least"),
        (["--small-calls", "0"], "--small-calls must be >= 1"),
        (["--mid-size", "-5"], "--mid-size must be >= 1"),
        (["--cold-calls", "0"], "--cold-calls must be >= 1"),
        (["--peer-timeout", "0"], "--peer-timeout must be a number of seconds > 0"),
        (["--json", "{tmp}/missing/bench.json"], "--json: the folder"),
        (["--json", "{tmp}"], "is a folder; give a file name"),
    ],
)
def test_bench_rejects_bad_options_before_measuring(argv, message, tmp_path, capsys):
    """Each one is a usage error naming the option (exit 2), before any measurement:
    an unwritable --json used to fail after the whole run, sizes deep inside it."""
    from shmcompute import bench

    with pytest.raises(SystemExit) as e:
        bench._parse([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


BROKEN_SIDES = """
    import os
    import sys
    from contextlib import contextmanager

    def main():
        import shmcompute.transform as T
        from shmcompute import _bench_pools, bench

        def broken(*args, **kwargs):
            raise RuntimeError("simulated shmcompute failure")

        T.transform = broken  # both shmcompute sides of the section call it

        @contextmanager
        def pools_with_a_dying_peer(workers):
            with _bench_pools.forkserver_pools(workers) as pools:
                mp_pool = pools["mp"]
                # The task kills its worker: the pool starts another one, and waits for
                # the lost result forever.
                mp_pool.map_async = lambda fn, items: type(mp_pool).map_async(
                    mp_pool, os._exit, [3]
                )
                yield pools

        bench.forkserver_pools = pools_with_a_dying_peer
        return bench.main(
            ["--sections", "small", "--small-calls", "2", "--repeat", "1", "--peer-timeout", "1"]
        )

    if __name__ == "__main__":
        sys.exit(main())
"""


def test_bench_failed_sides_fail_the_run(tmp_path):
    """A side that raises, or whose worker dies, is listed with its error; the others
    still run; exit 1."""
    out = run_script(tmp_path / "broken.py", BROKEN_SIDES)
    assert out.returncode == 1, out.stdout + out.stderr[-3000:]
    failed = out.stdout.split("FAILED (no figures):")[1]
    for label in ("thread", "process"):
        assert f"small/shmcompute {label} (share) (shmcompute): RuntimeError: simulated" in failed
    assert (
        "small/multiprocessing.Pool.map (copy) (peer): TimeoutError: multiprocessing.Pool.map: "
        "no result within 1 s (--peer-timeout)" in failed
    )
    assert "FAILED shmcompute sides:" in out.stdout and "FAILED peers:" in out.stdout
    assert "ThreadPoolExecutor (views)" in out.stdout.split("FAILED")[0]  # peers measured


def test_bench_ctrl_c_ends_the_run_at_once():
    """Ctrl-C (SIGINT to the whole process group) in the middle of the interleaved
    rounds: the run ends within seconds, with no traceback from the peers' workers
    (they ignore it) and nothing left running. It used to hang in Pool.join()."""
    args = ["bench", "--sections", "small", "--small-calls", "100", "--repeat", "1000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmcompute", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stderr is not None
        progress = b""
        deadline = time.monotonic() + 45  # (with the waits below, within pytest's 120 s)
        while b"round 1 of" not in progress:  # every side has warmed up: all pools in use
            assert time.monotonic() < deadline, progress.decode()[-2000:]
            if select.select([proc.stderr], [], [], 1.0)[0]:
                chunk = os.read(proc.stderr.fileno(), 4096)
                assert chunk, progress.decode()[-2000:]  # it exited: see why
                progress += chunk
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        left = _group_ended(proc)
    err = (progress + err).decode()
    assert proc.returncode == 130, err[-3000:]
    assert took < 15, f"{took:.1f} s after Ctrl-C"
    assert "Traceback" not in err and err.rstrip().endswith("interrupted"), err[-3000:]
    assert not left, f"left running: {left}"
