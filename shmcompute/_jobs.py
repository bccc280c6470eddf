"""The worker side of a transform: find the kernel, attach the arrays, run the driver.

Both backends end in :func:`drive`; process workers get there through :func:`run_task`,
which receives a small :class:`Job` (handles, not data).
"""

from __future__ import annotations

import importlib
import linecache
import os
import pickle
import re
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numba
import numpy as np
from numba import types
from numba.core.registry import CPUDispatcher

from . import _drivers as D
from . import atomics as at
from .array import SharedArray, SharedArrayHandle
from .errors import ArgumentError, ArgumentTypeError, TransformError


# --- kernels ---------------------------------------------------------------------------------
class KernelRef(NamedTuple):
    """How a worker process finds the kernel: by import path, or pickled by value."""

    module: str | None
    qualname: str | None
    by_value: bytes | None
    name: str


_resolved: dict[Any, Any] = {}  # worker-side: ref -> dispatcher


def kernel_ref(kernel: Any) -> KernelRef:
    """By reference when a worker process importing the kernel's module finds it;
    by value otherwise: a kernel made in a function, in ``python -c`` or a notebook, or
    under a script's ``if __name__ == "__main__":`` (a worker imports the script as
    ``__mp_main__``, which skips that block)."""
    fn = kernel.py_func
    mod, qual = fn.__module__, fn.__qualname__
    name = f"{mod}.{qual}"
    importable = "<locals>" not in qual and (mod != "__main__" or _top_level_in_main(fn))
    if importable:
        return KernelRef(mod, qual, None, name)
    return KernelRef(None, None, pickle.dumps(kernel), name)


