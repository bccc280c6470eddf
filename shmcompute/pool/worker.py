"""The body of a process worker: attach the control block, run tasks from its ring.

::

    parent                          control block (shared)             worker w
    ------                          ----------------------             --------
    submit -> pickle -> push   -->  task ring w   [slot][slot]...  -->  pop, run
             bump doorbell w,                                           |
             notify                                                     v
    collector / caller      <--     result ring w [slot][slot]...  <--  push result,
    (spinning in result())          RESULT_SEQ (bumped + notified        bump + notify
                                    unless a caller is spinning)         (or not)

    watcher thread: heartbeat every interval; exits the process at once if the
    owner's pidfd becomes readable (the owner died): no orphans.

The worker never blocks on anything but its doorbell and the owner's pidfd.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _layout as L
from .. import atomics as at
from ..array import SharedArray, SharedArrayHandle, _start_time
from . import _spin
from ._ring import Rings, dump_exception, spill, unspill

EXIT_ORPHANED = 70  # the owner died; the worker exited on its own
EXIT_INIT_FAILED = 71

_PROTOCOL = pickle.HIGHEST_PROTOCOL


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a new worker needs; pickled to it once at start."""

    handle: SharedArrayHandle
    nslots: int
    slot: int
    owner_pid: int
    owner_start: int
    initializer: Any
    initargs: tuple[Any, ...]
    max_tasks: int  # 0: unlimited
    heartbeat_interval: float
    spin: float  # seconds an idle worker spins on its doorbell before sleeping


def _watch_owner(spec: WorkerSpec, words: Any, rec: int) -> None:
    """Heartbeat, and exit the moment the owner dies (pidfd: no polling of the pid)."""
    interval_ms = max(1, int(spec.heartbeat_interval * 1000))
    fd = -1
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(spec.owner_pid)
        except ProcessLookupError:
            os._exit(EXIT_ORPHANED)
        # The pid could have been reused before we opened it: compare start times.
        if _start_time(spec.owner_pid) != spec.owner_start:
            os._exit(EXIT_ORPHANED)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
    while True:
        at.store(words, rec + L.W_HEARTBEAT_NS, time.monotonic_ns())
        at.add(words, rec + L.W_HEARTBEAT, 1)
        if fd >= 0:
            if poller.poll(interval_ms):
                os._exit(EXIT_ORPHANED)
        else:  # pragma: no cover - no pidfd (macOS, old kernels): check each beat
            time.sleep(spec.heartbeat_interval)
            if _start_time(spec.owner_pid) != spec.owner_start:
                os._exit(EXIT_ORPHANED)


def _warm_up() -> None:
    """Load every compiled function a worker calls from Numba's cache, once, at import.

    The forkserver imports this module (preload), so each forked worker starts with them
    ready: without it a new worker spends ~150 ms in Numba before its first task.
    """
    words = np.zeros(L.PC_HEADER_WORDS + L.W_WORDS, np.int64)
    at.store(words, 0, 1)
    at.load(words, 0)
    at.add(words, 0, 1)
    at.sub(words, 0, 1)
    at.notify(words, 0)
    at.wait(words, 0, -1, 0.0)
    _spin.warm_up()


_warm_up()


def main(spec: WorkerSpec) -> None:
    """Entry point of a worker process (``multiprocessing.Process`` target)."""
    # Ctrl-C goes to the whole process group; the parent decides what happens to tasks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The worker spins on its ring itself before it parks (see _serve), so wait() need not.
    at.set_spin(0)
    ctrl = SharedArray.attach(spec.handle)
    words = ctrl.array
    rings = Rings(words, spec.nslots)
    w = spec.slot
    rec = Rings.rec(w)
    at.store(words, rec + L.W_PID, os.getpid())
    threading.Thread(
        target=_watch_owner, args=(spec, words, rec), name="shmcompute-watch", daemon=True
    ).start()

    if spec.initializer is not None:
        try:
            spec.initializer(*spec.initargs)
        except BaseException as e:
            _report(words, rings, w, rec, -1, L.SF_INIT | L.SF_ERROR, dump_exception(e), 0, 0)
            at.store(words, rec + L.W_STATE, L.WS_INIT_FAILED)
            at.notify(words, rec + L.W_STATE)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INIT_FAILED)

    at.store(words, rec + L.W_STATE, L.WS_IDLE)
    at.notify(words, rec + L.W_STATE)
    _serve(spec, words, rings, w, rec)
    # Leaving normally: flush, and skip interpreter teardown (atexit of the parent's
    # modules, the inherited multiprocessing state) as multiprocessing children do.
    del words, rings
    ctrl.close()
    sys.stdout.flush()
    sys.stderr.flush()


