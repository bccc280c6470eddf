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

# --- pool control block (process backend) -----------------------------------------
# One int64 SharedArray per pool. Word indices (not bytes) for the header and the
# worker records; byte offsets for the rings. Layout::
#
#     words [0, PC_HEADER_WORDS)                 pool header (PC_*)
#     words [PC_HEADER_WORDS + w * W_WORDS, ...)  worker record w (W_*), per slot
#     bytes PC_RINGS + w * RING_BYTES_PER_WORKER  task ring w, then result ring w
#
# Each ring is single-producer single-consumer: the parent produces tasks and consumes
# results; worker w consumes tasks and produces results. A ring index only grows; the
# slot is index % RING_SLOTS. The parent never has more than RING_SLOTS tasks
# outstanding on a worker, so neither ring can overflow (one result per task).
PC_RESULT_SEQ = 0  # bumped (and notified) by a worker after it publishes results
PC_SPINNERS = 1  # callers spinning in Future.result(); while > 0 workers skip the notify
PC_BUSY = 2  # workers running a task now (spin only while a core is left over)
PC_CORES = 3  # usable cores, set by the parent
PC_HEADER_WORDS = 8

W_DOORBELL = 0  # the parent bumps it (and notifies) after pushing tasks or asking to stop
W_TASK_TAIL = 1  # tasks pushed (parent writes)
W_TASK_HEAD = 2  # tasks finished (worker writes, after publishing the result)
W_RES_TAIL = 3  # results published (worker writes)
W_RES_HEAD = 4  # unused: the parent keeps its result head to itself (see _heads)
W_STATE = 5  # WS_* (worker writes, parent reads)
W_PID = 6
W_CURRENT = 7  # seq of the task being run, -1 between tasks
W_STARTED_NS = 8  # CLOCK_MONOTONIC when W_CURRENT started (system-wide clock)
W_HEARTBEAT = 9  # bumped by the worker's watcher thread every heartbeat interval
W_HEARTBEAT_NS = 10  # CLOCK_MONOTONIC of the last beat
W_DONE = 11  # tasks finished by this process
W_ERRORS = 12  # of which raised
W_STOP = 13  # nonzero: finish the queued tasks, then exit
W_WORDS = 16

WS_EMPTY = 0
WS_STARTING = 1
WS_IDLE = 2
WS_BUSY = 3
WS_EXITING = 4  # recycled (max_tasks_per_child) or stopping: exit is expected
WS_INIT_FAILED = 5  # the initializer raised; the message is in the result ring

RING_SLOTS = 32
SLOT_BYTES = 16384
SLOT_HEAD = 48  # slot header: seq, flags, nbytes, t_start_ns, t_end_ns (int64), pad
SLOT_INLINE = SLOT_BYTES - SLOT_HEAD  # payloads above this spill to their own segment
RING_BYTES = RING_SLOTS * SLOT_BYTES
RING_BYTES_PER_WORKER = 2 * RING_BYTES

# slot header words, relative to the slot start (in int64 words)
SH_SEQ = 0
SH_FLAGS = 1
SH_NBYTES = 2
SH_T_START = 3
SH_T_END = 4

# SH_FLAGS bits
SF_ERROR = 1  # a result that is an exception
SF_SPILL = 2  # the payload is a pickled SharedArrayHandle of a uint8 segment
SF_INIT = 4  # an initializer failure report (seq = -1)


def pool_bytes(nslots: int) -> int:
    """Size of a control block with room for ``nslots`` worker records."""
    rings = -(-(PC_HEADER_WORDS + nslots * W_WORDS) * 8 // 4096) * 4096
    return rings + nslots * RING_BYTES_PER_WORKER


def ring_offset(nslots: int, w: int, results: bool) -> int:
    """Byte offset of worker ``w``'s task ring (or result ring) in the control block."""
    rings = pool_bytes(nslots) - nslots * RING_BYTES_PER_WORKER
    return rings + w * RING_BYTES_PER_WORKER + (RING_BYTES if results else 0)
