"""A team of threads that run a transform's driver loops without the GIL.

On the thread backend a transform's helpers were pool tasks: each started in Python, so
it needed the GIL and a wake-up through the pool before its compiled driver ran, tens
of microseconds after the caller submitted it, and its GIL hand-offs landed in the
caller's next call. For a job of a few hundred microseconds that was most of the job:
measured on 2 cores, a 200,000-element ``y = 2.5x + 1`` took ~200 us on two drivers,
``prange`` (whose threads wait for work in compiled code) ~40 us.

A team is ``max_workers - 1`` threads of a thread pool, made on its first transform,
that stay in compiled code between jobs::

    caller (run_job)                            team thread me
    ----------------                            --------------
    describe the job in its arena               wait on its doorbell (spin, then futex)
    publish the arena to threads 0..ntasks-2 -> take the job from its ring; another
    run driver 0 (its block first, then help)     signature? back to Python, re-enter
    wait for the bell                           run driver me + 1 (no GIL), leave
                                                spin a while for the next job

The GIL is taken only when a thread meets a job of another *signature* (kernel and
array types) than the loop it is in: it returns to Python and enters that signature's
loop (compiled in the caller when the signature is first seen). Each thread has a ring
of ``RING`` jobs: the caller never overwrites a job a thread has not taken (``publish``
checks first), and an arena stays its job's until every driver has left, so a thread
reads a valid description however late it wakes.

A kernel's exception reaches Python through Numba's unraisable hook in the thread
that ran it; ``_jobs`` routes it to ``Team.kernel_failed``, which keeps it for the
job's caller and stops the job (as on pool tasks).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import carray, literal_unroll, njit, types
from numba.core.imputils import impl_ret_borrowed
from numba.cpython.unsafe.tuple import tuple_setitem
from numba.extending import intrinsic

from . import _drivers as D
from . import atomics as at
from ._atomics_core import _now_ns
from .pool._spin import spin_while_equal

log = logging.getLogger("shmcompute")

# Team words: a header line, then one record per thread.
# Running medians of publish-to-start, ns, that threads update as they start a job: one
# for a thread that was awake (spinning for the next job, or finishing one), one for a
# thread that was parked (asleep on its doorbell, so the publish had to wake it).
H_START_NS = 0
H_COLD_NS = 1
# Running median of what waking a parked thread costs the caller's publish (its notify:
# a system call, and on a VM often a wake-up of an idle virtual CPU), ns.
H_WAKE_NS = 2
HEADER = 8
R_BELL = 0  # jobs published to this thread (it waits on this word)
R_SEEN = 1  # jobs it has taken
R_CUR = 2  # the arena (ctrl address) of the job it is running, 0 between jobs
R_RUNS = 3  # jobs it ran a driver for
R_QUIT = 4  # 1: leave
R_PARKED = 5  # 1: asleep on its doorbell (a publish must wake it), 0: awake
R_RING = 8  # RING slots: arena address, arena words, signature, publish time (ns)
SLOT = 4
RING = 32
REC = R_RING + SLOT * RING

# The job's description, at D.J_DESC in its arena (arrays at D.J_ARR).
D_SIG = 0
D_KADDR = 1
D_ORDER = 2  # address of the work list
D_NORDER = 3
D_N = 4
D_CHUNK = 5
D_NCHUNKS = 6
D_OVERLAP = 7

SPIN_NS = 200_000  # a thread that ran a driver spins this long for the next job
START_NS = 20_000  # first guess of publish-to-start (awake or parked)
WAKE_NS = 5_000  # first guess of what waking a parked thread costs the caller


def team_words(size: int) -> int:
    return HEADER + REC * size


# --- compiled: the threads' side -----------------------------------------------------------
@intrinsic
def _voidptr(typingctx, addr):  # type: ignore[no-untyped-def]
    """The address ``addr`` (an integer) as a ``void *``."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return types.voidptr(addr), codegen


