"""The caller's side of a share- or transfer-mode job: control words, driver tasks,
waiting for the bell, re-running chunks a crash lost.

::

    caller (run_job)                              driver tasks (pool workers)
    ----------------                              ---------------------------
    take an arena (control words), reset it
    submit driver tasks 1..N-1 (threads) or       claim chunks, own block first:
      0..N-1 (processes), run driver 0 itself       i = block[t]++ ...
                                                    write chunk i, J_DONE += 1
      on threads                                    the last chunk rings J_BELL
    wait for J_BELL: complete -> return           leave: J_EXITED += 1 (the last
                     failed   -> wait for every     one rings J_BELL too)
                                 task, re-run
                                 the lost chunks
    the arena goes back to the pool when every
    driver has left (release_when_left)

``transform`` compiles the kernel and plans the chunks once per kernel and array layouts
(:class:`Prepared`); everything here runs on every call, so it is kept short.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from . import _drivers as D
from . import atomics as at
from ._arenas import Arenas, arena, count_out, release_when_left
from ._jobs import (
    NO_ORDER,
    Job,
    KernelRef,
    Plan,
    Work,
    drive,
    evict_oldest,
    kernel_error,
    pack,
    plan,
    run_task,
    scalar_partial_dtype,
)
from ._team import START_NS, Team
from .array import SharedArray
from .errors import TransformError, WorkerCrashedError
from .modes import Progress
from .pool import Pool, _spin
from .pool.sizing import usable_cores


class Prepared(NamedTuple):
    """What the checks and the compiler decided for a kernel and the layouts of its
    arrays: ``transform`` keeps it for the next call with the same ones."""

    name: str  # the kernel's name, for errors
    rt: Any  # the kernel's Numba return type
    plan: Plan | None  # thread backend: the compiled driver (reduce: made per call)
    ref: KernelRef | None  # process backend: how workers find the kernel


def _costs(pool: Pool) -> dict[int, float]:
    """Per pool: ns of work per row of each prepared call (by ``id``), as last measured."""
    costs: dict[int, float] | None = pool.__dict__.get("_transform_costs")
    if costs is None:
        costs = pool.__dict__["_transform_costs"] = {}
    return costs


def row_ns(prep: Prepared, pool: Pool) -> float | None:
    """This pool's last measure of a prepared call's work per row (ns), if any."""
    return _costs(pool).get(id(prep))


def drivers_worth(row_ns: float, pool: Pool, rows: int) -> float:
    """How many driver tasks ``rows`` of work at ``row_ns`` a row would keep busy, each
    bringing ``HELP_FACTOR`` times what starting one costs on ``pool``."""
    return row_ns * rows / (HELP_FACTOR * start_s(pool) * 1e9)


def start_s(pool: Pool) -> float:
    """What starting one more driver typically costs on ``pool``: from publish to start
    on its team (threads), from submit to start of a task otherwise."""
    team: Team | None = pool.__dict__.get("_team")
    return team.start_s if team is not None else pool._latencies.start


def team_for(pool: Pool) -> Team | None:
    """The thread pool's driver team (made on its first transform), or None: process
    pools and one-worker pools have none."""
    team: Team | None = pool.__dict__.get("_team")
    if team is None and pool.backend == "thread" and pool.max_workers > 1:
        with pool._lock:
            team = pool.__dict__.get("_team")
            if team is None and pool._state == "running":
                team = pool.__dict__["_team"] = Team(pool.max_workers - 1)
                pool._close_callbacks.append(team.close)
    return team


def helpers(prep: Prepared, pool: Pool, rows: int, nwork: int) -> int:
    """How many drivers a job of ``rows`` gets, by this pool's measure of the kernel's
    work per row; every worker while there is no measure yet. On a team (threads), see
    ``team_drivers``. On processes each task must bring at least ``HELP_FACTOR`` times
    what starting one costs (the pool's typical submit-to-start time)."""
    most = min(pool.max_workers, nwork, D.MAX_TASKS)
    if most == 1:
        return 1  # (one chunk, or one worker: nothing to decide)
    per_row = _costs(pool).get(id(prep))
    if per_row is None:
        return most
    team: Team | None = pool.__dict__.get("_team")
    if team is not None:
        return min(most, on_team(team, per_row * rows, most))
    return max(1, min(most, int(drivers_worth(per_row, pool, rows))))


TEAM_HELPER_NS = 1_000  # what one more team driver costs the caller (publish, notify)
EXPLORE_EVERY = 64  # see on_team


def on_team(team: Team, work_ns: float, most: int) -> int:
    """Drivers for ``work_ns`` of work on ``team`` (``most`` > 1). A team thread that
    is awake (spinning for its next job a while after each one) starts a job within a
    microsecond or so; a parked one only once the publish has woken it, tens to
    hundreds of microseconds later, and that wake-up is a system call in the caller's
    own path (tens of microseconds too when the machine has been idle: measured on a
    2-core VM, waking a parked helper made a 50,000-element job 30% slower than the
    caller doing it alone). So each count is judged by the threads it would use: any
    count by the parked threads' start and wake-up cost, a larger one by the awake
    threads' start if that many are awake.

    The two estimates move only as threads start jobs: one that came out high (a busy
    minute) would keep the team idle and so never be measured again; one job in
    ``EXPLORE_EVERY`` that the first guess (``START_NS``) would give a helper gets one
    anyway, to measure again."""
    k = min(most, team_drivers(work_ns, team.cold_start_s * 1e9, team.wake_s * 1e9))
    if k < most:
        awake = min(most, team_drivers(work_ns, team.start_s * 1e9))
        if awake > k:
            k = max(k, min(awake, 1 + team.awake(awake - 1)))
    if k == 1 and next(team.ticks) % EXPLORE_EVERY == 0:
        k = min(2, team_drivers(work_ns, START_NS))
    return k


def team_drivers(work_ns: float, late_ns: float, helper_ns: float = TEAM_HELPER_NS) -> int:
    """Drivers for ``work_ns`` of work on a team whose threads start ``late_ns`` after
    the caller. A team driver costs the caller only its publish, ``helper_ns`` (no
    GIL, no pool task; for a parked thread, the notify that wakes it): the caller
    works alone until the others start, then k drivers share the rest, so the job
    takes about ``late + (work - late) / k``, and the k-th driver saves
    ``(work - late) / (k (k - 1))``. Take the largest k for which that is at least
    ``HELP_FACTOR`` times its cost."""
    spare = (work_ns - late_ns) / (HELP_FACTOR * max(TEAM_HELPER_NS, helper_ns))
    if spare < 2:
        return 1
    return int((1 + math.sqrt(1 + 4 * spare)) / 2)


HELP_FACTOR = 4.0  # see helpers()
COST_DRIFT = 1.25  # see _measured


def _measured(prep: Prepared, pool: Pool, per_row: float) -> None:
    """Keep a new measure of the work per row. Each is an upper bound (it includes the
    job's fixed cost, and any time the OS took the core away), so the estimate follows a
    lower measure at once and a higher one by at most ``COST_DRIFT`` per call: one job
    slowed down by a busy machine does not pass a cheap kernel for an expensive one."""
    costs = _costs(pool)
    old = costs.get(id(prep))
    if old is None:
        if len(costs) >= 256:
            evict_oldest(costs)  # (an evicted Prepared's id may come back: one wrong guess)
        costs[id(prep)] = per_row
    else:
        costs[id(prep)] = min(per_row, old * COST_DRIFT)


_attempts = itertools.count(1)  # J_ATTEMPT: unique across this process's jobs


# --- waiting -------------------------------------------------------------------------------
SPIN_NS = 100_000  # a short job ends within this: catch it spinning, without sleeping
CORES = usable_cores()


def _all_left(ctrl: np.ndarray) -> bool:
    return bool(D.status(ctrl) & D.ALL_LEFT)


def _either(ctrl: np.ndarray) -> bool:
    return bool(D.status(ctrl))


def wait_bell(
    ctrl: np.ndarray,
    until: Callable[[np.ndarray], bool],
    deadline: float | None,
    spin_on: Pool | None = None,
) -> None:
    """Wait until ``until(ctrl)``. Everything that can make it true rings J_BELL (the
    last chunk written, the last task gone), so checking after reading the bell and then
    waiting for the bell to change misses nothing. With ``spin_on`` (the job's pool),
    spin briefly first."""
    if spin_on is not None and not until(ctrl):
        # Spin first (without the GIL): the wake-up of a sleeping caller costs tens of
        # microseconds, more than a small job. Results that arrive meanwhile are ours
        # to collect (the pool's _collecting); only for the spin, though: while this
        # thread sleeps, the collector must run, or a task queued behind an uncollected
        # result would wait for the whole job.
        with spin_on._collecting():
            _spin.spin_until_at_least(ctrl, D.J_BELL, 1, SPIN_NS, D.J_SCRATCH)
    while True:
        seen = int(at.load(ctrl, D.J_BELL))
        if until(ctrl):
            return
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            at.store(ctrl, D.J_CLAIM, D.STOP)
            raise TimeoutError("transform: the job did not finish within its timeout")
        at.wait(ctrl, D.J_BELL, seen, 60.0 if left is None else left)


def wait_all(
    futures: list[Any], deadline: float | None, ctrl: np.ndarray | None
) -> list[BaseException | None]:
    errors: list[BaseException | None] = []
    for f in futures:
        left = None if deadline is None else deadline - time.monotonic()
        try:
            errors.append(f.exception(None if left is None else max(0.0, left)))
        except TimeoutError:
            if ctrl is not None:
                at.store(ctrl, D.J_CLAIM, D.STOP)
            raise TimeoutError("transform: the job did not finish within its timeout") from None
    return errors


def _chunks_done(ctrl: np.ndarray) -> int:
    return int(at.load(ctrl, D.J_DONE))


class _Deadlines:
    """Stops timed jobs' drivers at their deadlines. On threads the caller runs a driver
    itself, in compiled code, and looks at the clock only once it finds no chunk left
    to claim: a job of many slow chunks ran to its end, long past its timeout, and
    returned. Stopped, each driver leaves after its current chunk, and the caller
    raises ``TimeoutError`` (``run_job``).

    One daemon thread for the process, started on first use, waits for the earliest
    deadline (a timer thread per job cost ~100 us a call: a small call with a timeout
    took 120-180 us instead of 20). ``cancel`` holds the lock the thread stops a job
    under, so once it returns the arena can go to another job."""

    NAME = "shmcompute-deadlines"

    def __init__(self) -> None:
        self._pid = -1

    def _start(self) -> None:
        # (Also in a forked child: the parent's thread is not there, and its lock may
        # have been held at the fork.) The pid last: another thread may be checking it.
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, list[np.ndarray | None]]] = []
        self._seq = itertools.count()
        self._until = -math.inf  # when the thread wakes next, at the latest
        threading.Thread(target=self._run, name=self.NAME, daemon=True).start()
        self._pid = os.getpid()

    def add(self, ctrl: np.ndarray, deadline: float) -> list[np.ndarray | None]:
        if self._pid != os.getpid():
            with _deadlines_start:
                if self._pid != os.getpid():
                    self._start()
        entry: list[np.ndarray | None] = [ctrl]
        with self._cond:
            heap = self._heap
            while heap and heap[0][2][0] is None:  # (jobs that ended: usually all of them)
                heapq.heappop(heap)
            heapq.heappush(heap, (deadline, next(self._seq), entry))
            if deadline < self._until:  # (else it wakes in time, for an earlier one)
                self._cond.notify()
        return entry

    def cancel(self, entry: list[np.ndarray | None]) -> None:
        with self._cond:
            entry[0] = None

    def _run(self) -> None:
        cond, heap = self._cond, self._heap
        with cond:
            while True:
                while heap and heap[0][2][0] is None:
                    heapq.heappop(heap)
                now = time.monotonic()
                left = min(heap[0][0] - now, 60.0) if heap else 60.0
                if left > 0:
                    self._until = now + left
                    cond.wait(left)
                    self._until = -math.inf  # (awake: add() need not wake it)
                    continue
                ctrl = heapq.heappop(heap)[2][0]
                if ctrl is not None:
                    at.store(ctrl, D.J_CLAIM, D.STOP)


