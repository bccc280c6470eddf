"""Kernels and per-chunk task functions for benchmarks/test_transform.py.

The same code ``shmcompute bench`` runs (``shmcompute._bench_kernels``), so the two
report on identical work. Worker processes (shmcompute's, multiprocessing's, loky's)
receive these by reference and load the compiled code from Numba's disk cache.

* ``cpu_steps`` / ``affine``: ``@numba.njit(nogil=True, cache=True)`` transform kernels,
  ``kernel(x, out)``: what shmcompute runs, and what the "one numba thread" peer calls
  directly on the whole array.
* ``cpu_steps_prange`` / ``affine_prange``: the same loops with ``parallel=True``. Never
  pass these to shmcompute: the pool is the parallelism there.
* ``cpu_chunk`` / ``affine_chunk``: plain-Python tasks for the copy-mode peers: the chunk
  arrives pickled, the nogil kernel fills a new array, which goes back pickled.
"""

from __future__ import annotations

import numpy as np

from shmcompute._bench_kernels import (
    STEPS as CPU_STEPS,
)
from shmcompute._bench_kernels import (
    affine,
    affine_chunk,
    affine_prange,
    cpu_chunk,
    cpu_steps,
    cpu_steps_prange,
)
from shmcompute._bench_kernels import (
    cpu_numpy as cpu_reference,
)


def affine_reference(x: np.ndarray) -> np.ndarray:
    """NumPy reference for ``affine``."""
    return 2.5 * x + 1.0


__all__ = [
    "CPU_STEPS",
    "affine",
    "affine_chunk",
    "affine_prange",
    "affine_reference",
    "cpu_chunk",
    "cpu_reference",
    "cpu_steps",
    "cpu_steps_prange",
]
