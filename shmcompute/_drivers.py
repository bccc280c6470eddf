"""Compiled driver loops: workers claim chunks with an atomic fetch-add and run the
user's kernel on each, without the GIL and without Python between chunks.

The kernel arrives as a bare address plus its function type (``kref``, a
``TypeRef`` of a ``numba.types.FunctionType``, which costs nothing to pass): each driver
is compiled once per *type signature*, never per kernel, so it is cached on disk and
loads in every worker process in milliseconds. (Typed as a ``Dispatcher`` instead, a
driver would be recompiled for each kernel in each process: the type names the kernel
object, so the disk cache never hits. Passed as a first-class function object, unboxing
it calls back into Python twice, ~3 us, and typing it ~6 us more: more than a small
job's kernel.)

Job control words (int64)::

    J_CLAIM    0, or STOP: stored by whoever stops every driver (an error, a timeout)
    J_DONE     chunks finished (the caller's progress bar reads it)
    J_EXITED   driver tasks that have left
    J_TARGET   the value of J_DONE at which this attempt's work list is done
    J_NTASKS   driver tasks in this attempt
    J_BELL     the caller waits on it; rung when J_DONE reaches J_TARGET (the output is
               complete: the caller returns without waiting for tasks that have not
               even started) and when the last task leaves (a failure: the caller
               waits for every task before it looks at what went wrong)
    J_ATTEMPT  a number unique to this attempt of this job: a task's future that
               resolves after its job has returned counts the task out only if the
               arena still holds that attempt (``left_if``)
    J_TASK+t   chunk that driver task t is running, -1 between chunks: names the chunk
               in an error and tells a crash which chunk it lost
    J_EXIT+t   1 once task t was counted in J_EXITED (by itself, or by the caller when
               its task died): each task is counted exactly once
    J_BLOCK+8t claims made in task t's block of the work list (see ``claim``)
    J_DESC     the job itself (kernel address, sizes, array addresses and shapes), for
               threads that run drivers from compiled code (``_team``)
    J_FLAGS+i  1 once chunk i is written: after a crash, only unflagged chunks re-run

A work list (``order``) of chunk indices lets a re-run cover just the lost chunks; an
empty list means all chunks in order.
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import atomics as at

J_CLAIM = 0
J_DONE = 1
J_EXITED = 2  # driver tasks that have left (the caller waits on it)
J_SCRATCH = 3  # bumped by the caller's spin (it marks "GIL released"; unused here)
J_TARGET = 4
J_NTASKS = 5
J_BELL = 6
J_ATTEMPT = 7  # which attempt of which job holds the arena (see ``left_if``)
J_TASK = 8  # per driver task
MAX_TASKS = 256
J_EXIT = J_TASK + MAX_TASKS  # per driver task: 1 once counted in J_EXITED
J_BLOCK = J_EXIT + MAX_TASKS  # per driver task, a cache line each: claims in its block
BLOCK_STRIDE = 8
J_DESC = J_BLOCK + BLOCK_STRIDE * MAX_TASKS  # the job, for a thread team (_team.describe)
DESC_WORDS = 16
J_ARR = J_DESC + DESC_WORDS  # per array (inputs, then the output): address, then shape
ARR_STRIDE = 8  # so at most 7 dimensions
MAX_ARRAYS = 4
J_FLAGS = J_ARR + ARR_STRIDE * MAX_ARRAYS  # per chunk
STOP = 1 << 40  # stored into J_CLAIM to stop every driver (an error elsewhere)


def ctrl_words(nchunks: int) -> int:
    return J_FLAGS + nchunks


@intrinsic
def kernel_at(typingctx, kref, kaddr):  # type: ignore[no-untyped-def]
    """The compiled kernel at address ``kaddr`` (its C wrapper), as a value of the
    function type ``kref`` names. The caller vouches that the two match (``_jobs.plan``
    takes both from the same compile result)."""
    if not isinstance(kref, types.TypeRef) or not isinstance(kaddr, types.Integer):
        return None
    if not isinstance(kref.instance_type, types.FunctionType):
        return None
    fty = kref.instance_type

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        fn = cgutils.create_struct_proxy(fty)(context, builder)
        voidptr = ir.IntType(8).as_pointer()
        fn.c_addr = builder.inttoptr(args[1], voidptr)
        fn.py_addr = ir.Constant(voidptr, None)  # no Python object behind it
        fn.jit_addr = ir.Constant(voidptr, None)  # call through the C wrapper
        return fn._getvalue()

    return fty(kref, kaddr), codegen


# The caller's bookkeeping, one compiled call each instead of several NumPy operations
# from Python (they keep the GIL: sub-microsecond helpers lose more to a GIL hand-off
# than they save). Plain stores: no driver runs until the job's tasks are published,
# and publishing them (an atomic store, or a lock) orders these stores before it.
@njit(cache=True)
def reset(ctrl, nchunks):  # type: ignore[no-untyped-def]
    """A fresh job: every word zero, no task on a chunk (the block counters are set
    by ``begin_attempt``)."""
    for i in range(J_BLOCK):
        ctrl[i] = 0
    for i in range(J_FLAGS, J_FLAGS + nchunks):
        ctrl[i] = 0
    for t in range(MAX_TASKS):
        ctrl[J_TASK + t] = -1


@njit(cache=True)
def begin_attempt(ctrl, nwork, ntasks, attempt):  # type: ignore[no-untyped-def]
    """Before (re)running a work list of ``nwork`` chunks with ``ntasks`` tasks;
    ``attempt``: a number no other attempt of any job on this arena has."""
    ctrl[J_ATTEMPT] = attempt
    ctrl[J_CLAIM] = 0
    ctrl[J_EXITED] = 0
    ctrl[J_BELL] = 0
    ctrl[J_TARGET] = ctrl[J_DONE] + nwork
    ctrl[J_NTASKS] = ntasks
    for t in range(MAX_TASKS):
        ctrl[J_EXIT + t] = 0
    for t in range(ntasks):
        ctrl[J_BLOCK + BLOCK_STRIDE * t] = 0


@njit(cache=True)
def start(ctrl, nchunks, ntasks, attempt):  # type: ignore[no-untyped-def]
    """``reset`` and the first ``begin_attempt`` (every chunk), in one call: a call into
    compiled code costs ~1 us, and several times that once the caller has been doing
    other work (its caches cold)."""
    reset(ctrl, nchunks)
    begin_attempt(ctrl, nchunks, ntasks, attempt)


# The per-chunk helpers (claim, finished, ring, left) are plain calls, not inlined at
# Numba's IR level: a call per chunk is lost in a chunk's work (measured: 16M elements
# in 1,024-element chunks ran as fast), and IR inlining them made every new driver
# signature, so every new kernel or dtype, compile ~3.5 s longer (4.2 -> 0.7 s).
@njit(nogil=True, cache=True)
def claim(ctrl, t, emptied, nwork):  # type: ignore[no-untyped-def]
    """The next work-list position for driver ``t``, or -1 when none is left (or the
    job was stopped), and the new ``emptied`` (how many blocks this driver has found
    empty; start at 0). The work list is cut into one contiguous block per task: a driver works
    through its own block first, then helps in the next ones. Each block has its own
    counter on its own cache line, so drivers do not all contend for one counter, and
    driver ``t`` of back-to-back jobs over the same arrays starts on the same rows each
    time: where it runs on the same core (the caller is driver 0 on threads; process
    task ``t`` goes to the same idle worker each job), they may still be in its cache.
    A driver that starts late loses its block's front to the others, no more."""
    ntasks = max(1, ctrl[J_NTASKS])
    while emptied < ntasks:
        if at.load(ctrl, J_CLAIM) >= STOP:
            return -1, emptied
        u = t + emptied
        if u >= ntasks:
            u -= ntasks
        j = u * nwork // ntasks + at.add(ctrl, J_BLOCK + BLOCK_STRIDE * u, 1)
        if j < (u + 1) * nwork // ntasks:
            return j, emptied
        emptied += 1
    return -1, emptied


