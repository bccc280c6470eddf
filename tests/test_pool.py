"""The pool's behaviour, written once and run on both backends (process and thread).

Ordering comes from shared memory (an atomic counter a task bumps when it is running,
an Event the test opens), never from sleeping. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import logging
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import shmcompute as shc
from shmcompute.errors import ArgumentError, ArgumentTypeError, TaskTimeoutError
from shmcompute.pool import Pool, PoolStats, ProcessPool, ThreadPool, pool_size
from shmcompute.pool._task import _Latencies
from shmcompute.sync import Event
from tests import _pool_tasks as T

BACKENDS = ["process", "thread"]
WAIT = 30.0  # bound on every wait in this file


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_pool(backend: str) -> Iterator[Callable[..., Pool]]:
    pools: list[Pool] = []

    def make(max_workers: int = 2, **kw: Any) -> Pool:
        pool = Pool(max_workers, backend=backend, **kw)
        pools.append(pool)
        return pool

    yield make
    for p in pools:
        p.shutdown(wait=True, cancel_futures=True, timeout=WAIT)


@pytest.fixture
def counter() -> Iterator[shc.SharedArray]:
    with shc.zeros(8, np.int64) as c:
        yield c


def wait_count(c: shc.SharedArray, n: int, index: int = 0) -> None:
    """Block (bounded) until counter[index] >= n: tasks announced they are running."""
    deadline = time.monotonic() + WAIT
    while True:
        v = int(shc.atomics.load(c.array, index))
        if v >= n:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"counter stayed at {v}, expected {n}")
        shc.atomics.wait(c.array, index, v, 0.5)


def bump(c: shc.SharedArray, index: int = 0) -> None:
    shc.atomics.add(c.array, index, 1)
    shc.atomics.notify(c.array, index)


# --- the Executor contract --------------------------------------------------------------
def test_submit_result_args_kwargs(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool()
    assert isinstance(pool, cf.Executor)
    assert pool.submit(T.square, 7).result(WAIT) == 49
    assert pool.submit(T.add, 1, 2, c=3).result(WAIT) == 6
    futures = [pool.submit(T.square, i) for i in range(200)]
    assert [f.result(WAIT) for f in futures] == [i * i for i in range(200)]


def test_backend_classes_are_drop_ins(backend: str) -> None:
    cls = ProcessPool if backend == "process" else ThreadPool
    with cls(2) as pool:  # positional max_workers, like the stdlib
        assert isinstance(pool, Pool) and pool.backend == backend
        assert pool.submit(T.square, 3).result(WAIT) == 9
        assert pool.max_workers == 2


def test_exception_propagates_with_type_and_traceback(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool()
    with pytest.raises(ValueError, match="boom"):
        pool.submit(T.raise_value, "boom").result(WAIT)
    err = pool.submit(T.raise_custom, 7).exception(WAIT)
    assert isinstance(err, T.CustomError) and err.code == 7
    if pool.backend == "process":  # the worker's traceback rides along as the cause
        assert "raise_custom" in str(err.__cause__)
    assert pool.submit(T.square, 2).result(WAIT) == 4  # still usable


@pytest.mark.parametrize("chunksize", [1, 3, 100])
def test_map_in_order_with_chunks(make_pool: Callable[..., Pool], chunksize: int) -> None:
    pool = make_pool()
    assert list(pool.map(T.square, range(50), chunksize=chunksize, timeout=WAIT)) == [
        i * i for i in range(50)
    ]
    assert list(pool.map(T.add, [1, 2], [10, 20], chunksize=chunksize)) == [11, 22]
    assert list(pool.map(T.square, [], chunksize=chunksize)) == []


def test_map_raises_the_first_error_in_order(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool()
    it = pool.map(T.ident, [1, 2], timeout=WAIT)
    assert list(it) == [1, 2]
    with pytest.raises(ValueError, match="x"):
        list(pool.map(T.raise_value, ["x", "y"], chunksize=2))


def test_map_timeout(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool()
    gate = Event()
    try:
        it = pool.map(T.block, [gate], timeout=0.2)
        with pytest.raises(TimeoutError):
            next(it)
    finally:
        gate.set()
        gate.close()


@pytest.mark.parametrize("chunksize", [1, 3])
@pytest.mark.parametrize("via", ["map", "options().map"])
def test_map_timeout_counts_from_the_call_and_cancels_every_task_left(
    make_pool: Callable[..., Pool], counter: shc.SharedArray, via: str, chunksize: int
) -> None:
    # As Executor.map: the deadline is map()'s call + timeout, and a timeout cancels
    # every task not yet run, the one that timed out included. options().map started
    # the deadline at the first next(), and let the task that timed out run anyway.
    pool = make_pool(1)
    mapper = pool if via == "map" else pool.options(retries=0)
    gate = Event()
    try:
        busy = pool.submit(T.count_and_wait, counter, gate)
        wait_count(counter, 1)  # the only worker is busy: the map's tasks stay queued
        it = mapper.map(T.count, [counter] * 4, [1] * 4, timeout=0.3, chunksize=chunksize)
        time.sleep(0.35)  # the deadline passes before the first next()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            next(it)
        assert time.monotonic() - t0 < 0.25  # not a fresh 0.3 s from next()
        gate.set()
        assert busy.result(WAIT) == 1
        pool.shutdown(wait=True)
        assert int(counter.array[1]) == 0  # no task of the map ran
    finally:
        gate.set()
        gate.close()


def test_stdlib_helpers_work_with_our_futures(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool()
    futures = [pool.submit(T.square, i) for i in range(20)]
    done, not_done = cf.wait(futures, timeout=WAIT)
    assert len(done) == 20 and not not_done
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=WAIT)) == sorted(
        i * i for i in range(20)
    )
    seen: list[int] = []
    fut = pool.submit(T.square, 5)
    fut.add_done_callback(lambda f: seen.append(f.result()))
    fut.result(WAIT)
    deadline = time.monotonic() + WAIT
    while not seen and time.monotonic() < deadline:  # callbacks run right after resolve
        time.sleep(0.001)
    assert seen == [25]


def test_callback_may_submit_more_work(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool()
    chained: list[cf.Future[int]] = []
    fut = pool.submit(T.square, 3)
    fut.add_done_callback(lambda f: chained.append(pool.submit(T.square, f.result())))
    fut.result(WAIT)
    deadline = time.monotonic() + WAIT
    while not chained and time.monotonic() < deadline:
        time.sleep(0.001)
    assert chained[0].result(WAIT) == 81


def test_asyncio_run_and_run_in_executor(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool()

    async def main() -> tuple[int, int, list[int]]:
        loop = asyncio.get_running_loop()
        a = await asyncio.wait_for(pool.run(T.square, 6), WAIT)
        b = await asyncio.wait_for(loop.run_in_executor(pool, T.add, 1, 2), WAIT)
        many = await asyncio.wait_for(
            asyncio.gather(*(pool.run(T.square, i) for i in range(10))), WAIT
        )
        return a, b, many

    assert asyncio.run(main()) == (36, 3, [i * i for i in range(10)])


# --- shutdown -----------------------------------------------------------------------------
def test_submit_after_shutdown_raises(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool()
    pool.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(T.square, 1)
    pool.shutdown()  # idempotent
    assert pool.stats.state == "closed"


def test_shutdown_drains_running_and_queued(
    make_pool: Callable[..., Pool], counter: shc.SharedArray
) -> None:
    pool = make_pool(2)
    gate = Event()
    try:
        futures = [pool.submit(T.count_and_wait, counter, gate) for _ in range(6)]
        wait_count(counter, 2)  # both workers busy, four queued
        assert pool.stats.queued == 4
        threading.Timer(0.05, gate.set).start()  # opens while shutdown waits
        pool.shutdown(wait=True)
        assert all(f.done() for f in futures)
        assert sorted(f.result() for f in futures) == [1, 2, 3, 4, 5, 6]
    finally:
        gate.set()
        gate.close()


def test_shutdown_cancel_futures(make_pool: Callable[..., Pool], counter: shc.SharedArray) -> None:
    pool = make_pool(1)
    gate = Event()
    try:
        running = pool.submit(T.count_and_wait, counter, gate)
        wait_count(counter, 1)
        queued = [pool.submit(T.count, counter, 1) for _ in range(5)]
        pool.shutdown(wait=False, cancel_futures=True)
        assert all(f.cancelled() for f in queued)
        gate.set()
        assert running.result(WAIT) == 1
        pool.shutdown(wait=True)
        assert int(counter.array[1]) == 0  # no cancelled task ran
    finally:
        gate.set()
        gate.close()


@pytest.mark.parametrize(
    ("backend", "where"),
    [("thread", "done-callback"), ("thread", "task"), ("process", "done-callback")],
)
def test_shutdown_with_wait_from_the_pools_own_thread_raises_instead_of_deadlocking(
    backend: str, where: str, counter: shc.SharedArray
) -> None:
    # shutdown(wait=True) on one of the pool's threads (a thread worker, or the thread
    # that runs done-callbacks: a thread worker, the process backend's collector) waited
    # for that very thread: the pool deadlocked. Like ThreadPoolExecutor, it raises
    # RuntimeError; the shutdown has begun all the same and the pool finishes its work.
    pool = Pool(1, backend=backend)
    raised: list[BaseException] = []
    called = threading.Event()

    def shut_down(*_: Any) -> None:
        try:
            pool.shutdown()  # wait=True
        except RuntimeError as e:
            raised.append(e)
        finally:
            called.set()

    gate = Event()
    try:
        if where == "task":
            first = pool.submit(lambda: gate.wait(WAIT) and shut_down())
        else:
            first = pool.submit(T.count_and_wait, counter, gate)
            first.add_done_callback(shut_down)
        second = pool.submit(T.square, 32)
        gate.set()
        # (a plain wait: a caller spinning in result() would collect the results and run
        # the callback itself, on this thread, rather than the pool's collector)
        assert called.wait(WAIT)
        assert second.result(10) == 1024
        first.result(10)
        assert len(raised) == 1 and "the pool's own threads" in str(raised[0])
        with pytest.raises(RuntimeError, match="after shutdown"):
            pool.submit(T.square, 1)
    finally:
        gate.set()
        pool.shutdown(wait=True, timeout=10)
        gate.close()
    assert pool.stats.state == "closed"


_EXIT_WITHOUT_SHUTDOWN = textwrap.dedent(
    """
    import os, sys
    from shmcompute.pool import Pool
    from tests import _pool_tasks as T
    pool = Pool(1, backend=sys.argv[1])
    for i in range(3):
        f = pool.submit(T.sleep_for, 0.1)
        f.add_done_callback(lambda f, i=i: os.write(1, f"done {i}\\n".encode()))
    # The script ends here without shutdown(), with the work still queued.
    """
)


def test_queued_work_runs_to_completion_at_interpreter_exit(backend: str) -> None:
    # Like ThreadPoolExecutor: work submitted and never waited for still runs when the
    # program ends. The thread backend's daemon threads were cut off at exit instead.
    proc = subprocess.run(
        [sys.executable, "-c", _EXIT_WITHOUT_SHUTDOWN, backend],
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == ["done 0", "done 1", "done 2"], proc.stderr


_FORK_WHILE_A_THREAD_HOLDS_THE_POOL_LIST = textwrap.dedent(
    """
    import os, sys, threading
    from shmcompute.pool import ThreadPool, thread
    from tests import _pool_tasks as T
    pool = ThreadPool(1)
    assert pool.submit(T.square, 3).result(30) == 9
    held, done = threading.Event(), threading.Event()
    def hold():
        with thread._live_lock:  # (as a pool being made or closed in another thread)
            held.set()
            done.wait(30)
    t = threading.Thread(target=hold)
    t.start()
    held.wait(30)
    pid = os.fork()
    if pid == 0:
        sys.exit(0)  # a normal exit: the exit hooks run, the pool drain's among them
    done.set()
    t.join(30)
    for _ in range(300):  # 30 s at most
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            break
        threading.Event().wait(0.1)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        sys.exit("the forked child hung at exit")
    pool.shutdown(wait=True, timeout=30)
    print("child exited", os.waitstatus_to_exitcode(status))
    """
)


def test_a_forked_child_exits_though_the_fork_came_while_a_thread_held_the_pool_list() -> None:
    # The exit hook that drains thread pools takes a lock; a child forked while another
    # thread held it would have it held for ever and hang at exit (ThreadPoolExecutor
    # re-makes its lock in the child for the same reason). The child also has none of
    # the parent's pool threads: its exit hook leaves those pools alone.
    proc = subprocess.run(
        [sys.executable, "-c", _FORK_WHILE_A_THREAD_HOLDS_THE_POOL_LIST],
        capture_output=True,
        text=True,
        timeout=2 * WAIT,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "child exited 0", proc.stdout + proc.stderr


def _join_all(threads: list[threading.Thread], timeout: float = 10.0) -> list[threading.Thread]:
    """Join (bounded); returns the threads still alive."""
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [t for t in threads if t.is_alive()]


def _threads_of(pool: ThreadPool) -> list[threading.Thread]:
    return [w.thread for w in pool._workers.values() if w.thread] + [pool._supervisor]


def test_a_dropped_thread_pool_is_collected_and_its_threads_exit(
    counter: shc.SharedArray,
) -> None:
    # Like ThreadPoolExecutor: a pool dropped without shutdown() must not leak its
    # threads. They held the pool (and so themselves) alive forever. The caller keeps
    # the futures, a done one, a failed one and a cancelled one: they do not keep the
    # pool either (they did, through future._pool).
    pool = ThreadPool(1)
    gate = Event()
    done = pool.submit(T.square, 3)
    assert done.result(WAIT) == 9
    failed = pool.submit(T.square, "x")
    assert isinstance(failed.exception(WAIT), TypeError)
    running = pool.submit(T.count_and_wait, counter, gate)
    cancelled = pool.submit(T.square, 4)  # queued behind it
    assert cancelled.cancel()
    gate.set()
    assert running.result(WAIT) == 1
    gate.close()
    released = threading.Event()
    pool._on_close(released.set)  # what a transform's team of threads registers
    threads = _threads_of(pool)
    ref = weakref.ref(pool)
    del pool
    gc.collect()
    assert ref() is None
    assert not _join_all(threads)
    assert released.is_set()
    assert done.result(0) == 9 and cancelled.cancelled()  # (kept, and still usable)


def test_a_dropped_thread_pool_finishes_its_work_first(counter: shc.SharedArray) -> None:
    # As with ThreadPoolExecutor, dropping the pool and the futures loses no work: the
    # pool lives while a worker runs a task, and its workers take the queued ones first.
    pool = ThreadPool(1)
    gate = Event()
    try:
        pool.submit(T.count_and_wait, counter, gate)
        pool.submit(T.count, counter, 1)  # queued
        threads = _threads_of(pool)
        ref = weakref.ref(pool)
        del pool
        wait_count(counter, 1)  # running: it holds the pool
        gate.set()
        assert not _join_all(threads)
        assert ref() is None
        assert int(counter.array[1]) == 1  # the queued task ran
    finally:
        gate.set()
        gate.close()


def test_shutdown_without_wait_finishes_in_background(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool()
    futures = [pool.submit(T.square, i) for i in range(50)]
    pool.shutdown(wait=False)
    assert [f.result(WAIT) for f in futures] == [i * i for i in range(50)]
    pool.shutdown(wait=True)


def test_cancel_a_queued_task(make_pool: Callable[..., Pool], counter: shc.SharedArray) -> None:
    pool = make_pool(1)
    gate = Event()
    try:
        first = pool.submit(T.count_and_wait, counter, gate)
        wait_count(counter, 1)
        queued = pool.submit(T.count, counter, 1)
        assert queued.cancel() and queued.cancelled()
        gate.set()
        assert first.result(WAIT) == 1
        assert pool.submit(T.square, 4).result(WAIT) == 16
        assert int(counter.array[1]) == 0
    finally:
        gate.set()
        gate.close()


# --- per-task options -------------------------------------------------------------------
def test_task_timeout_fails_the_task_and_pool_stays_usable(
    make_pool: Callable[..., Pool], counter: shc.SharedArray
) -> None:
    pool = make_pool(2)
    gate = Event()
    try:
        fut = pool.options(timeout=0.3).submit(T.count_and_wait, counter, gate)
        with pytest.raises(TaskTimeoutError, match=r"timeout of 0\.3 s") as info:
            fut.result(WAIT)
        assert isinstance(info.value, TimeoutError)
        gate.set()
        assert [pool.submit(T.square, i).result(WAIT) for i in range(4)] == [0, 1, 4, 9]
        assert pool.options(timeout=WAIT).submit(T.square, 5).result(WAIT) == 25
        assert pool.stats.failed == 1
    finally:
        gate.set()
        gate.close()


def test_the_pools_task_timeout_applies_to_every_task(
    make_pool: Callable[..., Pool], counter: shc.SharedArray
) -> None:
    # Pool(task_timeout=...) is the timeout of every task that sets none of its own:
    # plain submits, and options() that set other options only.
    pool = make_pool(2, task_timeout=0.3)
    gate = Event()
    try:
        plain = pool.submit(T.count_and_wait, counter, gate)
        other_options = pool.options(retries=0).submit(T.count_and_wait, counter, gate)
        for fut in (plain, other_options):
            with pytest.raises(TaskTimeoutError, match=r"timeout of 0\.3 s"):
                fut.result(WAIT)
        gate.set()
        assert [pool.submit(T.square, i).result(WAIT) for i in range(4)] == [0, 1, 4, 9]
        assert pool.stats.failed == 2 and pool.stats.completed == 4
    finally:
        gate.set()
        gate.close()


def test_hung_tasks_past_their_timeout_never_break_the_pool(
    make_pool: Callable[..., Pool],
) -> None:
    # A thread cannot be killed: a timed-out task's thread is abandoned and keeps its
    # worker slot until its call returns. Once hung calls held every slot (2 x workers
    # + 2), the next timeout killed the thread pool's supervisor: later tasks never
    # timed out (one even succeeded), or never ran, and shutdown() left it draining.
    pool = make_pool(1)
    gate = Event()
    try:
        hung = [pool.options(timeout=0.2).submit(T.block, gate, WAIT) for _ in range(6)]
        for f in hung:
            assert isinstance(f.exception(10), TaskTimeoutError)
        assert pool.submit(T.square, 3).result(WAIT) == 9
        s = pool.stats
        assert (s.total, s.failed, s.completed) == (1, 6, 1)
    finally:
        gate.set()  # the abandoned threads return (thread backend)
        pool.shutdown(wait=True, timeout=WAIT)
        gate.close()
    assert pool.stats.state == "closed"


def test_thread_timeout_is_not_missed_while_the_supervisor_checks_the_backlog(
    counter: shc.SharedArray,
) -> None:
    # The thread pool's supervisor drops its lock while it checks the queue backlog. A
    # task that starts then must still get its timeout: the notify it sends is not
    # lost (it used to be, and the timeout then fired only at the next scan, up to a
    # minute later).
    gate = Event()
    entered, proceed = threading.Event(), threading.Event()
    armed = [False]
    with ThreadPool(2) as pool:
        check = pool._check_backlog

        def slow_check(now: int) -> Any:
            if armed[0]:
                armed[0] = False
                entered.set()
                proceed.wait(WAIT)
            return check(now)

        pool._check_backlog = slow_check  # type: ignore[method-assign]
        try:
            armed[0] = True
            first = pool.options(timeout=WAIT).submit(T.block, gate, WAIT)
            assert entered.wait(WAIT)  # the supervisor is checking, without the lock
            second = pool.options(timeout=0.3).submit(T.count_and_wait, counter, gate)
            proceed.set()
            with pytest.raises(TaskTimeoutError, match=r"timeout of 0\.3 s"):
                second.result(timeout=10)  # not a concurrent TimeoutError after 10 s
        finally:
            proceed.set()
            gate.set()
        assert first.result(WAIT) is True
    gate.close()


def test_spread_tasks_are_never_packed_onto_one_worker() -> None:
    # After a run of tiny tasks the process pool packs new ones onto a worker that is
    # already awake. A transform's driver tasks must run side by side instead: they ask
    # for it (_submit_spread). Two tasks that must meet at a barrier prove it.
    from shmcompute.sync import Barrier

    def as_after_tiny_tasks() -> None:
        with pool._lock:
            pool._run_ewma = 1e-6
            pool._update_capacity()

    with ProcessPool(2) as pool:
        as_after_tiny_tasks()
        packed = [pool.submit(T.pid) for _ in range(2)]
        assert len({f.result(WAIT) for f in packed}) == 1  # the control: packed
        as_after_tiny_tasks()
        barrier = Barrier(2)
        try:
            spread = [pool._submit_spread(T.pid_after_barrier, barrier, 10.0) for _ in range(2)]
            assert len({f.result(WAIT) for f in spread}) == 2  # two workers, concurrently
        finally:
            barrier.close()


def test_dispatch_never_overfills_a_worker_ring() -> None:
    # A worker whose results are published but not yet collected is free for more
    # tasks, but each uncollected result still holds a slot of its result ring: a
    # burst must never leave more than RING_SLOTS tasks outstanding on one worker (it
    # once did, results were overwritten, and the pool wedged). Here nothing collects
    # while the burst is submitted.
    from shmcompute import _layout as L
    from shmcompute import atomics as at
    from shmcompute.pool._ring import Rings

    with ProcessPool(1) as pool:
        assert pool.submit(T.square, 2).result(WAIT) == 4
        (proc,) = pool._procs.values()
        tail_i = Rings.rec(proc.slot) + L.W_RES_TAIL
        collect = pool._collect_all
        futures = []
        with pool._collecting():  # workers leave the collector thread asleep
            pool._collect_all = lambda: False  # type: ignore[method-assign]
            try:
                for i in range(3 * L.RING_SLOTS):
                    futures.append(pool.submit(T.square, i))
                    assert len(proc.inflight) <= L.RING_SLOTS
                    # Let the worker publish all it has (bounded): its results then
                    # count as done, and the next submit may dispatch again.
                    deadline = time.monotonic() + WAIT
                    while (
                        at.load(pool._words, tail_i) - proc.res_head < len(proc.inflight)
                        and time.monotonic() < deadline
                    ):
                        time.sleep(0.0005)
                assert len(proc.inflight) == L.RING_SLOTS  # the rest wait in the queue
            finally:
                pool._collect_all = collect  # type: ignore[method-assign]
        assert [f.result(WAIT) for f in futures] == [i * i for i in range(3 * L.RING_SLOTS)]


class _SlowToPickle:
    """An argument whose pickling waits for the test: a slow or large argument."""

    def __init__(self, entered: threading.Event, release: threading.Event) -> None:
        self.entered, self.release = entered, release

    def __reduce__(self) -> tuple[Any, ...]:
        self.entered.set()
        self.release.wait(WAIT)
        return (int, (0,))


def test_a_slow_pickle_does_not_hold_back_other_threads_results() -> None:
    # Workers skip waking the collector thread while a caller is about to collect
    # results itself (_collecting: a burst of submits, a spin in result()). A submit
    # used to enter that state before it pickled its call, so one thread pickling a
    # slow or large argument held every other thread's results until the collector's
    # next periodic look, up to 1 s later.
    from shmcompute import _layout as L
    from shmcompute import atomics as at

    entered, release = threading.Event(), threading.Event()
    with ProcessPool(2, spin=0) as pool:  # no spin: results come through the collector
        for f in [pool.submit(T.square, i) for i in range(4)]:
            f.result(WAIT)  # both workers up
        slow: list[cf.Future[Any]] = []
        a = threading.Thread(
            target=lambda: slow.append(pool.submit(T.ident, _SlowToPickle(entered, release)))
        )
        a.start()
        try:
            assert entered.wait(WAIT)  # thread A is pickling
            assert at.load(pool._words, L.PC_SPINNERS) == 0
            assert pool.submit(T.square, 3).result(0.5) == 9
        finally:
            release.set()
            a.join(WAIT)
        assert slow[0].result(WAIT) == 0


@pytest.mark.parametrize("chunksize", [1, 4])
def test_options_map(make_pool: Callable[..., Pool], chunksize: int) -> None:
    pool = make_pool()
    opts = pool.options(timeout=WAIT, retries=1)
    assert list(opts.map(T.add, range(10), range(10), chunksize=chunksize)) == [
        2 * i for i in range(10)
    ]
    with pytest.raises(ValueError, match="bad"):
        list(opts.map(T.raise_value, ["bad"], chunksize=chunksize))
    with pytest.raises(ArgumentError, match="chunksize must be >= 1"):
        opts.map(T.square, [1], chunksize=0)


def test_options_validate(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(1)
    with pytest.raises(ArgumentError, match="timeout must be > 0"):
        pool.options(timeout=0)
    with pytest.raises(ArgumentTypeError, match="retries must be an int"):
        pool.options(retries=1.5)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="retries must be >= 0"):
        pool.options(retries=-1)
    with pytest.raises(ArgumentTypeError, match="fn must be callable"):
        pool.submit(42)  # type: ignore[arg-type]


# --- stats, health, monitoring -----------------------------------------------------------
def test_stats_count_idle_busy_queued(
    make_pool: Callable[..., Pool], counter: shc.SharedArray
) -> None:
    pool = make_pool(2)
    s = pool.stats
    assert isinstance(s, PoolStats) and s.total == 2 and s.queued == 0 and s.busy == 0
    gate = Event()
    try:
        futures = [pool.submit(T.count_and_wait, counter, gate) for _ in range(5)]
        wait_count(counter, 2)
        s = pool.stats
        assert (s.total, s.busy, s.idle, s.queued) == (2, 2, 0, 3)
        assert all(w.task_age is not None and w.task_age >= 0 for w in s.workers)
        gate.set()
        for f in futures:
            f.result(WAIT)
        pool.submit(T.raise_value, "x").exception(WAIT)
        s = pool.stats
        assert s.completed == 5 and s.failed == 1 and s.queued == 0
        assert 0 <= s.wait_p50 <= s.wait_p99 and 0 <= s.run_p50 <= s.run_p99
        assert sum(w.tasks_done for w in s.workers) == 6
        assert sum(w.errors for w in s.workers) == 1
    finally:
        gate.set()
        gate.close()


def test_typical_start_time_ignores_tasks_queued_behind_busy_workers(
    make_pool: Callable[..., Pool], counter: shc.SharedArray
) -> None:
    # Transforms size their helper count by the pool's typical submit-to-start time; a
    # few tasks that waited behind busy workers must not pass for the usual cost (a mean
    # of these waits was ~10 ms, and big jobs then got one or two workers of sixteen).
    pool = make_pool(2)
    for f in [pool.submit(T.square, i) for i in range(10)]:
        f.result(WAIT)
    for round_ in range(5):
        gate = Event()
        try:
            blockers = [pool.submit(T.count_and_wait, counter, gate) for _ in range(2)]
            wait_count(counter, 2 * (round_ + 1))  # both workers busy
            queued = pool.submit(T.square, 3)
            time.sleep(0.05)
        finally:
            gate.set()
        assert queued.result(WAIT) == 9
        for f in blockers:
            f.result(WAIT)
        gate.close()
    lat = pool._latencies
    assert sum(w >= 0.04 for w in lat.wait) >= 5  # the queued tasks were measured
    assert lat.start < 0.005, f"typical start {lat.start * 1e3:.1f} ms"


def test_typical_start_time_is_a_running_median() -> None:
    rng = np.random.default_rng(1)
    lat = _Latencies()
    for _ in range(600):  # one sample in five is a 30 ms outlier
        lat.add(0.030 if rng.random() < 0.2 else 50e-6 * rng.uniform(0.9, 1.1), 1e-3)
    assert 40e-6 < lat.start < 80e-6
    assert np.mean(lat.wait) > 0.005  # what a mean would have said
    for _ in range(100):  # and it follows a real change, up as well as down
        lat.add(2e-3, 1e-3)
    assert 1.6e-3 < lat.start < 2.5e-3


def test_queue_backlog_is_reported(
    make_pool: Callable[..., Pool], counter: shc.SharedArray, caplog: pytest.LogCaptureFixture
) -> None:
    reports: list[PoolStats] = []
    reported = threading.Event()

    def on_backlog(stats: PoolStats) -> None:
        reports.append(stats)
        reported.set()

    pool = make_pool(1, queue_warn_after=0.1, on_queue_backlog=on_backlog)
    quiet = make_pool(1, queue_warn_after=0.1)  # default: a logging warning
    gate = Event()
    try:
        for p in (pool, quiet):
            p.submit(T.count_and_wait, counter, gate)
            p.submit(T.square, 1)
        wait_count(counter, 2)
        with caplog.at_level(logging.WARNING, logger="shmcompute.pool"):
            assert reported.wait(WAIT)
            deadline = time.monotonic() + WAIT
            while "undersized" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.01)
        assert reports[0].queued >= 1 and reports[0].total == 1
        assert "undersized" in caplog.text
    finally:
        gate.set()
        gate.close()


def test_backlog_is_measured_from_the_oldest_task_not_cancelled(
    make_pool: Callable[..., Pool], counter: shc.SharedArray
) -> None:
    # A queue holding only cancelled tasks was reported as a backlog (with queued=0),
    # and a task queued behind a cancelled one was judged by the cancelled one's age.
    # The checks run here, at chosen times; the pool's own come too late to interfere.
    limit = 5.0
    reports: list[PoolStats] = []
    pool = make_pool(1, queue_warn_after=limit, on_queue_backlog=reports.append)

    def submitted_ns(f: cf.Future[Any]) -> int:
        task = f._task  # type: ignore[attr-defined]
        assert task is not None
        return int(task.submitted_ns)

    gate = Event()
    try:
        busy = pool.submit(T.count_and_wait, counter, gate)
        wait_count(counter, 1)
        cancelled = pool.submit(T.count, counter, 1)
        at_ns = submitted_ns(cancelled)  # (a cancelled future lets go of its task)
        assert cancelled.cancel()
        assert pool._check_backlog(at_ns + int(2 * limit * 1e9)) is None
        assert reports == [] and pool.stats.queued == 0

        stale = pool.submit(T.count, counter, 1)
        stale._task.submitted_ns -= int(2 * limit * 1e9)  # type: ignore[attr-defined]
        assert stale.cancel()
        fresh = pool.submit(T.square, 3)
        due = pool._check_backlog(submitted_ns(fresh) + int(limit / 2 * 1e9))
        assert due == pytest.approx(limit / 2) and reports == []
        pool._check_backlog(submitted_ns(fresh) + int(2 * limit * 1e9))
        assert [s.queued for s in reports] == [1]

        gate.set()
        assert busy.result(WAIT) == 1 and fresh.result(WAIT) == 9
        assert int(counter.array[1]) == 0  # no cancelled task ran
    finally:
        gate.set()
        gate.close()


def test_health_per_worker(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(2)
    for f in [pool.submit(T.square, i) for i in range(10)]:
        f.result(WAIT)
    workers = pool.stats.workers
    assert len(workers) == 2 and {w.state for w in workers} <= {"idle", "busy", "starting"}
    assert sum(w.tasks_done for w in workers) == 10
    if pool.backend == "process":
        assert all(w.pid and w.pid != os.getpid() for w in workers)
        assert all(w.rss and w.rss > 1 << 20 for w in workers)
        assert all(w.heartbeat_age is not None and w.heartbeat_age < 5 for w in workers)
    else:
        assert all(w.pid is None and w.rss is None for w in workers)


# --- restart, initializer --------------------------------------------------------------------
def _workers_now(pool: Pool) -> set[Any]:
    """Who the pool's workers are now: their pids (processes) or their threads."""
    if isinstance(pool, ThreadPool):
        return {w.thread for w in pool._workers.values()}
    return {w.pid for w in pool.stats.workers}