def _top_level_in_main(fn: Any) -> bool:
    """``fn`` (of ``__main__``) is defined at the top level of a script file: its
    first line (the decorator's) is not indented."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or fn.__code__.co_filename != path:
        return False
    line = linecache.getline(path, fn.__code__.co_firstlineno)
    return bool(line) and not line[0].isspace()


def resolve(ref: KernelRef) -> Any:
    key = ref.by_value if ref.by_value is not None else (ref.module, ref.qualname)
    k = _resolved.get(key)
    if k is None:
        try:
            if ref.by_value is not None:
                k = pickle.loads(ref.by_value)
            else:
                assert ref.module is not None and ref.qualname is not None
                k = importlib.import_module(ref.module)
                for part in ref.qualname.split("."):
                    k = getattr(k, part)
        except Exception as e:
            raise TransformError(
                f"kernel {ref.name} cannot be found in a worker process "
                f"({type(e).__name__}: {e}); define it at the top level of a module the "
                "workers can import (not inside a function or an if block)"
            ) from e
        _resolved[key] = k
    return k


def kernel_name(kernel: Any) -> str:
    fn = getattr(kernel, "py_func", kernel)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def check_kernel(kernel: Any) -> None:
    if not isinstance(kernel, CPUDispatcher):
        raise ArgumentTypeError(
            f"kernel must be a Numba function, @numba.njit(nogil=True, cache=True), got "
            f"{type(kernel).__name__}; plain Python functions hold the GIL and cannot run "
            "in parallel here (use Pool.map for them)"
        )
    if not kernel.targetoptions.get("nogil"):
        raise ArgumentError(
            f"kernel {kernel_name(kernel)} must be compiled with nogil=True "
            "(@numba.njit(nogil=True, cache=True)): workers run it without the GIL"
        )
    if kernel.targetoptions.get("parallel"):
        raise ArgumentError(
            f"kernel {kernel_name(kernel)} uses parallel=True; the pool is the parallelism "
            "here, and Numba's threading layer aborts when entered from several threads"
        )


def compile_kernel(kernel: Any, argtypes: tuple[Any, ...], kind: str) -> Any:
    """Compile the kernel for the chunk types; return its return type."""
    done = kernel.overloads.get(argtypes)
    if done is not None and (kind == "reduce") == (done.signature.return_type != types.none):
        return done.signature.return_type  # compiled and checked before
    try:
        kernel.compile(argtypes)
    except Exception as e:
        raise TransformError(
            f"kernel {kernel_name(kernel)} does not compile for the chunk types "
            f"({', '.join(str(t) for t in argtypes)}): {type(e).__name__}: "
            f"{compile_summary(str(e))} (Numba's whole message is this error's __cause__)"
        ) from e
    rt = kernel.overloads[argtypes].signature.return_type
    if kind != "reduce" and rt != types.none:
        raise TransformError(
            f"kernel {kernel_name(kernel)} returns {rt}; a transform kernel writes into "
            "its output chunk (the last argument) and returns nothing. For partial "
            "results per chunk use shc.reduce"
        )
    if kind == "reduce" and rt == types.none:
        raise TransformError(
            f"kernel {kernel_name(kernel)} returns nothing; a reduce kernel returns its "
            "chunk's partial result (a number or an array)"
        )
    return rt


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_WHERE = re.compile(r'^File "(?P<file>.+)", line (?P<line>\d+):$')


def compile_summary(message: str) -> str:
    """What a Numba compile error says, in one line: its first line past the
    pipeline headers ("Failed in nopython mode pipeline ..."), the signature it looked
    for, and where in the kernel (the line Numba marks with ^)."""
    lines = [ln.rstrip() for ln in _ANSI.sub("", message).splitlines()]
    said = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("Failed in ")]
    if not said:
        return ""
    parts = [said[0]]
    parts += [ln[3:].strip() for ln in said[1:] if ln.startswith(">>>")][:1]
    for i, ln in enumerate(lines):
        m = _WHERE.match(ln.strip())
        if m is None:
            continue
        marked = [j for j in range(i + 1, len(lines)) if lines[j].strip() == "^"]
        code = lines[marked[0] - 1].strip() if marked else ""
        parts.append(f"at {os.path.basename(m['file'])} line {m['line']}: {code}".rstrip(": "))
        break
    return " ".join(parts)


_checked: dict[tuple[Any, ...], tuple[Any, Any]] = {}


def kernel_rt(kind: str, kernel: Any, arrays: Sequence[np.ndarray], out: Any) -> Any:
    """Compile and check the kernel for these array types (once per combination)."""
    key = (
        kind,
        id(kernel),
        *(array_key(a) for a in arrays),
        array_key(out) if out is not None else None,
    )
    hit = _checked.get(key)
    if hit is not None and hit[0] is kernel:
        return hit[1]
    in_types = tuple(numba.typeof(a) for a in arrays)
    if kind == "map":
        rt = compile_kernel(kernel, (*in_types, numba.typeof(out)), kind)
    elif kind == "halo":
        rt = compile_kernel(kernel, (*in_types, numba.typeof(out), types.int64), kind)
    else:
        rt = compile_kernel(kernel, in_types, kind)
    _checked[key] = (kernel, rt)
    return rt


def signature(
    kind: str, rt: Any, in_types: tuple[Any, ...], out_type: Any, ctrl_type: Any, order_type: Any
) -> tuple[Any, ...]:
    """The driver's signature: the kernel's function type (as a TypeRef) and address,
    then the job's arguments."""
    i64 = types.int64
    if kind == "map":
        fty = types.FunctionType(types.none(*in_types, out_type))
        tail: tuple[Any, ...] = (i64, i64, i64)
    elif kind == "halo":
        fty = types.FunctionType(types.none(*in_types, out_type, i64))
        tail = (i64, i64, i64, i64)
    else:
        fty = types.FunctionType(rt(*in_types))
        tail = (i64, i64, i64)
    return (types.TypeRef(fty), types.intp, ctrl_type, i64, order_type, *in_types, out_type, *tail)


_SCALAR_PARTIALS = (
    (types.Boolean, np.dtype(bool)),
    (types.Integer, np.dtype(int)),
    (types.Float, np.dtype(float)),
    (types.Complex, np.dtype(complex)),
)


def scalar_partial_dtype(rt: Any) -> np.dtype[Any] | None:
    """The dtype of a reduce job's partials when its kernel returns a number of type
    ``rt``: that of the Python number Numba returns (copy mode's partials), so a float32
    partial is a float64. None for an array (its shape comes from a call)."""
    for numba_type, dtype in _SCALAR_PARTIALS:
        if isinstance(rt, numba_type):
            return dtype
    return None


# --- one call ---------------------------------------------------------------------------------
class Work(NamedTuple):
    """One call's work as ``transform`` checked it: what every mode's runner needs."""

    kind: str  # "map", "halo" or "reduce"
    kernel: Any
    arrays: list[np.ndarray]  # the inputs
    out: Any  # the output array (None for reduce: the runner makes the partials)
    n: int  # rows along axis 0
    chunk: int  # rows per chunk
    nchunks: int
    overlap: int  # halo rows on each side
    progress: bool
    timeout: float | None


