"""Supervision of process workers: the crash table, retries, timeouts, recycling,
stalled heartbeats, parent death and SIGTERM draining.

After every crash the same pool must still run tasks; only the crashed task fails.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import psutil
import pytest

import shmcompute as shc
from shmcompute.errors import PoolTerminatedError, TaskTimeoutError, WorkerCrashedError
from shmcompute.pool import Pool, ProcessPool, supervisor
from shmcompute.sync import Event
from tests import _pool_tasks as T
from tests.test_pool import WAIT, _Restarting, wait_count

pytestmark = pytest.mark.crash


@pytest.fixture
def pool() -> Iterator[Pool]:
    p = Pool(2, backend="process")
    yield p
    p.shutdown(wait=True, cancel_futures=True, timeout=WAIT)


@pytest.fixture
def counter() -> Iterator[shc.SharedArray]:
    with shc.zeros(8, np.int64) as c:
        yield c


def _still_usable(pool: Pool) -> None:
    assert [pool.submit(T.square, i).result(WAIT) for i in range(4)] == [0, 1, 4, 9]
    assert pool.stats.total == pool.max_workers


def _kill_busy_worker(pool: Pool, counter: shc.SharedArray, sig: int) -> Any:
    gate = Event()
    fut = pool.submit(T.pid_count_and_wait, counter, gate)
    wait_count(counter, 1)
    pid = int(counter.array[1])  # the worker running it (others may be busy too)
    os.kill(pid, sig)
    try:
        return fut.exception(WAIT), pid
    finally:
        gate.set()
        gate.close()


# --- the crash table: what dies, and what the caller sees ------------------------------------
CRASHES: list[tuple[str, Callable[..., Any], tuple[Any, ...], type[BaseException], str]] = [
    ("segfault", T.segfault, (), WorkerCrashedError, "SIGSEGV"),
    ("os._exit", T.exit_now, (3,), WorkerCrashedError, "exited with code 3"),
    ("SIGKILL itself", T.kill_self, (), WorkerCrashedError, "SIGKILL"),
    ("raises", T.raise_value, ("plain error",), ValueError, "plain error"),
    ("unpicklable result", T.return_unpicklable, (), TypeError, "pickle"),
]


@pytest.mark.parametrize(
    ("what", "fn", "args", "error", "match"), CRASHES, ids=[c[0] for c in CRASHES]
)
def test_crash_table(
    pool: Pool,
    what: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    error: type[BaseException],
    match: str,
) -> None:
    bystanders = [pool.submit(T.square, i) for i in range(10)]
    err = pool.submit(fn, *args).exception(WAIT)
    assert isinstance(err, error), repr(err)
    assert match in str(err)
    if isinstance(err, WorkerCrashedError):
        # Code written for ProcessPoolExecutor catches BrokenProcessPool.
        assert isinstance(err, BrokenProcessPool)
        assert err.pid is not None and err.task is not None and fn.__name__ in err.task
        assert pool.stats.crashed == 1
        assert pickle.loads(pickle.dumps(err)).pid == err.pid
    assert [f.result(WAIT) for f in bystanders] == [i * i for i in range(10)]
    _still_usable(pool)


def test_unpicklable_argument_fails_only_that_future(pool: Pool) -> None:
    fut = pool.submit(T.ident, lambda: 1)
    err = fut.exception(WAIT)
    assert isinstance(err, (pickle.PicklingError, AttributeError, TypeError)), repr(err)
    assert "while pickling the call" in "".join(getattr(err, "__notes__", []))
    _still_usable(pool)


def test_sigkill_from_outside_fails_only_the_running_task(
    pool: Pool, counter: shc.SharedArray
) -> None:
    queued = [pool.submit(T.square, i) for i in range(20)]
    err, pid = _kill_busy_worker(pool, counter, signal.SIGKILL)
    assert isinstance(err, WorkerCrashedError) and err.pid == pid
    assert err.exitcode == -signal.SIGKILL and "SIGKILL" in str(err)
    assert [f.result(WAIT) for f in queued] == [i * i for i in range(20)]
    assert pid not in {w.pid for w in pool.stats.workers}
    _still_usable(pool)


def test_retries_rerun_a_crashed_task(pool: Pool, counter: shc.SharedArray) -> None:
    fut = pool.options(retries=1).submit(T.crash_first_time, counter, 42)
    assert fut.result(WAIT) == 42
    assert int(counter.array[0]) == 2  # ran twice: crashed once, then succeeded
    assert pool.stats.crashed == 1 and pool.stats.failed == 0
    counter.array[0] = 0
    no_retry = pool.submit(T.crash_first_time, counter, 7)
    assert isinstance(no_retry.exception(WAIT), WorkerCrashedError)


def test_the_pools_retries_apply_to_every_task(counter: shc.SharedArray) -> None:
    # Pool(retries=n) re-runs a task whose worker died, n times at most, for every task
    # that sets no retries of its own; options(retries=...) still overrides it.
    with Pool(2, backend="process", retries=2) as pool:
        assert pool.submit(T.crash_first_time, counter, 42).result(WAIT) == 42
        assert int(counter.array[0]) == 2  # crashed once, then succeeded
        counter.array[0] = 0
        err = pool.options(timeout=WAIT).submit(T.crash_every_time, counter).exception(WAIT)
        assert isinstance(err, WorkerCrashedError)
        assert int(counter.array[0]) == 3  # the run and two retries, each crashed
        counter.array[0] = 0
        err = pool.options(retries=0).submit(T.crash_every_time, counter).exception(WAIT)
        assert isinstance(err, WorkerCrashedError)
        assert int(counter.array[0]) == 1
        assert (pool.stats.crashed, pool.stats.failed) == (5, 2)
        _still_usable(pool)


def test_a_worker_a_restart_started_is_replaced_like_any_other() -> None:
    # restart()'s new workers are spares until ready (one that fails to start is not
    # replaced: restart() reports it); once ready, a death is an ordinary one, even with
    # the exit code of a failed initializer.
    from shmcompute.pool.worker import EXIT_INIT_FAILED

    with Pool(2, backend="process") as pool:
        pool.restart(timeout=WAIT)
        err = pool.options(retries=0).submit(T.exit_with, EXIT_INIT_FAILED).exception(WAIT)
        assert isinstance(err, WorkerCrashedError)
        _still_usable(pool)


def test_timeout_kills_and_replaces_the_worker(pool: Pool, counter: shc.SharedArray) -> None:
    fut = pool.options(timeout=0.3).submit(T.spin_forever_holding_gil, counter)
    wait_count(counter, 1)
    (busy,) = [w for w in pool.stats.workers if w.state == "busy"]
    err = fut.exception(WAIT)
    assert isinstance(err, TaskTimeoutError) and isinstance(err, TimeoutError)
    assert f"pid {busy.pid}" in str(err)
    assert not psutil.pid_exists(busy.pid) or psutil.Process(busy.pid).status() == "zombie"
    _still_usable(pool)


def test_max_tasks_per_child_recycles_workers() -> None:
    with Pool(2, backend="process", max_tasks_per_child=3) as pool:
        pids = [pool.submit(T.pid).result(WAIT) for _ in range(12)]
        assert len(set(pids)) >= 4  # 12 tasks, at most 3 per process
        results = list(pool.map(T.square, range(40)))
        assert results == [i * i for i in range(40)]
        assert pool.stats.failed == 0 and pool.stats.restarts >= 4


def test_stalled_heartbeat_is_reported_and_replaced(counter: shc.SharedArray) -> None:
    with Pool(
        1, backend="process", heartbeat_interval=0.05, stall_timeout=0.5, replace_stalled=True
    ) as pool:
        gate = Event()
        fut = pool.submit(T.count_and_wait, counter, gate)
        wait_count(counter, 1)
        (w,) = pool.stats.workers
        assert w.pid is not None and not w.stalled
        os.kill(w.pid, signal.SIGSTOP)  # the whole process freezes: no heartbeat
        try:
            err = fut.exception(WAIT)
        finally:
            try:
                os.kill(w.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            gate.set()
            gate.close()
        assert isinstance(err, WorkerCrashedError) and "heartbeat stalled" in str(err)
        _still_usable(pool)


def test_stall_is_only_reported_without_replace(counter: shc.SharedArray) -> None:
    with Pool(1, backend="process", heartbeat_interval=0.05, stall_timeout=0.3) as pool:
        pool.submit(T.square, 1).result(WAIT)
        (w,) = pool.stats.workers
        assert w.pid is not None
        os.kill(w.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + WAIT
            while not pool.stats.workers[0].stalled:
                assert time.monotonic() < deadline, "stall never reported"
                time.sleep(0.05)
        finally:
            os.kill(w.pid, signal.SIGCONT)
        deadline = time.monotonic() + WAIT
        while pool.stats.workers[0].stalled:  # beats again once resumed
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert pool.stats.workers[0].pid == w.pid
        _still_usable(pool)


def test_restart_after_a_timed_out_restart_waits_for_the_retired_worker(
    counter: shc.SharedArray,
) -> None:
    # A restart() that times out leaves the old worker retiring (finishing its task) in
    # the pool's one spare slot. The next restart() took another slot anyway and failed
    # with a bare IndexError; it now waits for that worker, within its own timeout.
    gate = Event()
    try:
        with ProcessPool(1) as pool:
            fut = pool.submit(T.count_and_wait, counter, gate)
            wait_count(counter, 1)
            with pytest.raises(TimeoutError, match="did not finish its tasks"):
                pool.restart(timeout=1.0)  # the new worker is ready; the old one is busy
            with pytest.raises(TimeoutError, match="retired by an earlier restart"):
                pool.restart(timeout=0.2)
            gate.set()
            assert fut.result(WAIT) == 1
            pool.restart(timeout=WAIT)  # the retired worker exits; this one completes
            _still_usable(pool)
            assert len(pool._procs) == 1
    finally:
        gate.set()
        gate.close()


def test_restart_whose_new_worker_is_not_ready_in_time_leaves_no_extra_worker() -> None:
    # The new worker of a restart() that timed out before it was ready stayed on as an
    # extra worker in the spare slot; the next restart() then failed with IndexError.
    with ProcessPool(1) as pool:
        assert pool.submit(T.square, 2).result(WAIT) == 4
        (old,) = pool._procs.values()
        with pytest.raises(TimeoutError, match="did not become ready"):
            pool.restart(timeout=1e-6)
        assert all(p.retiring for p in pool._procs.values() if p is not old)
        pool.restart(timeout=WAIT)
        assert old.pid not in {w.pid for w in pool.stats.workers}
        _still_usable(pool)
        assert len(pool._procs) == 1


def test_a_worker_that_dies_while_its_restart_replacement_starts_leaves_no_extra_worker(
    counter: shc.SharedArray,
) -> None:
    # restart() starts the new worker beside the old one, which runs until the new one
    # is ready. The old one died meanwhile, and the supervisor replaced it as any dead
    # worker: with restart()'s, the pool then ran max_workers + 1 workers, every slot
    # taken, and each later restart() failed with "no worker slot is free".
    gate = Event()
    try:
        with ProcessPool(1, initializer=T.init_hold_after, initargs=(counter, 1, gate)) as pool:
            assert pool.submit(T.square, 2).result(WAIT) == 4
            (old,) = pool._procs.values()
            restarting = _Restarting(pool)
            wait_count(counter, 2)  # restart()'s new worker is held in its initializer
            os.kill(old.pid, signal.SIGKILL)
            wait_count(counter, 3)  # and so is the supervisor's replacement of the old one
            gate.set()
            restarting.done()
            deadline = time.monotonic() + WAIT
            while len(pool._procs) > 1:  # the one too many exits
                assert time.monotonic() < deadline, f"{len(pool._procs)} workers in a 1-worker pool"
                time.sleep(0.01)
            assert old.pid not in {w.pid for w in pool.stats.workers}
            pool.restart(timeout=WAIT)  # a slot is free for the next one
            _still_usable(pool)
    finally:
        gate.set()
        gate.close()


def test_shutdown_timeout_terminates_stuck_workers(counter: shc.SharedArray) -> None:
    pool = Pool(1, backend="process")
    fut = pool.submit(T.spin_forever_holding_gil, counter)
    queued = pool.submit(T.square, 2)
    wait_count(counter, 1)
    t0 = time.monotonic()
    pool.shutdown(wait=True, timeout=0.5)
    assert time.monotonic() - t0 < 10
    assert isinstance(fut.exception(WAIT), shc.PoolTerminatedError)
    assert isinstance(queued.exception(WAIT), (shc.PoolTerminatedError, cf.CancelledError))
    assert pool.stats.state == "closed"


def test_shutdown_again_writes_nothing_into_a_file_that_took_the_wake_pipe_fd(
    tmp_path: Any,
) -> None:
    # The teardown closes the supervisor's wake-up pipe, and the kernel gives its fd
    # number to the next file opened. A second shutdown() (documented as harmless) used
    # to write its wake-up byte into that file.
    pool = ProcessPool(1)
    assert pool.submit(T.square, 2).result(WAIT) == 4
    wake_w = pool._wake_w
    pool.shutdown(wait=True)
    path = tmp_path / "user.txt"
    fds: list[int] = []
    try:
        while wake_w not in fds:  # the lowest free number comes first
            assert len(fds) < 256, f"fd {wake_w} was not reused: {fds}"
            fds.append(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        pool.shutdown(wait=True)
        pool.shutdown(wait=False)
    finally:
        for fd in fds:
            os.close(fd)
    assert path.read_bytes() == b""
    assert pool.stats.state == "closed"


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_shutdown_timeout_fails_running_and_queued_tasks(
    backend: str, counter: shc.SharedArray
) -> None:
    # The documented contract of shutdown(timeout=...): past it, unfinished tasks fail
    # with PoolTerminatedError. The thread backend only logged a warning: its queued
    # task was still pending when shutdown() returned, and ran afterwards.
    pool = Pool(1, backend=backend)
    gate = Event()
    try:
        running = pool.submit(T.count_and_wait, counter, gate)
        queued = pool.submit(T.count, counter, 1)
        wait_count(counter, 1)
        pool.shutdown(wait=True, timeout=0.2)
        for f in (running, queued):  # resolved by the time shutdown() returns
            assert isinstance(f.exception(0), PoolTerminatedError)
        assert "ran out of time" in str(queued.exception(0))
        assert pool.stats.state == "closed"
    finally:
        gate.set()  # (the thread backend's running call returns; its result is discarded)
    pool.shutdown(wait=True, timeout=WAIT)  # joins that thread
    assert int(counter.array[1]) == 0  # the queued task never ran
    gate.close()


# --- the parent dies, or is asked to stop ---------------------------------------------------
_PARENT = textwrap.dedent(
    """
    import sys, time
    from shmcompute.pool import Pool
    from tests import _pool_tasks as T
    pool = Pool(2, backend="process")
    assert pool.submit(T.square, 3).result(30) == 9
    print(" ".join(str(w.pid) for w in pool.stats.workers), flush=True)
    time.sleep(60)  # the test kills us here
    """
)


def test_workers_exit_within_a_second_of_parent_death() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _PARENT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2, (line, proc.stderr.read() if proc.stderr else "")
        workers = [psutil.Process(p) for p in pids]
        proc.kill()
        proc.wait(WAIT)
        t0 = time.monotonic()
        _, alive = psutil.wait_procs(workers, timeout=1.0)
        running = [p for p in alive if _running(p)]  # a zombie has exited: not an orphan
        assert not running, f"orphans after {time.monotonic() - t0:.2f} s: {running}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT)
        # Its control block is reclaimed by its resource tracker (it owned the segment),
        # once every process holding the tracker's pipe is gone: the workers, then the
        # forkserver. Give it that time before the safety net below, which kills the
        # whole group, tracker included (killing it first leaked the segment once, on a
        # loaded 2-core machine).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _segments_of(proc.pid):
            time.sleep(0.05)
        try:  # the dead parent's forkserver and tracker exit by themselves; be sure
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    assert not _segments_of(proc.pid)


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _segments_of(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"shmc_{pid:x}_")]


_DRAINING = textwrap.dedent(
    """
    import os, signal, sys
    from shmcompute.pool import Pool
    from tests import _pool_tasks as T
    pool = Pool(2, backend=sys.argv[1])
    pool.drain_on_sigterm(timeout=30)
    futures = [pool.submit(T.sleep_for, 0.05) for _ in range(12)]
    for i, f in enumerate(futures):
        # One write per line: callbacks run in two worker threads at once, and print's
        # separate writes of "done", i and the result interleave between them.
        f.add_done_callback(lambda f, i=i: os.write(1, f"done {i} {f.result()}\\n".encode()))
    os.kill(os.getpid(), signal.SIGTERM)
    signal.pause()
    """
)


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_sigterm_drains_then_exits(backend: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _DRAINING, backend],
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    done = [line for line in proc.stdout.splitlines() if line.startswith("done")]
    assert len(done) == 12, (proc.stdout, proc.stderr)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert "leaked" not in proc.stderr


_DROPPED = textwrap.dedent(
    """
    import gc, json, os, time
    import numpy as np
    import psutil
    import shmcompute as shc
    from shmcompute import atomics as at
    from shmcompute.pool import ProcessPool
    from shmcompute.sync import Event
    from tests import _pool_tasks as T

    counter, gate = shc.zeros(8, np.int64), Event()
    pool = ProcessPool(1)
    # The caller keeps the futures (a done one, a failed one, the job's): they must not
    # keep the pool.
    kept = [pool.submit(T.square, 3), pool.submit(T.square, "x")]
    kept[0].result(30), kept[1].exception(30)
    kept.append(pool.submit(T.count_and_wait, counter, gate))
    for _ in range(3):
        kept.append(pool.submit(T.count, counter, 1))  # queued behind it
    while at.load(counter.array, 0) < 1:  # the first task runs
        at.wait(counter.array, 0, 0, 1.0)
    workers = [psutil.Process(p.pid) for p in pool._procs.values()]
    threads, seg = [pool._collector, pool._supervisor], pool._ctrl.name
    del pool  # dropped without shutdown()
    gc.collect()
    gate.set()
    deadline = time.monotonic() + 30
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        gc.collect()  # (a finished task and its future form a cycle: freed by the gc)
        threads[1].join(0.05)
    _, alive = psutil.wait_procs(workers, timeout=5)
    print(json.dumps({
        "ran": int(counter.array[1]),
        "threads": [t.name for t in threads if t.is_alive()],
        "workers": [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE],
        "segment": os.path.exists(os.path.join("/dev/shm", seg)),
    }))
    gate.close()
    counter.close()
    """
)


def test_a_dropped_pool_finishes_its_work_then_releases_everything() -> None:
    # A ProcessPool dropped without shutdown() used to keep its worker processes, its
    # two threads and its control segment until the interpreter exited: the threads
    # held the pool. They hold it weakly now, and its finalizer has the supervisor
    # release what it left, once the work it was given is done.
    proc = subprocess.run(
        [sys.executable, "-c", _DROPPED],
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out == {"ran": 3, "threads": [], "workers": [], "segment": False}, proc.stderr
    assert "leaked" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_failure_while_collecting_terminates_the_pool_instead_of_hanging(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Collecting results relies on invariants of the rings. Should one ever break (a
    # bug), the pool must fail what is outstanding and shut down, not leave futures that
    # never resolve and a shutdown() that waits for them forever.
    pool = ProcessPool(1)
    assert pool.submit(T.square, 2).result(WAIT) == 4
    # The teardown takes no new task from its start: one submitted after it took the
    # leftovers would never resolve (the forced teardown began in 'running').
    states: list[str] = []
    stop_workers = supervisor._stop_workers

    def stopping(*args: Any) -> Any:
        states.append(pool._state)
        return stop_workers(*args)

    monkeypatch.setattr(supervisor, "_stop_workers", stopping)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("result ring out of order (simulated)")

    pool._rings.read = broken  # type: ignore[method-assign]
    # The thread that hits the failure sees it: this one, in result(), or already in
    # submit() when the worker was quick (a submitting thread collects what has come in).
    fut = None
    with pytest.raises((RuntimeError, PoolTerminatedError)):
        fut = pool.submit(T.square, 3)
        fut.result(WAIT)
    # The pool terminated itself: the future resolves without a shutdown() call...
    if fut is not None:
        assert isinstance(fut.exception(WAIT), PoolTerminatedError)
    pool.shutdown(wait=True)  # ...and shutting down has nothing left to wait for
    assert pool._outstanding == 0  # (every task's future resolved, seen or not)
    assert pool.stats.state == "closed"
    assert "collecting results failed" in caplog.text
    assert states == ["draining"]


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_a_supervisor_failure_closes_the_pool_and_fails_what_is_outstanding(
    backend: str, counter: shc.SharedArray, caplog: pytest.LogCaptureFixture
) -> None:
    # Should the supervisor ever fail (a bug), the pool must fail what is outstanding
    # and close, not leave futures that never resolve and a shutdown() that waits for
    # them forever (the thread backend's supervisor used to just die).
    pool = Pool(1, backend=backend)
    gate = Event()
    try:
        running = pool.submit(T.count_and_wait, counter, gate)
        wait_count(counter, 1)

        def broken(now: int) -> Any:
            raise RuntimeError("supervisor bug (simulated)")

        pool._check_backlog = broken  # type: ignore[method-assign]
        queued = pool.submit(T.square, 2)  # a backlog starts: the supervisor looks
        for f in (running, queued):
            assert isinstance(f.exception(10), PoolTerminatedError)
    finally:
        gate.set()  # (the thread backend's running call returns; its result is discarded)
        pool.shutdown(wait=True, timeout=WAIT)  # nothing left to wait for
        gate.close()
    assert pool.stats.state == "closed"
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(T.square, 1)
    assert "supervisor failed" in caplog.text
