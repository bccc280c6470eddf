"""Kernels for the transform tests: importable, cached, nogil."""

from __future__ import annotations

import numpy as np
from numba import njit, types

import shmcompute.atomics as at


@njit(nogil=True, cache=True)
def affine(x, out):  # type: ignore[no-untyped-def]
    for i in range(x.shape[0]):
        out[i] = 2.5 * x[i] + 1.0


@njit(nogil=True, cache=True)
def add2(a, b, out):  # type: ignore[no-untyped-def]
    for i in range(a.shape[0]):
        out[i] = a[i] + b[i]


@njit(nogil=True, cache=True)
def fma3(a, b, c, out):  # type: ignore[no-untyped-def]
    for i in range(a.shape[0]):
        out[i] = a[i] * b[i] + c[i]


@njit(nogil=True, cache=True)
def rows_plus_colsum(img, out):  # type: ignore[no-untyped-def]
    for r in range(img.shape[0]):
        for c in range(img.shape[1]):
            out[r, c] = img[r, c] * 2.0 + c


@njit(nogil=True, cache=True)
def blur3(x, out, start):  # type: ignore[no-untyped-def]
    """out[i] = mean of x[i-1..i+1] clipped at the array's ends; ``x`` carries up to one
    row of halo on each side and ``start`` is where out[0] sits in it."""
    n = x.shape[0]
    for j in range(out.shape[0]):
        i = start + j
        lo = max(i - 1, 0)
        hi = min(i + 2, n)
        s = 0.0
        for k in range(lo, hi):
            s += x[k]
        out[j] = s / (hi - lo)


@njit(nogil=True, cache=True)
def vblur5(img, out, start):  # type: ignore[no-untyped-def]
    """A 2-D halo kernel (an image by rows, overlap=2): out[r, c] = mean of
    img[r-2..r+2, c] clipped at the image's top and bottom."""
    n = img.shape[0]
    for j in range(out.shape[0]):
        i = start + j
        lo = max(i - 2, 0)
        hi = min(i + 3, n)
        for c in range(img.shape[1]):
            s = 0.0
            for k in range(lo, hi):
                s += img[k, c]
            out[j, c] = s / (hi - lo)


@njit(nogil=True, cache=True)
def col_sums(img):  # type: ignore[no-untyped-def]
    """A 2-D reduce kernel: the chunk's column sums (an array partial)."""
    s = np.zeros(img.shape[1])
    for r in range(img.shape[0]):
        for c in range(img.shape[1]):
            s[c] += img[r, c]
    return s


@njit(nogil=True, cache=True)
def chunk_sum(x):  # type: ignore[no-untyped-def]
    s = 0.0
    for i in range(x.shape[0]):
        s += x[i]
    return s


@njit(nogil=True, cache=True)
def chunk_min(x):  # type: ignore[no-untyped-def]
    m = np.inf
    for i in range(x.shape[0]):
        m = min(m, x[i])
    return m


@njit(nogil=True, cache=True)
def histogram16(x):  # type: ignore[no-untyped-def]
    h = np.zeros(16, np.int64)
    for i in range(x.shape[0]):
        h[int(x[i]) & 15] += 1
    return h


@njit(nogil=True, cache=True)
def dot_partial(a, b):  # type: ignore[no-untyped-def]
    s = 0.0
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@njit(nogil=True, cache=True)
def blur_pair(a, b, out, start):  # type: ignore[no-untyped-def]
    """A two-input halo kernel: out[i] = a[i-1] + b[i+1], zero past the ends."""
    n = a.shape[0]
    for j in range(out.shape[0]):
        i = start + j
        left = a[i - 1] if i >= 1 else 0.0
        right = b[i + 1] if i + 1 < n else 0.0
        out[j] = left + right


@njit(nogil=True, cache=True)
def dot3_partial(a, b, c):  # type: ignore[no-untyped-def]
    s = 0.0
    for i in range(a.shape[0]):
        s += a[i] * b[i] * c[i]
    return s


@njit(nogil=True, cache=True)
def fails_on_negative(x, out):  # type: ignore[no-untyped-def]
    for i in range(x.shape[0]):
        if x[i] < 0:
            raise ValueError("negative input")
        out[i] = x[i]


@njit(nogil=True, cache=True)
def sum_fails_on_negative(x):  # type: ignore[no-untyped-def]
    s = 0.0
    for i in range(x.shape[0]):
        if x[i] < 0:
            raise ValueError("negative input")
        s += x[i]
    return s


@njit(nogil=True, cache=True)
def hist_fails_on_negative(x):  # type: ignore[no-untyped-def]
    h = np.zeros(4, np.int64)
    for i in range(x.shape[0]):
        if x[i] < 0:
            raise ValueError("negative input")
        h[int(x[i]) % 4] += 1
    return h


@njit(nogil=True, cache=True)
def does_not_type(x, out):  # type: ignore[no-untyped-def]
    for i in range(x.shape[0]):
        out[i] = x[i] + "a"