@njit(cache=True)
def exhausted(ctrl, nwork):  # type: ignore[no-untyped-def]
    """Nothing is left to claim (or the job was stopped)."""
    if at.load(ctrl, J_CLAIM) >= STOP:
        return True
    ntasks = max(1, ctrl[J_NTASKS])
    for u in range(ntasks):
        claimed = at.load(ctrl, J_BLOCK + BLOCK_STRIDE * u)
        if u * nwork // ntasks + claimed < (u + 1) * nwork // ntasks:
            return False
    return True


@njit(cache=True)
def leave_if_exhausted(ctrl, t, nwork):  # type: ignore[no-untyped-def]
    """``exhausted``, and if so count task ``t`` out (``left``): a task that starts
    after the others did every chunk leaves at once. One compiled call, one load from
    the cache in a new worker process."""
    if exhausted(ctrl, nwork):
        left(ctrl, t)
        return True
    return False


COMPLETE = 1  # every chunk of the attempt written, and nothing asked the drivers to stop
ALL_LEFT = 2  # every task of the attempt has left


@njit(cache=True)
def status(ctrl):  # type: ignore[no-untyped-def]
    s = 0
    if at.load(ctrl, J_DONE) >= at.load(ctrl, J_TARGET) and at.load(ctrl, J_CLAIM) < STOP:
        s |= COMPLETE
    if at.load(ctrl, J_EXITED) >= at.load(ctrl, J_NTASKS):
        s |= ALL_LEFT
    return s