# --- one driver task ---------------------------------------------------------------------------
class Job(NamedTuple):
    """A driver task's description: small and picklable (handles, not data)."""

    kind: str
    kernel: KernelRef
    ctrl: SharedArrayHandle
    order: SharedArrayHandle | None
    inputs: tuple[SharedArrayHandle, ...]
    out: SharedArrayHandle
    n: int
    chunk: int
    nchunks: int
    overlap: int
    keep: bool  # keep the arrays mapped for the next job (not for one-shot transfers)


_attached: dict[str, tuple[SharedArray, int]] = {}  # worker-side: name -> (array, inode)
_ATTACH_CACHE = 16
NO_ORDER = np.zeros(0, np.int64)


_swept = 0.0
_SWEEP_EVERY = 0.1  # seconds


def _sweep() -> None:
    """Drop cached mappings of segments unlinked since (checked at most every 0.1 s, at
    the next job), so the caches never keep freed memory alive for long."""
    global _swept
    now = time.monotonic()
    if now - _swept <= _SWEEP_EVERY:
        return
    _swept = now
    for name, (sa, ino) in list(_attached.items()):
        try:
            alive = os.stat(f"/dev/shm/{name}").st_ino == ino
        except FileNotFoundError:
            alive = False
        if not alive:
            del _attached[name]
            sa.close()
            _unpacked.clear()  # their prepared jobs hold views of it


def view(h: SharedArrayHandle, populate: bool = True) -> np.ndarray:
    """Attach a segment in a worker process, or reuse this worker's attachment: a job's
    arrays are usually the previous job's. ``populate``: map every page now (see
    ``_populate``); not for a one-shot job, which touches only the chunks it claims."""
    _sweep()
    hit = _attached.get(h.name)
    if hit is not None:
        return hit[0].array
    sa = SharedArray.attach(h)
    if populate:
        _populate(sa)
    if len(_attached) >= _ATTACH_CACHE:
        name = next(iter(_attached))
        _attached.pop(name)[0].close()
        _unpacked.clear()
    _attached[h.name] = (sa, os.stat(f"/dev/shm/{h.name}").st_ino)
    return sa.array


_MADV_POPULATE_WRITE = 23  # Linux 5.14+; Python's mmap module does not name it yet


def _populate(sa: SharedArray) -> None:
    """Map every page of a cached segment now, in one system call. Each process has its
    own page tables, and the chunks a worker claims change from job to job, so without
    this a worker keeps taking page faults on an array's pages for its first several
    jobs (measured: 16M float64 in and out took 3,000-11,000 faults per worker per job
    and ran 1.5-2.5x slower until every page had been touched)."""
    mm = sa._state.mm
    if mm is None or not sys.platform.startswith("linux"):
        return  # (the number means something else, or nothing, elsewhere)
    try:
        mm.madvise(_MADV_POPULATE_WRITE)
    except (OSError, ValueError):  # a kernel before 5.14: pages fault in as before
        pass


class PackedJob:
    """A :class:`Job` pickled once. Back-to-back transforms over the same arrays send the
    same job again and again: the caller pickles it once (``pack``), and a worker
    unpickles it once and keeps what it prepared for it (the attached arrays, the
    compiled driver), so a repeated job costs a dictionary lookup on each side instead
    of ~25 us of pickling, attaching and type checks."""

    __slots__ = ("calls", "job", "payload", "ready")

    def __init__(self, job: Job, payload: bytes | None = None) -> None:
        self.job = job
        self.payload = payload if payload is not None else pickle.dumps(job, _PROTOCOL)
        self.ready: tuple[Any, ...] | None = None  # worker side, see run_task
        self.calls: list[Any] = []  # caller side, see call

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpack, (self.payload,))

    def call(self, t: int, pool: Any) -> Any:
        """Driver task ``t``'s call, ``run_task(self, t)``, as ``pool`` sends it, made
        once per job (``Pool._reusable``): None when the pool cannot reuse it (it then
        prepares the call as any other)."""
        calls = self.calls
        while len(calls) <= t:
            calls.append(pool._reusable(run_task, (self, len(calls))))
        return calls[t]


