"""Lock-free atomic operations and blocking wait/notify on int32/int64 array elements.

The same functions work from Python and inside ``@numba.njit(nogil=True)`` code::

    import shmcompute.atomics as at

    @numba.njit(nogil=True)
    def claim(counter):
        return at.add(counter, 0, 1)       # lock xadd, ~2-5 ns, no GIL

    at.add(shared.array, 0, 1)             # the same function from Python, ~0.3 us

Semantics follow JavaScript ``Atomics``: every operation is sequentially consistent;
``add``/``sub``/``and_``/``or_``/``xor``/``exchange`` return the old value, ``store``
the value stored, ``compare_exchange`` the value that was there (it succeeded iff
that equals ``expected``).

``wait(arr, i, expected, timeout)`` blocks while ``arr[i] == expected`` until a
``notify`` on the same element wakes it, returning :data:`OK`, :data:`NOT_EQUAL`
(the value differed at the call: no sleep) or :data:`TIMED_OUT`. ``notify(arr, i,
count)`` wakes up to ``count`` waiters in FIFO order and returns how many it woke.
No wake-up is ever lost (a notify after the store that changed the value always
finds a waiter that saw the old value) and nothing returns OK without being
notified. Waiters meet in a wait table inside the segment (process-shared POSIX
semaphores, no named kernel objects), so this works across threads and processes
for SharedArray memory, and across threads for any other NumPy memory.

Arguments: ``arr`` is a 1-D, aligned int32 or int64 array (a SharedArray or its
``.array``, or any NumPy array), writable except for ``load``; ``index`` is in
``range(len(arr))`` (no negative indices); values must fit the element type. From
Python, bad arguments raise clear errors; in compiled code, type errors are compile
errors and indices are bounds-checked at run time.
"""

from __future__ import annotations

import enum
import mmap
import os
import threading
import time
from typing import Any

import numpy as np
from numba import types
from numba.core.errors import TypingError
from numba.extending import overload

from . import _layout as L
from . import _native as N
from . import array as _array
from ._atomics_core import (
    _ERR_FULL,
    _ERR_INIT,
    _ERR_LOCK,
    _INTERRUPTED,
    _JIT,
    _LOCK_TIMEOUT_NS,
    _add_impl,
    _and_impl,
    _cas_impl,
    _exchange_impl,
    _load_impl,
    _notify_impl,
    _now_ns,
    _or_impl,
    _reg_add,
    _reg_remove,
    _store_impl,
    _sub_impl,
    _wait_impl,
    _waiters_impl,
    _xor_impl,
)
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    AtomicIndexError,
    ShmComputeError,
    WaitTableFullError,
)

__all__ = [
    "ALL",
    "NOT_EQUAL",
    "OK",
    "TIMED_OUT",
    "WaitResult",
    "add",
    "and_",
    "compare_exchange",
    "exchange",
    "get_spin",
    "load",
    "notify",
    "or_",
    "set_spin",
    "store",
    "sub",
    "wait",
    "waiters",
    "xor",
]


class WaitResult(enum.IntEnum):
    """What ``wait`` returns (plain ints with these values inside compiled code)."""

    OK = 0
    NOT_EQUAL = 1
    TIMED_OUT = 2


OK = WaitResult.OK
NOT_EQUAL = WaitResult.NOT_EQUAL
TIMED_OUT = WaitResult.TIMED_OUT
ALL = 1 << 62  # notify(..., count=ALL) wakes every waiter


# --- Python-facing entry points ---------------------------------------------------------
def _as_ndarray(arr: Any) -> np.ndarray:
    if isinstance(arr, np.ndarray):
        return arr
    if isinstance(arr, _array.SharedArray):
        view = arr._state.array  # the hot path skips the property's checks
        return view if view is not None else arr.array  # closed: .array raises
    raise ArgumentTypeError(f"arr must be a NumPy array or a SharedArray, got {type(arr).__name__}")