_deadlines = _Deadlines()
_deadlines_start = threading.Lock()


def _after_fork_in_child() -> None:
    global _deadlines_start
    _deadlines_start = threading.Lock()  # (a thread of the parent may have held it)


os.register_at_fork(after_in_child=_after_fork_in_child)


# --- one job ---------------------------------------------------------------------------------
def _shared(a: np.ndarray, obj: Any, temps: list[SharedArray]) -> SharedArray:
    """``obj`` as a segment a worker process can attach: itself, or a one-time copy."""
    if isinstance(obj, SharedArray):
        return obj
    sa = SharedArray.create(a.shape, a.dtype)
    sa.array[...] = a
    temps.append(sa)
    return sa


def _partials(
    prep: Prepared, kernel: Any, arrays: Sequence[np.ndarray], chunk: int, n: int, nchunks: int
) -> np.ndarray:
    """Where a reduce job's drivers write each chunk's partial result: one row per
    chunk. A number's type says it all (as the Python number Numba returns, as in copy
    mode: a float32 partial is a float); an array's shape comes from running the kernel
    on chunk 0 here (it runs again in the job)."""
    dtype = scalar_partial_dtype(prep.rt)
    if dtype is not None:
        return np.empty(nchunks, dtype)
    try:
        first = kernel(*(a[:chunk] for a in arrays))
    except Exception as e:
        raise kernel_error(prep.name, e, 0, chunk, n) from e
    return np.empty((nchunks, *np.shape(first)), np.asarray(first).dtype)


