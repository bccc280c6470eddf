"""Kernels and per-chunk task functions for benchmarks/test_transform.py.

Worker processes (shmcompute's, multiprocessing's, loky's) receive these by reference
(module and name), so they live in an importable module; the benchmark preloads this
module in the forkserver, and ``cache=True`` lets every worker load the compiled code
from Numba's disk cache instead of compiling it.

* ``cpu_steps`` / ``affine``: ``@numba.njit(nogil=True, cache=True)`` transform kernels,
  ``kernel(x, out)``: what shmcompute runs, and what the "one numba thread" peer calls
  directly on the whole array.
* ``cpu_steps_prange`` / ``affine_prange``: the same loops with ``parallel=True`` and
  ``prange``. Never pass these to shmcompute: the pool is the parallelism there, and
  Numba's threading layer must not be entered from several pool threads.
* ``cpu_chunk`` / ``affine_chunk``: plain-Python tasks for the copy-mode peers
  (multiprocessing.Pool.map, ProcessPoolExecutor.map, joblib): the chunk arrives pickled,
  the nogil kernel fills a new array, which goes back pickled.
"""

from __future__ import annotations

import numba
import numpy as np

CPU_STEPS = 32  # iterations of the CPU-bound update per element


@numba.njit(nogil=True, cache=True)
def cpu_steps(x, out):  # type: ignore[no-untyped-def]
    """``CPU_STEPS`` times ``v = v + 0.3 + 0.1*sin(v)*cos(v)`` per element."""
    for i in range(x.shape[0]):
        v = x[i]
        for _ in range(CPU_STEPS):
            v = v + 0.3 + 0.1 * np.sin(v) * np.cos(v)
        out[i] = v


@numba.njit(nogil=True, cache=True)
def affine(x, out):  # type: ignore[no-untyped-def]
    """``out = 2.5 * x + 1``: one read and one write per element (memory-bound)."""
    for i in range(x.shape[0]):
        out[i] = 2.5 * x[i] + 1.0


@numba.njit(parallel=True, cache=True)
def cpu_steps_prange(x, out):  # type: ignore[no-untyped-def]
    for i in numba.prange(x.shape[0]):
        v = x[i]
        for _ in range(CPU_STEPS):
            v = v + 0.3 + 0.1 * np.sin(v) * np.cos(v)
        out[i] = v


@numba.njit(parallel=True, cache=True)
def affine_prange(x, out):  # type: ignore[no-untyped-def]
    for i in numba.prange(x.shape[0]):
        out[i] = 2.5 * x[i] + 1.0


def cpu_chunk(x: np.ndarray) -> np.ndarray:
    """Copy-mode task: run ``cpu_steps`` on a pickled chunk, return the new array."""
    out = np.empty_like(x)
    cpu_steps(x, out)
    return out


def affine_chunk(x: np.ndarray) -> np.ndarray:
    """Copy-mode task: run ``affine`` on a pickled chunk, return the new array."""
    out = np.empty_like(x)
    affine(x, out)
    return out


def cpu_reference(x: np.ndarray) -> np.ndarray:
    """NumPy reference for ``cpu_steps`` (checks every peer's result)."""
    v = x.copy()
    for _ in range(CPU_STEPS):
        v = v + 0.3 + 0.1 * np.sin(v) * np.cos(v)
    return v


def affine_reference(x: np.ndarray) -> np.ndarray:
    """NumPy reference for ``affine``."""
    return 2.5 * x + 1.0