def _diagnose(
    op: str,
    arr: np.ndarray,
    index: Any,
    values: tuple[Any, ...],
    writes: bool,
    cause: BaseException,
) -> BaseException:
    """Turn a failure of the compiled call into an error that names the problem."""
    where = f"shmcompute.atomics.{op}"
    if arr.dtype not in (np.int32, np.int64):
        return ArgumentTypeError(
            f"{where}: arr must have dtype int32 or int64, got {arr.dtype}; keep "
            "counters and flags in an integer SharedArray"
        )
    if arr.ndim != 1:
        return ArgumentError(
            f"{where}: arr must be 1-D, got shape {arr.shape}; pass a flat view "
            "(arr.reshape(-1)) and a flat index"
        )
    if writes and not arr.flags.writeable:
        return ArgumentError(
            f"{where}: arr is read-only; atomics write to it (attach the SharedArray "
            "without readonly=True)"
        )
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        return ArgumentTypeError(f"{where}: index must be an int, got {type(index).__name__}")
    if not 0 <= index < arr.shape[0]:
        return AtomicIndexError(
            f"{where}: index {index} is out of range for an array of {arr.shape[0]} "
            "elements (negative indices are not allowed)"
        )
    if (arr.ctypes.data + int(index) * arr.strides[0]) % arr.itemsize:
        return ArgumentError(
            f"{where}: arr[{index}] is not aligned to {arr.itemsize} bytes, so no atomic "
            "instruction can update it; use an array that starts at an aligned offset "
            "(SharedArray data is page-aligned)"
        )
    info = np.iinfo(arr.dtype)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            return ArgumentTypeError(f"{where}: values must be ints, got {type(v).__name__}")
        if not info.min <= v <= info.max:
            return ArgumentError(
                f"{where}: value {v} does not fit {arr.dtype} "
                f"([{info.min}, {info.max}]); for all bits set use -1"
            )
    return cause


def _fail(
    op: str, arr: Any, index: Any, values: tuple[Any, ...], writes: bool, cause: BaseException
) -> BaseException:
    if not isinstance(arr, np.ndarray):
        return cause
    return _diagnose(op, arr, index, values, writes, cause)


def load(arr: Any, index: int) -> int:
    """Atomically read ``arr[index]`` (works on read-only arrays too)."""
    if type(arr) is not np.ndarray:
        arr = _as_ndarray(arr)
    try:
        return _load_impl(arr, index)
    except Exception as e:
        raise _fail("load", arr, index, (), False, e) from None


def store(arr: Any, index: int, value: int) -> int:
    """Atomically write ``value`` to ``arr[index]``; returns ``value``."""
    if type(arr) is not np.ndarray:
        arr = _as_ndarray(arr)
    try:
        return _store_impl(arr, index, value)
    except Exception as e:
        raise _fail("store", arr, index, (value,), True, e) from None


def add(arr: Any, index: int, value: int) -> int:
    """Atomically ``arr[index] += value`` (wrapping); returns the old value."""
    if type(arr) is not np.ndarray:
        arr = _as_ndarray(arr)
    try:
        return _add_impl(arr, index, value)
    except Exception as e:
        raise _fail("add", arr, index, (value,), True, e) from None


def sub(arr: Any, index: int, value: int) -> int:
    """Atomically ``arr[index] -= value`` (wrapping); returns the old value."""
    if type(arr) is not np.ndarray:
        arr = _as_ndarray(arr)
    try:
        return _sub_impl(arr, index, value)
    except Exception as e:
        raise _fail("sub", arr, index, (value,), True, e) from None


def and_(arr: Any, index: int, value: int) -> int:
    """Atomically ``arr[index] &= value``; returns the old value."""
    if type(arr) is not np.ndarray:
        arr = _as_ndarray(arr)
    try:
        return _and_impl(arr, index, value)
    except Exception as e:
        raise _fail("and_", arr, index, (value,), True, e) from None


def or_(arr: Any, index: int, value: int) -> int:
    """Atomically ``arr[index] |= value``; returns the old value."""
    if type(arr) is not np.ndarray:
        arr = _as_ndarray(arr)
    try:
        return _or_impl(arr, index, value)
    except Exception as e:
        raise _fail("or_", arr, index, (value,), True, e) from None


def xor(arr: Any, index: int, value: int) -> int:
    """Atomically ``arr[index] ^= value``; returns the old value."""
    if type(arr) is not np.ndarray:
        arr = _as_ndarray(arr)
    try:
        return _xor_impl(arr, index, value)
    except Exception as e:
        raise _fail("xor", arr, index, (value,), True, e) from None


def exchange(arr: Any, index: int, value: int) -> int:
    """Atomically replace ``arr[index]`` with ``value``; returns the old value."""
    if type(arr) is not np.ndarray:
        arr = _as_ndarray(arr)
    try:
        return _exchange_impl(arr, index, value)
    except Exception as e:
        raise _fail("exchange", arr, index, (value,), True, e) from None