@njit(nogil=True, cache=True)
def ring(ctrl):  # type: ignore[no-untyped-def]
    at.add(ctrl, J_BELL, 1)
    at.notify(ctrl, J_BELL)


@njit(nogil=True, cache=True)
def finished(ctrl, i):  # type: ignore[no-untyped-def]
    """Chunk ``i`` is written: flag it, count it, and ring when it was the last."""
    at.store(ctrl, J_FLAGS + i, 1)
    if at.add(ctrl, J_DONE, 1) + 1 == at.load(ctrl, J_TARGET):
        ring(ctrl)


# Without nogil: nogil is a property of the entry from Python, so the (nogil) drivers
# calling it are not affected, and called from Python (a process task on its way out, a
# caller counting out a crashed task) it keeps the GIL, as a helper this short should.
@njit(cache=True)
def left(ctrl, t):  # type: ignore[no-untyped-def]
    """Count driver ``t`` out, once, and ring when it was the last. A process task
    counts itself out the same way however it ends (``run_task``), and the caller
    counts out the tasks whose futures resolved when a job failed (a worker that died
    counted nothing): whoever comes first, through the exchange, counts it."""
    if at.exchange(ctrl, J_EXIT + t, 1) == 0:
        if at.add(ctrl, J_EXITED, 1) + 1 >= at.load(ctrl, J_NTASKS):
            ring(ctrl)


@njit(cache=True)
def left_if(ctrl, t, attempt):  # type: ignore[no-untyped-def]
    """``left(ctrl, t)`` if the arena still holds ``attempt``: for a task's future
    resolving after its job returned, when the arena may be another job's by now. It
    keeps the GIL, and only Python code in this process starts an attempt on an arena,
    so the arena cannot change hands between the check and the count."""
    if ctrl[J_ATTEMPT] == attempt:
        left(ctrl, t)


# One driver per (kind, number of inputs); Numba needs fixed arity. They are written out
# rather than generated: generated source has no file, and so no disk cache.
def map1(kref, kaddr, ctrl, t, order, a, out, n, chunk, nchunks):  # type: ignore[no-untyped-def]
    kernel = kernel_at(kref, kaddr)
    nwork = order.shape[0] if order.shape[0] > 0 else nchunks
    emptied = 0
    while True:
        j, emptied = claim(ctrl, t, emptied, nwork)
        if j < 0:
            break
        i = order[j] if order.shape[0] > 0 else j
        at.store(ctrl, J_TASK + t, i)
        lo = i * chunk
        hi = min(lo + chunk, n)
        kernel(a[lo:hi], out[lo:hi])
        finished(ctrl, i)
    at.store(ctrl, J_TASK + t, -1)
    left(ctrl, t)
    return 0


def map2(kref, kaddr, ctrl, t, order, a, b, out, n, chunk, nchunks):  # type: ignore[no-untyped-def]
    kernel = kernel_at(kref, kaddr)
    nwork = order.shape[0] if order.shape[0] > 0 else nchunks
    emptied = 0
    while True:
        j, emptied = claim(ctrl, t, emptied, nwork)
        if j < 0:
            break
        i = order[j] if order.shape[0] > 0 else j
        at.store(ctrl, J_TASK + t, i)
        lo = i * chunk
        hi = min(lo + chunk, n)
        kernel(a[lo:hi], b[lo:hi], out[lo:hi])
        finished(ctrl, i)
    at.store(ctrl, J_TASK + t, -1)
    left(ctrl, t)
    return 0


def map3(kref, kaddr, ctrl, t, order, a, b, c, out, n, chunk, nchunks):  # type: ignore[no-untyped-def]
    kernel = kernel_at(kref, kaddr)
    nwork = order.shape[0] if order.shape[0] > 0 else nchunks
    emptied = 0
    while True:
        j, emptied = claim(ctrl, t, emptied, nwork)
        if j < 0:
            break
        i = order[j] if order.shape[0] > 0 else j
        at.store(ctrl, J_TASK + t, i)
        lo = i * chunk
        hi = min(lo + chunk, n)
        kernel(a[lo:hi], b[lo:hi], c[lo:hi], out[lo:hi])
        finished(ctrl, i)
    at.store(ctrl, J_TASK + t, -1)
    left(ctrl, t)
    return 0


def halo1(kref, kaddr, ctrl, t, order, a, out, n, chunk, nchunks, k):  # type: ignore[no-untyped-def]
    kernel = kernel_at(kref, kaddr)
    nwork = order.shape[0] if order.shape[0] > 0 else nchunks
    emptied = 0
    while True:
        j, emptied = claim(ctrl, t, emptied, nwork)
        if j < 0:
            break
        i = order[j] if order.shape[0] > 0 else j
        at.store(ctrl, J_TASK + t, i)
        lo = i * chunk
        hi = min(lo + chunk, n)
        s = max(lo - k, 0)
        kernel(a[s : min(hi + k, n)], out[lo:hi], lo - s)
        finished(ctrl, i)
    at.store(ctrl, J_TASK + t, -1)
    left(ctrl, t)
    return 0