class _Restarting:
    """``pool.restart()`` running in another thread, so the test can act while it waits
    for the new worker; ``done()`` joins it (bounded) and re-raises what it raised."""

    def __init__(self, pool: Pool) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(pool,))
        self.thread.start()

    def _run(self, pool: Pool) -> None:
        try:
            pool.restart(timeout=WAIT)
        except BaseException as e:
            self.error = e

    def done(self) -> None:
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "restart() did not return"
        if self.error is not None:
            raise self.error


def test_rolling_restart_under_a_stream_loses_nothing(
    make_pool: Callable[..., Pool], counter: shc.SharedArray
) -> None:
    # The first restart's new worker waits in its initializer until the stream has
    # submitted 20 tasks since that worker started: the restart cannot be over before
    # the stream got going, so tasks are submitted while it runs.
    gate = Event()
    pool = make_pool(2, initializer=T.init_hold_after, initargs=(counter, 2, gate))
    wait_count(counter, 2)  # both first workers passed their initializer
    assert pool.submit(T.square, 2).result(WAIT) == 4
    before = _workers_now(pool)
    stop = threading.Event()
    futures: list[cf.Future[int]] = []

    def stream() -> None:
        i = held = 0
        while not stop.is_set() and i < 100_000:
            futures.append(pool.submit(T.square, i))
            i += 1
            if not gate.is_set() and shc.atomics.load(counter.array, 0) > 2:
                held += 1  # submitted while a new worker is held back
                if held == 20:
                    gate.set()
            if i % 50 == 0:
                # Keep the queue short: wait for any recent task, not the last one (on
                # processes it may sit in the ring of the worker held back).
                done, _ = cf.wait(futures[-50:], WAIT, cf.FIRST_COMPLETED)
                if not done:
                    return

    t = threading.Thread(target=stream)
    t.start()
    try:
        submitted = len(futures)
        pool.restart(timeout=WAIT)
        during = len(futures) - submitted
        pool.restart(timeout=WAIT)
    finally:
        stop.set()
        gate.set()
        t.join(WAIT)
        gate.close()
    assert during >= 20, f"{during} tasks submitted during the restart"
    results = [f.result(WAIT) for f in futures]
    assert results == [i * i for i in range(len(futures))]
    assert pool.stats.failed == 0 and pool.stats.total == 2
    after = _workers_now(pool)
    assert len(after) == 2 and not after & before  # every worker was replaced
    if pool.backend == "thread":
        assert not _join_all(list(before))  # and the old threads exited
    assert pool.stats.restarts == 4