@intrinsic
def _typed_like(typingctx, arr, template):  # type: ignore[no-untyped-def]
    """``arr`` (a C array ``carray`` made) read-only when ``template`` is: the same
    array, typed as the caller's was, so that the driver compiled for a read-only input
    is the one that runs (and a kernel cannot write to it)."""
    if not (isinstance(arr, types.Array) and isinstance(template, types.Array)):
        return None
    rt = arr.copy(readonly=not template.mutable)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return impl_ret_borrowed(context, builder, sig.return_type, args[0])

    return rt(arr, template), codegen


@njit(nogil=True, cache=True)
def _array(ctrl, base, template):  # type: ignore[no-untyped-def]
    """The array described at ``ctrl[base:]``, of ``template``'s type."""
    shape = template.shape
    for d in range(template.ndim):
        shape = tuple_setitem(shape, d, ctrl[base + 1 + d])
    return _typed_like(carray(_voidptr(ctrl[base]), shape, template.dtype), template)


@njit(nogil=True, cache=True)
def _words_at(addr, n):  # type: ignore[no-untyped-def]
    return carray(_voidptr(addr), (n,), np.int64)


@njit(nogil=True, cache=True)
def _order(ctrl):  # type: ignore[no-untyped-def]
    return carray(_voidptr(ctrl[D.J_DESC + D_ORDER]), (ctrl[D.J_DESC + D_NORDER],), np.int64)


@njit(nogil=True, cache=True)
def _next(words, me, sig, spin_ns, take):  # type: ignore[no-untyped-def]
    """Wait for thread ``me``'s next job. Returns ``(arena address, arena words)``;
    the address is -1 when the team quits, -2 when the job has another signature than
    ``sig`` (it is left in the ring; ``sig < 0`` asks for any). With ``take`` the job is
    taken (the ring slot may be reused from then on), else only looked at, and the
    second value is its signature."""
    rec = HEADER + me * REC
    ts = np.empty(2, np.int64)
    spin = spin_ns
    while True:
        if at.load(words, rec + R_QUIT):
            return -1, 0
        seen = words[rec + R_SEEN]
        bell = at.load(words, rec + R_BELL)
        if bell == seen:
            if spin > 0:
                spin_while_equal(words, rec + R_BELL, bell, spin)
                spin = 0
            else:
                at.store(words, rec + R_PARKED, 1)
                at.wait(words, rec + R_BELL, bell, 1.0)  # (re-checks R_QUIT each second)
            continue
        slot = rec + R_RING + SLOT * (seen % RING)
        if not take:
            return 0, words[slot + 2]
        if sig >= 0 and words[slot + 2] != sig:
            return -2, 0
        addr = words[slot]
        n = words[slot + 1]
        late = _now_ns(ts) - words[slot + 3]
        words[rec + R_CUR] = addr
        at.store(words, rec + R_SEEN, seen + 1)
        # The team's running median of publish-to-start, awake or parked (a racy
        # update loses a step): the two differ by a wake-up, ~1 us against 10s-100s.
        h = H_START_NS
        if words[rec + R_PARKED]:
            at.store(words, rec + R_PARKED, 0)
            h = H_COLD_NS
        est = words[h]
        words[h] = est + est // 10 + 1 if late > est else est - est // 11
        return addr, n


@njit(nogil=True, cache=True)
def _done(words, me):  # type: ignore[no-untyped-def]
    rec = HEADER + me * REC
    words[rec + R_CUR] = 0
    words[rec + R_RUNS] += 1


_map1, _map2, _map3 = D.DRIVERS["map", 1], D.DRIVERS["map", 2], D.DRIVERS["map", 3]
_halo1, _halo2 = D.DRIVERS["halo", 1], D.DRIVERS["halo", 2]
_reduce1, _reduce2, _reduce3 = (D.DRIVERS["reduce", k] for k in (1, 2, 3))
A0, A1, A2, A3 = (D.J_ARR + D.ARR_STRIDE * i for i in range(4))
N_, CH, NC, OV, KA = (D.J_DESC + d for d in (D_N, D_CHUNK, D_NCHUNKS, D_OVERLAP, D_KADDR))


