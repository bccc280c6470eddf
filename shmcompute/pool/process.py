"""The process backend: supervised worker processes fed through shared memory.

::

    caller threads                  parent threads                  worker processes
    --------------                  --------------                  ----------------
    submit(fn, *a)                                                  (forkserver children,
      pickle (fn, a, k)                                              numpy+numba preloaded)
      lock: queue.append ---------> dispatch: push to the least
            dispatch                 loaded worker's task ring --->  worker.main: pop, run,
                                     (<= prefetch outstanding)        push result
    future.result()                                                    |
      spin <=100 us on that  <------------------------------------------+ result ring
      worker's result tail,          collector thread: waits on
      collect it yourself            RESULT_SEQ, collects every ring,
                                     resolves futures, refills rings
                                    supervisor thread: waits on the
                                     workers' sentinels; replaces the
                                     dead, kills the overdue and the
                                     stalled, reports backlogs, and
                                     tears the pool down after drain

Who knows what: the parent's ``_Proc.inflight`` lists the tasks pushed to a worker in
order; results come back in the same order. When a worker dies, results it published
are delivered, the task named by its ``W_CURRENT`` (started, no result) crashed, and
the rest never started: they go back to the front of the queue. So a crash costs
exactly one task (or none, with ``retries``).

The supervision half (crashes, timeouts, stalls, teardown, restart, health) is in
``supervisor.py``; ``ProcessPool`` subclasses it.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _layout as L
from .. import atomics as at
from ..array import SharedArray, _identity
from ..errors import (
    ArgumentError,
    ArgumentTypeError,
)
from . import _spin
from ._ring import Rings, load_error, release_spill, spill, unspill
from ._task import (
    PoolStats,
    _check_spin,
    _check_timeout,
    _describe,
    _PrepareFailed,
    _Task,
)
from .base import CLOSED
from .base import log as _log
from .sizing import usable_cores
from .supervisor import Supervision, _on_drop, _Proc, _Remains, _supervise
from .worker import WorkerSpec
from .worker import main as _worker_main

_PROTOCOL = pickle.HIGHEST_PROTOCOL
_PRELOAD = ["numpy", "numba", "shmcompute.atomics", "shmcompute.pool.worker"]


def _forkserver_context() -> Any:
    ctx = mp.get_context("forkserver")
    from multiprocessing import forkserver

    current = list(getattr(forkserver._forkserver, "_preload_modules", ["__main__"]))
    wanted = current + [m for m in _PRELOAD if m not in current]
    if wanted != current:
        ctx.set_forkserver_preload(wanted)  # takes effect if the server is not yet running
    return ctx


class ProcessPool(Supervision):
    """Worker processes behind a ``concurrent.futures.Executor``: a drop-in for
    ``ProcessPoolExecutor`` (same positional arguments and keywords).

    Args:
        max_workers: worker count; default ``pool_size("cpu")`` or ``SHMCOMPUTE_WORKERS``.
        mp_context: a multiprocessing context; default forkserver with numpy, numba and
            shmcompute preloaded (a worker is ready in ~20 ms, not ~300 ms with spawn).
        initializer, initargs: run once in each worker before its first task.
        max_tasks_per_child: replace a worker after this many tasks.
        task_timeout: default per-task run-time limit in seconds (see ``options``).
        retries: default re-runs of a task whose worker crashed.
        heartbeat_interval: seconds between a worker's heartbeats.
        stall_timeout: report a worker whose heartbeat is older than this (its
            interpreter is stuck holding the GIL, or it was stopped); with
            ``replace_stalled=True`` also kill and replace it.
        queue_warn_after: log a warning (or call ``on_queue_backlog(stats)``) when a task
            has waited this long in the queue: the pool is undersized. None: off.
        spin: seconds ``result()`` spins without the GIL before it blocks.
    """

    backend = "process"

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        task_timeout: float | None = None,
        retries: int = 0,
        heartbeat_interval: float = 1.0,
        stall_timeout: float | None = None,
        replace_stalled: bool = False,
        queue_warn_after: float | None = 5.0,
        on_queue_backlog: Callable[[PoolStats], Any] | None = None,
        spin: float = 100e-6,
        backend: str | None = None,
    ) -> None:
        self._init_common(
            max_workers,
            initializer,
            initargs,
            task_timeout=task_timeout,
            retries=retries,
            queue_warn_after=queue_warn_after,
            on_queue_backlog=on_queue_backlog,
        )
        if max_tasks_per_child is not None:
            if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
                raise ArgumentTypeError(
                    f"max_tasks_per_child must be an int or None, got "
                    f"{type(max_tasks_per_child).__name__}"
                )
            if max_tasks_per_child < 1:
                raise ArgumentError(f"max_tasks_per_child must be >= 1, got {max_tasks_per_child}")
        self._max_tasks = max_tasks_per_child or 0
        hb = _check_timeout("heartbeat_interval", heartbeat_interval)
        assert hb is not None
        self._heartbeat = hb
        self._stall_timeout = _check_timeout("stall_timeout", stall_timeout)
        self._replace_stalled = bool(replace_stalled)
        self._spin_ns = _check_spin(spin)
        self._cores = usable_cores()
        if mp_context is None:
            mp_context = _forkserver_context()
        elif not hasattr(mp_context, "Process"):
            raise ArgumentTypeError(
                "mp_context must be a multiprocessing context (multiprocessing.get_context("
                f"'forkserver')), got {type(mp_context).__name__}"
            )
        self._ctx = mp_context

        _spin.warm_up()  # compile/load before any worker needs the cache
        self._nslots = self._max_workers + 1  # one spare: rolling restart overlaps
        self._ctrl = SharedArray.create(L.pool_bytes(self._nslots) // 8, np.int64)
        self._words = self._ctrl.array
        self._words[L.PC_CORES] = self._cores
        self._rings = Rings(self._words, self._nslots)
        self._owner = _identity()
        self._procs: dict[int, _Proc] = {}
        self._dispatchable: list[_Proc] | None = None  # live, not retiring; None: rebuild
        self._heads = np.zeros(self._nslots, np.int64)  # results consumed, per slot
        self._free = list(range(self._nslots - 1, -1, -1))
        self._restarts = [0] * self._nslots
        # Seconds per task (moving average); sets how many tasks a worker's ring may hold.
        # Start by assuming long tasks: one at a time, so queued tasks stay cancellable in
        # the parent until short tasks have been measured. Like ProcessPoolExecutor's
        # call queue, a task pushed to a ring counts as running for Future.cancel().
        self._run_ewma = 10e-3
        self._cap = 2
        self._update_capacity()
        self._init_failures = 0
        self._last_init_error: BaseException | None = None
        self._force = False
        self._broken: BaseException | None = None  # collecting results failed (a bug)
        self._stop_collector = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

        try:
            with self._lock:
                for _ in range(self._max_workers):
                    self._start_worker_locked()
        except BaseException:
            self._abort_start()
            raise
        # The threads hold the pool only by a weak reference (and only while they act
        # on it): a pool dropped without shutdown() is collected, and its finalizer
        # has the supervisor release what it left (see supervisor._supervise).
        ref = weakref.ref(self)
        self._collector = threading.Thread(
            target=_collect, args=(ref, self._words), name="shmcompute-collector", daemon=True
        )
        remains = _Remains(
            self._procs,
            self._queue,
            self._ctrl,
            self._close_callbacks,
            (self._wake_r, self._wake_w),
            self._collector,
        )
        self._supervisor = threading.Thread(
            target=_supervise, args=(ref, remains), name="shmcompute-supervisor", daemon=True
        )
        self._finalizer = weakref.finalize(self, _on_drop, self._wake_w)
        self._finalizer.atexit = False  # (at exit, _shutdown_at_exit shuts it down)
        self._collector.start()
        self._supervisor.start()
        threading._register_atexit(lambda: _shutdown_at_exit(ref))  # type: ignore[attr-defined]

    # --- workers ------------------------------------------------------------------------
    def _start_worker_locked(self, spare: bool = False) -> _Proc:
        if not self._free:  # pragma: no cover - restart() waits for a slot first
            raise RuntimeError(
                f"no free worker slot (the pool has {self._nslots} for {self._max_workers} "
                "workers): a retiring worker still holds one; try again once it exits"
            )
        slot = self._free.pop()
        rec = Rings.rec(slot)
        w = self._words
        w[rec : rec + L.W_WORDS] = 0
        w[rec + L.W_CURRENT] = -1
        w[rec + L.W_STATE] = L.WS_STARTING
        w[rec + L.W_HEARTBEAT_NS] = time.monotonic_ns()
        self._heads[slot] = 0
        spec = WorkerSpec(
            handle=self._ctrl.handle,
            nslots=self._nslots,
            slot=slot,
            owner_pid=self._owner[0],
            owner_start=self._owner[1],
            initializer=self._initializer,
            initargs=self._initargs,
            max_tasks=self._max_tasks,
            heartbeat_interval=self._heartbeat,
            spin=self._spin_ns / 1e9,
        )
        process = self._ctx.Process(
            target=_worker_main, args=(spec,), name=f"shmcompute-worker-{slot}"
        )
        try:
            process.start()
        except BaseException:
            self._free.append(slot)
            raise
        proc = _Proc(slot, process, self._restarts[slot])
        proc.spare = spare
        self._procs[slot] = proc
        self._dispatchable = None
        self._wake_supervisor()
        return proc

    def _abort_start(self) -> None:
        for p in self._procs.values():
            p.process.kill()
            p.process.join(5)
        self._procs.clear()
        self._close_wake_pipe()
        self._ctrl.unlink()
        self._ctrl.close()

    def _wake_supervisor(self) -> None:
        # Under the lock, and never once the pipe is closed: _close_wake_pipe closes it
        # under the lock too, and the kernel hands its numbers to the next file opened,
        # so a wake-up sent late (a second shutdown(), a submit racing the teardown)
        # would write into someone else's file.
        with self._lock:
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass  # the pipe is full: a wake-up is already pending

    def _close_wake_pipe(self) -> None:
        with self._lock:
            r, w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = -1  # closed: see _wake_supervisor
            if w >= 0:
                os.close(r)
                os.close(w)

    # --- submit and dispatch ------------------------------------------------------------
    def _prepare(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[bytes, SharedArray | None]:
        # Pickle in the caller's thread, before the lock is taken.
        try:
            payload = pickle.dumps((fn, args, kwargs), protocol=_PROTOCOL)
        except Exception as e:
            e.add_note(f"(while pickling the call {_describe(fn)} to send it to a worker)")
            raise _PrepareFailed(e) from None
        if len(payload) <= L.SLOT_INLINE:
            return payload, None
        seg = spill(payload)
        return pickle.dumps(seg.handle, protocol=_PROTOCOL), seg

    def _reusable(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bytes, None] | None:
        # Only a call that fits a ring slot: a spilled one owns a segment, freed per task.
        payload = pickle.dumps((fn, args, {}), protocol=_PROTOCOL)
        return (payload, None) if len(payload) <= L.SLOT_INLINE else None

    def _unprepare(self, prepared: tuple[bytes, SharedArray | None]) -> None:
        seg = prepared[1]
        if seg is not None:
            seg.unlink()
            seg.close()

    def _add_task(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        retries: int,
        spread: bool,
        prepared: Any,
    ) -> Any:
        # A burst: every worker's ring is full. This thread collects results itself
        # (leaving _collecting), so rings refill at once, and while it submits, workers
        # skip waking the collector thread: that thread would only take the GIL from us
        # (it gets it every switch interval, 5 ms) while the workers sit idle with their
        # results uncollected. Only around the enqueue, after _prepare: a thread pickling
        # a slow or large argument in there held every other thread's results until the
        # collector's next periodic look (up to 1 s).
        with self._collecting():
            return super()._add_task(fn, args, kwargs, timeout, retries, spread, prepared)

    def _enqueue(self, task: _Task, prepared: tuple[bytes, SharedArray | None]) -> None:
        if not self._procs:
            # Every worker failed to start and the pool gave up on the queued tasks:
            # new work gets fresh workers.
            for _ in range(self._max_workers):
                self._start_worker_locked()
        task.payload, task.spill = prepared
        task.args = ()  # the payload holds them; do not keep large arguments alive twice
        task.kwargs = {}
        self._queue.append(task)
        self._dispatch_locked()
        if len(self._queue) == 1 and self._queue_warn_after is not None:
            self._wake_supervisor()  # a backlog starts: it schedules the check

    def _update_capacity(self) -> None:
        # Short tasks: keep several queued in a worker's ring so it never waits for the
        # parent; long ones: one at a time, so a free worker is never stuck behind a busy
        # one's backlog.
        self._cap = max(1, min(L.RING_SLOTS // 2, int(2e-3 / max(self._run_ewma, 1e-6))))

    def _dispatch_locked(self) -> None:
        queue = self._queue
        if not queue:
            return
        procs = self._dispatchable
        if procs is None:  # rebuilt only after the worker set changed
            # (Not a restart's new worker until it is ready: the one it replaces still
            # runs tasks, and a task sent to the new one would wait for its initializer.)
            procs = self._dispatchable = [
                p for p in self._procs.values() if not (p.retiring or p.reaped or p.spare)
            ]
        cap = self._cap
        words = self._words
        # Tiny tasks: pack them onto a worker that is already awake (it spins between
        # tasks), so the others stay asleep and no push pays for a wake-up. Longer
        # tasks, and tasks meant to run beside their siblings (a transform's drivers,
        # _submit_spread), go to the least loaded worker.
        tiny = self._run_ewma < 20e-6
        while queue:
            pack = tiny and not queue[0].spread
            best = None
            best_n = -1 if pack else cap
            for p in procs:
                # A task whose result is published but not yet collected is done: its
                # worker is free. (Counting it kept the next task of a back-to-back
                # transform queued until the collector came round, and one worker did
                # the whole job.) Uncollected results still hold result-ring slots,
                # though: never more than RING_SLOTS tasks outstanding on a worker.
                outstanding = len(p.inflight)
                # (A plain read: a stale tail only makes the worker look busier.)
                published = int(words[Rings.rec(p.slot) + L.W_RES_TAIL]) - p.res_head
                n = outstanding - published
                if n >= cap or outstanding >= L.RING_SLOTS:
                    continue
                if self._max_tasks and p.sent >= self._max_tasks:
                    continue
                if (n > best_n) if pack else (n < best_n):
                    best, best_n = p, n
            if best is None:
                return
            task = queue.popleft()
            fut = task.future
            if not fut.running() and not fut.set_running_or_notify_cancel():
                self._drop_cancelled_locked(task)  # cancelled while queued
                continue
            self._push_locked(best, task)

    def _purge_cancelled_locked(self) -> None:
        for task in [t for t in self._queue if t.future.cancelled()]:
            self._queue.remove(task)
            self._drop_cancelled_locked(task)

    def _release(self, task: _Task) -> None:
        release_spill(task)

    def _push_locked(self, p: _Proc, task: _Task) -> None:
        assert task.payload is not None
        flags = L.SF_SPILL if task.spill is not None else 0
        self._rings.write(p.slot, False, p.tail, task.seq, flags, task.payload)
        p.tail += 1
        p.sent += 1
        task.worker = p.slot
        p.inflight.append(task)
        rec = Rings.rec(p.slot)
        # tail, doorbell and wake-up in one compiled call (no system call unless the
        # worker sleeps)
        _spin.publish_task(self._words, rec + L.W_TASK_TAIL, p.tail, rec + L.W_DOORBELL)
        if task.timeout is not None:
            self._wake_supervisor()  # it computes the deadline

    # --- results ------------------------------------------------------------------------
    def _collect_locked(self, p: _Proc, out: list[tuple[_Task, int, bytes, int, int]]) -> None:
        rec = Rings.rec(p.slot)
        tail = at.load(self._words, rec + L.W_RES_TAIL)
        if p.res_head == tail:
            return
        while p.res_head < tail:
            seq, flags, t0, t1, data = self._rings.read(p.slot, True, p.res_head)
            payload = bytes(data)
            del data
            p.res_head += 1
            if flags & L.SF_INIT:
                p.init_error = load_error(flags, payload)
                continue
            task = p.inflight.popleft()
            assert task.seq == seq, (task.seq, seq)  # invariant: results come in push order
            out.append((task, flags, payload, t0, t1))
            if t1 > t0:
                self._run_ewma += 0.1 * ((t1 - t0) / 1e9 - self._run_ewma)
        self._heads[p.slot] = p.res_head
        self._update_capacity()

    def _collect_all(self) -> bool:
        if self._broken is not None:
            return False  # the supervisor is terminating the pool (see below)
        if not _spin.results_waiting(
            self._words, L.PC_HEADER_WORDS, L.W_WORDS, L.W_RES_TAIL, self._heads
        ):
            return False  # nothing published since we last looked (no lock taken)
        out: list[tuple[_Task, int, bytes, int, int]] = []
        try:
            with self._lock:
                for p in self._procs.values():
                    self._collect_locked(p, out)
                if out:
                    self._dispatch_locked()
        except BaseException as e:
            # A broken invariant (a bug): the rings can no longer be trusted. Terminate
            # the pool, failing what is outstanding, rather than leave futures that
            # never resolve and a shutdown that waits for them forever.
            if self._broken is None:
                self._broken = e
                _log.exception("shmcompute: collecting results failed; terminating the pool")
                self._force = True
                self._wake_supervisor()
            raise
        self._deliver(out)
        return bool(out)

    def _deliver(self, batch: list[tuple[_Task, int, bytes, int, int]]) -> None:
        done = []
        for task, flags, payload, t0, t1 in batch:
            if task.spill is not None:
                release_spill(task)
            try:
                if flags & L.SF_ERROR:
                    ok, value = False, load_error(flags, payload)
                else:
                    if flags & L.SF_SPILL:
                        payload = unspill(payload)
                    ok, value = True, pickle.loads(payload)
            except Exception as e:
                e.add_note(f"(while unpickling the result of {task.describe()})")
                ok, value = False, e
            if task.timed_out:
                continue  # already failed with TaskTimeoutError
            done.append((task, ok, value, (t0 - task.submitted_ns) / 1e9, (t1 - t0) / 1e9))
        if done:
            self._finish_many(done)

    def _collecting(self) -> _Collecting:
        """For a thread that will collect results itself for a bounded while (a burst of
        submits, a spin in ``result()``, a transform's spin): meanwhile workers skip
        waking the collector thread, which would only take the GIL from it just as its
        results arrive; on leaving, it collects what they published meanwhile. Never
        around a blocking wait: that one relies on the collector."""
        return _Collecting(self)

    def _spin_for(self, task: _Task) -> None:
        if self._spin_ns <= 0 or task.worker < 0 or self._state == CLOSED:
            return
        p = self._procs.get(task.worker)
        if p is None:
            return
        # Spin only while a core is free for it: with every core running a task, a
        # spinning caller would take one from a worker and delay the very result it
        # waits for (measured: two short tasks on 2 cores took +0.3 ms).
        words = self._words
        if at.load(words, L.PC_BUSY) >= self._cores:
            return
        idx = Rings.rec(p.slot) + L.W_RES_TAIL
        stop = time.monotonic_ns() + self._spin_ns
        with self._collecting():
            while not task.future.done():
                left = stop - time.monotonic_ns()
                if left <= 0:
                    break
                seen = p.res_head
                if _spin.spin_while_equal(words, idx, seen, left) != seen:
                    self._collect_all()

    def _queued_locked(self) -> int:
        # Tasks waiting in a worker's ring behind its current one count as queued.
        words = self._words
        n = sum(1 for t in self._queue if not t.future.cancelled())
        for p in self._procs.values():
            if p.inflight and not p.reaped:
                cur = at.load(words, Rings.rec(p.slot) + L.W_CURRENT)
                n += len(p.inflight) - (1 if cur == p.inflight[0].seq else 0)
        return n


class _Collecting:
    """``ProcessPool._collecting()``: a plain class, not a generator, because it is on
    every submit and every spin (a ``@contextmanager`` costs ~1.5 us more per use)."""

    __slots__ = ("pool", "words")

    def __init__(self, pool: ProcessPool) -> None:
        self.pool = pool
        self.words = pool._words

    def __enter__(self) -> None:
        at.add(self.words, L.PC_SPINNERS, 1)

    def __exit__(self, *exc: object) -> None:
        at.sub(self.words, L.PC_SPINNERS, 1)
        self.pool._collect_all()  # results published while workers skipped the notify


def _collect(ref: weakref.ReferenceType[ProcessPool], words: np.ndarray) -> None:
    """The collector thread. Like the supervisor, it holds the pool only while it
    collects, never while it waits, so that a dropped pool can be collected."""
    while True:
        seq = at.load(words, L.PC_RESULT_SEQ)
        pool = ref()
        if pool is None:
            return  # dropped: the supervisor releases what it left
        try:
            if pool._collect_all():
                continue
        except Exception:
            return  # logged; the supervisor is terminating the pool (_collect_all)
        if pool._stop_collector:
            return
        pool = None
        at.wait(words, L.PC_RESULT_SEQ, seq, 1.0)


def _shutdown_at_exit(ref: weakref.ReferenceType[ProcessPool]) -> None:
    pool = ref()
    if pool is not None and pool._state != CLOSED:
        pool.shutdown(wait=True, timeout=30.0)