_PROTOCOL = pickle.HIGHEST_PROTOCOL
_PACK_CACHE = 64
_packed: dict[Job, PackedJob] = {}  # caller side
_unpacked: dict[bytes, PackedJob] = {}  # worker side


def evict_oldest(cache: dict[Any, Any]) -> None:
    """Drop a bounded cache's oldest entry. Callers in other threads may be evicting or
    inserting at the same moment: then this one skips (the bound is approximate, by at
    most one entry per racing thread)."""
    try:
        del cache[next(iter(cache))]
    except (KeyError, RuntimeError, StopIteration):
        pass


def pack(job: Job) -> PackedJob:
    p = _packed.get(job)
    if p is None:
        if len(_packed) >= _PACK_CACHE:
            evict_oldest(_packed)
        p = _packed[job] = PackedJob(job)
    return p


def _unpack(payload: bytes) -> PackedJob:
    p = _unpacked.get(payload)
    if p is None:
        if len(_unpacked) >= _PACK_CACHE:
            del _unpacked[next(iter(_unpacked))]
        p = _unpacked[payload] = PackedJob(pickle.loads(payload), payload)
    return p


def run_task(packed: PackedJob, t: int) -> int:
    """Process-worker entry: attach by handle (or reuse what this job had), run the
    compiled driver. However it ends, the task counts itself out of the job's arena
    before it returns (the driver on its way out, or ``leave_if_exhausted``, or the
    handler below): the caller reuses the arena once every task has
    (``_arenas.release_when_left``)."""
    job = packed.job
    _sweep()
    ready = packed.ready
    ctrl = view(job.ctrl) if ready is None else ready[1]
    try:
        return _run_task(packed, t, job, ready, ctrl)
    except BaseException:
        D.left(ctrl, t)  # (failed before its driver ran; a no-op if it failed in it)
        raise


def _run_task(packed: PackedJob, t: int, job: Job, ready: Any, ctrl: np.ndarray) -> int:
    nwork = job.order.shape[0] if job.order is not None else job.nchunks
    if D.leave_if_exhausted(ctrl, t, nwork):
        # The other tasks did every chunk (or were stopped) before this one started:
        # leave without attaching anything.
        return 0
    if ready is None:
        kernel = resolve(job.kernel)
        try:
            order = view(job.order) if job.order is not None else NO_ORDER
            ins = tuple(view(h, job.keep) for h in job.inputs)
            out = view(job.out, job.keep)
        except FileNotFoundError:
            if D.leave_if_exhausted(ctrl, t, nwork):
                # Lost the race to the last chunk: while this task attached, the others
                # claimed every chunk, the caller returned and freed what it owned (a
                # copy of a NumPy input, a transferred array). Nothing is left to do.
                return 0
            raise
        rt = kernel_rt(job.kind, kernel, ins, out if job.kind != "reduce" else None)
        ready = (plan(job.kind, kernel, rt, ctrl, order, ins, out), ctrl, order, ins, out)
        if job.keep:
            packed.ready = ready
    p, ctrl, order, ins, out = ready
    try:
        return drive(
            p, job.kernel.name, ctrl, t, order, ins, out, job.n, job.chunk, job.nchunks, job.overlap
        )
    finally:
        if not job.keep:
            # Transferred arrays are one-shot: unmap them now, so that freeing their
            # memory happens where the owner frees it, not inside our next job.
            del ready, ins, out
            for h in (*job.inputs, job.out):
                hit = _attached.pop(h.name, None)
                if hit is not None:
                    hit[0].close()


class Plan(NamedTuple):
    """How to run a job's driver: built once per kernel and array types, then reused."""

    run: Any  # the driver's compiled entry point (see _drivers.driver)
    kref: Any  # TypeRef of the kernel's function type
    kaddr: int  # address of the kernel's compiled C wrapper
    kernel: Any  # the dispatcher: keeps the code at kaddr alive while the plan is used


def array_key(a: np.ndarray) -> tuple[Any, ...]:
    """Everything ``numba.typeof`` reads from an array (its type is a function of this)."""
    f = a.flags
    return (a.dtype.str, a.ndim, f.c_contiguous, f.f_contiguous, f.writeable, f.aligned)


_plans: dict[tuple[Any, ...], Plan] = {}


