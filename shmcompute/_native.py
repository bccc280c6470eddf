"""Hardware atomics and libc calls for compiled (Numba) code.

Numba has no CPU atomics (numba issue 2988), so these intrinsics emit LLVM
``atomicrmw`` / ``cmpxchg`` / atomic ``load``/``store`` / ``fence`` directly, all
sequentially consistent: on x86-64 they become ``lock xadd``, ``lock cmpxchg``,
``xchg`` and ``mov``. libc functions (POSIX semaphores, clocks, errno) are bound
as ``ExternalFunction``s by symbol name, and the process-local segment registry is
an external global symbol registered with LLVM; both resolve by name when a cached
function is loaded, so compiled code stays valid in every process (a baked-in
address would not).

Everything here is private: the public surface is :mod:`shmcompute.atomics`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import llvmlite.binding as llb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _layout as L

if not sys.platform.startswith("linux"):  # pragma: no cover - Linux-first
    raise ImportError(
        "shmcompute.atomics needs Linux: wait/notify use process-shared POSIX "
        "semaphores (sem_init with pshared=1), which macOS does not implement"
    )

_libc_path = ctypes.util.find_library("c") or "libc.so.6"
llb.load_library_permanently(_libc_path)
_libc = ctypes.CDLL(_libc_path, use_errno=True)
for _sym in ("sem_init", "sem_post", "sem_trywait", "sem_wait", "sem_clockwait"):
    if llb.address_of_symbol(_sym) is None:  # pragma: no cover - glibc < 2.30
        raise ImportError(f"shmcompute.atomics needs {_sym} from libc (glibc >= 2.30)")

# --- libc -------------------------------------------------------------------------
sem_init = types.ExternalFunction("sem_init", types.int32(types.voidptr, types.int32, types.uint32))
sem_post = types.ExternalFunction("sem_post", types.int32(types.voidptr))
sem_trywait = types.ExternalFunction("sem_trywait", types.int32(types.voidptr))
sem_wait = types.ExternalFunction("sem_wait", types.int32(types.voidptr))
sem_clockwait = types.ExternalFunction(
    "sem_clockwait", types.int32(types.voidptr, types.int32, types.voidptr)
)
clock_gettime = types.ExternalFunction("clock_gettime", types.int32(types.int32, types.voidptr))
getpid = types.ExternalFunction("getpid", types.int32())
kill = types.ExternalFunction("kill", types.int32(types.int32, types.int32))
sched_yield = types.ExternalFunction("sched_yield", types.int32())

CLOCK_MONOTONIC = 1
ESRCH = 3
EINTR = 4
EAGAIN = 11
ETIMEDOUT = 110

# --- the process-local registry, reachable from compiled code by symbol ----------
REGISTRY_SYMBOL = "shmcompute_segment_registry_v1"
# Allocated once per process and never freed: compiled code holds its address.
registry = np.zeros(L.REG_WORDS, dtype=np.int64)
llb.add_symbol(REGISTRY_SYMBOL, registry.ctypes.data)


def _i64ptr(builder: ir.IRBuilder, addr: ir.Value) -> ir.Value:
    return builder.inttoptr(addr, ir.IntType(64).as_pointer())


@intrinsic
def registry_address(typingctx):
    """Address of this process's registry (an external symbol, resolved at load)."""

    def codegen(context, builder, sig, args):
        mod = builder.module
        gv = mod.globals.get(REGISTRY_SYMBOL)
        if gv is None:
            gv = ir.GlobalVariable(mod, ir.IntType(8), REGISTRY_SYMBOL)
            gv.linkage = "external"
        return builder.ptrtoint(gv, ir.IntType(64))

    return types.int64(), codegen