def test_tasks_submitted_during_a_restart_wait_for_the_old_workers_until_the_new_one_is_ready(
    make_pool: Callable[..., Pool], counter: shc.SharedArray
) -> None:
    # A restart's new worker takes tasks only once it is ready: until then the workers
    # it replaces run them. (On processes a task went to the new worker as soon as it
    # was started, and waited there for its initializer while the old worker sat idle.)
    go, held = Event(), Event()
    with shc.zeros(1, np.int64) as started:
        try:
            pool = make_pool(1, initializer=T.init_hold_after, initargs=(started, 1, held))
            old = pool.submit(T.worker_id).result(WAIT)
            # Tasks of this length go one at a time to a worker (none queue behind a
            # busy one), so the one below is placed only by who is free to take it.
            assert pool.submit(T.sleep_for, 0.05).result(WAIT) == 0.05
            busy = pool.submit(T.count_and_wait, counter, go)
            wait_count(counter, 1)
            restarting = _Restarting(pool)
            wait_count(started, 2)  # the new worker is in its initializer, held there
            during = pool.submit(T.worker_id)
            go.set()
            assert busy.result(WAIT) == 1
            done, _ = cf.wait([during], 10.0)
            assert during in done, "the task waited for the new worker's initializer"
            assert during.result() == old
            held.set()
            restarting.done()
            new = pool.submit(T.worker_id).result(WAIT)
            assert new != old and pool.stats.total == 1
        finally:
            go.set()
            held.set()
            go.close()
            held.close()