# One loop per driver, as the drivers are (Numba needs fixed arity; written out, not
# generated, so that they have a file and a disk cache). Each runs jobs of its signature
# until the next job has another one (-2) or the team quits (-1).
def loop_map1(words, me, sig, spin_ns, kref, a, out):  # type: ignore[no-untyped-def]
    while True:
        addr, n = _next(words, me, sig, spin_ns, True)
        if addr < 0:
            return addr
        c = _words_at(addr, n)
        a_, o_ = _array(c, A0, a), _array(c, A1, out)
        _map1(kref, c[KA], c, me + 1, _order(c), a_, o_, c[N_], c[CH], c[NC])
        _done(words, me)


def loop_map2(words, me, sig, spin_ns, kref, a, b, out):  # type: ignore[no-untyped-def]
    while True:
        addr, n = _next(words, me, sig, spin_ns, True)
        if addr < 0:
            return addr
        c = _words_at(addr, n)
        a_, b_, o_ = _array(c, A0, a), _array(c, A1, b), _array(c, A2, out)
        _map2(kref, c[KA], c, me + 1, _order(c), a_, b_, o_, c[N_], c[CH], c[NC])
        _done(words, me)


def loop_map3(words, me, sig, spin_ns, kref, a, b, x, out):  # type: ignore[no-untyped-def]
    while True:
        addr, n = _next(words, me, sig, spin_ns, True)
        if addr < 0:
            return addr
        c = _words_at(addr, n)
        a_, b_, x_, o_ = _array(c, A0, a), _array(c, A1, b), _array(c, A2, x), _array(c, A3, out)
        _map3(kref, c[KA], c, me + 1, _order(c), a_, b_, x_, o_, c[N_], c[CH], c[NC])
        _done(words, me)


def loop_halo1(words, me, sig, spin_ns, kref, a, out):  # type: ignore[no-untyped-def]
    while True:
        addr, n = _next(words, me, sig, spin_ns, True)
        if addr < 0:
            return addr
        c = _words_at(addr, n)
        a_, o_ = _array(c, A0, a), _array(c, A1, out)
        _halo1(kref, c[KA], c, me + 1, _order(c), a_, o_, c[N_], c[CH], c[NC], c[OV])
        _done(words, me)


def loop_halo2(words, me, sig, spin_ns, kref, a, b, out):  # type: ignore[no-untyped-def]
    while True:
        addr, n = _next(words, me, sig, spin_ns, True)
        if addr < 0:
            return addr
        c = _words_at(addr, n)
        a_, b_, o_ = _array(c, A0, a), _array(c, A1, b), _array(c, A2, out)
        _halo2(kref, c[KA], c, me + 1, _order(c), a_, b_, o_, c[N_], c[CH], c[NC], c[OV])
        _done(words, me)


def loop_reduce1(words, me, sig, spin_ns, kref, a, out):  # type: ignore[no-untyped-def]
    while True:
        addr, n = _next(words, me, sig, spin_ns, True)
        if addr < 0:
            return addr
        c = _words_at(addr, n)
        a_, o_ = _array(c, A0, a), _array(c, A1, out)
        _reduce1(kref, c[KA], c, me + 1, _order(c), a_, o_, c[N_], c[CH], c[NC])
        _done(words, me)


def loop_reduce2(words, me, sig, spin_ns, kref, a, b, out):  # type: ignore[no-untyped-def]
    while True:
        addr, n = _next(words, me, sig, spin_ns, True)
        if addr < 0:
            return addr
        c = _words_at(addr, n)
        a_, b_, o_ = _array(c, A0, a), _array(c, A1, b), _array(c, A2, out)
        _reduce2(kref, c[KA], c, me + 1, _order(c), a_, b_, o_, c[N_], c[CH], c[NC])
        _done(words, me)


def loop_reduce3(words, me, sig, spin_ns, kref, a, b, x, out):  # type: ignore[no-untyped-def]
    while True:
        addr, n = _next(words, me, sig, spin_ns, True)
        if addr < 0:
            return addr
        c = _words_at(addr, n)
        a_, b_, x_, o_ = _array(c, A0, a), _array(c, A1, b), _array(c, A2, x), _array(c, A3, out)
        _reduce3(kref, c[KA], c, me + 1, _order(c), a_, b_, x_, o_, c[N_], c[CH], c[NC])
        _done(words, me)


