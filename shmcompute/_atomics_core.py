"""The compiled half of :mod:`shmcompute.atomics`: compile-time argument checks, the
per-element operations (LLVM atomic instructions, inlined into kernels), the registry of
mapped segments (a seqlock) and the wait table (process-shared semaphores in slots of
each segment's lot) behind ``wait``/``notify``. ``atomics.py`` holds the public
functions, their Python-side error messages and their overloads for compiled code."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, types
from numba.core.errors import TypingError
from numba.extending import overload

from . import _layout as L
from . import _native as N

# internal codes returned by the compiled wait/notify cores
_INTERRUPTED = 3  # a signal arrived while blocked: Python runs handlers, then retries
_ERR_FULL = -1
_ERR_LOCK = -2
_ERR_INIT = -3
_LOCK_TIMEOUT_NS = 10_000_000_000  # no one holds a wait-table lock while blocking

_JIT: dict[str, Any] = {"cache": True}
_JIT_NOGIL: dict[str, Any] = {"cache": True, "nogil": True}
# The per-element operations are inlined at the Numba IR level: a call layer costs more
# than a locked add (~2 ns uncontended here), and LLVM does not inline across them.
_INLINE: dict[str, Any] = {"cache": True, "inline": "always"}


# --- compile-time argument checks (clear TypingErrors in kernels) ----------------------
def _check_args(arr, index):
    pass


@overload(_check_args, jit_options=_JIT)
def _ov_check_args(arr, index):
    atomic_dtypes = (types.int32, types.int64)
    if not isinstance(arr, types.Array) or arr.ndim != 1 or arr.dtype not in atomic_dtypes:
        raise TypingError(f"shmcompute.atomics: arr must be a 1-D int32 or int64 array, got {arr}")
    if not isinstance(index, types.Integer):
        raise TypingError(f"shmcompute.atomics: index must be an integer, got {index}")
    return lambda arr, index: None


def _check_writable(arr):
    pass


@overload(_check_writable, jit_options=_JIT)
def _ov_check_writable(arr):
    if isinstance(arr, types.Array) and not arr.mutable:
        raise TypingError(f"shmcompute.atomics: arr is read-only ({arr}); atomics write to it")
    return lambda arr: None


def _fit(arr, value):
    pass


@overload(_fit, jit_options=_JIT)
def _ov_fit(arr, value):
    if not isinstance(value, types.Integer):
        raise TypingError(f"shmcompute.atomics: values must be integers, got {value}")
    if arr.dtype == types.int32:

        def impl32(arr, value):
            if value < -2147483648 or value > 2147483647:
                raise OverflowError("shmcompute.atomics: value does not fit int32")
            return np.int32(value)

        return impl32
    if isinstance(value, types.Integer) and not value.signed and value.bitwidth == 64:

        def impl_u64(arr, value):
            if value > 9223372036854775807:
                raise OverflowError("shmcompute.atomics: value does not fit int64")
            return np.int64(value)

        return impl_u64
    return lambda arr, value: np.int64(value)


def _misaligned(arr, index):
    pass


@overload(_misaligned, jit_options=_JIT)
def _ov_misaligned(arr, index):
    # A compile-time mask: `address % arr.itemsize` is a runtime division (~13 ns).
    mask = arr.dtype.bitwidth // 8 - 1
    return lambda arr, index: (N.item_address(arr, index) & mask) != 0


@njit(**_INLINE)
def _slot_ro(arr, index):
    _check_args(arr, index)
    if index < 0 or index >= arr.shape[0]:
        raise IndexError("shmcompute.atomics: index out of range")
    if _misaligned(arr, index):
        raise ValueError("shmcompute.atomics: element is not aligned to its size")


@njit(**_INLINE)
def _slot(arr, index):
    _check_writable(arr)
    _slot_ro(arr, index)


# --- the operations, compiled -----------------------------------------------------------
@njit(**_INLINE)
def _load_impl(arr, index):
    _slot_ro(arr, index)
    return N.arr_load(arr, index)


@njit(**_INLINE)
def _store_impl(arr, index, value):
    _slot(arr, index)
    v = _fit(arr, value)
    N.arr_store(arr, index, v)
    return v


@njit(**_INLINE)
def _add_impl(arr, index, value):
    _slot(arr, index)
    return N.arr_add(arr, index, _fit(arr, value))


@njit(**_INLINE)
def _sub_impl(arr, index, value):
    _slot(arr, index)
    return N.arr_sub(arr, index, _fit(arr, value))


@njit(**_INLINE)
def _and_impl(arr, index, value):
    _slot(arr, index)
    return N.arr_and(arr, index, _fit(arr, value))


@njit(**_INLINE)
def _or_impl(arr, index, value):
    _slot(arr, index)
    return N.arr_or(arr, index, _fit(arr, value))


@njit(**_INLINE)
def _xor_impl(arr, index, value):
    _slot(arr, index)
    return N.arr_xor(arr, index, _fit(arr, value))


@njit(**_INLINE)
def _exchange_impl(arr, index, value):
    _slot(arr, index)
    return N.arr_xchg(arr, index, _fit(arr, value))


@njit(**_INLINE)
def _cas_impl(arr, index, expected, replacement):
    _slot(arr, index)
    return N.arr_cas(arr, index, _fit(arr, expected), _fit(arr, replacement))


@njit(**_JIT)
def _cas_address(addr, expected, desired):
    return N.i64_cas(addr, expected, desired)


# --- the registry of mapped segments (seqlock; writers hold _array._map_lock) -----------
@njit(**_JIT)
def _reg_add(start, end, lot):
    reg = N.registry_address()
    N.i64_add(reg + L.REG_SEQ * 8, 1)  # odd: readers retry
    n = N.i64_load(reg + L.REG_COUNT * 8)
    # Drop stale entries overlapping the new range: a mapping freed by the garbage
    # collector is untracked just after munmap, so its address may already be reused.
    j = 0
    while j < n:
        e = reg + (L.REG_ENTRIES + j * L.REG_ENTRY_WORDS) * 8
        if N.i64_load(e) < end and start < N.i64_load(e + 8):
            last = reg + (L.REG_ENTRIES + (n - 1) * L.REG_ENTRY_WORDS) * 8
            for w in range(L.REG_ENTRY_WORDS):
                N.i64_store(e + w * 8, N.i64_load(last + w * 8))
            n -= 1
        else:
            j += 1
    ok = n < L.REG_CAPACITY
    if ok:
        e = reg + (L.REG_ENTRIES + n * L.REG_ENTRY_WORDS) * 8
        N.i64_store(e, start)
        N.i64_store(e + 8, end)
        N.i64_store(e + 16, lot)
        n += 1
    N.i64_store(reg + L.REG_COUNT * 8, n)
    N.i64_add(reg + L.REG_SEQ * 8, 1)  # even again
    return ok


@njit(**_JIT)
def _reg_remove(start):
    reg = N.registry_address()
    N.i64_add(reg + L.REG_SEQ * 8, 1)
    n = N.i64_load(reg + L.REG_COUNT * 8)
    for j in range(n):
        e = reg + (L.REG_ENTRIES + j * L.REG_ENTRY_WORDS) * 8
        if N.i64_load(e) == start:
            last = reg + (L.REG_ENTRIES + (n - 1) * L.REG_ENTRY_WORDS) * 8
            for w in range(L.REG_ENTRY_WORDS):
                N.i64_store(e + w * 8, N.i64_load(last + w * 8))
            N.i64_store(reg + L.REG_COUNT * 8, n - 1)
            break
    N.i64_add(reg + L.REG_SEQ * 8, 1)


@njit(**_JIT)
def _lookup(addr):
    """(wait table, key) for the element at ``addr``: the segment's table keyed by the
    byte offset (the same in every process), else the process-local table by address."""
    reg = N.registry_address()
    while True:
        seq = N.i64_load(reg + L.REG_SEQ * 8)
        if seq & 1:  # a writer is mid-update (a few hundred ns, never blocked)
            N.sched_yield()
            continue
        lot = 0
        key = addr
        n = N.i64_load(reg + L.REG_COUNT * 8)
        for j in range(n):
            e = reg + (L.REG_ENTRIES + j * L.REG_ENTRY_WORDS) * 8
            start = N.i64_load(e)
            if start <= addr and addr < N.i64_load(e + 8):
                lot = N.i64_load(e + 16)
                key = addr - start
                break
        if N.i64_load(reg + L.REG_SEQ * 8) == seq:
            break
    if lot == 0:
        lot = N.i64_load(reg + L.REG_LOCAL_LOT * 8)
    return lot, key


# --- the wait table ---------------------------------------------------------------------
@njit(**_JIT)
def _now_ns(ts):
    N.clock_gettime(N.CLOCK_MONOTONIC, N.voidptr(ts.ctypes.data))
    return ts[0] * 1_000_000_000 + ts[1]


@njit(**_JIT)
def _errno():
    return N.errno_value()


@njit(**_JIT)
def _sem_wait_until(sem, deadline, ts):
    """sem_wait with an absolute CLOCK_MONOTONIC deadline (< 0: none); 0 or errno."""
    if deadline < 0:
        rc = N.sem_wait(N.voidptr(sem))
    else:
        ts[0] = deadline // 1_000_000_000
        ts[1] = deadline % 1_000_000_000
        rc = N.sem_clockwait(N.voidptr(sem), N.CLOCK_MONOTONIC, N.voidptr(ts.ctypes.data))
    return 0 if rc == 0 else _errno()


@njit(**_JIT)
def _lot_ready(lot, ts):
    """Initialize the table on first use (whoever wins the CAS); 0 or an error code."""
    state = lot + L.LOT_STATE
    if N.i64_load(state) == L.LOT_READY:
        return 0
    if N.i64_cas(state, L.LOT_UNINIT, L.LOT_INITIALIZING) == L.LOT_UNINIT:
        N.sem_init(N.voidptr(lot + L.LOT_LOCK), 1, 1)
        for k in range(L.LOT_NSLOTS):
            N.sem_init(N.voidptr(lot + L.LOT_SLOTS + k * L.LOT_SLOT_SIZE + L.SLOT_SEM), 1, 0)
        N.i64_store(state, L.LOT_READY)
        return 0
    give_up = _now_ns(ts) + _LOCK_TIMEOUT_NS  # the winner needs microseconds
    while N.i64_load(state) != L.LOT_READY:
        if _now_ns(ts) > give_up:
            return _ERR_INIT
        N.sched_yield()
    return 0


@njit(**_JIT)
def _lock(lot, ts):
    sem = lot + L.LOT_LOCK
    if N.sem_trywait(N.voidptr(sem)) == 0:
        return 0
    # Holders never block while holding it, so a long wait means the holder died.
    deadline = _now_ns(ts) + _LOCK_TIMEOUT_NS
    while True:
        err = _sem_wait_until(sem, deadline, ts)
        if err == 0:
            return 0
        if err != N.EINTR:
            return _ERR_LOCK


@njit(**_JIT)
def _unlock(lot):
    N.sem_post(N.voidptr(lot + L.LOT_LOCK))


@njit(**_JIT)
def _gone(slot):
    """The process that took this waiter slot has died (SIGKILLed while it waited, say):
    it will never free the slot, nor take a wake-up meant for the living."""
    return N.kill(np.int32(N.i64_load(slot + L.SLOT_PID)), 0) != 0 and N.errno_value() == N.ESRCH


@njit(**_JIT)
def _reclaim(lot):
    """Free the slots of dead waiters (under the lock); return one of them, or 0."""
    freed = 0
    for k in range(L.LOT_NSLOTS):
        s = lot + L.LOT_SLOTS + k * L.LOT_SLOT_SIZE
        state = N.i64_load(s + L.SLOT_STATE)
        if state == L.SLOT_FREE or not _gone(s):
            continue
        if state == L.SLOT_WAITING:
            N.i64_add(lot + L.LOT_NWAITERS, -1)
        else:  # SLOT_WOKEN: its post was never taken; the slot's next user starts at 0
            N.sem_trywait(N.voidptr(s + L.SLOT_SEM))
        N.i64_store(s + L.SLOT_STATE, L.SLOT_FREE)
        freed = s
    return freed


@njit(**_JIT_NOGIL)
def _wait_impl(arr, index, expected, deadline, interruptible):
    _slot(arr, index)
    exp = _fit(arr, expected)
    lot, key = _lookup(N.item_address(arr, index))
    ts = np.empty(2, np.int64)
    err = _lot_ready(lot, ts)
    if err != 0:
        return err
    if _lock(lot, ts) != 0:
        return _ERR_LOCK
    slot = 0
    for k in range(L.LOT_NSLOTS):
        s = lot + L.LOT_SLOTS + k * L.LOT_SLOT_SIZE
        if N.i64_load(s + L.SLOT_STATE) == L.SLOT_FREE:
            slot = s
            break
    if slot == 0:
        slot = _reclaim(lot)
    if slot == 0:
        _unlock(lot)
        return _ERR_FULL
    N.i64_store(slot + L.SLOT_KEY, key)
    N.i64_store(slot + L.SLOT_TICKET, N.i64_add(lot + L.LOT_TICKET, 1))
    N.i64_store(slot + L.SLOT_PID, N.getpid())
    N.i64_store(slot + L.SLOT_STATE, L.SLOT_WAITING)
    # Enqueue before reading the value (a locked add: a full barrier). notify fences
    # before reading LOT_NWAITERS, so either it sees us or we see the new value: no
    # lost wake-up even when notify takes its no-waiter fast path.
    N.i64_add(lot + L.LOT_NWAITERS, 1)
    if N.arr_load(arr, index) != exp:
        N.i64_store(slot + L.SLOT_STATE, L.SLOT_FREE)
        N.i64_add(lot + L.LOT_NWAITERS, -1)
        _unlock(lot)
        return 1  # NOT_EQUAL
    _unlock(lot)

    # Spin briefly before sleeping: a notify that comes within the budget finds us awake,
    # so its sem_post makes no futex call and we never sleep (a wake-up from sleep costs
    # tens of microseconds here). Bounded, because spinning collapses when cores are
    # oversubscribed.
    spin = N.i64_load(N.registry_address() + L.REG_SPIN_NS * 8)
    if spin > 0:
        stop = _now_ns(ts) + spin
        if deadline >= 0 and deadline < stop:
            stop = deadline
        k = 0
        while N.i64_load(slot + L.SLOT_STATE) == L.SLOT_WAITING:
            N.cpu_relax()
            k += 1
            if (k & 63) == 0 and _now_ns(ts) >= stop:
                break

    sem = slot + L.SLOT_SEM
    while True:
        err = _sem_wait_until(sem, deadline, ts)
        if err == 0:
            break  # a notifier moved us to SLOT_WOKEN and posted
        if err == N.EINTR and not interruptible:
            continue
        # Timed out or interrupted: withdraw, unless a notifier chose us meanwhile.
        if _lock(lot, ts) != 0:
            return _ERR_LOCK
        if N.i64_load(slot + L.SLOT_STATE) == L.SLOT_WAITING:
            N.i64_store(slot + L.SLOT_STATE, L.SLOT_FREE)
            N.i64_add(lot + L.LOT_NWAITERS, -1)
            _unlock(lot)
            return 2 if err == N.ETIMEDOUT else _INTERRUPTED
        _unlock(lot)
        # The notifier posts under the lock, so its post is there: consume it, so the
        # semaphore is back at 0 for the slot's next user. Then report OK (counted).
        while N.sem_wait(N.voidptr(sem)) != 0:
            pass
        break
    N.i64_store(slot + L.SLOT_STATE, L.SLOT_FREE)
    return 0  # OK


@njit(**_JIT)
def _notify_impl(arr, index, count):
    _slot(arr, index)
    if count < 0:
        raise ValueError("shmcompute.atomics: count must be >= 0")
    lot, key = _lookup(N.item_address(arr, index))
    N.fence()  # orders the caller's store (plain or atomic) before the read below
    if count == 0 or N.i64_load(lot + L.LOT_NWAITERS) == 0:
        return 0  # nobody waits anywhere in this table: no lock, no system call
    ts = np.empty(2, np.int64)
    if _lock(lot, ts) != 0:
        return _ERR_LOCK
    woken = 0
    while woken < count:
        best = 0
        best_ticket = 0
        for k in range(L.LOT_NSLOTS):
            s = lot + L.LOT_SLOTS + k * L.LOT_SLOT_SIZE
            if N.i64_load(s + L.SLOT_STATE) == L.SLOT_WAITING and N.i64_load(s + L.SLOT_KEY) == key:
                t = N.i64_load(s + L.SLOT_TICKET)
                if best == 0 or t < best_ticket:
                    best = s
                    best_ticket = t
        if best == 0:
            break
        N.i64_add(lot + L.LOT_NWAITERS, -1)
        if _gone(best):  # a dead waiter takes no wake-up: free its slot, wake the next
            N.i64_store(best + L.SLOT_STATE, L.SLOT_FREE)
            continue
        N.i64_store(best + L.SLOT_STATE, L.SLOT_WOKEN)
        N.sem_post(N.voidptr(best + L.SLOT_SEM))
        woken += 1
    _unlock(lot)
    return woken


@njit(**_JIT)
def _waiters_impl(arr, index):
    _slot_ro(arr, index)
    lot, key = _lookup(N.item_address(arr, index))
    if N.i64_load(lot + L.LOT_NWAITERS) == 0:
        return 0
    n = 0
    for k in range(L.LOT_NSLOTS):
        s = lot + L.LOT_SLOTS + k * L.LOT_SLOT_SIZE
        if N.i64_load(s + L.SLOT_STATE) == L.SLOT_WAITING and N.i64_load(s + L.SLOT_KEY) == key:
            n += not _gone(s)
    return n
