"""Kernels and peer task functions for ``shmcompute bench`` (importable by workers).

The ``*_prange`` kernels use Numba's own threads (``parallel=True``); they are only ever
called directly, never handed to a shmcompute pool.
"""

from __future__ import annotations

import signal
from typing import Any

import numpy as np
from numba import njit, prange

STEPS = 32


@njit(nogil=True, cache=True)
def cpu_steps(x, out):  # type: ignore[no-untyped-def]
    """CPU-bound: 32 steps of v = v + 0.3 + 0.1*sin(v)*cos(v) per element."""
    for i in range(x.shape[0]):
        v = x[i]
        for _ in range(STEPS):
            v = v + 0.3 + 0.1 * np.sin(v) * np.cos(v)
        out[i] = v


@njit(parallel=True, cache=True)
def cpu_steps_prange(x, out):  # type: ignore[no-untyped-def]
    for i in prange(x.shape[0]):
        v = x[i]
        for _ in range(STEPS):
            v = v + 0.3 + 0.1 * np.sin(v) * np.cos(v)
        out[i] = v


@njit(nogil=True, cache=True)
def affine(x, out):  # type: ignore[no-untyped-def]
    """Memory-bound: y = 2.5 x + 1."""
    for i in range(x.shape[0]):
        out[i] = 2.5 * x[i] + 1.0


@njit(parallel=True, cache=True)
def affine_prange(x, out):  # type: ignore[no-untyped-def]
    for i in prange(x.shape[0]):
        out[i] = 2.5 * x[i] + 1.0


def cpu_numpy(x: np.ndarray) -> np.ndarray:
    v = x.copy()
    for _ in range(STEPS):
        v = v + 0.3 + 0.1 * np.sin(v) * np.cos(v)
    return v


def cpu_chunk(x: np.ndarray) -> np.ndarray:
    """A peer's task: one chunk in, its result out (pickled both ways by the peer)."""
    out = np.empty_like(x)
    cpu_steps(x, out)
    return out


def affine_chunk(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    affine(x, out)
    return out


def trivial(x: Any) -> Any:
    return x


def ignore_sigint() -> None:
    """Peer workers' initializer. Ctrl-C reaches the whole process group; a peer worker
    that dies of it can die holding its pool's queue lock or with a task in flight, and
    the pool then never finishes. The parent decides what happens (shmcompute's own
    workers ignore SIGINT too: pool/worker.py)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def echo(conn: Any) -> None:
    """The raw-Pipe peer: answer every message until None."""
    ignore_sigint()
    while True:
        msg = conn.recv()
        if msg is None:
            return
        conn.send(msg)


def warm_up() -> None:
    x = np.ones(16)
    out = np.empty(16)
    cpu_steps(x, out)
    affine(x, out)
    cpu_steps_prange(x, out)
    affine_prange(x, out)
    touch(x, out)


@njit(nogil=True, cache=True)
def touch(x, out):  # type: ignore[no-untyped-def]
    """O(1) per chunk: measures what moving the data costs, not the arithmetic."""
    if x.shape[0] > 0:
        out[0] = 2.5 * x[0] + 1.0