def _serve(spec: WorkerSpec, words: Any, rings: Rings, w: int, rec: int) -> None:
    begin, end = _spin.worker_begin, _spin.worker_end
    spin_tail, spin_ns = _spin.spin_while_equal, int(spec.spin * 1e9)
    head = 0  # tasks finished (mirrors W_TASK_HEAD)
    res_tail = 0
    done = 0
    while True:
        bell = at.load(words, rec + L.W_DOORBELL)
        tail = at.load(words, rec + L.W_TASK_TAIL)
        if head == tail:
            if at.load(words, rec + L.W_STOP):
                at.store(words, rec + L.W_STATE, L.WS_EXITING)
                return
            at.store(words, rec + L.W_STATE, L.WS_IDLE)
            # Spin on the ring's tail before parking, without entering the wait table: a
            # task pushed within the budget then costs the parent no notify at all (with
            # no waiter, notify is a fence and a load), and us no wake-up. Bounded:
            # spinning collapses when cores are oversubscribed.
            # Only while a core is left for the parent and the busy workers, though.
            spare = at.load(words, L.PC_BUSY) + 2 <= at.load(words, L.PC_CORES)
            if spare and spin_tail(words, rec + L.W_TASK_TAIL, tail, spin_ns) != tail:
                continue
            # Parent death ends the process from the watcher thread, so this may sleep
            # until the doorbell rings; the timeout only bounds it as a matter of rule.
            at.wait(words, rec + L.W_DOORBELL, bell, 60.0)
            continue
        seq, flags, _, _, data = rings.read(w, False, head)
        t0 = time.monotonic_ns()
        begin(words, rec, seq, t0, L.W_STATE, L.W_STARTED_NS, L.W_CURRENT, L.WS_BUSY)
        try:
            if flags & L.SF_SPILL:
                data = memoryview(unspill(data))
            fn, args, kwargs = pickle.loads(data)
            del data
            value = fn(*args, **kwargs)
            del fn, args, kwargs
            try:
                out = pickle.dumps(value, protocol=_PROTOCOL)
                rflags = 0
            except BaseException as e:
                e.add_note(f"(while pickling the result, a {type(value).__name__}, to send it)")
                out, rflags = dump_exception(e), L.SF_ERROR
            del value
        except BaseException as e:
            out, rflags = dump_exception(e), L.SF_ERROR
        t1 = time.monotonic_ns()
        out, rflags = _fit(out, rflags)
        rings.write(w, True, res_tail, seq, rflags, out, t0, t1)
        res_tail += 1
        head += 1
        done += 1
        end(
            words,
            rec,
            bool(rflags & L.SF_ERROR),
            res_tail,
            head,
            L.W_DONE,
            L.W_ERRORS,
            L.W_RES_TAIL,
            L.W_TASK_HEAD,
            L.W_CURRENT,
            L.PC_SPINNERS,
            L.PC_RESULT_SEQ,
        )
        if spec.max_tasks and done >= spec.max_tasks:
            at.store(words, rec + L.W_STATE, L.WS_EXITING)
            return


def _fit(out: bytes, flags: int) -> tuple[bytes, int]:
    """A payload too large for a ring slot moves to its own segment, owned by the
    parent once it attaches the transfer handle."""
    if len(out) <= L.SLOT_INLINE:
        return out, flags
    seg = spill(out)
    return pickle.dumps(seg.transfer(), protocol=_PROTOCOL), flags | L.SF_SPILL


def _report(
    words: Any,
    rings: Rings,
    w: int,
    rec: int,
    seq: int,
    flags: int,
    out: bytes,
    t0: int,
    t1: int,
    res_tail: int = 0,
) -> int:
    """Publish one message outside the task flow (the initializer's failure) and wake the
    parent; returns the new result-ring tail."""
    out, flags = _fit(out, flags)
    rings.write(w, True, res_tail, seq, flags, out, t0, t1)
    res_tail += 1
    at.store(words, rec + L.W_RES_TAIL, res_tail)
    at.add(words, L.PC_RESULT_SEQ, 1)
    at.notify(words, L.PC_RESULT_SEQ)
    return res_tail