def test_stats_count_every_restart(make_pool: Callable[..., Pool]) -> None:
    # Restarts rotate workers through the slots: summing the current workers' per-slot
    # counts said 1 after two rolling restarts of a one-worker pool (and 0 once closed).
    pool = make_pool(1)
    assert pool.submit(T.square, 2).result(WAIT) == 4
    assert pool.stats.restarts == 0
    pool.restart(timeout=WAIT)
    pool.restart(timeout=WAIT)
    assert pool.stats.restarts == 2
    pool.shutdown(wait=True)
    assert pool.stats.restarts == 2  # stopping the workers replaces none


def test_restart_after_shutdown_raises(
    make_pool: Callable[..., Pool], counter: shc.SharedArray
) -> None:
    # While the pool drains and once it is closed: restart() refuses, and touches none
    # of the workers (the running task finishes on its own worker).
    pool = make_pool(1)
    gate = Event()
    try:
        running = pool.submit(T.count_and_wait, counter, gate)
        wait_count(counter, 1)
        pool.shutdown(wait=False)
        with pytest.raises(RuntimeError, match="cannot restart a pool after shutdown"):
            pool.restart(timeout=WAIT)
        gate.set()
        assert running.result(WAIT) == 1
        pool.shutdown(wait=True)
        with pytest.raises(RuntimeError, match="cannot restart a pool after shutdown"):
            pool.restart(timeout=WAIT)
        assert pool.stats.state == "closed" and pool.stats.restarts == 0
    finally:
        gate.set()
        gate.close()


