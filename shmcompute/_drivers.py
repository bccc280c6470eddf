"""Compiled driver loops: workers claim chunks with an atomic fetch-add and run the
user's kernel on each, without the GIL and without Python between chunks.

The kernel arrives as a first-class function (``numba.types.FunctionType``): each
driver is compiled once per *type signature*, never per kernel, so it is cached on disk
and loads in every worker process in milliseconds. (Typed as a ``Dispatcher`` instead, a
driver would be recompiled for each kernel in each process: the type names the kernel
object, so the disk cache never hits.)

Job control words (int64)::

    J_CLAIM    next position in the work list (fetch-add by every driver)
    J_DONE     chunks finished (the caller's progress bar reads it)
    J_EXITED   driver tasks that have left; the last one wakes the caller (notify)
    J_TASK+t   chunk that driver task t is running, -1 between chunks: names the chunk
               in an error and tells a crash which chunk it lost
    J_EXIT+t   1 once task t was counted in J_EXITED (by itself, or by the caller when
               its task died): each task is counted exactly once
    J_FLAGS+i  1 once chunk i is written: after a crash, only unflagged chunks re-run

A work list (``order``) of chunk indices lets a re-run cover just the lost chunks; an
empty list means all chunks in order.
"""

from __future__ import annotations

from typing import Any

from numba import njit

from . import atomics as at

J_CLAIM = 0
J_DONE = 1
J_EXITED = 2  # driver tasks that have left (the caller waits on it)
J_SCRATCH = 3  # bumped by the caller's spin (it marks "GIL released"; unused here)
J_TASK = 8  # per driver task
MAX_TASKS = 256
J_EXIT = J_TASK + MAX_TASKS  # per driver task: 1 once counted in J_EXITED
J_FLAGS = J_EXIT + MAX_TASKS  # per chunk
STOP = 1 << 40  # stored into J_CLAIM to stop every driver (an error elsewhere)


def ctrl_words(nchunks: int) -> int:
    return J_FLAGS + nchunks


@njit(nogil=True, cache=True, inline="always")
def left(ctrl, t):  # type: ignore[no-untyped-def]
    """Count driver ``t`` out, once, and wake the caller when it was the last. The
    caller counts a task out the same way when its future fails (a crash): whoever
    comes first, through the exchange, counts it."""
    if at.exchange(ctrl, J_EXIT + t, 1) == 0:
        at.add(ctrl, J_EXITED, 1)
        at.notify(ctrl, J_EXITED)


# One driver per (kind, number of inputs); Numba needs fixed arity. They are written out
# rather than generated: generated source has no file, and so no disk cache.
def map1(kernel, ctrl, t, order, a, out, n, chunk, nchunks):  # type: ignore[no-untyped-def]
    nwork = order.shape[0] if order.shape[0] > 0 else nchunks
    while True:
        j = at.add(ctrl, J_CLAIM, 1)
        if j >= nwork:
            break
        i = order[j] if order.shape[0] > 0 else j
        at.store(ctrl, J_TASK + t, i)
        lo = i * chunk
        hi = min(lo + chunk, n)
        kernel(a[lo:hi], out[lo:hi])
        at.store(ctrl, J_FLAGS + i, 1)
        at.add(ctrl, J_DONE, 1)
    at.store(ctrl, J_TASK + t, -1)
    left(ctrl, t)
    return 0


def map2(kernel, ctrl, t, order, a, b, out, n, chunk, nchunks):  # type: ignore[no-untyped-def]
    nwork = order.shape[0] if order.shape[0] > 0 else nchunks
    while True:
        j = at.add(ctrl, J_CLAIM, 1)
        if j >= nwork:
            break
        i = order[j] if order.shape[0] > 0 else j
        at.store(ctrl, J_TASK + t, i)
        lo = i * chunk
        hi = min(lo + chunk, n)
        kernel(a[lo:hi], b[lo:hi], out[lo:hi])
        at.store(ctrl, J_FLAGS + i, 1)
        at.add(ctrl, J_DONE, 1)
    at.store(ctrl, J_TASK + t, -1)
    left(ctrl, t)
    return 0


def map3(kernel, ctrl, t, order, a, b, c, out, n, chunk, nchunks):  # type: ignore[no-untyped-def]
    nwork = order.shape[0] if order.shape[0] > 0 else nchunks
    while True:
        j = at.add(ctrl, J_CLAIM, 1)
        if j >= nwork:
            break
        i = order[j] if order.shape[0] > 0 else j
        at.store(ctrl, J_TASK + t, i)
        lo = i * chunk
        hi = min(lo + chunk, n)
        kernel(a[lo:hi], b[lo:hi], c[lo:hi], out[lo:hi])
        at.store(ctrl, J_FLAGS + i, 1)
        at.add(ctrl, J_DONE, 1)
    at.store(ctrl, J_TASK + t, -1)
    left(ctrl, t)
    return 0