def plan(
    kind: str,
    kernel: Any,
    rt: Any,
    ctrl: np.ndarray,
    order: np.ndarray,
    ins: tuple[np.ndarray, ...],
    out: np.ndarray,
) -> Plan:
    """The compiled driver and the kernel's address for these array types, cached: the
    Numba types are built once per combination, not per call (~60 us). The driver's
    entry point does not check its arguments' types, so the key holds everything the
    types are made of."""
    key = (kind, id(kernel), *(array_key(a) for a in (ctrl, order, *ins, out)))
    hit = _plans.get(key)
    if hit is None or hit.kernel is not kernel:
        in_types = tuple(numba.typeof(a) for a in ins)
        sig = signature(
            kind, rt, in_types, numba.typeof(out), numba.typeof(ctrl), numba.typeof(order)
        )
        kref = sig[0]
        ksig = kref.instance_type.signature
        kernel.compile(ksig.args)  # a no-op when already compiled or cached
        cres = kernel.get_compile_result(ksig)
        kaddr = cres.library.get_pointer_to_function(cres.fndesc.llvm_cfunc_wrapper_name)
        hit = _plans[key] = Plan(D.driver(kind, len(ins), sig), kref, int(kaddr), kernel)
    return hit


# A kernel called through a function pointer cannot hand an exception back to the
# driver: Numba's C wrapper reports it with PyErr_WriteUnraisable and returns. So while a
# driver runs, this thread's unraisable errors are routed here: the first one is kept for
# the job, and every driver is told to stop claiming chunks. Others go to the hook that
# was installed before (pytest's, or Python's default).
_tls = threading.local()
_prev_hook: Any = None


def _unraisable(u: Any) -> None:
    team = getattr(_tls, "team", None)
    if team is not None and team[0].kernel_failed(team[1], u.exc_value):
        return
    job = getattr(_tls, "job", None)
    if job is not None and job[0] is None:
        ctrl, t = job[1], job[2]
        _tls.job = (u.exc_value, ctrl, t, int(at.load(ctrl, D.J_TASK + t)))
        at.store(ctrl, D.J_CLAIM, D.STOP)
        return
    if job is not None:
        return  # a later error of the same failed job
    (_prev_hook or sys.__unraisablehook__)(u)


def _route_unraisable() -> None:
    global _prev_hook
    if sys.unraisablehook is not _unraisable:
        _prev_hook = sys.unraisablehook
        sys.unraisablehook = _unraisable


def serve_team(team: Any, me: int) -> None:
    """This thread is thread ``me`` of a driver team (``_team``): its kernels' errors
    go to the team."""
    _route_unraisable()
    _tls.team = (team, me)


def kernel_error(name: str, error: BaseException, i: int, chunk: int, n: int) -> TransformError:
    lo, hi = i * chunk, min(i * chunk + chunk, n)
    e = TransformError(
        f"kernel {name} raised {type(error).__name__}: {error} on chunk {i} (rows {lo}:{hi})"
    )
    e.__cause__ = error
    return e


def drive(
    p: Plan,
    name: str,
    ctrl: np.ndarray,
    t: int,
    order: np.ndarray,
    ins: tuple[np.ndarray, ...],
    out: np.ndarray,
    n: int,
    chunk: int,
    nchunks: int,
    overlap: int,
) -> int:
    """Run the driver loop in this thread (both backends end here)."""
    _route_unraisable()
    _tls.job = (None, ctrl, t)
    try:
        if overlap:
            p.run(p.kref, p.kaddr, ctrl, t, order, *ins, out, n, chunk, nchunks, overlap)
        else:
            p.run(p.kref, p.kaddr, ctrl, t, order, *ins, out, n, chunk, nchunks)
    finally:
        job, _tls.job = _tls.job, None
    error = job[0]
    if error is not None:
        raise kernel_error(name, error, job[3], chunk, n)
    return 0


def copy_task(
    kernel: Any,
    kind: str,
    ins: tuple[np.ndarray, ...],
    out_shape: tuple[int, ...],
    out_dtype: Any,
    start: int,
) -> Any:
    """Copy-mode entry: the chunk arrived pickled, the result goes back pickled."""
    k = resolve(kernel) if isinstance(kernel, KernelRef) else kernel
    if kind == "reduce":
        return k(*ins)
    out = np.empty(out_shape, out_dtype)
    if kind == "halo":
        k(*ins, out, start)
    else:
        k(*ins, out)
    return out
