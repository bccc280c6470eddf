"""Kernels for ``03_worked_example.ipynb``: a box blur with a halo, and two reductions.

They live in a module (not in the notebook) so that process workers import them by name
and load them from Numba's disk cache; a kernel defined in a notebook cell works too, but
it is shipped by value and compiled once in each worker process.

Halo kernels are called as ``kernel(img_chunk, out_chunk, start)``: ``img_chunk`` holds
the chunk's own rows plus up to ``overlap`` rows of halo on each side, and ``start`` is
the row of ``img_chunk`` where ``out_chunk[0]`` sits. A chunk at the top of the image has
no rows above it (``start == 0``), one at the bottom none below, so clamping a row index
to ``img_chunk``'s rows is the same as clamping it to the image's rows: edges repeat
(``np.pad(mode="edge")``), provided ``overlap`` is at least the blur radius.
"""

from __future__ import annotations

import numpy as np
from numba import njit

HIST_BINS = 64


@njit(nogil=True, cache=True)
def _box(img, out, start, r):
    """(2r+1) x (2r+1) box blur of ``img``'s rows ``start .. start+len(out)`` into ``out``,
    with edge replication: sum 2r+1 rows into one row, then a sliding sum along it."""
    rows, width = img.shape[0], img.shape[1]
    inv = 1.0 / ((2 * r + 1) * (2 * r + 1))
    col = np.empty(width, np.float64)  # float64 sums: the sliding window does not drift
    for i in range(out.shape[0]):
        c = start + i
        col[:] = 0.0
        for dy in range(-r, r + 1):
            y = min(max(c + dy, 0), rows - 1)
            for x in range(width):
                col[x] += img[y, x]
        # sliding window along the row; indices outside the row repeat the edge value
        s = 0.0
        for dx in range(-r, r + 1):
            s += col[min(max(dx, 0), width - 1)]
        for x in range(width):
            out[i, x] = s * inv
            s += col[min(x + r + 1, width - 1)] - col[max(x - r, 0)]


@njit(nogil=True, cache=True)
def blur3(img, out, start):
    """3x3 box blur; run with ``overlap=1`` (or more)."""
    _box(img, out, start, 1)


@njit(nogil=True, cache=True)
def blur5(img, out, start):
    """5x5 box blur; run with ``overlap=2`` (or more)."""
    _box(img, out, start, 2)


@njit(nogil=True, cache=True)
def chunk_sum(img):
    """A reduce kernel: the chunk's sum, in float64."""
    s = 0.0
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            s += img[i, j]
    return s


@njit(nogil=True, cache=True)
def histogram(img):
    """A reduce kernel returning an array: counts of values in [0, 1) in HIST_BINS bins
    (values outside are clipped into the first or last bin)."""
    h = np.zeros(HIST_BINS, np.int64)
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            b = int(img[i, j] * HIST_BINS)
            h[min(max(b, 0), HIST_BINS - 1)] += 1
    return h
