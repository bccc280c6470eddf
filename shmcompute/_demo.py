"""`shmcompute demo`: a short, real run of the core (shared arrays, atomics,
wait/notify across processes), verified against NumPy, with a peer beside each figure.
Kernels and worker entry points live here so worker processes can import them."""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from numba import njit

from . import atomics as at
from .array import PREFIX, SHM_DIR, SharedArray, _fmt_bytes, zeros

NEXT, DONE = 0, 1  # control slots: next chunk to claim, chunks finished
TURN, STOP = 0, 1  # ping-pong slots


@njit(nogil=True, cache=True)
def square_chunks(data, ctrl, chunk):
    """Claim chunks with an atomic fetch-add until none are left; square them in place."""
    n = data.shape[0]
    nchunks = (n + chunk - 1) // chunk
    mine = 0
    while True:
        c = at.add(ctrl, NEXT, 1)
        if c >= nchunks:
            break
        hi = min((c + 1) * chunk, n)
        for i in range(c * chunk, hi):
            data[i] = data[i] * data[i]
        mine += 1
    at.add(ctrl, DONE, mine)
    at.notify(ctrl, DONE)
    return mine


@njit(nogil=True, cache=True)
def count_up(ctrl, n):
    for _ in range(n):
        at.add(ctrl, 2, 1)
    return n


def worker_ready(ready: SharedArray, workers: int) -> int:
    """Load this worker's kernels, then wait until every worker has: with one such task
    per worker, each of them is started and warm. A process's first call of a cached
    kernel reads Numba's disk cache (hundreds of ms), which step 1 would otherwise time
    as squaring."""
    probe = np.zeros(4, np.int64)
    square_chunks(np.ones(4), probe, 2)
    count_up(probe, 1)
    r = ready.array
    at.add(r, 0, 1)
    at.notify(r, 0)
    deadline = time.monotonic() + 60
    while (arrived := at.load(r, 0)) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {arrived} of {workers} workers started within 60 s")
        at.wait(r, 0, arrived, 1.0)
    return os.getpid()


def worker_square(data: SharedArray, ctrl: SharedArray, chunk: int) -> tuple[int, int]:
    return os.getpid(), int(square_chunks(data.array, ctrl.array, chunk))


def worker_count(ctrl: SharedArray, n: int) -> int:
    return int(count_up(ctrl.array, n))


def echo_wait_notify(ctrl: SharedArray) -> None:
    c = ctrl.array
    seen = 0
    while at.load(c, STOP) == 0:
        at.wait(c, TURN, seen, 1.0)  # bounded: re-checks STOP every second
        v = at.load(c, TURN)
        if v & 1:
            at.store(c, TURN, v + 1)
            at.notify(c, TURN, 1)
        seen = at.load(c, TURN)


def echo_pipe(conn) -> None:
    while (msg := conn.recv()) is not None:
        conn.send(msg)


def _roundtrips_wait_notify(ctx, n: int) -> list[float]:
    with zeros(2, np.int64) as ctrl:
        c = ctrl.array
        child = ctx.Process(target=echo_wait_notify, args=(ctrl,), daemon=True)
        child.start()
        times = []
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                t = at.load(c, TURN) + 1
                at.store(c, TURN, t)
                at.notify(c, TURN, 1)
                while at.load(c, TURN) == t:
                    if at.wait(c, TURN, t, 10.0) == at.TIMED_OUT:
                        raise TimeoutError("echo process stopped answering")
                times.append(time.perf_counter() - t0)
        finally:
            at.store(c, STOP, 1)
            at.add(c, TURN, 2)
            at.notify(c, TURN)
            child.join(10)
        return times


def _roundtrips_pipe(ctx, n: int) -> list[float]:
    parent, child_end = ctx.Pipe()
    child = ctx.Process(target=echo_pipe, args=(child_end,), daemon=True)
    child.start()
    times = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            parent.send(1)
            if not parent.poll(10):
                raise TimeoutError("echo process stopped answering")
            parent.recv()
            times.append(time.perf_counter() - t0)
    finally:
        parent.send(None)
        child.join(10)
        parent.close()
        child_end.close()
    return times


