"""The thread backend's driver team (shmcompute._team): threads that wait for jobs and
run transform drivers in compiled code, without the GIL.

Every kind of driver on the team, results against NumPy; kernel errors raised on a team
thread reach the caller naming the chunk; arrays the team cannot describe fall back to
pool tasks; jobs of other signatures interleave; rings refuse a job rather than
overwrite one; the threads leave at shutdown.
"""

from __future__ import annotations

import itertools
import operator
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from shmcompute import _arenas, _runner
from shmcompute import _drivers as D
from shmcompute import _team as TM
from shmcompute._jobs import NO_ORDER, kernel_rt, plan
from shmcompute.errors import TransformError
from shmcompute.pool import Pool
from shmcompute.transform import reduce, transform
from tests import _kernels as K

WAIT = 30.0


@pytest.fixture
def every_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every job gets every driver the pool has, however short the job and however late
    the team's threads have lately started (on a loaded machine a 20,000-element job
    can be shorter than that, and the caller would do it alone)."""
    monkeypatch.setattr(_runner, "HELP_FACTOR", 1e-12)
    monkeypatch.setattr(_runner, "team_drivers", lambda *_: 1 << 20)


@pytest.fixture
def pool() -> Iterator[Pool]:
    p = Pool(3, backend="thread")
    yield p
    p.shutdown(wait=True, timeout=WAIT)


def _team(pool: Pool) -> TM.Team:
    team = pool.__dict__.get("_team")
    assert team is not None, "the thread pool made no team"
    return team


def _blur(x: np.ndarray) -> np.ndarray:
    p = np.pad(x, 1, mode="edge")
    ones = np.pad(np.ones_like(x), 1)
    sums = p[:-2] * ones[:-2] + p[1:-1] + p[2:] * ones[2:]
    return sums / (ones[:-2] + 1 + ones[2:])


def _blur_pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.concatenate(([0.0], a[:-1])) + np.concatenate((b[1:], [0.0]))


rng = np.random.default_rng(11)
X, Y, Z = (rng.standard_normal(20_011) for _ in range(3))
IMG = rng.random((1001, 16))
CASES: list[tuple[str, Callable[[Pool], Any], Any]] = [
    ("map1", lambda p: transform(K.affine, X, pool=p, chunk_size=500), 2.5 * X + 1.0),
    ("map2", lambda p: transform(K.add2, X, Y, pool=p, chunk_size=500), X + Y),
    ("map3", lambda p: transform(K.fma3, X, Y, Z, pool=p, chunk_size=500), X * Y + Z),
    (
        "map 2-D",
        lambda p: transform(K.rows_plus_colsum, IMG, pool=p, chunk_size=50),
        IMG * 2.0 + np.arange(16),
    ),
    ("halo1", lambda p: transform(K.blur3, X, pool=p, chunk_size=500, overlap=1), _blur(X)),
    (
        "halo2",
        lambda p: transform(K.blur_pair, X, Y, pool=p, chunk_size=500, overlap=1),
        _blur_pair(X, Y),
    ),
    (
        "reduce1",
        lambda p: reduce(K.chunk_sum, X, combine=operator.add, pool=p, chunk_size=500),
        X.sum(),
    ),
    (
        "reduce2",
        lambda p: reduce(K.dot_partial, X, Y, combine=operator.add, pool=p, chunk_size=500),
        X @ Y,
    ),
    (
        "reduce3",
        lambda p: reduce(K.dot3_partial, X, Y, Z, combine=operator.add, pool=p, chunk_size=500),
        (X * Y * Z).sum(),
    ),
]


def _wait_until_the_team_ran_every_job(team: TM.Team) -> None:
    """A job is handed to a team thread's ring and the caller may finish it alone
    before that thread wakes (on a loaded machine it may not wake for several calls):
    the thread still takes and runs it later, as a driver that finds no chunk left."""
    deadline = time.monotonic() + WAIT
    while team.runs() < team.handed:
        assert time.monotonic() < deadline, f"team ran {team.runs()} of {team.handed} jobs"
        time.sleep(0.001)
    assert team.runs() == team.handed


def _value(result: Any) -> Any:
    if hasattr(result, "array"):
        value = result.array.copy()
        result.unlink()
        result.close()
        return value
    return result


@pytest.mark.parametrize(("name", "run", "expected"), CASES, ids=[c[0] for c in CASES])
def test_every_kind_of_driver_runs_on_the_team(
    every_driver: None, pool: Pool, name: str, run: Callable[[Pool], Any], expected: Any
) -> None:
    for _ in range(6):  # (the first call also measures the kernel)
        np.testing.assert_allclose(_value(run(pool)), expected, rtol=1e-9, atol=1e-9)
    team = _team(pool)
    assert team.handed == 6 * 2, "each call should hand drivers to both team threads"
    _wait_until_the_team_ran_every_job(team)
    pool.shutdown(wait=True, timeout=WAIT)
    assert pool.stats.completed == 0  # and none ran as pool tasks


def test_team_threads_leave_at_shutdown() -> None:
    with Pool(3, backend="thread") as pool:
        transform(K.affine, X, pool=pool, chunk_size=500).unlink()
        team = _team(pool)
        assert all(t.is_alive() for t in team.threads) and len(team.threads) == 2
    assert not any(t.is_alive() for t in team.threads)
    assert not [t for t in threading.enumerate() if t.name.startswith("shmcompute-team")]


def test_one_worker_pools_have_no_team() -> None:
    with Pool(1, backend="thread") as pool:
        out = transform(K.affine, X, pool=pool, chunk_size=500)
        np.testing.assert_allclose(_value(out), 2.5 * X + 1.0)
        assert "_team" not in pool.__dict__


def _fail_on_the_team(team: TM.Team, keep: bool = False) -> np.ndarray:
    """Hand a 10-chunk job whose chunk 7 fails to ``team`` alone (playing a caller that
    leaves at once, so the team's thread runs every chunk and meets the bad one); its
    arena's words once the thread has left. ``keep``: as ``run_job`` does when it
    returns while a team thread is inside."""
    x = np.arange(1000.0)
    x[734] = -1.0
    out = np.empty_like(x)
    ctrl = np.zeros(D.ctrl_words(10), np.int64)
    D.reset(ctrl, 10)
    D.begin_attempt(ctrl, 10, 2, 1)
    rt = kernel_rt("map", K.fails_on_negative, (x,), out)
    p = plan("map", K.fails_on_negative, rt, ctrl, NO_ORDER, (x,), out)
    sig = team.signature(p, "map", (x,), out)
    assert sig >= 0
    if keep:
        team.keep(ctrl, (x, out))
    D.left(ctrl, 0)  # the caller's driver: gone without a chunk
    assert team.publish(ctrl, sig, p, NO_ORDER, (x,), out, 1000, 100, 10, 0, 2)
    deadline = time.monotonic() + WAIT
    while not D.status(ctrl) & D.ALL_LEFT:
        assert time.monotonic() < deadline, "the team's driver did not leave"
        time.sleep(0.001)
    return ctrl


def test_a_kernel_error_on_a_team_thread_is_kept_for_the_job() -> None:
    team = TM.Team(1)
    try:
        ctrl = _fail_on_the_team(team)
        failed = team.take_error(ctrl)
        assert failed is not None
        error, t, chunk = failed
        assert "negative input" in str(error) and (t, chunk) == (1, 7)
        assert ctrl[D.J_CLAIM] >= D.STOP  # the job was stopped
        assert team.take_error(ctrl) is None  # handed over once
    finally:
        team.close()


def test_an_arena_forgets_its_failed_jobs_leftovers_when_it_starts_a_job() -> None:
    # A team thread can fail after its job's caller returned (a timeout): the error it
    # keeps under the arena must not be reported by the arena's next job. And a failed
    # job's arrays, kept for threads still inside it, go once those threads have left.
    team = TM.Team(1)
    try:
        ctrl = _fail_on_the_team(team, keep=True)
        assert ctrl.ctypes.data in team.errors and ctrl.ctypes.data in team.kept
        team.new_job(np.zeros(D.ctrl_words(10), np.int64))  # another arena's job
        assert ctrl.ctypes.data not in team.kept  # (its drivers have all left)
        assert ctrl.ctypes.data in team.errors
        D.reset(ctrl, 10)
        team.new_job(ctrl)  # the arena's next job
        assert team.take_error(ctrl) is None
    finally:
        team.close()


def test_a_kernel_error_in_a_team_job_names_the_chunk(every_driver: None, pool: Pool) -> None:
    x = np.arange(20_000.0)
    transform(K.fails_on_negative, x, out=np.empty_like(x), pool=pool, chunk_size=1000)
    x[19_500] = -1.0  # the last block: a team thread's own
    for _ in range(3):
        with pytest.raises(TransformError) as info:
            transform(K.fails_on_negative, x, out=np.empty_like(x), pool=pool, chunk_size=1000)
        msg = str(info.value)
        assert "fails_on_negative" in msg and "chunk 19 (rows 19000:20000)" in msg
        assert "negative input" in msg
    out = np.empty_like(x)
    before = _team(pool).handed
    transform(K.affine, x, out=out, pool=pool, chunk_size=1000)  # still usable
    np.testing.assert_allclose(out, 2.5 * x + 1.0)
    assert _team(pool).handed == before + 2


def _misaligned(x: np.ndarray) -> np.ndarray:
    """A copy of ``x`` one byte off its type's alignment (C-contiguous, writable)."""
    buf = np.empty(x.nbytes + 1, np.uint8)
    y = np.frombuffer(buf.data, x.dtype, count=x.size, offset=1).reshape(x.shape)
    y[...] = x
    assert not y.flags.aligned
    return y


def test_misaligned_inputs_run_on_pool_tasks(every_driver: None, pool: Pool) -> None:
    # A misaligned array has another Numba type than the team can rebuild from an
    # address: such jobs keep the pool-task path.
    x = _misaligned(X)
    for _ in range(3):
        np.testing.assert_allclose(
            _value(transform(K.affine, x, pool=pool, chunk_size=500)), 2.5 * x + 1.0
        )
    pool.shutdown(wait=True, timeout=WAIT)
    assert _team(pool).handed == 0 and pool.stats.completed == 3 * 2


def test_read_only_inputs_run_on_the_team(every_driver: None, pool: Pool) -> None:
    # A read-only input (np.load(mmap_mode="r"), a frozen array) is rebuilt read-only
    # by the team's threads, so the driver compiled for it is the one that runs. They
    # went to pool tasks before: 200,000 elements took 193 us there, 61 us on the team.
    x = X.copy()
    x.setflags(write=False)
    y = X[::-1].copy()
    for _ in range(3):
        np.testing.assert_allclose(
            _value(transform(K.affine, x, pool=pool, chunk_size=500)), 2.5 * x + 1.0
        )
        out = np.empty_like(x)
        transform(K.add2, x, y, out=out, pool=pool, chunk_size=500)  # one read-only, one not
        np.testing.assert_allclose(out, x + y)
    _wait_until_the_team_ran_every_job(_team(pool))
    assert _team(pool).handed == 6 * 2 and pool.stats.completed == 0


def test_jobs_of_other_signatures_interleave(every_driver: None, pool: Pool) -> None:
    # Each change of kernel or array types sends the team's threads back to Python to
    # enter that signature's loop; a job is never run by the wrong one.
    x32 = X.astype(np.float32)
    for _ in range(30):
        np.testing.assert_allclose(
            _value(transform(K.affine, X, pool=pool, chunk_size=500)), 2.5 * X + 1.0
        )
        np.testing.assert_allclose(
            _value(transform(K.affine, x32, pool=pool, chunk_size=500)),
            2.5 * x32 + 1.0,
            rtol=1e-6,
            atol=1e-6,
        )
        np.testing.assert_allclose(
            _value(transform(K.add2, X, Y, pool=pool, chunk_size=500)), X + Y
        )
    # (A thread that must change loops needs the GIL for it, and waits for it while the
    # caller runs Python; the team's start time grows, and short jobs like these are
    # then left to the caller alone: the policy, not a failure.)
    team = _team(pool)
    assert team.handed > 0
    _wait_until_the_team_ran_every_job(team)


def test_many_back_to_back_jobs_go_round_the_rings(every_driver: None, pool: Pool) -> None:
    out = np.empty_like(X)
    for i in range(3 * TM.RING + 5):
        out.fill(np.nan)
        transform(K.affine, X, out=out, pool=pool, chunk_size=500)
        np.testing.assert_allclose(out, 2.5 * X + 1.0, err_msg=f"call {i}")


def test_publish_refuses_a_job_a_thread_has_no_room_for() -> None:
    words = np.zeros(TM.team_words(2), np.int64)
    for i in range(TM.RING):
        assert TM._publish(words, 3, 4096 + i, 10, 1, 0)
    assert not TM._publish(words, 3, 9999, 10, 1, 0)  # both rings full
    words[TM.HEADER + TM.R_SEEN] += 1  # thread 0 took a job; thread 1 did not
    assert not TM._publish(words, 3, 9999, 10, 1, 0)
    assert TM._publish(words, 2, 9999, 10, 1, 0)  # a job for thread 0 alone fits
    words[TM.HEADER + TM.REC + TM.R_SEEN] += 1
    assert not TM._publish(words, 3, 9999, 10, 1, 0)  # thread 0 is full again


def test_a_job_does_not_wait_for_arenas_only_a_lagging_team_thread_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A team job's arena is the job's until its last driver has left; a team thread that
    # lags (its core taken by another program) holds its arenas a while. Nothing wakes a
    # caller waiting for one, so the next job must make another arena rather than wait
    # (seen: one 50 ms stall in every 20 back-to-back calls on a busy 2-core machine).
    monkeypatch.setattr(_arenas, "ARENA_WAIT", 10.0)  # what a wait would cost here
    with Pool(2, backend="thread") as pool:
        transform(K.affine, X, pool=pool, chunk_size=500).unlink()
        # (its arena comes back once the team's driver has left: a loaded machine can
        # keep that thread from its core past the next lines)
        _wait_until_the_team_ran_every_job(_team(pool))
        state = pool.__dict__["_arenas"]
        held = [_arenas.arena(pool, _arenas.ARENA_WORDS) for _ in range(_arenas.ARENAS)]
        for a in held:  # each a job whose team driver has not left yet
            D.reset(a.words, 1)
            D.begin_attempt(a.words, 1, 2, 1)
            D.left(a.words, 0)
            _arenas.release_when_left(pool, a)
        assert len(state.left) == _arenas.ARENAS
        t0 = time.monotonic()
        extra = _arenas.arena(pool, _arenas.ARENA_WORDS)
        assert time.monotonic() - t0 < 1.0, "waited for an arena a lagging thread holds"
        _arenas.release(pool, extra)
        for a in held:  # the lagging drivers leave: their arenas come back
            D.left(a.words, 1)
        again = _arenas.arena(pool, _arenas.ARENA_WORDS)
        assert not state.left and len(state.free) == _arenas.ARENAS
        _arenas.release(pool, again)


def test_team_helper_count_pays_for_itself() -> None:
    # k drivers finish work W, of which the caller does the first `late` alone, in about
    # late + (W - late) / k; the k-th driver saves (W - late) / (k (k - 1)), and it must
    # save HELP_FACTOR times what handing it the job costs the caller.
    f = _runner.team_drivers
    assert f(10_000, 50_000) == 1  # shorter than the threads take to start: alone
    assert f(1e6, 0) == 16  # 1e6 / (16 * 15) >= 4 * 1000 > 1e6 / (17 * 16)
    assert f(1e6, 5e5) < f(1e6, 0) and f(1e8, 0) > f(1e6, 0)


class _Estimates:
    """What ``_runner.on_team`` reads of a team: its two start estimates, what waking a
    parked thread costs the caller, and how many of its first threads are awake."""

    def __init__(
        self, awake_s: float, parked_s: float, awake: int, size: int = 15, wake_s: float = 0.0
    ) -> None:
        self.start_s, self.cold_start_s, self._awake = awake_s, parked_s, awake
        self.wake_s = wake_s
        self.size = size
        self.ticks = itertools.count(1)  # (tick 0 would be a measuring job)

    def awake(self, most: int) -> int:
        assert most <= self.size, f"asked about {most} threads of {self.size}"
        return min(most, self._awake)


def test_helpers_are_judged_by_whether_their_threads_are_awake() -> None:
    f = _runner.on_team
    # Parked threads take 500 us to wake: a 100 us job is the caller's alone...
    assert f(_Estimates(1e-6, 500e-6, 0, size=1), 100_000, 2) == 1  # type: ignore[arg-type]
    # ...unless the thread it would use is awake (it started within a microsecond).
    assert f(_Estimates(1e-6, 500e-6, 1, size=1), 100_000, 2) == 2  # type: ignore[arg-type]
    # Awake threads serve as many drivers as there are of them (+ the caller); beyond
    # that, a count must pay off at the parked threads' start.
    many = _Estimates(1e-6, 590e-6, awake=3)
    assert _runner.team_drivers(600_000, 1e3) > 4 and _runner.team_drivers(600_000, 590e3) == 2
    assert f(many, 600_000, 16) == 4  # type: ignore[arg-type]
    assert f(_Estimates(1e-6, 1e-6, awake=0), 600_000, 16) > 4  # type: ignore[arg-type]
    # Never more than ``most``, however much work (the team has ``most - 1`` threads).
    for awake in (0, 1):
        two = _Estimates(1e-6, 1e-6, awake=awake, size=1)
        assert f(two, 1e12, 2) == 2  # type: ignore[arg-type]


def test_waking_a_parked_thread_is_charged_to_the_job() -> None:
    f = _runner.on_team
    # Parked threads start within 10 us, but waking one costs the caller 40 us (on a VM
    # whose other CPU idles): a 150 us job is the caller's alone...
    assert f(_Estimates(1e-6, 10e-6, 0, size=1, wake_s=40e-6), 150_000, 2) == 1  # type: ignore[arg-type]
    # ...where a cheap wake-up would have paid for itself...
    assert f(_Estimates(1e-6, 10e-6, 0, size=1, wake_s=1e-6), 150_000, 2) == 2  # type: ignore[arg-type]
    # ...and an awake thread needs none; a long job pays for the wake-up.
    assert f(_Estimates(1e-6, 10e-6, 1, size=1, wake_s=40e-6), 150_000, 2) == 2  # type: ignore[arg-type]
    assert f(_Estimates(1e-6, 10e-6, 0, size=1, wake_s=40e-6), 10_000_000, 2) == 2  # type: ignore[arg-type]


def test_a_team_judged_too_slow_is_measured_again_now_and_then() -> None:
    # Both estimates high (a busy minute): the team would never be used, so never be
    # measured again. One job in EXPLORE_EVERY gets a helper anyway...
    slow = _Estimates(1e-3, 1e-3, awake=0)
    n = 4 * _runner.EXPLORE_EVERY
    counts = [_runner.on_team(slow, 100_000, 2) for _ in range(n)]  # type: ignore[arg-type]
    assert counts.count(2) == 4 and counts.count(1) == n - 4
    # ...when it is one the first guess would give a helper: not a job shorter than that.
    assert all(_runner.on_team(slow, 10_000, 2) == 1 for _ in range(n))  # type: ignore[arg-type]


def test_a_threads_start_counts_as_parked_or_awake(every_driver: None) -> None:
    # Team threads start parked: the first job wakes thread 0, and its start moves the
    # parked estimate only. Back-to-back jobs then find it awake (it spins a while after
    # each job) and move the awake one. (Every job gets the helper: judged by its cost,
    # on a loaded machine such short jobs are the caller's alone, the thread parks, and
    # no job would find it awake.)
    with Pool(2, backend="thread") as pool:
        transform(K.affine, X, out=np.empty_like(X), pool=pool, chunk_size=500)
        team = _team(pool)
        _wait_until_the_team_ran_every_job(team)
        words = team.words
        assert team.handed >= 1 and words[TM.H_START_NS] == TM.START_NS
        assert words[TM.H_COLD_NS] != TM.START_NS
        assert words[TM.H_WAKE_NS] != TM.WAKE_NS  # (the publish timed its wake-up)
        deadline = time.monotonic() + WAIT
        out = np.empty_like(X)
        while words[TM.H_START_NS] == TM.START_NS:  # (a busy machine may park it between)
            assert time.monotonic() < deadline, "no job found the team thread awake"
            transform(K.affine, X, out=out, pool=pool, chunk_size=500)
        # Left alone, the thread parks again after its spin.
        while team.awake(1):
            assert time.monotonic() < deadline, "the team thread never parked"
            time.sleep(0.001)
