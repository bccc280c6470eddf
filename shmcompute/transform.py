"""Parallel array transforms and reductions with nogil Numba kernels.

::

    shc.transform(kernel, *inputs, out=None, pool=None, chunk_size=None, mode="share")

        caller                          each of up to N pool workers (threads or processes)
        ------                          -----------------------------------------------
        check arguments, compile the    attach inputs/out by handle (process, cached)
        kernel for the chunk types      compiled driver loop, no GIL, no Python per chunk:
        (driver + kernel: disk cache)     i = atomic add(J_CLAIM, 1); stop if i >= chunks
        submit one driver task per        kernel(in[lo:hi], ..., out[lo:hi])
        worker, wait for them             flag chunk i done; J_DONE += 1
        re-run chunks a crash lost

``kernel(*input_chunks, out_chunk)`` writes its output chunk; chunks are slices along
axis 0 (rows of an image, elements of a vector). With ``overlap=k`` the kernel gets each
input chunk with up to ``k`` extra rows on both sides, plus the index of its first own
row: ``kernel(*input_chunks, out_chunk, start)``. ``reduce`` calls ``kernel(*chunks)``
for a partial per chunk and folds partials in chunk order with ``combine``, so the
result depends on ``chunk_size`` but never on worker count or scheduling.

Default ``chunk_size``: about 16 chunks per worker, each at least 64 KiB and, past
that, at most 1 MiB::

    rows = clamp(ceil(rows / (16 * workers)), 64 KiB / row, 1 MiB / row), >= 8 * overlap

Many small chunks keep the workers finishing together: each claims the next chunk when
it is done, so a worker that started late or runs slower (a busy core, a cold cache)
costs at most one chunk's time, ~0.1 ms at 1 MiB, not a quarter of its share (measured:
16M float64 ``y = 2.5x + 1`` on 2 cores went from 0.90 to 0.95 of ``prange``'s speed on
processes). The floor keeps a chunk's fixed cost (an atomic add, ~100 ns) far below its
work, and makes a small array one chunk, run by one worker. With ``overlap`` a chunk is
at least 8 halos long, so re-read halo rows stay under a quarter of the reads.

Modes, kept side by side for comparison (identical results):

* ``share``: workers attach inputs and output by handle; nothing is copied. Plain NumPy
  inputs on the process backend are first copied into shared memory once (pass
  SharedArrays to avoid it).
* ``copy``: each chunk is pickled to a worker and its result pickled back, as
  ``multiprocessing.Pool.map`` does: cost grows with the data.
* ``transfer``: like ``postMessage(..., transferList)``: the caller's SharedArrays are
  detached (using them raises ``DetachedError``), the job owns and then frees the inputs,
  and the result comes back as a new SharedArray the caller owns. O(1).

Kernels travel to process workers by reference (module and name) and load from Numba's
disk cache (``cache=True``); a kernel defined in a notebook or ``python -c`` has no
importable name and is shipped by value, so each worker process compiles it on its first
job (~0.1-0.5 s once per worker).
"""

from __future__ import annotations

import atexit
import functools
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from . import _drivers as D
from . import atomics as at
from ._jobs import (
    NO_ORDER,
    Job,
    check_kernel,
    drive,
    kernel_name,
    kernel_ref,
    kernel_rt,
    pack,
    plan,
    run_task,
)
from .array import SharedArray
from .errors import ArgumentError, ArgumentTypeError, TransformError, WorkerCrashedError
from .modes import MODES, Progress, run_copy, take_ownership
from .pool import Pool, _spin, pool_size
from .pool.sizing import usable_cores

__all__ = ["default_pool", "reduce", "transform"]

_MIN_CHUNK_BYTES = 64 * 1024
_MAX_CHUNK_BYTES = 1024 * 1024
_CHUNKS_PER_WORKER = 16
_HALOS_PER_CHUNK = 8
_MAX_CHUNKS = 1 << 16


# --- the default pool ------------------------------------------------------------------
_default: Pool | None = None
_default_lock = threading.Lock()