def halo1(kernel, ctrl, t, order, a, out, n, chunk, nchunks, k):  # type: ignore[no-untyped-def]
    nwork = order.shape[0] if order.shape[0] > 0 else nchunks
    while True:
        j = at.add(ctrl, J_CLAIM, 1)
        if j >= nwork:
            break
        i = order[j] if order.shape[0] > 0 else j
        at.store(ctrl, J_TASK + t, i)
        lo = i * chunk
        hi = min(lo + chunk, n)
        s = max(lo - k, 0)
        kernel(a[s : min(hi + k, n)], out[lo:hi], lo - s)
        at.store(ctrl, J_FLAGS + i, 1)
        at.add(ctrl, J_DONE, 1)
    at.store(ctrl, J_TASK + t, -1)
    left(ctrl, t)
    return 0


def halo2(kernel, ctrl, t, order, a, b, out, n, chunk, nchunks, k):  # type: ignore[no-untyped-def]
    nwork = order.shape[0] if order.shape[0] > 0 else nchunks
    while True:
        j = at.add(ctrl, J_CLAIM, 1)
        if j >= nwork:
            break
        i = order[j] if order.shape[0] > 0 else j
        at.store(ctrl, J_TASK + t, i)
        lo = i * chunk
        hi = min(lo + chunk, n)
        s = max(lo - k, 0)
        e = min(hi + k, n)
        kernel(a[s:e], b[s:e], out[lo:hi], lo - s)
        at.store(ctrl, J_FLAGS + i, 1)
        at.add(ctrl, J_DONE, 1)
    at.store(ctrl, J_TASK + t, -1)
    left(ctrl, t)
    return 0


def reduce1(kernel, ctrl, t, order, a, parts, n, chunk, nchunks):  # type: ignore[no-untyped-def]
    nwork = order.shape[0] if order.shape[0] > 0 else nchunks
    while True:
        j = at.add(ctrl, J_CLAIM, 1)
        if j >= nwork:
            break
        i = order[j] if order.shape[0] > 0 else j
        at.store(ctrl, J_TASK + t, i)
        lo = i * chunk
        hi = min(lo + chunk, n)
        parts[i] = kernel(a[lo:hi])
        at.store(ctrl, J_FLAGS + i, 1)
        at.add(ctrl, J_DONE, 1)
    at.store(ctrl, J_TASK + t, -1)
    left(ctrl, t)
    return 0


def reduce2(kernel, ctrl, t, order, a, b, parts, n, chunk, nchunks):  # type: ignore[no-untyped-def]
    nwork = order.shape[0] if order.shape[0] > 0 else nchunks
    while True:
        j = at.add(ctrl, J_CLAIM, 1)
        if j >= nwork:
            break
        i = order[j] if order.shape[0] > 0 else j
        at.store(ctrl, J_TASK + t, i)
        lo = i * chunk
        hi = min(lo + chunk, n)
        parts[i] = kernel(a[lo:hi], b[lo:hi])
        at.store(ctrl, J_FLAGS + i, 1)
        at.add(ctrl, J_DONE, 1)
    at.store(ctrl, J_TASK + t, -1)
    left(ctrl, t)
    return 0


def reduce3(kernel, ctrl, t, order, a, b, c, parts, n, chunk, nchunks):  # type: ignore[no-untyped-def]
    nwork = order.shape[0] if order.shape[0] > 0 else nchunks
    while True:
        j = at.add(ctrl, J_CLAIM, 1)
        if j >= nwork:
            break
        i = order[j] if order.shape[0] > 0 else j
        at.store(ctrl, J_TASK + t, i)
        lo = i * chunk
        hi = min(lo + chunk, n)
        parts[i] = kernel(a[lo:hi], b[lo:hi], c[lo:hi])
        at.store(ctrl, J_FLAGS + i, 1)
        at.add(ctrl, J_DONE, 1)
    at.store(ctrl, J_TASK + t, -1)
    left(ctrl, t)
    return 0


PY_DRIVERS: dict[tuple[str, int], Any] = {
    ("map", 1): map1,
    ("map", 2): map2,
    ("map", 3): map3,
    ("halo", 1): halo1,
    ("halo", 2): halo2,
    ("reduce", 1): reduce1,
    ("reduce", 2): reduce2,
    ("reduce", 3): reduce3,
}
MAX_INPUTS = {"map": 3, "halo": 2, "reduce": 3}

_compiled: dict[tuple[Any, ...], Any] = {}


def driver(kind: str, arity: int, signature: tuple[Any, ...]) -> Any:
    """The driver for ``kind``/``arity`` compiled for exactly ``signature`` (loaded from
    the disk cache after the first time on this machine). A dispatcher with an explicit
    signature never compiles another one, so a kernel passed to it is unboxed as the
    signature's function type (a function pointer)."""
    key = (kind, arity, signature)
    d = _compiled.get(key)
    if d is None:
        d = _compiled[key] = njit(signature, nogil=True, cache=True)(PY_DRIVERS[kind, arity])
    return d