def run_job(
    w: Work,
    prep: Prepared,
    pool: Pool,
    retries: int,
    in_objs: Sequence[Any],
    out_obj: Any,
    one_shot: bool = False,
) -> Any:
    """Run the work on the pool's workers, in place in shared memory (reduce: return the
    partials). ``in_objs``/``out_obj``: what the caller passed (SharedArrays are sent by
    handle; other arrays are copied into shared memory for process workers)."""
    kind, kernel, arrays, out_arr = w.kind, w.kernel, w.arrays, w.out
    n, chunk, nchunks, overlap = w.n, w.chunk, w.nchunks, w.overlap
    progress, timeout = w.progress, w.timeout
    process = pool.backend == "process"
    deadline = None if timeout is None else time.monotonic() + timeout
    temps: list[SharedArray] = []
    copy_back: tuple[np.ndarray, np.ndarray] | None = None
    if kind == "reduce":
        out_arr = _partials(prep, kernel, arrays, chunk, n, nchunks)
    if process:
        # Workers attach by handle: everything they touch must be a segment.
        in_sas = [_shared(a, obj, temps) for a, obj in zip(arrays, in_objs, strict=True)]
        out_sa = out_obj if isinstance(out_obj, SharedArray) else None
        if out_sa is None:
            out_sa = SharedArray.create(out_arr.shape, out_arr.dtype)
            temps.append(out_sa)
            copy_back = (out_sa.array, out_arr)
            if any(np.may_share_memory(out_arr, a) for a in arrays):
                out_sa.array[...] = out_arr
    job_arena = arena(pool, D.ctrl_words(nchunks))
    arenas: Arenas = pool.__dict__["_arenas"]
    every_future: list[Any] = []  # of every attempt: the arena is ours until all resolve
    team = None if process else team_for(pool)
    teamed = False  # an attempt ran on the team: the arena is ours until all drivers left
    team_running = False  # the team runs drivers of the current attempt
    ctrl = job_arena.words
    bar = Progress(nchunks) if progress else None
    order = NO_ORDER
    order_sa: SharedArray | None = None
    stop_at: list[np.ndarray | None] | None = None  # (_deadlines' entry)
    st = 0  # the attempt's D.status, as last read (ALL_LEFT, once read, stays true)
    try:
        nwork = nchunks
        ntasks = helpers(prep, pool, min(n, nwork * chunk), nwork)
        attempt = next(_attempts)
        D.start(ctrl, nchunks, ntasks, attempt)
        if team is not None and (team.errors or team.kept):
            team.new_job(ctrl)
        if bar is not None:
            bar.follow(functools.partial(_chunks_done, ctrl))
        while True:
            if order.shape[0]:  # a re-run of the chunks a crash lost
                nwork = order.shape[0]
                ntasks = helpers(prep, pool, min(n, nwork * chunk), nwork)
                attempt = next(_attempts)
                st = 0
                D.begin_attempt(ctrl, nwork, ntasks, attempt)
            if deadline is not None and not process and stop_at is None and deadline < math.inf:
                # (After the attempt cleared the stop flag. Processes need none: the
                # caller only waits there, and its waits end at the deadline.)
                stop_at = _deadlines.add(ctrl, deadline)
            started = time.perf_counter_ns()
            if process:
                assert prep.ref is not None and job_arena.shared is not None and out_sa is not None
                sas = (order_sa, *in_sas, out_sa)
                key = (kind, prep.ref, *map(id, sas), n, chunk, nchunks, overlap, one_shot)
                packed = job_arena.recall(key, sas)
                if packed is None:
                    job = Job(
                        kind,
                        prep.ref,
                        job_arena.shared.handle,
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
                    if not temps and not one_shot:  # (arrays made for this call only)
                        job_arena.remember(key, sas, packed)
                futures = [
                    pool._submit_spread(run_task, packed, t, prepared=packed.call(t, pool))
                    for t in range(ntasks)
                ]
                every_future += futures
                for t, f in enumerate(futures):
                    f.add_done_callback(functools.partial(count_out, arenas, ctrl, t, attempt))
            else:
                # The caller runs driver 0 itself (it would only wait otherwise): a
                # one-chunk job never touches the pool, and no task pays a wake-up.
                ins = tuple(arrays)
                p = prep.plan or plan(kind, kernel, prep.rt, ctrl, order, ins, out_arr)
                rest = (order, ins, out_arr, n, chunk, nchunks, overlap)
                # Helpers: the pool's team (threads waiting in compiled code) when it can
                # run this job, else pool tasks.
                on_team = False
                if ntasks > 1 and team is not None:
                    sig = team.signature(p, kind, ins, out_arr)
                    team_running = True  # (from before the publish: Ctrl-C can land after)
                    on_team = sig >= 0 and team.publish(
                        ctrl, sig, p, order, ins, out_arr, n, chunk, nchunks, overlap, ntasks
                    )
                    teamed = teamed or on_team
                    team_running = on_team
                futures = []
                if not on_team:
                    # Without the pool's task_timeout: a thread cannot be stopped, and a
                    # driver past it would go on in its chunk after its future failed and
                    # counted it out, while the arena went to the next job. The job's own
                    # timeout= bounds it (its drivers stop after their current chunk).
                    futures = [
                        pool._submit(drive, (p, prep.name, ctrl, t, *rest), {}, None, 0)
                        for t in range(1, ntasks)
                    ]
                    every_future += futures
                    for t, f in enumerate(futures, start=1):
                        f.add_done_callback(functools.partial(count_out, arenas, ctrl, t, attempt))
                try:
                    drive(p, prep.name, ctrl, 0, *rest)
                    st = D.status(ctrl)
                except Exception:
                    # A kernel error (the STOP flag is set): stop the others too, and
                    # let them leave (each after its current chunk), so that nothing
                    # writes to the arrays once the error is raised; but only until the
                    # deadline, if any: then the error is raised anyway, and the team's
                    # threads still inside keep the arrays alive (below).
                    at.store(ctrl, D.J_CLAIM, D.STOP)
                    D.left(ctrl, 0)
                    try:
                        if on_team:
                            wait_bell(ctrl, _all_left, deadline)
                        for f in futures:
                            left = None if deadline is None else deadline - time.monotonic()
                            f.exception(None if left is None else max(0.0, left))
                    except TimeoutError:
                        pass  # (the kernel's error is the one to report)
                    raise
                except BaseException:
                    # Ctrl-C (which can land before this driver's loop ran: count it out
                    # here): return at once; drivers still inside leave after their chunk.
                    at.store(ctrl, D.J_CLAIM, D.STOP)
                    D.left(ctrl, 0)
                    raise
            # The driver that writes the last chunk wakes us: the output is complete.
            # Tasks that have not started yet (a worker slow to wake) will find nothing
            # to claim and leave; the arena stays theirs until they have (release_when_left).
            # Spin first, unless that takes a core from a worker: on processes the
            # caller is one more runnable thread, and a worker queued behind its spin
            # on a core would start late while the other workers take its share.
            # (On threads the caller's driver often wrote the last chunk itself, or
            # found it written: then there is nothing to wait for.)
            if not st:
                wait_bell(ctrl, _either, deadline, pool if not process or ntasks < CORES else None)
                st = D.status(ctrl)
            if st & D.COMPLETE:
                # The work per row, for the next call's helper count: exact when the
                # caller ran alone; otherwise an upper bound (every task busy from its
                # start, which took the pool's usual submit-to-start time, to the end).
                took = time.perf_counter_ns() - started
                if process or ntasks > 1:  # (never to zero: it is an estimate)
                    took = max(took // 4, took - int(start_s(pool) * 1e9))
                _measured(prep, pool, took * ntasks / max(1, min(n, nwork * chunk)))
                # Done. The futures of tasks that already left resolve on the pool's
                # collector thread, and the arena goes back once they have. Waiting for
                # them here cost more than it saved (measured, interleaved in one
                # process: a 1,000-element job on processes took 150-250 us with the
                # wait and 100-160 us without; the collector's work overlaps the
                # caller's next call instead of adding to this one).
                break
            # Something failed: wait for every task to leave and see what went wrong. A
            # task whose future has resolved is done with the arena, whether or not it
            # counted itself out (its worker died, or it failed before its driver ran):
            # count it out, then wait for the caller's and the team's drivers.
            errors = wait_all(futures, deadline, ctrl)
            for t in range(ntasks - len(futures), ntasks):
                D.left(ctrl, t)
            wait_bell(ctrl, _all_left, deadline)
            failed = team.take_error(ctrl) if team is not None else None
            if failed is not None:
                errors.append(kernel_error(prep.name, failed[0], failed[2], chunk, n))
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
            if deadline is not None and time.monotonic() >= deadline:
                # Stopped at the deadline (_deadlines), or past it anyway: no re-run.
                raise TimeoutError("transform: the job did not finish within its timeout")
            crashed = [e for e in errors if isinstance(e, WorkerCrashedError)]
            if not crashed:  # pragma: no cover - a stop or a gap always has a cause
                raise TransformError(
                    f"{prep.name}'s job stopped with chunks {lost.tolist()[:10]} unwritten "
                    "and no error reported"
                )
            in_place = kind != "reduce" and any(np.may_share_memory(out_arr, a) for a in arrays)
            if retries == 0 or in_place or lost.size == 0:
                why = (
                    "the kernel writes in place, so a half-written chunk cannot be re-run"
                    if in_place
                    else "retries ran out"
                )
                raise WorkerCrashedError(
                    f"a worker died during {prep.name}'s job and chunks {lost.tolist()[:10]} "
                    f"were lost; {why}. The output is incomplete and was not returned",
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
    except BaseException:
        # The job fails (Ctrl-C in the caller's wait, a timeout, an error): its output is
        # not returned, so stop every driver now rather than let them finish it unseen
        # (worker processes ignore SIGINT). Before the arena can go to another job.
        at.store(ctrl, D.J_CLAIM, D.STOP)
        if team_running and team is not None and not _all_left(ctrl):
            # The team's threads reach the job's arrays by address alone (no reference
            # keeps them alive), and each leaves only after its current chunk: the
            # arrays stay alive until then, whatever the caller does with its own (a
            # transferred input, the new output, its NumPy arrays). Seen without: a
            # segfault after a timeout in transfer mode.
            D.left(ctrl, 0)  # (a no-op unless the caller's own driver never started)
            team.keep(ctrl, (tuple(arrays), out_arr, order))
        raise
    finally:
        if stop_at is not None:
            _deadlines.cancel(stop_at)
        if bar is not None:
            bar.close()
        # Tasks that have not started yet (a worker slow to wake) will find nothing to
        # claim and leave: the arena goes back to the pool once every driver has left.
        if teamed and team is not None:
            team.take_error(ctrl)  # (a failure the caller did not get to look at)
        release_when_left(pool, job_arena, every_future, bool(st & D.ALL_LEFT))
        if order_sa is not None:
            order_sa.unlink()
            order_sa.close()
        for sa in temps:
            sa.unlink()
            sa.close()
