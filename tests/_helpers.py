"""Kernels and child-process entry points shared by the tests.

They live in an importable module (not in test files) so spawn and forkserver
children can import them, and their Numba disk cache is written once by the parent.
"""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
from numba import njit

import shmcompute.atomics as at
from shmcompute import SharedArray

# control-array slots for the counting tests
GO, READY, COUNTER, LOCK, PLAIN = 0, 1, 2, 3, 4
CTRL_SLOTS = 8
START_TIMEOUT = 30.0
RACY_GAP = 8  # see racy_adds


@njit(nogil=True, cache=True)
def start_together(ctrl):
    """Report ready, then block (bounded) until the parent sets GO: workers start at once."""
    at.add(ctrl, READY, 1)
    at.notify(ctrl, READY)
    while at.load(ctrl, GO) == 0:
        if at.wait(ctrl, GO, 0, START_TIMEOUT) == at.TIMED_OUT:
            return False
    return True


@njit(nogil=True, cache=True)
def atomic_adds(ctrl, n):
    if not start_together(ctrl):
        return -1
    for _ in range(n):
        at.add(ctrl, COUNTER, 1)
    return n


@njit(nogil=True, cache=True)
def racy_adds(ctrl, n):
    """Read, then write: each access is atomic but the pair is not, so updates get lost.
    (A plain ``ctrl[COUNTER] += 1`` loop is folded by LLVM into one add of n.)

    Some reads of PLAIN (zero) sit between the read and the write, as work would: the
    write is the slow part of a bare load-add-store, so a process preempted on a busy
    core almost always stopped after it, and two processes sharing one core lost nothing
    (seen with one CPU hog on 2 cores: 5 of 5 tries exact). With the gap, a preemption
    lands between the read and the write as often as not, on one core or two."""
    if not start_together(ctrl):
        return -1
    for _ in range(n):
        v = at.load(ctrl, COUNTER)
        for _ in range(RACY_GAP):
            v += at.load(ctrl, PLAIN)
        at.store(ctrl, COUNTER, v + 1)
    return n


@njit(nogil=True, cache=True)
def spinlock_adds(ctrl, n):
    """A compare_exchange spin-lock guarding a plain, non-atomic increment."""
    if not start_together(ctrl):
        return -1
    for _ in range(n):
        while at.compare_exchange(ctrl, LOCK, 0, 1) != 0:
            pass
        ctrl[PLAIN] += 1
        at.store(ctrl, LOCK, 0)
    return n


@njit(nogil=True, cache=True)
def kernel_wait(ctrl, index, expected, timeout):
    return at.wait(ctrl, index, expected, timeout)


@njit(nogil=True, cache=True)
def kernel_wait_forever(ctrl, index, expected):
    return at.wait(ctrl, index, expected)


@njit(nogil=True, cache=True)
def kernel_notify(ctrl, index, count):
    return at.notify(ctrl, index, count)


@njit(nogil=True, cache=True)
def kernel_pingpong(ctrl, rounds, seen):
    """Child side of a ping-pong, all in compiled code: wait for odd turns, answer even."""
    for r in range(rounds):
        mine = 2 * r + 1
        while at.load(ctrl, 0) != mine:
            if at.wait(ctrl, 0, 2 * r, 10.0) == at.TIMED_OUT:
                return r
        seen[r] = at.load(ctrl, 0)
        at.store(ctrl, 0, mine + 1)
        at.notify(ctrl, 0, 1)
    return rounds


KERNELS = {"atomic": atomic_adds, "racy": racy_adds, "spinlock": spinlock_adds}