def halo2(kref, kaddr, ctrl, t, order, a, b, out, n, chunk, nchunks, k):  # type: ignore[no-untyped-def]
    kernel = kernel_at(kref, kaddr)
    nwork = order.shape[0] if order.shape[0] > 0 else nchunks
    emptied = 0
    while True:
        j, emptied = claim(ctrl, t, emptied, nwork)
        if j < 0:
            break
        i = order[j] if order.shape[0] > 0 else j
        at.store(ctrl, J_TASK + t, i)
        lo = i * chunk
        hi = min(lo + chunk, n)
        s = max(lo - k, 0)
        e = min(hi + k, n)
        kernel(a[s:e], b[s:e], out[lo:hi], lo - s)
        finished(ctrl, i)
    at.store(ctrl, J_TASK + t, -1)
    left(ctrl, t)
    return 0


def reduce1(kref, kaddr, ctrl, t, order, a, parts, n, chunk, nchunks):  # type: ignore[no-untyped-def]
    kernel = kernel_at(kref, kaddr)
    nwork = order.shape[0] if order.shape[0] > 0 else nchunks
    emptied = 0
    while True:
        j, emptied = claim(ctrl, t, emptied, nwork)
        if j < 0:
            break
        i = order[j] if order.shape[0] > 0 else j
        at.store(ctrl, J_TASK + t, i)
        lo = i * chunk
        hi = min(lo + chunk, n)
        r = kernel(a[lo:hi])
        if at.load(ctrl, J_CLAIM) >= STOP:
            break  # (the kernel raised, and its hook stopped the job: r is no partial)
        parts[i] = r
        finished(ctrl, i)
    at.store(ctrl, J_TASK + t, -1)
    left(ctrl, t)
    return 0


def reduce2(kref, kaddr, ctrl, t, order, a, b, parts, n, chunk, nchunks):  # type: ignore[no-untyped-def]
    kernel = kernel_at(kref, kaddr)
    nwork = order.shape[0] if order.shape[0] > 0 else nchunks
    emptied = 0
    while True:
        j, emptied = claim(ctrl, t, emptied, nwork)
        if j < 0:
            break
        i = order[j] if order.shape[0] > 0 else j
        at.store(ctrl, J_TASK + t, i)
        lo = i * chunk
        hi = min(lo + chunk, n)
        r = kernel(a[lo:hi], b[lo:hi])
        if at.load(ctrl, J_CLAIM) >= STOP:
            break  # (the kernel raised, and its hook stopped the job: r is no partial)
        parts[i] = r
        finished(ctrl, i)
    at.store(ctrl, J_TASK + t, -1)
    left(ctrl, t)
    return 0


def reduce3(kref, kaddr, ctrl, t, order, a, b, c, parts, n, chunk, nchunks):  # type: ignore[no-untyped-def]
    kernel = kernel_at(kref, kaddr)
    nwork = order.shape[0] if order.shape[0] > 0 else nchunks
    emptied = 0
    while True:
        j, emptied = claim(ctrl, t, emptied, nwork)
        if j < 0:
            break
        i = order[j] if order.shape[0] > 0 else j
        at.store(ctrl, J_TASK + t, i)
        lo = i * chunk
        hi = min(lo + chunk, n)
        r = kernel(a[lo:hi], b[lo:hi], c[lo:hi])
        if at.load(ctrl, J_CLAIM) >= STOP:
            break  # (the kernel raised, and its hook stopped the job: r is no partial)
        parts[i] = r
        finished(ctrl, i)
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

# One dispatcher per driver, shared by ``driver`` (the caller's and the process workers'
# entry points) and the thread team's loops (``_team``), which call these same objects:
# a signature compiled for one is found by the other rather than compiled again.
DRIVERS: dict[tuple[str, int], Any] = {
    key: njit(nogil=True, cache=True)(fn) for key, fn in PY_DRIVERS.items()
}

_compiled: dict[tuple[Any, ...], Any] = {}


def driver(kind: str, arity: int, signature: tuple[Any, ...]) -> Any:
    """The driver for ``kind``/``arity`` compiled for exactly ``signature`` (loaded from
    the disk cache after the first time on this machine), as its compiled entry point:
    called directly, it skips the dispatcher's typing of nine arguments (~1 us). The
    caller must pass arguments of exactly these types (``_jobs.plan`` keys on them)."""
    key = (kind, arity, signature)
    hit = _compiled.get(key)
    if hit is None:
        # (The dispatcher keeps the overload, and so the code the entry point runs.)
        hit = _compiled[key] = DRIVERS[kind, arity].compile(signature)
    return hit