def test_thread_restart_that_runs_out_of_time_on_a_busy_worker(counter: shc.SharedArray) -> None:
    # As on the process backend: restart() raises TimeoutError when an old worker is
    # still busy at its end. The new worker is in place already; the old one takes no
    # new task, finishes its own and exits, and the next restart() completes.
    gate = Event()
    try:
        with ThreadPool(1) as pool:
            (old,) = pool._workers.values()
            busy = pool.submit(T.count_and_wait, counter, gate)
            wait_count(counter, 1)
            with pytest.raises(TimeoutError, match="did not finish its task in time"):
                pool.restart(timeout=0.5)  # the new worker is ready; the old one is busy
            assert pool.submit(T.square, 3).result(WAIT) == 9  # on the new worker
            gate.set()
            assert busy.result(WAIT) == 1
            assert old.thread is not None and not _join_all([old.thread])
            assert pool.stats.total == 1
            pool.restart(timeout=WAIT)
            assert [pool.submit(T.square, i).result(WAIT) for i in range(4)] == [0, 1, 4, 9]
            assert pool.stats.total == 1 and pool.stats.restarts == 2
    finally:
        gate.set()
        gate.close()


@pytest.fixture
def held(counter: shc.SharedArray) -> Iterator[tuple[ThreadPool, Any, Event]]:
    """A 1-worker thread pool whose later workers (a restart's) wait in their
    initializer until the gate opens; its first worker; the gate (opened at the end)."""
    gate = Event()
    try:
        with ThreadPool(1, initializer=T.init_hold_after, initargs=(counter, 1, gate)) as pool:
            assert pool.submit(T.square, 2).result(WAIT) == 4
            (old,) = pool._workers.values()
            yield pool, old, gate
    finally:
        gate.set()
        gate.close()


