"""Parallel array transforms and reductions with nogil Numba kernels.

::

    shc.transform(kernel, *inputs, out=None, pool=None, chunk_size=None, mode="share")

        caller                          each of up to N pool workers (threads or processes)
        ------                          -----------------------------------------------
        check arguments, compile the    attach inputs/out by handle (process, cached)
        kernel for the chunk types      compiled driver loop, no GIL, no Python per chunk:
        (driver + kernel: disk cache)     i = atomic add(block counter, 1), own block
                                          first, then the others'; stop when none left
        hand a driver to each helper      kernel(in[lo:hi], ..., out[lo:hi])
        (process tasks, or the thread     flag chunk i done; J_DONE += 1
        pool's team), run one itself
        (threads), wait for the bell
        re-run chunks a crash lost

``kernel(*input_chunks, out_chunk)`` writes its output chunk; chunks are slices along
axis 0 (rows of an image, elements of a vector). With ``overlap=k`` the kernel gets each
input chunk with up to ``k`` extra rows on both sides, plus the index of its first own
row: ``kernel(*input_chunks, out_chunk, start)``. ``reduce`` calls ``kernel(*chunks)``
for a partial per chunk and folds partials in chunk order with ``combine``, so the
result depends on ``chunk_size`` but never on worker count or scheduling.

Default ``chunk_size``: about 16 chunks per worker, each at least 64 KiB (or, for
``transform`` once a kernel's work per row is known, 50 us of work) and, past that, at
most 1 MiB::

    floor = 64 KiB / row
    floor = min(floor, max(4 KiB / row, 50 us / work per row))  # transform, once measured
    rows = clamp(ceil(rows / (16 * workers)), floor, 1 MiB / row), >= 8 * overlap

Many small chunks keep the workers finishing together: each claims the next chunk when
it is done, so a worker that started late or runs slower (a busy core, a cold cache)
costs at most one chunk's time, ~0.1 ms at 1 MiB, not a quarter of its share (measured:
16M float64 ``y = 2.5x + 1`` on 2 cores went from 0.90 to 0.95 of ``prange``'s speed on
processes). The floor keeps a chunk's fixed cost (an atomic add, ~100 ns) far below its
work, and makes a small array one chunk, run by one worker. A kernel that does much per
row needs far fewer rows for that: ``transform`` lowers the floor to 50 us of work (a
power of two rows, so the chunk size stays put from call to call) but not below a page,
once the pool has measured the kernel (measured on 16 cores: 50,000 elements of the
32-step kernel, 46 ms of work, made 7 chunks of 64 KiB and took 10-11 ms on 8 or 16
workers, against 4-7 ms for ``prange``). ``reduce`` keeps the fixed floor: its result
depends on the chunk size, which must not depend on a timing. With ``overlap`` a chunk
is at least 8 halos long, so re-read halo rows stay under a quarter of the reads.

Helpers: on processes, driver tasks on the pool's workers; on threads, the caller runs
driver 0 and the pool's team (``_team``: threads that wait in compiled code) runs the
others, so no helper needs the GIL to start or end.

Workers per job: the first call of a kernel (for given array types) on a pool uses every
worker and measures the work per row; later calls give a job only as many drivers as pay
for themselves (``_runner.helpers``): on processes each must bring ``HELP_FACTOR`` (4)
times what starting a task costs on that pool (its typical submit-to-start time, a
running median); on a team, each must save ``HELP_FACTOR`` times its publish cost, given
how late the team's threads typically start. A short job runs in the caller alone.

Modes, kept side by side for comparison (identical results):

* ``share``: workers attach inputs and output by handle; nothing is copied. Plain NumPy
  inputs on the process backend are first copied into shared memory once (pass
  SharedArrays to avoid it).
* ``copy``: each chunk is pickled to a worker and its result pickled back, as
  ``multiprocessing.Pool.map`` does: cost grows with the data.
* ``transfer``: like ``postMessage(..., transferList)``: the caller's SharedArrays are
  detached (using them raises ``DetachedError``), the job owns and then frees the inputs,
  and the result comes back as a new SharedArray the caller owns. O(1). Nothing moves
  until every argument is checked and the kernel compiled: an error before the work
  starts leaves the caller's arrays as they were; once it has started they are the
  job's, whatever its end (as a transferred buffer is the receiver's).

Kernels travel to process workers by reference (module and name) and load from Numba's
disk cache (``cache=True``); a kernel defined in a notebook, ``python -c``, a function,
or under a script's ``if __name__ == "__main__":`` has no name a worker can import and is
shipped by value, so each worker process compiles it on its first job (~0.1-0.5 s once
per worker). The caller compiles the kernel and the driver for the
workers' array types before any worker needs them (``_compile_for_workers``).
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np
from numba.np.numpy_support import as_dtype

from . import _drivers as D
from ._jobs import (
    NO_ORDER,
    Work,
    array_key,
    check_kernel,
    evict_oldest,
    kernel_name,
    kernel_ref,
    kernel_rt,
    plan,
    scalar_partial_dtype,
)
from ._runner import Prepared, drivers_worth, row_ns, run_job
from .array import SharedArray
from .errors import ArgumentError, ArgumentTypeError
from .modes import MODES, check_transfer, run_copy, take_ownership
from .pool import Pool, pool_size

__all__ = ["default_pool", "reduce", "transform"]

log = logging.getLogger("shmcompute")


def _load_fingerprint() -> Callable[[Any], Any]:
    """Numba's own dispatch key for a value's type (C, ~0.1 us), a private API; without
    it, our slower key of the same meaning."""
    try:
        from numba._dispatcher import compute_fingerprint
    except ImportError:  # pragma: no cover - a Numba that moved it
        return array_key
    return compute_fingerprint


_fingerprint = _load_fingerprint()

_MIN_CHUNK_BYTES = 64 * 1024
_MIN_CHUNK_NS = 50_000  # a chunk's work, when the kernel's work per row is known
_PAGE = 4096
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
def _as_array(x: Any, what: str | int) -> np.ndarray:
    """``x`` as a NumPy array; ``what`` names it in the error (an int: that input)."""
    if isinstance(x, SharedArray):
        return x.array
    if isinstance(x, np.ndarray):
        return x
    raise ArgumentTypeError(
        f"{f'input {what}' if isinstance(what, int) else what} must be a NumPy array or a "
        f"SharedArray, got {type(x).__name__}"
    )


def _check_inputs(inputs: Sequence[Any], kind: str) -> list[np.ndarray]:
    if not inputs:
        raise ArgumentError(
            f"{'reduce' if kind == 'reduce' else 'transform'} needs at least one input array"
        )
    arrays = [_as_array(x, i) for i, x in enumerate(inputs)]
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
        raise ArgumentError(
            f"out is not C-contiguous (strides {out.strides}); pass a C-contiguous out "
            "(np.empty_like(x)), or out=None for a new SharedArray"
        )
    if not out.flags.writeable:
        raise ArgumentError("out is read-only; the kernel writes into it")


def _check_dtype(dtype: Any) -> np.dtype[Any]:
    try:
        dt: np.dtype[Any] = np.dtype(dtype)
    except TypeError as e:
        raise ArgumentTypeError(
            f"dtype must be a NumPy dtype for the output (np.float32, 'int64'), got {dtype!r}: {e}"
        ) from None
    if dt.hasobject:
        raise ArgumentTypeError(f"dtype {dt} holds Python objects; kernels need numbers")
    return dt


def _check_int(name: str, value: Any, lo: int) -> int:
    if type(value) is int and value >= lo:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ArgumentError(f"{name} must be >= {lo}, got {value}")
    return int(value)


def default_chunk_size(
    n: int, row_bytes: int, workers: int, overlap: int = 0, work_rows: int | None = None
) -> int:
    """Rows per chunk when ``chunk_size`` is not given (see the module docstring).
    ``work_rows``: how many rows make ``_MIN_CHUNK_NS`` of work, when that is known."""
    row_bytes = max(1, row_bytes)
    by_workers = math.ceil(n / (_CHUNKS_PER_WORKER * max(1, workers))) if n else 1
    floor = math.ceil(_MIN_CHUNK_BYTES / row_bytes)
    if work_rows is not None:
        floor = min(floor, max(work_rows, math.ceil(_PAGE / row_bytes)))
    cap = max(floor, _MAX_CHUNK_BYTES // row_bytes)
    return max(1, floor, min(by_workers, cap), _HALOS_PER_CHUNK * overlap)


_default_chunk_size = functools.lru_cache(maxsize=1024)(default_chunk_size)  # ~1 us a call


def work_rows(row_ns: float) -> int:
    """Rows that make at least ``_MIN_CHUNK_NS`` of work at ``row_ns`` a row, rounded up
    to a power of two: measurements jitter, and a chunk size that moved with them would
    make every call a new job to pickle for the process workers."""
    rows = _MIN_CHUNK_NS / max(row_ns, 1e-3)
    return 1 << max(0, math.ceil(math.log2(rows))) if rows > 1 else 1


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
        out: where to write (may be one of the inputs: in place, but not with
            ``overlap``). None: a new SharedArray shaped like the first input (``dtype``
            to change its type). Checked along axis 0 only: its other dimensions are
            the kernel's to use, and Numba does not check bounds, so a kernel writing
            past its out chunk corrupts memory as it would called directly.
        pool: a ``shmcompute.Pool`` (thread or process); default ``default_pool()``.
        chunk_size: rows per chunk; default see the module docstring.
        mode: "share", "copy" or "transfer" (see the module docstring).
        overlap: rows of halo on each side of every input chunk (neighbour kernels).
        progress: show a progress bar (tqdm if installed) fed from the chunk counter.
        retries: times chunks lost to a crashed worker are re-run (0: raise).
        timeout: seconds for the whole job; past it ``TimeoutError``. A chunk in
            progress is not interrupted: the drivers stop after their current chunks,
            and on threads the error comes once the caller's own chunk has ended. A
            thread pool's ``task_timeout`` does not apply to a job's helpers (a thread
            cannot be stopped mid-chunk); on a process pool a helper past it is killed
            and its chunks are lost, as in a crash (``retries``).

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
    starting from ``identity`` (or from the first partial when it is None; an empty
    input then has no result, and raises ``ArgumentError``).

    The order is fixed, so the result is the same for any scheduling and worker count
    for a given ``chunk_size``, floating-point sums included. The default chunk size
    depends on the pool's worker count (see the module docstring): pass ``chunk_size``
    for bit-identical results across pools of different sizes.

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
    arrays = _check_inputs(inputs, kind)
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
        chunk = _default_chunk_size(n, row_bytes, workers, overlap)
    else:
        chunk = _check_int("chunk_size", chunk_size, 1)
    nchunks = math.ceil(n / chunk) if n else 0
    if nchunks > _MAX_CHUNKS:
        raise ArgumentError(
            f"chunk_size={chunk} makes {nchunks} chunks (at most {_MAX_CHUNKS}); use larger chunks"
        )
    if overlap and overlap >= chunk and nchunks > 1:
        raise ArgumentError(
            f"overlap ({overlap}) must be smaller than chunk_size ({chunk}); use "
            f"chunk_size > {overlap}"
        )

    if out is not None:
        out_arr: Any = _as_array(out, "out")
        _check_out(out_arr, n)
        if overlap and any(np.may_share_memory(out_arr, a) for a in arrays):
            raise ArgumentError(
                f"out shares memory with an input, and overlap={overlap}: each chunk "
                "reads rows of its neighbours that they overwrite in place, so the "
                "result would depend on the order chunks ran in; pass a separate out "
                "(out=None, or np.empty_like(x))"
            )
    if mode == "transfer":
        check_transfer(inputs, out)
    if dtype is not None:
        dtype = _check_dtype(dtype)

    if kind == "reduce":
        out_arr, returned = None, None
    elif out is None:
        out_sa = SharedArray.create(
            arrays[0].shape, dtype if dtype is not None else arrays[0].dtype
        )
        out_arr, returned = out_sa.array, out_sa
    else:
        returned = out

    owned: list[SharedArray] = []
    try:
        # (compiles and checks the kernel: before a transfer moves anything)
        prep = _prepare(kind, kernel, process, arrays, out_arr)
        # --- transfer: the caller's handles are detached; the job owns the arrays now ------
        if mode == "transfer":
            inputs, out, returned = take_ownership(inputs, out, returned)
            owned = [x for x in (*inputs, out) if isinstance(x, SharedArray)]
            arrays = [x.array for x in inputs]
            if kind != "reduce":
                out_arr = returned.array
        if chunk_size is None and kind != "reduce" and mode != "copy" and nchunks > 0:
            # Smaller chunks for a kernel that does much per row (see the module
            # docstring): only when a chunk holds more than their work (else nothing
            # changes), and the job is worth splitting at all (the measure is an upper
            # bound that includes the job's fixed cost: on a short job it says little).
            ns = row_ns(prep, pool)
            if ns is not None and ns * chunk > _MIN_CHUNK_NS and drivers_worth(ns, pool, n) >= 2:
                chunk = _default_chunk_size(n, row_bytes, workers, overlap, work_rows(ns))
                nchunks = math.ceil(n / chunk)
        if nchunks == 0:
            return returned if kind != "reduce" else _fold([], combine, identity)
        work = Work(kind, kernel, arrays, out_arr, n, chunk, nchunks, overlap, progress, timeout)
        if mode == "copy":
            result = run_copy(work, pool, retries)
        else:
            result = run_job(
                work, prep, pool, retries, inputs, returned, one_shot=mode == "transfer"
            )
        if kind == "reduce":
            return _fold(result, combine, identity)
        return returned
    except BaseException:
        if out is None and isinstance(returned, SharedArray):  # (made here: not returned)
            returned.unlink()
            returned.close()
        raise
    finally:
        for sa in owned:  # consumed inputs are freed; the output goes back to the caller
            if sa is not returned:
                sa.unlink()
                sa.close()


# --- compiled once per kernel and array types ----------------------------------------------
_PREPARED_MAX = 256
_prepared: dict[tuple[Any, ...], Prepared] = {}
_CTRL_LIKE = np.zeros(1, np.int64)  # ctrl words are always a fresh int64 vector (an arena)


def _prepare(
    kind: str, kernel: Any, process: bool, arrays: list[np.ndarray], out_arr: Any
) -> Prepared:
    """Compile the kernel for these arrays' types and look up its driver, once per
    kernel and types: a repeated call costs a dictionary lookup instead of ~10-20 us of
    typing, keying and naming. The key is what ``numba.typeof`` reads (Numba's own
    dispatch fingerprint: dtype, dimensions, layout, writability)."""
    try:
        key: tuple[Any, ...] | None = (
            kind,
            kernel,
            process,
            *[_fingerprint(a) for a in arrays],
            None if out_arr is None else _fingerprint(out_arr),
        )
        hit = _prepared.get(key)  # type: ignore[arg-type]
    except Exception:  # an array Numba cannot fingerprint: no shortcut
        key = hit = None
    if hit is not None:
        return hit
    rt = kernel_rt(kind, kernel, arrays, out_arr)
    p = None
    if process:
        _compile_for_workers(kind, kernel, rt, arrays, out_arr)
    elif kind != "reduce":  # (reduce: the partials' type comes per call)
        p = plan(kind, kernel, rt, _CTRL_LIKE, NO_ORDER, tuple(arrays), out_arr)
    prep = Prepared(kernel_name(kernel), rt, p, kernel_ref(kernel) if process else None)
    if prep.ref is not None and prep.ref.by_value is None and not _disk_cached(kernel):
        _warn_uncached(prep.name)
    if key is not None:
        if len(_prepared) >= _PREPARED_MAX:
            evict_oldest(_prepared)
        _prepared[key] = prep
    return prep


def _disk_cached(kernel: Any) -> bool:
    """The kernel was made with ``cache=True`` (Numba keeps no public flag for it)."""
    try:
        from numba.core.caching import NullCache
    except ImportError:  # pragma: no cover - a Numba that moved it: assume it is
        return True
    return not isinstance(getattr(kernel, "_cache", None), NullCache)


_warned_uncached: set[str] = set()


def _warn_uncached(name: str) -> None:
    if name in _warned_uncached:
        return
    _warned_uncached.add(name)
    warnings.warn(
        f"kernel {name} has no cache=True: every process worker compiles it on its first "
        "job (~0.1-0.5 s each, again in each replaced worker), instead of loading what "
        "the caller compiled; use @numba.njit(nogil=True, cache=True)",
        RuntimeWarning,
        stacklevel=5,  # (the caller of transform or reduce: _run, _prepare, here)
    )


def _worker_like(dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """An empty array of the type a process worker's view of a segment has: this
    dtype and number of dimensions, C-contiguous, writable."""
    return np.empty((0, *shape[1:]), dtype)


def _compile_for_workers(
    kind: str, kernel: Any, rt: Any, arrays: list[np.ndarray], out_arr: Any
) -> None:
    """Compile (and so cache on disk) the driver for the types the process workers will
    see, here, once: otherwise every worker compiles it on its first job of these types,
    all at once, and they race to write Numba's cache (such races have crashed, numba
    issues 4807 and 10128). Workers then load it from the cache. Best effort: a type
    not foreseen here leaves the compile to the workers, as before."""
    try:
        ins = tuple(_worker_like(a.dtype, a.shape) for a in arrays)
        if kind == "reduce":  # the partials: one row per chunk, of the kernel's result
            scalar = scalar_partial_dtype(rt)
            if scalar is not None:
                out = np.empty(0, scalar)
            else:
                out = np.empty((0, *((0,) * rt.ndim)), as_dtype(rt.dtype))
        else:
            out = _worker_like(out_arr.dtype, out_arr.shape)
        plan(kind, kernel, rt, _CTRL_LIKE, NO_ORDER, ins, out)
    except Exception as e:  # pragma: no cover - a return type NumPy cannot hold, say
        log.debug("not compiling %s's driver ahead of the workers: %r", kernel_name(kernel), e)


def _fold(partials: Sequence[Any], combine: Any, identity: Any) -> Any:
    if not partials and identity is None:
        raise ArgumentError(
            "reduce of an empty input needs identity= (the result when there is nothing "
            "to combine, e.g. identity=0.0 for a sum)"
        )
    acc = identity
    for i, p in enumerate(partials):
        acc = p if (acc is None and i == 0) else combine(acc, p)
    return acc


class _CallableModule(ModuleType):
    """``import shmcompute.transform`` binds the *module* to ``shmcompute.transform``,
    shadowing the function of the same name; calling the module calls the function, so
    ``shc.transform(kernel, x)`` works whichever of the two that name holds."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return transform(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
