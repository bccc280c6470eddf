"""Byte offsets of every shared header, in one place (no magic offsets elsewhere).

Segment layout (every SharedArray segment)::

    0      segment header (SEG_*), 128 bytes
    128    wait table ("parking lot", LOT_*), LOT_SIZE bytes
    ...    padding
    16384  array data (DATA_OFFSET): page-aligned for 4 KiB and 16 KiB pages

The wait table is what ``atomics.wait``/``notify`` meet on: a lock, a waiter count and
LOT_NSLOTS waiter slots, each with its own process-shared POSIX semaphore. All integer
fields are int64 and accessed only with atomic instructions once the segment is shared.
"""

from __future__ import annotations

# --- segment header -------------------------------------------------------------
SEG_MAGIC = 0  # MAGIC once the creator finished the header
SEG_VERSION = 8
SEG_OWNER_PID = 16  # the owning process; changes when ownership is transferred
SEG_OWNER_START = 24  # owner's start time (clock ticks since boot): guards pid reuse
SEG_TRANSFER_TOKEN = 32  # nonzero while a transfer handle is waiting to be claimed
SEG_DATA_OFFSET = 40
SEG_DATA_NBYTES = 48
SEG_HEADER_SIZE = 128

MAGIC = int.from_bytes(b"SHMCARR1", "little")
VERSION = 1

# --- wait table ("parking lot") ---------------------------------------------------
SEG_LOT = SEG_HEADER_SIZE  # offset of the wait table inside a segment

LOT_STATE = 0  # LOT_UNINIT -> LOT_INITIALIZING -> LOT_READY, by CAS (lazy init)
LOT_NWAITERS = 8  # slots in state SLOT_WAITING; notify's no-syscall fast path reads it
LOT_TICKET = 16  # monotonically increasing: FIFO order of waiters
LOT_LOCK = 32  # sem_t used as a mutex (value 1 = free), guards slot transitions
LOT_SLOTS = 64
LOT_NSLOTS = 128
LOT_SLOT_SIZE = 64
LOT_SIZE = LOT_SLOTS + LOT_NSLOTS * LOT_SLOT_SIZE

# one waiter slot, relative to its start
SLOT_SEM = 0  # sem_t, 32 bytes on glibc (value 0 while idle)
SLOT_KEY = 32  # which element: byte offset in the segment (or address, local table)
SLOT_STATE = 40
SLOT_TICKET = 48
SLOT_PID = 56

SEM_T_SIZE = 32  # sizeof(sem_t) on 64-bit glibc

LOT_UNINIT = 0
LOT_INITIALIZING = 1
LOT_READY = 2

SLOT_FREE = 0
SLOT_WAITING = 1  # enqueued; only a notifier (under the lock) moves it to SLOT_WOKEN
SLOT_WOKEN = 2  # the notifier posted the semaphore; the waiter frees the slot

DATA_OFFSET = 16384
assert SEG_LOT + LOT_SIZE <= DATA_OFFSET

# --- process-local registry of mapped segments (read by compiled code) ------------
# int64 words: [REG_SEQ] seqlock, [REG_COUNT] entries, [REG_LOCAL_LOT] address of the
# process-private wait table used for memory that is not a SharedArray segment,
# [REG_SPIN_NS] the spin budget of wait(), then
# REG_CAPACITY entries of (start, end, lot address) from REG_ENTRIES.
REG_SEQ = 0
REG_COUNT = 1
REG_LOCAL_LOT = 2
REG_SPIN_NS = 3  # how long wait() spins before sleeping (atomics.set_spin)
REG_ENTRIES = 8
REG_ENTRY_WORDS = 3
REG_CAPACITY = 8192
REG_WORDS = REG_ENTRIES + REG_CAPACITY * REG_ENTRY_WORDS