def test_thread_restart_whose_new_worker_is_not_ready_in_time_leaves_no_extra_worker(
    counter: shc.SharedArray, held: tuple[ThreadPool, Any, Event]
) -> None:
    # As on the process backend: the new worker of a restart() that timed out before it
    # was ready must not stay on beside the old one, which keeps running.
    pool, old, gate = held
    with pytest.raises(TimeoutError, match="did not become ready"):
        pool.restart(timeout=0.2)
    wait_count(counter, 2)  # the new worker is in its initializer
    (new,) = [w for w in pool._workers.values() if w is not old]
    gate.set()
    assert new.thread is not None and not _join_all([new.thread])
    assert _workers_now(pool) == {old.thread} and pool.stats.total == 1
    assert pool.submit(T.square, 3).result(WAIT) == 9
    pool.restart(timeout=WAIT)
    assert old.thread is not None and not _join_all([old.thread])
    assert [pool.submit(T.square, i).result(WAIT) for i in range(4)] == [0, 1, 4, 9]
    assert pool.stats.total == 1


def test_thread_restart_that_times_out_as_its_new_worker_parks_leaves_no_lingering_worker(
    held: tuple[ThreadPool, Any, Event],
) -> None:
    # The other order of the race above: the new worker becomes ready and parks, idle,
    # just as restart()'s wait for it times out. It was told to leave but not woken, so
    # it stayed parked until its park timed out (60 s).
    pool, old, gate = held
    start = pool._start_worker_locked

    class ReadyAsItTimesOut:
        """restart()'s wait: the worker gets ready and parks, then it times out."""

        def __init__(self, wk: Any) -> None:
            self.wk, self.event = wk, threading.Event()

        def set(self) -> None:
            self.event.set()

        def is_set(self) -> bool:
            return self.event.is_set()

        def wait(self, timeout: float | None = None) -> bool:
            gate.set()
            deadline = time.monotonic() + WAIT
            while not (self.event.is_set() and self.wk.idle):
                assert time.monotonic() < deadline, "the new worker never parked"
                time.sleep(0.001)
            time.sleep(0.05)  # (it is in its park now, past the lock)
            return False

    def start_late_ready(spare: bool = False) -> Any:
        wk = start(spare)
        wk.ready = ReadyAsItTimesOut(wk)
        return wk

    pool._start_worker_locked = start_late_ready  # type: ignore[method-assign]
    with pytest.raises(TimeoutError, match="did not become ready"):
        pool.restart(timeout=WAIT)
    (new,) = [w for w in pool._workers.values() if w is not old]
    assert new.thread is not None and not _join_all([new.thread], timeout=10.0)
    assert _workers_now(pool) == {old.thread} and pool.stats.total == 1
    assert pool.submit(T.square, 3).result(WAIT) == 9