def compare_exchange(arr: Any, index: int, expected: int, replacement: int) -> int:
    """Atomically: if ``arr[index] == expected`` store ``replacement``. Returns the
    value that was there (the exchange happened iff it equals ``expected``)."""
    if type(arr) is not np.ndarray:
        arr = _as_ndarray(arr)
    try:
        return _cas_impl(arr, index, expected, replacement)
    except Exception as e:
        raise _fail("compare_exchange", arr, index, (expected, replacement), True, e) from None


def _timeout_ns(timeout: float | None) -> int:
    if timeout is None:
        return -1
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer, np.floating)):
        raise ArgumentTypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
    t = float(timeout)
    if not t >= 0:  # also rejects NaN
        raise ArgumentError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
    return int(min(t, 1e9) * 1e9)


def _raise_code(op: str, code: int) -> None:
    if code == _ERR_FULL:
        raise WaitTableFullError(
            f"shmcompute.atomics.{op}: {L.LOT_NSLOTS} waiters already block on this "
            "segment's wait table; wait on elements of another SharedArray, or use fewer "
            "concurrent waiters"
        )
    if code == _ERR_LOCK:
        raise ShmComputeError(
            f"shmcompute.atomics.{op}: the segment's wait table stayed locked for "
            f"{_LOCK_TIMEOUT_NS // 10**9} s; a process probably died inside wait/notify. "
            "Recreate the SharedArray"
        )
    if code == _ERR_INIT:
        raise ShmComputeError(
            f"shmcompute.atomics.{op}: the segment's wait table was never initialized "
            "(its initializer died); recreate the SharedArray"
        )


DEFAULT_SPIN = 20e-6