def default_pool() -> Pool:
    """The pool ``transform``/``reduce`` use when given none: threads, one per usable
    core (the caller only waits), created on first use and shut down at exit."""
    global _default
    with _default_lock:
        if _default is None or _default._state != "running":
            _default = Pool(
                pool_size("cpu", reserve=0),
                backend="thread",
                thread_name_prefix="shmcompute-default",
            )
            atexit.register(_default.shutdown)
        return _default


# --- argument checks -----------------------------------------------------------------------------
def _as_array(x: Any, what: str) -> np.ndarray:
    if isinstance(x, SharedArray):
        return x.array
    if isinstance(x, np.ndarray):
        return x
    raise ArgumentTypeError(
        f"{what} must be a NumPy array or a SharedArray, got {type(x).__name__}"
    )


def _check_inputs(inputs: Sequence[Any]) -> list[np.ndarray]:
    if not inputs:
        raise ArgumentError("transform needs at least one input array")
    arrays = [_as_array(x, f"input {i}") for i, x in enumerate(inputs)]
    n = arrays[0].shape[0] if arrays[0].ndim else None
    for i, a in enumerate(arrays):
        if a.ndim == 0:
            raise ArgumentError(f"input {i} is 0-d; chunks are taken along axis 0")
        if a.dtype.hasobject:
            raise ArgumentTypeError(f"input {i} has dtype {a.dtype}; kernels need numbers")
        if not a.flags.c_contiguous:
            raise ArgumentError(
                f"input {i} is not C-contiguous (strides {a.strides}); pass "
                "np.ascontiguousarray(x) or a SharedArray"
            )
        if a.shape[0] != n:
            raise ArgumentError(
                f"inputs differ in length along axis 0: input 0 has {n} rows, input {i} "
                f"has {a.shape[0]}"
            )
    return arrays


def _check_out(out: np.ndarray, n: int) -> None:
    if out.ndim == 0 or out.shape[0] != n:
        raise ArgumentError(
            f"out has {out.shape[0] if out.ndim else 0} rows along axis 0 but the inputs "
            f"have {n}; make out as long as the inputs"
        )
    if not out.flags.c_contiguous:
        raise ArgumentError(f"out is not C-contiguous (strides {out.strides})")
    if not out.flags.writeable:
        raise ArgumentError("out is read-only; the kernel writes into it")


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ArgumentError(f"{name} must be >= {lo}, got {value}")
    return int(value)