def test_thread_restart_whose_old_worker_is_abandoned_meanwhile_leaves_no_extra_worker(
    counter: shc.SharedArray,
) -> None:
    # As on processes (a worker that dies during its restart): the old worker's task ran
    # past its timeout while the new worker started, so the pool abandoned and replaced
    # the old one; restart()'s new worker then made one worker too many, for good.
    gate, go = Event(), Event()
    with shc.zeros(1, np.int64) as running:
        try:
            hold = {"initializer": T.init_hold_after, "initargs": (counter, 1, gate)}
            with ThreadPool(1, task_timeout=0.5, **hold) as pool:
                assert pool.submit(T.square, 2).result(WAIT) == 4
                busy = pool.submit(T.count_and_wait, running, go)
                wait_count(running, 1)
                restarting = _Restarting(pool)
                wait_count(counter, 2)  # restart()'s new worker is held in its initializer
                assert isinstance(busy.exception(WAIT), shc.TaskTimeoutError)
                wait_count(counter, 3)  # and so is the replacement of the abandoned one
                gate.set()
                restarting.done()
                go.set()
                deadline = time.monotonic() + WAIT
                while len([w for w in pool._workers.values() if not w.exited]) > 1:
                    assert time.monotonic() < deadline, "a 1-worker pool kept 2 workers"
                    time.sleep(0.01)
                assert pool.stats.total == 1
                assert [pool.submit(T.square, i).result(WAIT) for i in range(4)] == [0, 1, 4, 9]
        finally:
            gate.set()
            go.set()
            gate.close()
            go.close()


def test_thread_restart_of_a_worker_whose_task_then_times_out_leaves_no_extra_worker(
    counter: shc.SharedArray,
) -> None:
    # restart() has the new worker in place and waits for the old one's task; that task
    # then ran past the pool's task_timeout, and abandoning the old worker started a
    # replacement for it too: a 1-worker pool ran 2 workers for good.
    gate = Event()
    try:
        with ThreadPool(1, task_timeout=0.5) as pool:
            busy = pool.submit(T.count_and_wait, counter, gate, 1.5)  # gate stays shut
            wait_count(counter, 1)
            pool.restart(timeout=WAIT)  # (returns once the old thread's call ended)
            assert isinstance(busy.exception(WAIT), shc.TaskTimeoutError)
            assert pool.stats.total == 1
            assert len([w for w in pool._workers.values() if not w.exited]) == 1
            assert [pool.submit(T.square, i).result(WAIT) for i in range(4)] == [0, 1, 4, 9]
    finally:
        gate.set()
        gate.close()


def test_a_restart_whose_new_worker_fails_to_initialize_keeps_the_old_workers(
    make_pool: Callable[..., Pool], counter: shc.SharedArray
) -> None:
    # restart() retires a worker only once its replacement is ready. When the new
    # worker's initializer fails, restart() raises InitializerError with the failure
    # attached, and the pool keeps its old workers as they were: none added, none lost.
    pool = make_pool(1, initializer=T.init_fail_nth, initargs=(counter, 2))
    assert pool.submit(T.square, 2).result(WAIT) == 4
    before = _workers_now(pool)
    if isinstance(pool, ProcessPool):
        # The orders in which it went wrong. The failed worker was replaced, and so
        # stayed on as a second worker, when the supervisor reaped it before restart()
        # had seen it fail (forced here); and the failure came without its cause when
        # restart() saw it before the collector had read the worker's report of it (as
        # it does here: while a caller is "collecting", workers leave that thread asleep).
        wait_ready = pool._wait_ready

        def reaped_first(p: Any, end: float | None) -> None:
            try:
                wait_ready(p, end)
            except BaseException:
                deadline = time.monotonic() + WAIT
                while not p.reaped and time.monotonic() < deadline:
                    time.sleep(0.01)
                raise

        pool._wait_ready = reaped_first  # type: ignore[method-assign]
    with pool._collecting(), pytest.raises(shc.InitializerError, match="restart") as info:
        pool.restart(timeout=WAIT)
    assert "initializer failed in worker 2 on purpose" in str(info.value.__cause__)
    deadline = time.monotonic() + WAIT
    while pool.stats.restarts < 1:  # the failed worker is gone (and counted)
        assert time.monotonic() < deadline, "the failed worker was never reaped"
        time.sleep(0.01)
    assert [pool.submit(T.square, i).result(WAIT) for i in range(4)] == [0, 1, 4, 9]
    assert _workers_now(pool) == before
    pool.restart(timeout=WAIT)  # the next new worker starts well
    assert int(counter.array[0]) == 3  # no worker was started but the restarts' two
    after = _workers_now(pool)
    assert len(after) == 1 and not after & before
    assert pool.submit(T.square, 3).result(WAIT) == 9 and pool.stats.total == 1