def warm_up() -> None:
    """Compile (or load from cache) everything children use, before any child starts:
    concurrent writes to Numba's cache have crashed (numba issues 4807, 10128)."""
    for dt in (np.int32, np.int64):
        ctrl = np.zeros(CTRL_SLOTS, dt)
        ctrl[GO] = 1
        for k in KERNELS.values():
            k(ctrl, 1)
        kernel_wait(ctrl, 0, 1, 0.0)
        kernel_notify(ctrl, 0, 1)
        for f in (at.add, at.sub, at.and_, at.or_, at.xor, at.exchange, at.store):
            f(ctrl, 5, 1)
        at.load(ctrl, 0)
        at.compare_exchange(ctrl, 5, 0, 1)
        at.wait(ctrl, 6, 1, 0)
        at.wait(ctrl, 6, 0, 0)
        at.notify(ctrl, 6)
        at.waiters(ctrl, 6)
    seen = np.zeros(1, np.int64)
    ctrl64 = np.zeros(CTRL_SLOTS, np.int64)
    ctrl64[0] = 1
    kernel_pingpong(ctrl64, 1, seen)


# --- child-process entry points ----------------------------------------------------
def _open(obj) -> SharedArray:
    """A handle is attached here; a pickled SharedArray arrives already attached."""
    return obj if isinstance(obj, SharedArray) else SharedArray.attach(obj)


def child_count(kind: str, handle, n: int) -> int:
    a = _open(handle)
    try:
        return int(KERNELS[kind](a.array, n))
    finally:
        a.close()


def child_pingpong_python(handle, rounds: int) -> list[int]:
    """Child side in Python: returns every value it saw, for an exact-sequence check."""
    a = _open(handle)
    ctrl = a.array
    seen = []
    try:
        for r in range(rounds):
            while at.load(ctrl, 0) == 2 * r:
                if at.wait(ctrl, 0, 2 * r, 10.0) == at.TIMED_OUT:
                    return seen
            seen.append(at.load(ctrl, 0))
            at.store(ctrl, 0, 2 * r + 2)
            at.notify(ctrl, 0, 1)
        return seen
    finally:
        a.close()


def child_pingpong_kernel(handle, rounds: int) -> list[int]:
    a = _open(handle)
    seen = np.zeros(rounds, np.int64)
    try:
        kernel_pingpong(a.array, rounds, seen)
        return seen.tolist()
    finally:
        a.close()


def child_wait(handle, index: int, expected: int, timeout: float, in_kernel: bool) -> int:
    a = _open(handle)
    try:
        if in_kernel:
            return int(kernel_wait(a.array, index, expected, timeout))
        return int(at.wait(a.array, index, expected, timeout))
    finally:
        a.close()


def child_park_and_hang(handle, index: int, nthreads: int) -> None:
    """``nthreads`` threads wait on ``handle[index]`` (60 s at most) until the test
    kills this process (a multiprocessing.Process target)."""
    a = _open(handle)
    threads = [
        threading.Thread(target=at.wait, args=(a.array, index, 0, 60.0), daemon=True)
        for _ in range(nthreads)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60.0)


def child_attach_sum(handle, write: float | None = None) -> float:
    """Attach, optionally write, and return the sum: proves the child sees the memory."""
    a = _open(handle)
    try:
        if write is not None:
            a.array[:] = write
        return float(a.array.sum())
    finally:
        a.close()


def child_take_ownership(handle) -> str:
    a = _open(handle)
    name = a.name
    owner = a.owner
    a.array[:] = 7
    a.close()
    a.unlink()
    return f"{name} {owner}"


def child_sync(kind: str, obj, timeout: float):
    """Use a pickled sync primitive in a child."""
    if kind == "semaphore":
        return obj.acquire(timeout=timeout)
    if kind == "event":
        return obj.wait(timeout)
    if kind == "barrier":
        return obj.wait(timeout)
    raise ValueError(kind)


if __name__ == "__main__":  # `python -m tests._helpers HANDLE...`: an unrelated process
    import pickle

    h = pickle.loads(bytes.fromhex(sys.argv[1]))
    print(child_attach_sum(h, write=float(sys.argv[2])), os.getpid())
