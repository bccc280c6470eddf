"""Kernels and echo loops for benchmarks/test_core.py (importable by child processes)."""

from __future__ import annotations

import numpy as np
from numba import njit

import shmcompute.atomics as at

# The wait/notify and Pipe echo loops are the demo's own (one implementation).
from shmcompute._demo import STOP, TURN, echo_pipe, echo_wait_notify  # noqa: F401


@njit(nogil=True, cache=True)
def plain_adds(arr, idx, n):
    # idx is all zeros, but the compiler cannot know it (nor that arr and idx do not
    # alias), so every iteration really loads, adds and stores: a fair plain add.
    for i in range(n):
        arr[idx[i & 1023]] += 1


@njit(nogil=True, cache=True)
def atomic_adds(arr, idx, n):
    for i in range(n):
        at.add(arr, idx[i & 1023], 1)


def echo_queue(q_in, q_out) -> None:
    while (msg := q_in.get()) is not None:
        q_out.put(msg)


def warm_up() -> None:
    arr = np.zeros(2, np.int64)
    idx = np.zeros(1024, np.int64)
    plain_adds(arr, idx, 10)
    atomic_adds(arr, idx, 10)