@njit(nogil=True, cache=True)
def returns_value(x, out):  # type: ignore[no-untyped-def]
    return x[0]


@njit(cache=True)
def holds_gil(x, out):  # type: ignore[no-untyped-def]
    out[:] = x


@njit(nogil=True, cache=True)
def cpu_heavy(x, out):  # type: ignore[no-untyped-def]
    for i in range(x.shape[0]):
        v = x[i]
        for _ in range(32):
            v = v + 0.3 + 0.1 * np.sin(v) * np.cos(v)
        out[i] = v


@njit(nogil=True, cache=True)
def cpu_heavy_sum(x):  # type: ignore[no-untyped-def]
    """A partial for reduce: the sum of cpu_heavy's outputs over the chunk."""
    s = 0.0
    for i in range(x.shape[0]):
        v = x[i]
        for _ in range(32):
            v = v + 0.3 + 0.1 * np.sin(v) * np.cos(v)
        s += v
    return s


_exit = types.ExternalFunction("_exit", types.void(types.int32))


@njit(nogil=True, cache=True)
def dies_once_on_marker(x, latch, out):  # type: ignore[no-untyped-def]
    """out = 2x; the worker process dies (the first time only) on the chunk holding a
    -1 marker. ``latch`` is an int64 array as long as x; the chunk's first element of it
    is the once-only flag (a chunk always gets the same slice)."""
    for i in range(x.shape[0]):
        if x[i] == -1.0 and at.compare_exchange(latch, 0, 0, 1) == 0:
            _exit(9)
        out[i] = 2.0 * x[i]


@njit(nogil=True, cache=True)
def dies_on_marker(x, out):  # type: ignore[no-untyped-def]
    """out = 2x; the worker process dies on any chunk holding a -1 marker, every time."""
    for i in range(x.shape[0]):
        if x[i] == -1.0:
            _exit(9)
        out[i] = 2.0 * x[i]


@njit(nogil=True, cache=True)
def gated_copy(x, gate, out, start):  # type: ignore[no-untyped-def]
    """out = x, with a halo of 1 (for ``start``): every chunk but the first waits (up
    to 30 s) until the first word of its slice of ``gate`` is set."""
    if start > 0:
        at.wait(gate, 0, 0, 30.0)
    for i in range(out.shape[0]):
        out[i] = x[start + i]


@njit(nogil=True)
def affine_uncached(x, out):  # type: ignore[no-untyped-def]
    for i in range(x.shape[0]):
        out[i] = 2.5 * x[i] + 1.0


@njit(nogil=True, cache=True)
def returns_nothing(x):  # type: ignore[no-untyped-def]
    x[0] = x[0]


# Used by one test only (test_process_drivers_compile_in_the_caller): no other test
# may make a driver plan for them.
@njit(nogil=True, cache=True)
def only_for_caller_compile(x, out):  # type: ignore[no-untyped-def]
    for i in range(x.shape[0]):
        out[i] = 3 * x[i]


# (A second dispatcher of chunk_sum's function: a kernel object of its own.)
only_for_caller_compile_sum = njit(nogil=True, cache=True)(chunk_sum.py_func)


@njit(nogil=True, cache=True)
def only_for_caller_compile_f32(x):  # type: ignore[no-untyped-def]
    """A float32 partial (reduce jobs keep it as the float Numba returns)."""
    s = np.float32(0.0)
    for i in range(x.shape[0]):
        s += np.float32(x[i])
    return s


SLOW_CHUNK_S = 0.02  # see slow_copy


@njit(nogil=True, cache=True)
def slow_copy(x, out):  # type: ignore[no-untyped-def]
    """out = x, taking SLOW_CHUNK_S a chunk: a bounded wait on a word no one changes
    (the wait is the work here, so every call ends on its own, however it is run)."""
    idle = np.zeros(1, np.int64)
    at.wait(idle, 0, 0, SLOW_CHUNK_S)
    for i in range(x.shape[0]):
        out[i] = x[i]


@njit(nogil=True, cache=True)
def slow_sum(x):  # type: ignore[no-untyped-def]
    """The chunk's sum, taking SLOW_CHUNK_S (see slow_copy)."""
    idle = np.zeros(1, np.int64)
    at.wait(idle, 0, 0, SLOW_CHUNK_S)
    s = 0.0
    for i in range(x.shape[0]):
        s += x[i]
    return s


@njit(nogil=True, cache=True)
def wait_then_fail(x, out):  # type: ignore[no-untyped-def]
    """Waits x[0] seconds (a bounded wait on a word no one changes), then raises if
    x[1] < 0, else copies: each chunk's duration and fate are set by its data."""
    idle = np.zeros(1, np.int64)
    if x[0] > 0:
        at.wait(idle, 0, 0, x[0])
    if x[1] < 0:
        raise ValueError("this chunk fails")
    for i in range(x.shape[0]):
        out[i] = x[i]