def test_initializer_runs_in_every_worker(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(2, initializer=T.init_set, initargs=("ready",))
    assert {pool.submit(T.get_init_value).result(WAIT) for _ in range(10)} == {"ready"}


def test_initializer_that_always_fails(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(1, initializer=T.init_fail)
    err = pool.submit(T.square, 2).exception(WAIT)
    assert isinstance(err, shc.InitializerError)
    assert isinstance(err, cf.BrokenExecutor)
    assert "initializer failed on purpose" in repr(err.__cause__) + str(err.__cause__)
    # No hang and no busy loop afterwards; shutdown is clean (fixture).


def test_flaky_initializer_pool_recovers(
    make_pool: Callable[..., Pool], counter: shc.SharedArray
) -> None:
    pool = make_pool(1, initializer=T.init_fail_first, initargs=(counter, 2))
    assert pool.submit(T.square, 3).result(WAIT) == 9
    assert int(counter.array[0]) == 3  # two failed starts, then one good worker


# --- argument checking, sizing --------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_workers": 0}, ArgumentError, "max_workers must be >= 1, got 0"),
        ({"max_workers": "2"}, ArgumentTypeError, "max_workers must be an int"),
        ({"initializer": 5}, ArgumentTypeError, "initializer must be callable"),
        ({"initargs": [1]}, ArgumentTypeError, "initargs must be a tuple"),
        ({"task_timeout": -1}, ArgumentError, "task_timeout must be > 0"),
        ({"retries": -2}, ArgumentError, "retries must be >= 0"),
        ({"spin": 1.0}, ArgumentError, "spin must be seconds"),
        ({"queue_warn_after": 0}, ArgumentError, "queue_warn_after must be > 0"),
    ],
)
def test_constructor_errors_name_the_parameter(
    backend: str, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Pool(backend=backend, **kwargs)


def test_backend_specific_arguments() -> None:
    with pytest.raises(ArgumentError, match="backend must be 'process' or 'thread'"):
        Pool(2, backend="fiber")
    with pytest.raises(ArgumentError, match="max_tasks_per_child applies to the process"):
        Pool(2, backend="thread", max_tasks_per_child=3)
    with pytest.raises(ArgumentError, match="max_tasks_per_child must be >= 1"):
        Pool(2, backend="process", max_tasks_per_child=0)
    with pytest.raises(ArgumentTypeError, match="mp_context must be a multiprocessing"):
        Pool(2, backend="process", mp_context="fork")
    with pytest.raises(ArgumentTypeError, match="thread_name_prefix must be a str, got int"):
        ThreadPool(1, thread_name_prefix=5)  # type: ignore[arg-type]


def test_thread_name_prefix_names_every_worker_thread() -> None:
    # As ThreadPoolExecutor's: the worker threads, replacements included, are named
    # "<prefix>_<n>", which is what a task sees as its thread's name.
    with ThreadPool(2, thread_name_prefix="imaging") as pool:
        seen = {pool.submit(T.thread_name).result(WAIT) for _ in range(4)}
        pool.restart(timeout=WAIT)
        seen |= {pool.submit(T.thread_name).result(WAIT) for _ in range(4)}
        names = {w.thread.name for w in pool._workers.values() if w.thread is not None}
    assert seen and len(names) == 2
    assert all(name.startswith("imaging_") for name in seen | names), seen | names


# (Python 3.12+ warns that forking a process with threads may deadlock the child; the
# fork context forks on purpose, and its child runs only the worker's code.)
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_mp_context_starts_the_workers() -> None:
    # The workers are started with the pool's mp_context: with a fork context they are
    # this process's children; by default, the forkserver's.
    with ProcessPool(1, mp_context=mp.get_context("fork")) as pool:
        assert pool.submit(T.parent_pid).result(WAIT) == os.getpid()
    with ProcessPool(1) as pool:
        assert pool.submit(T.parent_pid).result(WAIT) != os.getpid()


def test_pool_size_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHMCOMPUTE_WORKERS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert pool_size("cpu") == max(1, cores - 1)
    assert pool_size("cpu", reserve=0) == cores
    assert pool_size("mixed") == 2 * max(1, cores - 1)
    assert pool_size("io") == 4 * max(1, cores - 1)
    with pytest.raises(ArgumentError, match="kind must be one of"):
        pool_size("gpu")
    with pytest.raises(ArgumentError, match="reserve must be >= 0"):
        pool_size("cpu", reserve=-1)
    monkeypatch.setenv("SHMCOMPUTE_WORKERS", "3")
    assert pool_size("io") == 3
    with Pool(backend="thread") as pool:
        assert pool.max_workers == 3 and pool.stats.total == 3
    monkeypatch.setenv("SHMCOMPUTE_WORKERS", "many")
    with pytest.raises(ArgumentError, match="SHMCOMPUTE_WORKERS='many' is not an integer"):
        pool_size()
    monkeypatch.setenv("SHMCOMPUTE_WORKERS", "0")
    with pytest.raises(ArgumentError, match="must be >= 1"):
        Pool(backend="thread")


def test_pool_size_checks_its_arguments_when_the_environment_sets_the_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A bad call must fail on every machine, not only where SHMCOMPUTE_WORKERS is unset.
    monkeypatch.setenv("SHMCOMPUTE_WORKERS", "3")
    with pytest.raises(ArgumentError, match="kind must be one of"):
        pool_size("bogus")
    with pytest.raises(ArgumentError, match="reserve must be >= 0, got -5"):
        pool_size("cpu", reserve=-5)
    with pytest.raises(ArgumentTypeError, match="reserve must be an int, got float"):
        pool_size("cpu", reserve=1.5)  # type: ignore[arg-type]
    assert pool_size("io", reserve=0) == 3  # valid arguments: the variable still wins


def test_shared_arrays_travel_as_handles(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(2)
    with shc.from_numpy(np.arange(1_000_000, dtype=np.int64)) as a:
        # A SharedArray pickles as a ~150-byte handle: the worker maps it zero-copy.
        assert len(pickle.dumps(a)) < 400
        assert pool.submit(T.big_sum, a).result(WAIT) == int(a.array.sum())


def test_large_arguments_and_results(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(2)
    big = np.arange(200_000, dtype=np.int64)  # 1.6 MB: more than a ring slot holds
    assert pool.submit(T.big_sum, big).result(WAIT) == int(big.sum())
    out = pool.submit(T.big_result, 300_000).result(WAIT)
    assert np.array_equal(out, np.arange(300_000))


def test_stats_state_lifecycle(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(1)
    assert pool.stats.state == "running"
    assert "running" in repr(pool)
    pool.shutdown()
    assert pool.stats.state == "closed" and pool.stats.total == 0