LOOPS: dict[tuple[str, int], Any] = {
    ("map", 1): loop_map1,
    ("map", 2): loop_map2,
    ("map", 3): loop_map3,
    ("halo", 1): loop_halo1,
    ("halo", 2): loop_halo2,
    ("reduce", 1): loop_reduce1,
    ("reduce", 2): loop_reduce2,
    ("reduce", 3): loop_reduce3,
}


# --- compiled: the caller's side ------------------------------------------------------------
@njit(cache=True)
def _describe(ctrl, sig, kaddr, order, n, chunk, nchunks, overlap, arrays):  # type: ignore[no-untyped-def]
    """Describe the job in its arena; returns the arena's address (``ctrl.ctypes`` from
    Python builds an object, ~2 us)."""
    b = D.J_DESC
    ctrl[b + D_SIG] = sig
    ctrl[b + D_KADDR] = kaddr
    ctrl[b + D_ORDER] = order.ctypes.data
    ctrl[b + D_NORDER] = order.shape[0]
    ctrl[b + D_N] = n
    ctrl[b + D_CHUNK] = chunk
    ctrl[b + D_NCHUNKS] = nchunks
    ctrl[b + D_OVERLAP] = overlap
    j = D.J_ARR
    for a in literal_unroll(arrays):
        ctrl[j] = a.ctypes.data
        for d in range(a.ndim):
            ctrl[j + 1 + d] = a.shape[d]
        j += D.ARR_STRIDE
    return ctrl.ctypes.data


# Keeps the GIL: a few hundred nanoseconds (see pool._spin on sub-microsecond helpers).
@njit(cache=True)
def _publish(words, ntasks, addr, nwords, sig, now_ns):  # type: ignore[no-untyped-def]
    """Give the job to threads 0..ntasks-2 (drivers 1..ntasks-1), or to none when one
    of them has a full ring (False)."""
    for me in range(ntasks - 1):
        rec = HEADER + me * REC
        if words[rec + R_BELL] - at.load(words, rec + R_SEEN) >= RING:
            return False
    ts = np.empty(2, np.int64)
    for me in range(ntasks - 1):
        rec = HEADER + me * REC
        bell = words[rec + R_BELL]
        slot = rec + R_RING + SLOT * (bell % RING)
        words[slot] = addr
        words[slot + 1] = nwords
        words[slot + 2] = sig
        words[slot + 3] = now_ns
        at.store(words, rec + R_BELL, bell + 1)
        if words[rec + R_PARKED]:
            # (The flag only picks which notify to time: each one is made either way.)
            t0 = _now_ns(ts)
            at.notify(words, rec + R_BELL)
            took = _now_ns(ts) - t0
            est = words[H_WAKE_NS]
            words[H_WAKE_NS] = est + est // 10 + 1 if took > est else est - est // 11
        else:
            at.notify(words, rec + R_BELL)
    return True