def default_chunk_size(n: int, row_bytes: int, workers: int, overlap: int = 0) -> int:
    """Rows per chunk when ``chunk_size`` is not given (see the module docstring)."""
    row_bytes = max(1, row_bytes)
    by_workers = math.ceil(n / (_CHUNKS_PER_WORKER * max(1, workers))) if n else 1
    floor = math.ceil(_MIN_CHUNK_BYTES / row_bytes)
    cap = max(floor, _MAX_CHUNK_BYTES // row_bytes)
    return max(1, floor, min(by_workers, cap), _HALOS_PER_CHUNK * overlap)


# --- the public functions -----------------------------------------------------------------------
def transform(
    kernel: Any,
    *inputs: Any,
    out: Any = None,
    pool: Pool | None = None,
    chunk_size: int | None = None,
    mode: str = "share",
    overlap: int = 0,
    dtype: Any = None,
    progress: bool = False,
    retries: int = 1,
    timeout: float | None = None,
) -> Any:
    """Apply ``kernel(*input_chunks, out_chunk)`` over chunks along axis 0, in parallel.

    Args:
        kernel: an ``@numba.njit(nogil=True, cache=True)`` function that writes its
            output chunk and returns nothing (with ``overlap``: also takes ``start``).
        inputs: 1 to 3 arrays (NumPy or SharedArray) of equal length along axis 0.
        out: where to write (may be one of the inputs: in place). None: a new
            SharedArray shaped like the first input (``dtype`` to change its type).
        pool: a ``shmcompute.Pool`` (thread or process); default ``default_pool()``.
        chunk_size: rows per chunk; default see the module docstring.
        mode: "share", "copy" or "transfer" (see the module docstring).
        overlap: rows of halo on each side of every input chunk (neighbour kernels).
        progress: show a progress bar (tqdm if installed) fed from the chunk counter.
        retries: times chunks lost to a crashed worker are re-run (0: raise).
        timeout: seconds for the whole job; past it ``TimeoutError``.

    Returns:
        ``out`` (a SharedArray when it was None, or in transfer mode).

    Raises:
        ArgumentError / ArgumentTypeError: bad arguments, before any work starts.
        TransformError: the kernel does not compile, or raised (names the chunk).
        WorkerCrashedError: a worker died and ``retries`` ran out; the output is not
            returned, so it is never silently partial.
    """
    kind = "halo" if overlap else "map"
    return _run(
        kind,
        kernel,
        inputs,
        out=out,
        pool=pool,
        chunk_size=chunk_size,
        mode=mode,
        overlap=overlap,
        dtype=dtype,
        progress=progress,
        retries=retries,
        timeout=timeout,
        combine=None,
        identity=None,
    )


def reduce(
    kernel: Any,
    *inputs: Any,
    combine: Callable[[Any, Any], Any],
    identity: Any = None,
    pool: Pool | None = None,
    chunk_size: int | None = None,
    mode: str = "share",
    progress: bool = False,
    retries: int = 1,
    timeout: float | None = None,
) -> Any:
    """Reduce in parallel: ``kernel(*input_chunks)`` returns each chunk's partial (a
    number or an array); partials are folded in chunk order, ``combine(acc, partial)``
    starting from ``identity`` (or from the first partial when it is None).

    The order is fixed, so the result is the same for any worker count and scheduling
    (for a given ``chunk_size``), floating-point sums included.

    >>> total = shc.reduce(chunk_sum, x, combine=operator.add, identity=0.0)
    """
    if not callable(combine):
        raise ArgumentTypeError("combine must be callable, e.g. operator.add or np.maximum")
    return _run(
        "reduce",
        kernel,
        inputs,
        out=None,
        pool=pool,
        chunk_size=chunk_size,
        mode=mode,
        overlap=0,
        dtype=None,
        progress=progress,
        retries=retries,
        timeout=timeout,
        combine=combine,
        identity=identity,
    )


class _Arena:
    """A job's control words (and work list), reused across jobs of one pool: making a
    segment per call would cost ~300 us, more than a small job itself."""

    def __init__(self, process: bool, words: int) -> None:
        self.process = process
        self.shared = SharedArray.create(words, np.int64) if process else None
        self.words = self.shared.array if self.shared is not None else np.zeros(words, np.int64)

    def close(self) -> None:
        if self.shared is not None:
            self.shared.unlink()
            self.shared.close()


_ARENAS = 2  # made together, on a pool's first job
_ARENA_WAIT = 0.05  # seconds to wait for a busy arena before making one more
_ARENA_WORDS = D.ctrl_words(4096)  # the usual size: jobs of up to 4096 chunks


def _arena(pool: Pool, words: int) -> _Arena:
    """A free arena of at least ``words``. An arena stays busy until every task of its
    job has resolved (see ``_release_after``), which can be after the job returned: a
    task that woke after the others had done every chunk still has to leave. So a pool
    gets two arenas at once, back-to-back jobs alternate between them without waiting,
    and a third job at the same time waits a little for one to come back (microseconds,
    usually) before it makes another. The pool frees them when it closes."""
    with pool._lock:
        state = pool.__dict__.get("_arena_state")
        if state is None:
            cond = threading.Condition(pool._lock)
            state = pool.__dict__["_arena_state"] = {"free": [], "busy": 0, "cond": cond}
        deadline = None
        while True:
            for i, a in enumerate(state["free"]):
                if a.words.shape[0] >= words:
                    state["busy"] += 1
                    return state["free"].pop(i)  # type: ignore[no-any-return]
            now = time.monotonic()
            deadline = now + _ARENA_WAIT if deadline is None else deadline
            if (
                state["busy"] + len(state["free"]) < _ARENAS
                or now >= deadline
                or words > _ARENA_WORDS  # a busy arena of the usual size would not do
            ):
                break
            state["cond"].wait(deadline - now)
        state["busy"] += 1
        spare = state["busy"] + len(state["free"]) < _ARENAS
    size = max(words, _ARENA_WORDS)
    arena = _Arena(pool.backend == "process", size)
    pool._on_close(arena.close)
    if spare:
        extra = _Arena(pool.backend == "process", size)
        pool._on_close(extra.close)
        _release(pool, extra, busy=False)
    return arena


def _release(pool: Pool, arena: _Arena, busy: bool = True) -> None:
    with pool._lock:
        state = pool.__dict__["_arena_state"]
        state["free"].append(arena)
        state["busy"] -= busy
        state["cond"].notify()


def _run(
    kind: str,
    kernel: Any,
    inputs: Sequence[Any],
    *,
    out: Any,
    pool: Pool | None,
    chunk_size: int | None,
    mode: str,
    overlap: int,
    dtype: Any,
    progress: bool,
    retries: int,
    timeout: float | None,
    combine: Any,
    identity: Any,
) -> Any:
    # --- every check before any work -----------------------------------------------------
    check_kernel(kernel)
    if mode not in MODES:
        raise ArgumentError(f"mode must be one of {MODES}, got {mode!r}")
    if pool is not None and not isinstance(pool, Pool):
        raise ArgumentTypeError(f"pool must be a shmcompute Pool, got {type(pool).__name__}")
    arrays = _check_inputs(inputs)
    if len(arrays) > D.MAX_INPUTS[kind]:
        raise ArgumentError(
            f"{kind} kernels take at most {D.MAX_INPUTS[kind]} inputs, got {len(arrays)}; "
            "stack related inputs into one array (np.stack) or fuse steps"
        )
    overlap = _check_int("overlap", overlap, 0)
    retries = _check_int("retries", retries, 0)
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ArgumentError(f"timeout must be > 0 seconds or None, got {timeout!r}")
    n = arrays[0].shape[0]
    pool = pool if pool is not None else default_pool()
    if pool._state != "running":
        raise RuntimeError("the pool was shut down; pass a running pool")
    process = pool.backend == "process"
    workers = pool.max_workers
    row_bytes = max(a.strides[0] if a.ndim else a.itemsize for a in arrays) or 1
    if chunk_size is None:
        chunk = default_chunk_size(n, row_bytes, workers, overlap)
    else:
        chunk = _check_int("chunk_size", chunk_size, 1)
    nchunks = math.ceil(n / chunk) if n else 0
    if nchunks > _MAX_CHUNKS:
        raise ArgumentError(
            f"chunk_size={chunk} makes {nchunks} chunks (at most {_MAX_CHUNKS}); use larger chunks"
        )
    if overlap and overlap >= chunk and nchunks > 1:
        raise ArgumentError(f"overlap ({overlap}) must be smaller than chunk_size ({chunk})")

    if kind != "reduce":
        if out is None:
            shape = arrays[0].shape
            out_arr: Any
            out_sa = SharedArray.create(shape, dtype if dtype is not None else arrays[0].dtype)
            out_arr, returned = out_sa.array, out_sa
        else:
            out_arr = _as_array(out, "out")
            _check_out(out_arr, n)
            returned = out
    else:
        out_arr, returned = None, None

    # --- transfer: the caller's handles are detached; the job owns the arrays now ----------
    owned: list[SharedArray] = []
    if mode == "transfer":
        inputs, out, returned = take_ownership(inputs, out, returned)
        owned = [x for x in (*inputs, out) if isinstance(x, SharedArray)]
        arrays = [x.array for x in inputs]
        if kind != "reduce":
            out_arr = returned.array
    try:
        rt = kernel_rt(kind, kernel, arrays, out_arr)
        if nchunks == 0:
            return returned if kind != "reduce" else _fold([], combine, identity)
        if mode == "copy":
            result = run_copy(
                kind, kernel, pool, arrays, out_arr, n, chunk, nchunks, overlap, progress, timeout
            )
        else:
            result = _run_shared(
                kind,
                kernel,
                rt,
                pool,
                process,
                arrays,
                out_arr,
                n,
                chunk,
                nchunks,
                overlap,
                progress,
                retries,
                timeout,
                in_objs=inputs,
                out_obj=returned,
                one_shot=mode == "transfer",
            )
        if kind == "reduce":
            return _fold(result, combine, identity)
        return returned
    except BaseException:
        if out is None and isinstance(returned, SharedArray) and mode != "transfer":
            returned.unlink()
            returned.close()
        raise
    finally:
        for sa in owned:  # consumed inputs are freed; the output goes back to the caller
            if sa is not returned:
                sa.unlink()
                sa.close()


def _fold(partials: Sequence[Any], combine: Any, identity: Any) -> Any:
    acc = identity
    for i, p in enumerate(partials):
        acc = p if (acc is None and i == 0) else combine(acc, p)
    return acc


def _release_after(pool: Pool, arena: _Arena, futures: list[Any]) -> None:
    pending = [f for f in futures if not f.done()]
    if not pending:
        _release(pool, arena)
        return
    left = [len(pending)]
    lock = threading.Lock()

    def one_done(_: Any) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            _release(pool, arena)

    for f in pending:
        f.add_done_callback(one_done)


def _count_out(ctrl: np.ndarray, t: int, future: Any) -> None:
    """A driver task's future resolved: count the task out if its driver did not (it
    died, failed before its loop, or found the job done); see ``_drivers.left``."""
    D.left(ctrl, t)


_SPIN_NS = 100_000  # a short job ends within this: catch it spinning, without sleeping
_CORES = usable_cores()


def _complete(ctrl: np.ndarray) -> bool:
    """Every chunk of this attempt is written and nothing asked the drivers to stop."""
    return bool(D.status(ctrl) & D.COMPLETE)


def _all_left(ctrl: np.ndarray) -> bool:
    return bool(D.status(ctrl) & D.ALL_LEFT)


def _either(ctrl: np.ndarray) -> bool:
    return bool(D.status(ctrl))


def _wait_bell(
    ctrl: np.ndarray,
    until: Callable[[np.ndarray], bool],
    deadline: float | None,
    bar: Any,
    spin_on: Pool | None = None,
) -> None:
    """Wait until ``until(ctrl)``. Everything that can make it true rings J_BELL (the
    last chunk written, the last task gone), so checking after reading the bell and then
    waiting for the bell to change misses nothing. With ``spin_on`` (the job's pool),
    spin briefly first."""
    if spin_on is not None:
        # Spin first (without the GIL): the wake-up of a sleeping caller costs tens of
        # microseconds, more than a small job. Results that arrive meanwhile are ours
        # to collect (see _wait_all); only for the spin, though: while this thread
        # sleeps, the collector must run, or a task queued behind an uncollected result
        # would wait for the whole job.
        with spin_on._collecting():
            _spin.spin_until_at_least(ctrl, D.J_BELL, 1, _SPIN_NS, D.J_SCRATCH)
    while True:
        seen = int(at.load(ctrl, D.J_BELL))
        if until(ctrl):
            return
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            at.store(ctrl, D.J_CLAIM, D.STOP)
            raise TimeoutError("transform: the job did not finish within its timeout")
        step = 60.0 if left is None else left
        at.wait(ctrl, D.J_BELL, seen, min(step, 0.1) if bar is not None else step)
        if bar is not None:
            bar.update_to(int(at.load(ctrl, D.J_DONE)))


def _wait_all(
    futures: list[Any], deadline: float | None, ctrl: np.ndarray | None, bar: Any
) -> list[BaseException | None]:
    errors: list[BaseException | None] = []
    for f in futures:
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                if ctrl is not None:
                    at.store(ctrl, D.J_CLAIM, D.STOP)
                raise TimeoutError("transform: the job did not finish within its timeout")
            step = left if bar is None else min(0.1, left if left is not None else 0.1)
            try:
                errors.append(f.exception(step))
                break
            except TimeoutError:
                if bar is not None and ctrl is not None:
                    bar.update_to(int(at.load(ctrl, D.J_DONE)))
    return errors


def _run_shared(
    kind: str,
    kernel: Any,
    rt: Any,
    pool: Pool,
    process: bool,
    arrays: list[np.ndarray],
    out_arr: Any,
    n: int,
    chunk: int,
    nchunks: int,
    overlap: int,
    progress: bool,
    retries: int,
    timeout: float | None,
    in_objs: Sequence[Any],
    out_obj: Any,
    one_shot: bool = False,
) -> Any:
    deadline = None if timeout is None else time.monotonic() + timeout
    temps: list[SharedArray] = []
    copy_back: tuple[np.ndarray, np.ndarray] | None = None
    if kind == "reduce":
        first = kernel(*(a[:chunk] for a in arrays))  # also gives the partials' shape
        pshape, pdtype = np.shape(first), np.asarray(first).dtype
        out_arr = np.empty((nchunks, *pshape), pdtype)
    if process:
        # Workers attach by handle: everything they touch must be a segment.
        def shared(a: np.ndarray, obj: Any) -> SharedArray:
            if isinstance(obj, SharedArray):
                return obj
            sa = SharedArray.create(a.shape, a.dtype)  # a one-time copy into shared memory
            sa.array[...] = a
            temps.append(sa)
            return sa

        in_sas = [shared(a, obj) for a, obj in zip(arrays, in_objs, strict=True)]
        out_sa = out_obj if isinstance(out_obj, SharedArray) else None
        if out_sa is None:
            out_sa = SharedArray.create(out_arr.shape, out_arr.dtype)
            temps.append(out_sa)
            copy_back = (out_sa.array, out_arr)
            if any(np.may_share_memory(out_arr, a) for a in arrays):
                out_sa.array[...] = out_arr
    arena = _arena(pool, D.ctrl_words(nchunks))
    every_future: list[Any] = []  # of every attempt: the arena is ours until all resolve
    ctrl = arena.words
    in_place = kind != "reduce" and any(np.may_share_memory(out_arr, a) for a in arrays)
    bar = Progress(nchunks) if progress else None
    order = NO_ORDER
    order_sa: SharedArray | None = None
    try:
        D.reset(ctrl, nchunks)
        name = kernel_name(kernel)
        ref = kernel_ref(kernel) if process else None
        while True:
            nwork = order.shape[0] if order.shape[0] else nchunks
            ntasks = min(pool.max_workers, nwork, D.MAX_TASKS)
            D.begin_attempt(ctrl, nwork, ntasks)
            if process:
                assert ref is not None and arena.shared is not None and out_sa is not None
                job = Job(
                    kind,
                    ref,
                    arena.shared.handle,
                    order_sa.handle if order_sa is not None else None,
                    tuple(sa.handle for sa in in_sas),
                    out_sa.handle,
                    n,
                    chunk,
                    nchunks,
                    overlap,
                    keep=not one_shot,
                )
                packed = pack(job)
                futures = [pool._submit_spread(run_task, packed, t) for t in range(ntasks)]
                every_future += futures
                for t, f in enumerate(futures):
                    f.add_done_callback(functools.partial(_count_out, ctrl, t))
            else:
                # The caller runs driver 0 itself (it would only wait otherwise): a
                # one-chunk job never touches the pool, and no task pays a wake-up.
                ins = tuple(arrays)
                p = plan(kind, kernel, rt, ctrl, order, ins, out_arr)
                run = functools.partial(drive, p, name, ctrl)
                rest = (order, ins, out_arr, n, chunk, nchunks, overlap)
                futures = [pool.submit(run, t, *rest) for t in range(1, ntasks)]
                every_future += futures
                for t, f in enumerate(futures, start=1):
                    f.add_done_callback(functools.partial(_count_out, ctrl, t))
                try:
                    run(0, *rest)
                except BaseException:
                    for f in futures:  # stopped by the STOP flag; wait for them to leave
                        f.exception(
                            None if deadline is None else max(0.0, deadline - time.monotonic())
                        )
                    raise
            # The driver that writes the last chunk wakes us: the output is complete.
            # Tasks that have not started yet (a worker slow to wake) will find nothing
            # to claim and leave; the arena stays theirs until they have (_release_after).
            # Spin first, unless that takes a core from a worker: on processes the
            # caller is one more runnable thread, and a worker queued behind its spin
            # on a core would start late while the other workers take its share.
            _wait_bell(
                ctrl, _either, deadline, bar, pool if not process or ntasks < _CORES else None
            )
            if _complete(ctrl):
                # The results of tasks that already left are microseconds away: taking
                # them here (a caller spinning in result()) is faster than leaving them
                # to the pool's collector thread, which would then compete with this
                # thread for the GIL during the next call.
                first = 0 if process else 1
                _wait_all(
                    [f for t, f in enumerate(futures, first) if ctrl[D.J_EXIT + t]],
                    deadline,
                    None,
                    None,
                )
                break
            # Something failed: wait for every task to leave and see what went wrong.
            _wait_bell(ctrl, _all_left, deadline, bar)
            errors = _wait_all(futures, deadline, ctrl, None)
            lost = np.flatnonzero(ctrl[D.J_FLAGS : D.J_FLAGS + nchunks] == 0)
            stopped = int(ctrl[D.J_CLAIM]) >= D.STOP
            if not stopped and lost.size == 0:
                break
            failure = next(
                (e for e in errors if e is not None and not isinstance(e, WorkerCrashedError)),
                None,
            )
            if failure is not None:
                raise failure
            crashed = [e for e in errors if isinstance(e, WorkerCrashedError)]
            if not crashed:  # pragma: no cover - a stop or a gap always has a cause
                raise TransformError(
                    f"{name}'s job stopped with chunks {lost.tolist()[:10]} unwritten and "
                    "no error reported"
                )
            if retries == 0 or in_place or lost.size == 0:
                why = (
                    "the kernel writes in place, so a half-written chunk cannot be re-run"
                    if in_place
                    else "retries ran out"
                )
                raise WorkerCrashedError(
                    f"a worker died during {name}'s job and chunks {lost.tolist()[:10]} were "
                    f"lost; {why}. The output is incomplete and was not returned",
                    pid=crashed[0].pid,
                    exitcode=crashed[0].exitcode,
                ) from crashed[0]
            retries -= 1
            # Re-run only the lost chunks.
            if process:
                if order_sa is not None:
                    order_sa.unlink()
                    order_sa.close()
                order_sa = SharedArray.create(lost.size, np.int64)
                order_sa.array[:] = lost
                order = order_sa.array
            else:
                order = lost.astype(np.int64)
        if copy_back is not None:
            copy_back[1][...] = copy_back[0]
        if bar is not None:
            bar.update_to(nchunks)
        return list(out_arr) if kind == "reduce" else None
    finally:
        if bar is not None:
            bar.close()
        # A task whose driver already left may still be resolving its future; its
        # callback writes this arena's exit words, so the arena goes back to the pool
        # only when every future of this job has resolved.
        _release_after(pool, arena, every_future)
        if order_sa is not None:
            order_sa.unlink()
            order_sa.close()
        for sa in temps:
            sa.unlink()
            sa.close()


class _CallableModule(ModuleType):
    """``import shmcompute.transform`` binds the *module* to ``shmcompute.transform``,
    shadowing the function of the same name; calling the module calls the function, so
    ``shc.transform(kernel, x)`` works whichever of the two that name holds."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return transform(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