def _ours() -> list[str]:
    """This process's segments (names carry their creator's pid): the demo creates all
    of its own, and other programs' segments, made meanwhile, are not its leaks."""
    mine = f"{PREFIX}{os.getpid():x}_"
    try:
        return [n for n in os.listdir(SHM_DIR) if n.startswith(mine)]
    except FileNotFoundError:  # pragma: no cover - macOS
        return []


def run(size: int = 16_000_000, workers: int = 2, rounds: int = 2000) -> int:
    """Run the demo; returns a process exit code (0 when every check passed)."""
    ok = True
    before = set(_ours())
    print(f"shmcompute demo: {workers} worker processes, {size:,} float64 elements")
    # compile (or load from the disk cache) here, before workers import the kernels
    t0 = time.perf_counter()
    probe = np.zeros(4, np.int64)
    square_chunks(np.ones(4), probe, 2)
    count_up(probe, 1)
    print(f"  kernels ready in {time.perf_counter() - t0:.2f} s (cached after the first run)")

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["numpy", "numba", "shmcompute.atomics", "shmcompute._demo"])
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        t0 = time.perf_counter()
        with zeros(1, np.int64) as ready:  # untimed below: start and warm every worker
            starting = [pool.submit(worker_ready, ready, workers) for _ in range(workers)]
            pids = {f.result(timeout=90) for f in starting}
        ok &= len(pids) == workers
        print(
            f"  {len(pids)} workers started, kernels loaded in each, in "
            f"{time.perf_counter() - t0:.2f} s (not part of the times below)"
        )

        # 1. zero-copy shared array, chunks claimed with an atomic counter
        src = np.random.default_rng(0).random(size)
        with SharedArray.create(size, np.float64) as data, zeros(4, np.int64) as ctrl:
            data.array[:] = src
            chunk = 65_536
            nchunks = -(-size // chunk)
            t0 = time.perf_counter()
            futs = [pool.submit(worker_square, data, ctrl, chunk) for _ in range(workers)]
            while (done := at.load(ctrl, DONE)) < nchunks:
                if at.wait(ctrl, DONE, done, 30.0) == at.TIMED_OUT:
                    raise TimeoutError("workers stopped making progress")
            elapsed = time.perf_counter() - t0
            split = [f.result(timeout=30)[1] for f in futs]
            good = np.array_equal(data.array, src * src)
            ok &= good and sum(split) == nchunks
            print(
                f"1. square {_fmt_bytes(size * 8)} in place across warm processes, zero-copy: "
                f"{elapsed * 1e3:.1f} ms, chunks per worker {split}, "
                f"{'matches NumPy' if good else 'MISMATCH'}"
            )

        # 2. exact counts under contention
        n = 1_000_000
        with zeros(4, np.int64) as ctrl:
            t0 = time.perf_counter()
            list(pool.map(worker_count, [ctrl] * workers, [n] * workers, timeout=60))
            elapsed = time.perf_counter() - t0
            total = int(ctrl.array[2])
            ok &= total == workers * n
            print(
                f"2. {workers} processes x {n:,} atomic adds on one slot: {total:,} "
                f"({'exact' if total == workers * n else 'LOST UPDATES'}), {elapsed * 1e3:.0f} ms"
            )

    # 3. wake-up latency across processes
    ours = _roundtrips_wait_notify(ctx, rounds)
    pipe = _roundtrips_pipe(ctx, rounds)
    med_ours, med_pipe = statistics.median(ours) * 1e6, statistics.median(pipe) * 1e6
    print(  # a speed ratio, as in `shmcompute bench`: above 1.00x wait/notify is faster
        f"3. cross-process wake-up round trip (median of {rounds}): wait/notify "
        f"{med_ours:.1f} us, multiprocessing.Pipe {med_pipe:.1f} us "
        f"(wait/notify at {med_pipe / med_ours:.2f}x Pipe's speed)"
    )

    leaked = sorted(set(_ours()) - before)
    ok &= not leaked
    print(f"4. shared-memory segments left behind: {len(leaked)}")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1