# --- the team --------------------------------------------------------------------------------
class Team:
    """``size`` threads that run driver loops for one thread pool (see the module
    docstring). ``close`` ends them; a thread inside a kernel leaves after its chunk."""

    def __init__(self, size: int, name: str = "shmcompute-team") -> None:
        self.size = size
        self.words = np.zeros(team_words(size), np.int64)
        self.words[H_START_NS] = self.words[H_COLD_NS] = START_NS
        self.words[H_WAKE_NS] = WAKE_NS
        for me in range(size):
            self.words[HEADER + me * REC + R_PARKED] = 1  # (each starts parked, see _serve)
        self.lock = threading.Lock()  # publishing (several callers may share the pool)
        # Per signature id (the driver plan's id): the loop's compiled entry point and
        # its fixed arguments; None when the team cannot run that signature.
        self._loops: dict[int, tuple[Any, tuple[Any, ...]] | None] = {}
        self.arenas: dict[int, np.ndarray] = {}  # arena address -> its words (errors)
        self.errors: dict[int, tuple[BaseException, int, int]] = {}  # arena address ->
        self.closed = False
        # The arrays of failed jobs whose drivers were still inside a chunk when their
        # caller returned (a timeout, Ctrl-C): the threads reach them by address alone,
        # so they stay alive until the threads have left (``keep``). The threads keep
        # the team alive, and with it these, even once the pool is gone.
        self.kept: dict[int, tuple[np.ndarray, tuple[Any, ...]]] = {}
        self.handed = 0  # drivers handed to the threads (jobs x threads)
        self.ticks = itertools.count()  # jobs it was considered for (_runner.on_team)
        self.threads = [
            threading.Thread(target=self._serve, args=(me,), name=f"{name}-{me}", daemon=True)
            for me in range(size)
        ]
        for t in self.threads:
            t.start()

    @property
    def start_s(self) -> float:
        """Typical seconds from publishing a job to an awake thread starting it."""
        return self.words.item(H_START_NS) / 1e9  # type: ignore[no-any-return]

    @property
    def cold_start_s(self) -> float:
        """Typical seconds from publishing a job to a parked thread starting it (the
        publish wakes it)."""
        return self.words.item(H_COLD_NS) / 1e9  # type: ignore[no-any-return]

    @property
    def wake_s(self) -> float:
        """Typical seconds a publish spends waking one parked thread (its notify)."""
        return self.words.item(H_WAKE_NS) / 1e9  # type: ignore[no-any-return]

    def awake(self, most: int) -> int:
        """How many of threads 0, 1, ... (the ones a job of ``most + 1`` drivers goes
        to), in a row, are awake: spinning for their next job or running one."""
        words, k, most = self.words, 0, min(most, self.size)
        while k < most and not words.item(HEADER + k * REC + R_PARKED):
            k += 1
        return k

    def runs(self) -> int:
        """Driver loops the team's threads have run."""
        return sum(int(self.words[HEADER + me * REC + R_RUNS]) for me in range(self.size))

    def signature(self, plan: Any, kind: str, ins: tuple[np.ndarray, ...], out: np.ndarray) -> int:
        """The id under which the team runs jobs of this driver plan (compiled now, in
        the caller), or -1 when it cannot: arrays it could not describe by address and
        shape as the same Numba type (not C-contiguous, misaligned, over 7 dimensions, a
        read-only output) run on pool tasks as before. Read-only inputs it rebuilds
        read-only (``_typed_like``)."""
        key = id(plan)  # (plans are cached for the process's life: an id stays theirs)
        if key not in self._loops:
            self._loops[key] = self._compile(plan, kind, (*ins, out))
        return key if self._loops[key] is not None else -1

    def _compile(
        self, plan: Any, kind: str, arrays: tuple[np.ndarray, ...]
    ) -> tuple[Any, tuple[Any, ...]] | None:
        loop = LOOPS.get((kind, len(arrays) - 1))
        ok = arrays[-1].flags.writeable and all(
            a.flags.c_contiguous and a.flags.aligned and 1 <= a.ndim < 8 for a in arrays
        )
        if loop is None or not ok or len(arrays) > D.MAX_ARRAYS:
            return None
        templates = tuple(np.empty((1,) * a.ndim, a.dtype) for a in arrays)
        for t, a in zip(templates, arrays, strict=True):
            t.flags.writeable = a.flags.writeable  # (read-only inputs: another Numba type)
        i64 = types.int64
        sig = (numba.typeof(self.words), i64, i64, i64, plan.kref, *map(numba.typeof, templates))
        d = njit(sig, nogil=True, cache=True)(loop)
        entry = d.overloads[d.signatures[0]].entry_point
        return entry, (plan.kref, *templates, d)  # (d keeps the code entry runs alive)

    def publish(
        self,
        ctrl: np.ndarray,
        sig: int,
        plan: Any,
        order: np.ndarray,
        ins: tuple[np.ndarray, ...],
        out: np.ndarray,
        n: int,
        chunk: int,
        nchunks: int,
        overlap: int,
        ntasks: int,
    ) -> bool:
        """Describe the job in its arena and hand it to ``ntasks - 1`` threads; False
        when they are too far behind (the caller then uses pool tasks)."""
        addr = _describe(ctrl, sig, plan.kaddr, order, n, chunk, nchunks, overlap, (*ins, out))
        with self.lock:
            if self.closed:
                return False
            self.arenas[addr] = ctrl
            if not _publish(self.words, ntasks, addr, ctrl.shape[0], sig, time.monotonic_ns()):
                return False
            self.handed += ntasks - 1
            return True

    def kernel_failed(self, me: int, error: BaseException) -> bool:
        """Numba's unraisable hook, in thread ``me``: keep the job's first error and stop
        the job. False when the thread is between jobs (not ours to handle)."""
        addr = int(self.words[HEADER + me * REC + R_CUR])
        ctrl = self.arenas.get(addr)
        if ctrl is None:
            return False
        t = me + 1
        if addr not in self.errors:
            self.errors[addr] = (error, t, int(at.load(ctrl, D.J_TASK + t)))
        at.store(ctrl, D.J_CLAIM, D.STOP)
        return True

    def take_error(self, ctrl: np.ndarray) -> tuple[BaseException, int, int] | None:
        if not self.errors:  # (the usual case: no need for the arena's address)
            return None
        return self.errors.pop(ctrl.ctypes.data, None)

    def keep(self, ctrl: np.ndarray, objs: tuple[Any, ...]) -> None:
        """Keep ``objs`` (a failed job's arrays) alive until every driver of the job in
        arena ``ctrl`` has left: its caller returned while threads were inside a chunk
        (each leaves after it), and may drop or free its arrays (a SharedArray's memory
        stays mapped while a view of it lives)."""
        with self.lock:
            self.kept[ctrl.ctypes.data] = (ctrl, objs)

    def new_job(self, ctrl: np.ndarray) -> None:
        """Arena ``ctrl`` starts a job, so every driver of its last one has left: forget
        what that one left behind (an error a thread raised after its caller returned
        would otherwise be reported by this job), and what other arenas no longer need
        kept. Called only when there is something to forget (see ``_runner``)."""
        addr = ctrl.ctypes.data
        with self.lock:
            self.errors.pop(addr, None)
            self.kept.pop(addr, None)
            for a, (words, _) in list(self.kept.items()):
                if D.status(words) & D.ALL_LEFT:
                    del self.kept[a]

    def _serve(self, me: int) -> None:
        from . import _jobs  # (imports transform's modules; the team is made by them)

        _jobs.serve_team(self, me)
        words = self.words
        while True:
            code, sig = _next(words, me, -1, 0, False)
            if code < 0:
                return
            entry = self._loops.get(sig)
            if entry is None:  # pragma: no cover - published only after _compile
                log.error("shmcompute team: a job of unknown signature %d", sig)
                return
            run, args = entry
            try:
                if run(words, me, sig, SPIN_NS, *args[:-1]) == -1:
                    return
            except BaseException as e:  # (a kernel's own errors come through the hook)
                self._failed(me, e)

    def _failed(self, me: int, error: BaseException) -> None:
        """A driver loop raised outside the kernel: fail its job, count the driver out."""
        log.error("shmcompute team: a driver loop failed", exc_info=error)
        addr = int(self.words[HEADER + me * REC + R_CUR])
        ctrl = self.arenas.get(addr)
        if ctrl is not None:
            self.errors.setdefault(addr, (error, me + 1, int(ctrl[D.J_TASK + me + 1])))
            at.store(ctrl, D.J_CLAIM, D.STOP)
            D.left(ctrl, me + 1)
        self.words[HEADER + me * REC + R_CUR] = 0

    def close(self, timeout: float = 5.0) -> None:
        """Ask every thread to leave and wait for them (bounded: a thread inside a
        kernel that never returns cannot be stopped; it is a daemon thread)."""
        with self.lock:
            self.closed = True
        words = self.words
        for me in range(self.size):
            rec = HEADER + me * REC
            at.store(words, rec + R_QUIT, 1)
            # Move the doorbell too, so a thread between its R_QUIT check and its
            # wait does not sleep (it re-checks R_QUIT before it reads a ring slot).
            at.add(words, rec + R_BELL, 1 << 40)
            at.notify(words, rec + R_BELL)
        for t in self.threads:
            t.join(timeout)
        stuck = [t.name for t in self.threads if t.is_alive()]
        if not stuck:
            self.kept.clear()  # (no thread is left to write to them)
        if stuck:
            log.warning("shmcompute team: threads still inside a kernel at close: %s", stuck)