@intrinsic
def voidptr(typingctx, addr):
    """Turn an integer address into a ``void*`` for libc calls."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return types.voidptr(addr), codegen


@intrinsic
def fence(typingctx):
    """A sequentially consistent fence (``mfence`` on x86-64)."""

    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


_MACHINE = __import__("platform").machine().lower()


@intrinsic
def cpu_relax(typingctx):
    """The spin-wait hint (``pause`` on x86-64, ``yield`` on Arm): saves power and
    lets a hyper-thread sibling run. (Inline asm aborts MCJIT; LLVM intrinsics do not.)"""

    def codegen(context, builder, sig, args):
        mod = builder.module
        if _MACHINE in ("x86_64", "amd64"):
            fn = cgutils.get_or_insert_function(
                mod, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause"
            )
            builder.call(fn, [])
        elif _MACHINE in ("aarch64", "arm64"):
            fn = cgutils.get_or_insert_function(
                mod, ir.FunctionType(ir.VoidType(), [ir.IntType(32)]), "llvm.aarch64.hint"
            )
            builder.call(fn, [ir.Constant(ir.IntType(32), 1)])
        return context.get_dummy_value()

    return types.void(), codegen


# --- atomics on raw int64 addresses (shared headers, wait tables) -----------------
def _make_i64_rmw(op: str):
    @intrinsic
    def rmw(typingctx, addr, val):
        if not isinstance(addr, types.Integer) or not isinstance(val, types.Integer):
            return None
        sig = types.int64(types.int64, types.int64)

        def codegen(context, builder, sig, args):
            return builder.atomic_rmw(op, _i64ptr(builder, args[0]), args[1], "seq_cst")

        return sig, codegen

    return rmw


i64_add = _make_i64_rmw("add")


@intrinsic
def i64_cas(typingctx, addr, expected, desired):
    """Compare-and-swap on an int64 at ``addr``; returns the value that was there."""
    if not all(isinstance(t, types.Integer) for t in (addr, expected, desired)):
        return None
    sig = types.int64(types.int64, types.int64, types.int64)

    def codegen(context, builder, sig, args):
        ptr = _i64ptr(builder, args[0])
        pair = builder.cmpxchg(ptr, args[1], args[2], "seq_cst", "seq_cst")
        return builder.extract_value(pair, 0)

    return sig, codegen


@intrinsic
def i64_load(typingctx, addr):
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_i64ptr(builder, args[0]), "seq_cst", 8)

    return types.int64(types.int64), codegen


@intrinsic
def i64_store(typingctx, addr, val):
    if not isinstance(addr, types.Integer) or not isinstance(val, types.Integer):
        return None
    sig = types.void(types.int64, types.int64)

    def codegen(context, builder, sig, args):
        builder.store_atomic(args[1], _i64ptr(builder, args[0]), "seq_cst", 8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def errno_value(typingctx):
    """This thread's errno (glibc: ``*__errno_location()``)."""

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.IntType(32).as_pointer(), [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "__errno_location")
        return builder.load(builder.call(fn, []))

    return types.int32(), codegen


# --- atomics on array elements -----------------------------------------------------
def _item_ptr(context, builder, aryty, ary_val, idx):
    ary = context.make_array(aryty)(context, builder, ary_val)
    return cgutils.get_item_pointer(context, builder, aryty, ary, [idx], wraparound=False)


def _is_atomic_array(arr) -> bool:
    return (
        isinstance(arr, types.Array)
        and arr.ndim == 1
        and arr.dtype in (types.int32, types.int64)
        and arr.mutable
    )


@intrinsic
def item_address(typingctx, arr, idx):
    """Address of ``arr[idx]`` (no bounds check: callers check first)."""
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None
    sig = types.int64(arr, types.intp)

    def codegen(context, builder, sig, args):
        ptr = _item_ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.ptrtoint(ptr, ir.IntType(64))

    return sig, codegen


def _make_arr_rmw(op: str):
    @intrinsic
    def rmw(typingctx, arr, idx, val):
        if not _is_atomic_array(arr) or not isinstance(idx, types.Integer):
            return None
        sig = arr.dtype(arr, types.intp, arr.dtype)

        def codegen(context, builder, sig, args):
            ptr = _item_ptr(context, builder, sig.args[0], args[0], args[1])
            return builder.atomic_rmw(op, ptr, args[2], "seq_cst")

        return sig, codegen

    return rmw


arr_add = _make_arr_rmw("add")
arr_sub = _make_arr_rmw("sub")
arr_and = _make_arr_rmw("and")
arr_or = _make_arr_rmw("or")
arr_xor = _make_arr_rmw("xor")
arr_xchg = _make_arr_rmw("xchg")


@intrinsic
def arr_cas(typingctx, arr, idx, expected, desired):
    if not _is_atomic_array(arr) or not isinstance(idx, types.Integer):
        return None
    sig = arr.dtype(arr, types.intp, arr.dtype, arr.dtype)

    def codegen(context, builder, sig, args):
        ptr = _item_ptr(context, builder, sig.args[0], args[0], args[1])
        pair = builder.cmpxchg(ptr, args[2], args[3], "seq_cst", "seq_cst")
        return builder.extract_value(pair, 0)

    return sig, codegen


@intrinsic
def arr_load(typingctx, arr, idx):
    # Loads also work on read-only arrays: a load never writes.
    if not (
        isinstance(arr, types.Array)
        and arr.ndim == 1
        and arr.dtype in (types.int32, types.int64)
        and isinstance(idx, types.Integer)
    ):
        return None
    sig = arr.dtype(arr, types.intp)

    def codegen(context, builder, sig, args):
        ptr = _item_ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "seq_cst", sig.args[0].dtype.bitwidth // 8)

    return sig, codegen


@intrinsic
def arr_store(typingctx, arr, idx, val):
    if not _is_atomic_array(arr) or not isinstance(idx, types.Integer):
        return None
    sig = types.void(arr, types.intp, arr.dtype)

    def codegen(context, builder, sig, args):
        ptr = _item_ptr(context, builder, sig.args[0], args[0], args[1])
        builder.store_atomic(args[2], ptr, "seq_cst", sig.args[0].dtype.bitwidth // 8)
        return context.get_dummy_value()

    return sig, codegen