def set_spin(seconds: float) -> float:
    """Set how long ``wait`` spins (in this process) before it sleeps; returns the old
    value. The default, 20 us, catches fast hand-offs between running threads and
    processes; 0 sleeps at once (best when cores are oversubscribed)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
        raise ArgumentError(f"seconds must be a number >= 0, got {seconds!r}")
    old = int(N.registry[L.REG_SPIN_NS]) / 1e9
    N.registry[L.REG_SPIN_NS] = int(min(seconds, 1.0) * 1e9)
    return old


def get_spin() -> float:
    """How long ``wait`` spins before sleeping, in seconds."""
    return int(N.registry[L.REG_SPIN_NS]) / 1e9


def wait(arr: Any, index: int, expected: int, timeout: float | None = None) -> WaitResult:
    """Block while ``arr[index] == expected`` until notified or ``timeout`` seconds pass.

    Returns :data:`OK` (woken by ``notify``), :data:`NOT_EQUAL` (the value already
    differed: no sleep) or :data:`TIMED_OUT`. The GIL is released while blocked, and
    signals (Ctrl-C) are handled. In compiled code it returns the same values as ints.
    """
    if type(arr) is not np.ndarray:
        arr = _as_ndarray(arr)
    tns = _timeout_ns(timeout)
    deadline = -1 if tns < 0 else time.monotonic_ns() + tns
    interruptible = threading.current_thread() is threading.main_thread()
    while True:
        try:
            code = _wait_impl(arr, index, expected, deadline, interruptible)
        except Exception as e:
            raise _fail("wait", arr, index, (expected,), True, e) from None
        if code != _INTERRUPTED:
            break
        # Back in Python: pending signal handlers run here (KeyboardInterrupt...).
    _raise_code("wait", code)
    return WaitResult(code)


def notify(arr: Any, index: int, count: int = ALL) -> int:
    """Wake up to ``count`` waiters on ``arr[index]`` (FIFO); return how many woke.

    With no waiters it is a fence and a load: no lock and no system call.
    """
    if type(arr) is not np.ndarray:
        arr = _as_ndarray(arr)
    if type(count) is not int and (isinstance(count, bool) or not isinstance(count, np.integer)):
        raise ArgumentTypeError(
            f"notify: count must be an int (or ALL), got {type(count).__name__} {count!r}"
        )
    try:
        code = _notify_impl(arr, index, count)
    except Exception as e:
        if count < 0:
            raise ArgumentError(f"notify: count must be >= 0 (or ALL), got {count}") from None
        raise _fail("notify", arr, index, (), True, e) from None
    _raise_code("notify", code)
    return code


def waiters(arr: Any, index: int) -> int:
    """How many threads and processes are blocked in ``wait`` on ``arr[index]`` now."""
    if type(arr) is not np.ndarray:
        arr = _as_ndarray(arr)
    try:
        return _waiters_impl(arr, index)
    except Exception as e:
        raise _fail("waiters", arr, index, (), False, e) from None


# --- the same functions inside compiled code -----------------------------------------
@overload(load, jit_options=_JIT, inline="always")
def _ov_load(arr, index):
    return lambda arr, index: _load_impl(arr, index)


@overload(store, jit_options=_JIT, inline="always")
def _ov_store(arr, index, value):
    return lambda arr, index, value: _store_impl(arr, index, value)


@overload(add, jit_options=_JIT, inline="always")
def _ov_add(arr, index, value):
    return lambda arr, index, value: _add_impl(arr, index, value)


@overload(sub, jit_options=_JIT, inline="always")
def _ov_sub(arr, index, value):
    return lambda arr, index, value: _sub_impl(arr, index, value)


@overload(and_, jit_options=_JIT, inline="always")
def _ov_and(arr, index, value):
    return lambda arr, index, value: _and_impl(arr, index, value)


@overload(or_, jit_options=_JIT, inline="always")
def _ov_or(arr, index, value):
    return lambda arr, index, value: _or_impl(arr, index, value)


@overload(xor, jit_options=_JIT, inline="always")
def _ov_xor(arr, index, value):
    return lambda arr, index, value: _xor_impl(arr, index, value)


@overload(exchange, jit_options=_JIT, inline="always")
def _ov_exchange(arr, index, value):
    return lambda arr, index, value: _exchange_impl(arr, index, value)


@overload(compare_exchange, jit_options=_JIT, inline="always")
def _ov_cas(arr, index, expected, replacement):
    return lambda arr, index, expected, replacement: _cas_impl(arr, index, expected, replacement)


@overload(wait, jit_options=_JIT)
def _ov_wait(arr, index, expected, timeout=None):
    if timeout is None or isinstance(timeout, (types.NoneType, types.Omitted)):

        def wait_forever(arr, index, expected, timeout=None):
            code = _wait_impl(arr, index, expected, -1, False)
            if code < 0:
                raise RuntimeError("shmcompute.atomics.wait: wait table full or abandoned")
            return code

        return wait_forever
    if not isinstance(timeout, (types.Integer, types.Float)):
        raise TypingError(
            f"shmcompute.atomics.wait: timeout must be seconds or None, got {timeout}"
        )

    def wait_timeout(arr, index, expected, timeout=None):
        if not timeout >= 0:
            raise ValueError("shmcompute.atomics.wait: timeout must be >= 0")
        ts = np.empty(2, np.int64)
        deadline = _now_ns(ts) + np.int64(min(timeout, 1e9) * 1e9)
        code = _wait_impl(arr, index, expected, deadline, False)
        if code < 0:
            raise RuntimeError("shmcompute.atomics.wait: wait table full or abandoned")
        return code

    return wait_timeout


@overload(notify, jit_options=_JIT)
def _ov_notify(arr, index, count=ALL):
    # (count is the default itself, ALL, when the call leaves it out)
    if not isinstance(count, (types.Integer, types.Omitted, int)) or isinstance(
        count, (types.Boolean, bool)
    ):
        raise TypingError(f"shmcompute.atomics.notify: count must be an integer, got {count}")

    def notify_impl(arr, index, count=ALL):
        code = _notify_impl(arr, index, count)
        if code < 0:
            raise RuntimeError("shmcompute.atomics.notify: wait table abandoned")
        return code

    return notify_impl


# --- set up this process's registry and private wait table -----------------------------
def _setup() -> None:
    # Memory that is not a SharedArray segment (plain NumPy arrays) meets in this
    # process-private table; it lives as long as the process.
    # Private, not shared: after fork, plain arrays at the same address in parent and
    # child are different memory, so they must not meet in one table. A fork child
    # starts with an empty table (a copy of the parent's would hold its waiters).
    local = mmap.mmap(-1, L.LOT_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    table = np.frombuffer(local, dtype=np.uint8)
    N.registry[L.REG_LOCAL_LOT] = table.ctypes.data
    N.registry[L.REG_SPIN_NS] = int(DEFAULT_SPIN * 1e9)
    globals()["_local_lot"] = table  # keeps the mapping alive for the process lifetime
    os.register_at_fork(after_in_child=lambda: table.fill(0))

    def add(start: int, end: int, lot: int) -> None:
        if not _reg_add(start, end, lot):
            raise ShmComputeError(
                f"more than {L.REG_CAPACITY} shared arrays are mapped in this process; "
                "close() the ones you no longer use"
            )

    _array._install_registry(add, _reg_remove)


_setup()
