"""The pools every side of ``shmcompute bench`` shares: how they start, how a side waits
on a peer, and how they end, so that no peer can hang the run.

* Peer workers ignore SIGINT (``_bench_kernels.ignore_sigint``), as shmcompute's do.
  Ctrl-C reaches the whole process group: a ``multiprocessing.Pool`` worker killed by it
  can take its task (or the queue lock) with it, and ``close()`` + ``join()`` then wait
  forever for a task nobody runs.
* Every wait on a peer has a deadline (``--peer-timeout``): a peer worker that dies
  mid-task (OOM killer, a signal) loses the task, ``multiprocessing.Pool`` starts a new
  worker and waits for the lost result forever. A side that runs past it fails, the run
  goes on, and the failure is reported (``Report.failed``).
* Ending the pools is bounded: each one gets ``CLOSE_S``; after an exception (Ctrl-C
  included) or past that, peer workers are terminated rather than waited for.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

PRELOAD = [
    "numpy",
    "numba",
    "shmcompute.atomics",
    "shmcompute.pool.worker",
    "shmcompute._bench_kernels",
    "shmcompute._jobs",
]
PEER_TIMEOUT_S = 600.0  # --peer-timeout's default: the slowest default peer run takes ~5 s
CLOSE_S = 60.0  # the most each pool may take to end


def _no_result(what: str, timeout: float) -> TimeoutError:
    return TimeoutError(
        f"{what}: no result within {timeout:g} s (--peer-timeout): a worker died or hung"
    )


def mp_map(pool: Any, fn: Callable[[Any], Any], items: list[Any], timeout: float) -> list[Any]:
    """``multiprocessing.Pool.map`` with a deadline (``map`` itself waits forever)."""
    try:
        return pool.map_async(fn, items).get(timeout)  # type: ignore[no-any-return]
    except mp.TimeoutError:
        raise _no_result("multiprocessing.Pool.map", timeout) from None


def ppe_map(
    pool: ProcessPoolExecutor, fn: Callable[[Any], Any], items: list[Any], timeout: float
) -> list[Any]:
    """``ProcessPoolExecutor.map`` with a deadline on all of its results."""
    try:
        return list(pool.map(fn, items, timeout=timeout))
    except TimeoutError:
        raise _no_result("ProcessPoolExecutor.map", timeout) from None


def joblib_map(parallel: Any, calls: Iterable[Any], timeout: float) -> list[Any]:
    """``joblib.Parallel(timeout=...)`` over ``calls``, its timeout named like the others'."""
    try:
        return parallel(calls)  # type: ignore[no-any-return]
    except (TimeoutError, mp.TimeoutError):  # joblib's is multiprocessing's; it aborts
        raise _no_result("joblib.Parallel", timeout) from None


@contextmanager
def forkserver_pools(workers: int) -> Iterator[dict[str, Any]]:
    """shmcompute's process and thread pools and the stdlib's, ``workers`` each."""
    from . import _bench_kernels as K
    from .pool import Pool

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    pools: dict[str, Any] = {}
    try:
        pools["shm-process"] = Pool(workers, backend="process")
        pools["shm-thread"] = Pool(workers, backend="thread")
        pools["ppe"] = ProcessPoolExecutor(workers, mp_context=ctx, initializer=K.ignore_sigint)
        pools["mp"] = ctx.Pool(workers, initializer=K.ignore_sigint)
        pools["tpe"] = ThreadPoolExecutor(workers)
        yield pools
    except BaseException:
        _end_all(pools, failed=True)
        raise
    else:
        _end_all(pools, failed=False)


def _end_all(pools: dict[str, Any], failed: bool) -> None:
    """End every pool, each within ``CLOSE_S``. A second Ctrl-C while one ends switches
    the rest to the quick way, and is raised once all of them are done."""
    interrupted: BaseException | None = None
    for key, pool in pools.items():
        try:
            _end(key, pool, failed or interrupted is not None)
        except KeyboardInterrupt as e:
            interrupted = e
    if interrupted is not None:
        raise interrupted


def _end(key: str, pool: Any, failed: bool) -> None:
    if key.startswith("shm"):  # bounded by its own timeout, escalating to kill
        pool.shutdown(wait=True, cancel_futures=failed, timeout=5.0 if failed else CLOSE_S)
    elif key == "mp":
        # terminate(), as Pool.__exit__ does: close() + join() waits for every task in
        # flight, and a task lost with a dead worker is never done. terminate() itself
        # can block on the queue lock of a worker that died holding it: bounded.
        _within(CLOSE_S, "multiprocessing.Pool.terminate()", pool.terminate)
    elif key == "ppe":
        # shutdown() sets _processes to None: take the workers first. (No public handle
        # on them before Python 3.14's terminate_workers().)
        procs = list((getattr(pool, "_processes", None) or {}).values())
        if not failed and _within(CLOSE_S, "ProcessPoolExecutor.shutdown()", pool.shutdown):
            return
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:  # they ignore SIGINT, not SIGTERM
            proc.terminate()
        for proc in procs:
            proc.join(CLOSE_S)
    elif failed:  # ThreadPoolExecutor: its threads cannot be stopped; drop what is queued
        pool.shutdown(wait=False, cancel_futures=True)
    else:
        _within(CLOSE_S, "ThreadPoolExecutor.shutdown()", pool.shutdown)


def _within(seconds: float, what: str, fn: Callable[[], Any]) -> bool:
    """Run ``fn`` in a daemon thread and wait for it at most ``seconds``; False (and a
    line on stderr) when it did not finish. A call that never returns then stays behind
    in its thread instead of holding the run, and its thread does not hold the exit."""
    errors: list[BaseException] = []

    def call() -> None:
        try:
            fn()
        except BaseException as e:  # reported below, by the waiting thread
            errors.append(e)

    t = threading.Thread(target=call, name=f"bench-end: {what}", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        print(f"shmcompute bench: {what} did not finish in {seconds:g} s; left", file=sys.stderr)
        return False
    if errors:
        print(f"shmcompute bench: {what} failed: {errors[0]!r}", file=sys.stderr)
        return False
    return True
