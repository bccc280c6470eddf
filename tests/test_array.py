"""SharedArray: creation, zero-copy attach, ownership, transfer, errors, crash recovery."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

import shmcompute as shc
from shmcompute import SharedArray
from shmcompute import array as array_mod
from shmcompute.array import PREFIX, SHM_DIR
from tests import _helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ours() -> set[str]:
    """This process's segments (others on the machine come and go meanwhile)."""
    mine = f"{PREFIX}{os.getpid():x}_"
    return {n for n in os.listdir(SHM_DIR) if n.startswith(mine)}


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, name))


# --- creation -------------------------------------------------------------------
@pytest.mark.parametrize("make", [shc.zeros, shc.empty, SharedArray.create])
@pytest.mark.parametrize("dtype", ["f8", "i4", "u1", "c16", "S7", [("x", "f4"), ("n", "i8")]])
def test_create_is_zeroed_and_page_aligned(make, dtype):
    with make((3, 5), dtype) as a:
        assert a.array.shape == (3, 5) and a.array.dtype == np.dtype(dtype)
        assert a.array.ctypes.data % 4096 == 0
        assert not a.array.tobytes().strip(b"\0")
        assert a.owner and not a.closed and exists(a.name) and a.name.startswith(PREFIX)


def test_from_numpy_copies_once():
    src = np.arange(12.0).reshape(3, 4)
    with shc.from_numpy(src) as a:
        np.testing.assert_array_equal(a.array, src)
        src[0, 0] = 99
        assert a.array[0, 0] == 0  # a copy, not a view of src


@pytest.mark.parametrize("shape", [0, (0,), (4, 0), ()])
def test_empty_and_scalar_shapes(shape):
    with shc.zeros(shape, "i8") as a:
        b = SharedArray.attach(a.handle)
        assert b.array.shape == a.array.shape
        if a.size:
            a.array[...] = 5
            assert b.array[()] == 5
        b.close()


def test_len_matches_numpy():
    for shape in [(3, 2), (0,), ()]:
        with shc.zeros(shape) as a:
            if shape:
                assert len(a) == len(a.array) == shape[0]
            else:
                with pytest.raises(TypeError, match="unsized object"):
                    len(a.array)  # NumPy
                with pytest.raises(TypeError, match="unsized object"):
                    len(a)


def test_int_shape_and_numpy_int_shape():
    with shc.zeros(np.int64(4)) as a:
        assert a.shape == (4,) and len(a) == 4


# --- zero-copy attach and handles ----------------------------------------------------
def test_attach_sees_the_same_memory():
    with shc.zeros(1000, "f8") as a:
        b = SharedArray.attach(a.handle)
        a.array[:] = 3.0
        assert b.array.sum() == 3000.0
        b.array[7] = -1.0
        assert a.array[7] == -1.0
        assert not b.owner
        b.close()


def test_handle_and_pickle_are_small_for_any_size():
    with shc.zeros(16 * 2**20, "f8") as a:  # 128 MiB
        assert len(pickle.dumps(a.handle)) < 300
        blob = pickle.dumps(a)  # pickling the array sends the handle only
        assert len(blob) < 300
        b = pickle.loads(blob)
        a.array[-1] = 42
        assert b.array[-1] == 42 and not b.owner
        b.close()


def test_np_asarray_is_zero_copy():
    with shc.zeros(4, "i8") as a:
        v = np.asarray(a)
        v[0] = 9
        assert a.array[0] == 9
        assert np.asarray(a, dtype="f8").dtype == np.float64
        del v


def test_readonly_attach():
    with shc.zeros(4) as a:
        b = SharedArray.attach(a.handle, readonly=True)
        with pytest.raises(ValueError, match="read-only"):
            b.array[0] = 1
        b.close()


# --- ownership and lifecycle --------------------------------------------------------
def test_context_manager_unlinks_owner_only():
    with shc.zeros(4) as a:
        name = a.name
        with SharedArray.attach(a.handle) as b:
            pass
        assert b.closed and exists(name)  # the attacher's exit does not unlink
    assert a.closed and not exists(name)


def test_unlink_exactly_once_and_idempotent():
    a = shc.zeros(4)
    name = a.name
    a.unlink()
    assert not exists(name)
    a.unlink()  # second call: nothing to do
    a.array[0] = 1  # the mapping stays valid after unlink
    a.close()
    with pytest.raises(shc.SegmentNotFoundError, match="no longer exists"):
        SharedArray.attach(
            a.handle if not a.closed else array_mod.SharedArrayHandle(name, (4,), np.dtype("f8"))
        )


def test_attacher_cannot_unlink():
    with shc.zeros(4) as a:
        b = SharedArray.attach(a.handle)
        with pytest.raises(shc.NotOwnerError, match="only the owner"):
            b.unlink()
        assert exists(a.name)
        b.close()


def test_finalizer_unlinks_on_collection():
    a = shc.zeros(4)
    name = a.name
    del a
    gc.collect()
    assert not exists(name)


def test_closed_array_raises_clear_error():
    a = shc.zeros(4)
    a.close()
    a.close()  # idempotent
    with pytest.raises(shc.ClosedError, match="closed"):
        a.array
    with pytest.raises(shc.ClosedError):
        pickle.dumps(a)
    a.unlink()


def test_close_with_live_view_is_deferred_never_dangling():
    a = shc.zeros(1 << 20, "f8")
    base = a.array.ctypes.data
    view = a.array[10:20]
    view[:] = 2.5
    a.close()
    a.unlink()
    # the view still points at mapped memory: reading and writing are safe
    assert view.sum() == 25.0
    view[:] = 1.0
    assert any(b == base - array_mod.L.DATA_OFFSET for b in array_mod._mapped)
    del view
    gc.collect()
    assert all(b != base - array_mod.L.DATA_OFFSET for b in array_mod._mapped)


def test_close_without_views_unmaps_at_once():
    a = shc.zeros(4)
    base = a.array.ctypes.data - array_mod.L.DATA_OFFSET
    assert base in array_mod._mapped
    a.close()
    assert base not in array_mod._mapped
    a.unlink()


# --- transfer ----------------------------------------------------------------------
def test_transfer_moves_ownership_in_process():
    a = shc.zeros(8, "i8")
    a.array[:] = 3
    h = a.transfer()
    assert a.detached and not a.owner
    with pytest.raises(shc.DetachedError, match="transferred"):
        a.array
    with pytest.raises(shc.DetachedError):
        a.handle
    with pytest.raises(shc.DetachedError):
        a.unlink()
    b = SharedArray.attach(h)
    assert b.owner and b.array.sum() == 24
    with pytest.raises(shc.NotOwnerError, match="already claimed"):
        SharedArray.attach(h)
    name = b.name
    del a
    gc.collect()
    assert exists(name)  # the detached sender's collection does not unlink
    b.close()
    b.unlink()
    assert not exists(name)


def test_transfer_to_another_process_which_unlinks():
    a = shc.zeros(8, "i8")
    name = a.name
    h = a.transfer()
    with ProcessPoolExecutor(1, mp_context=mp.get_context("forkserver")) as ex:
        assert ex.submit(_helpers.child_take_ownership, h).result(timeout=60) == f"{name} True"
    assert not exists(name)


def test_attacher_cannot_transfer():
    with shc.zeros(4) as a:
        b = SharedArray.attach(a.handle)
        with pytest.raises(shc.NotOwnerError):
            b.transfer()
        b.close()


# --- bad input ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "dtype", "exc", "match"),
    [
        (4, object, shc.ArgumentTypeError, "object pointers"),
        (4, [("a", "O")], shc.ArgumentTypeError, "object pointers"),
        (4, "not-a-dtype", shc.ArgumentTypeError, "not a NumPy dtype"),
        (4, "S", shc.ArgumentTypeError, "has no size"),
        ((3, -1), "f8", shc.ArgumentError, "negative"),
        ("abc", "f8", shc.ArgumentTypeError, "shape must be"),
        ((2.5,), "f8", shc.ArgumentTypeError, "shape must be"),
        (1 << 45, "f8", shc.SegmentTooLargeError, "does not fit"),
        ((1 << 40, 1 << 40), "f8", shc.ArgumentError, "too large"),
        (2, np.dtype(("i4", (3,))), shc.ArgumentTypeError, r"dtype .* is a subarray dtype"),
        ((1,) * 70, "i8", shc.ArgumentError, "shape has 70 dimensions"),
        ((1,) * 65, "u1", shc.ArgumentError, "at most 64"),
    ],
)
def test_bad_create_arguments(shape, dtype, exc, match):
    before = _ours()
    with pytest.raises(exc, match=match):
        SharedArray.create(shape, dtype)
    assert _ours() == before  # nothing half-made is left behind


def test_most_dimensions_numpy_allows():
    with shc.zeros((1,) * array_mod._MAX_NDIM, "u1") as a:
        assert a.array.ndim == array_mod._MAX_NDIM
    with shc.zeros(2, [("xyz", "f4", (3,))]) as a:  # subarray fields are fine
        assert a.array["xyz"].shape == (2, 3)


class Boom(Exception):
    pass


@pytest.mark.parametrize("step", ["_write_header", "_tracker_register", "_track_mapping", "_view"])
def test_create_that_fails_after_the_segment_exists_removes_it(monkeypatch, step):
    def fail(*args):
        raise Boom(step)

    before = _ours()
    monkeypatch.setattr(array_mod, step, fail)
    with pytest.raises(Boom):
        SharedArray.create(4, "f8")
    assert _ours() == before


def test_transfer_attach_that_fails_before_the_claim_can_be_retried(monkeypatch):
    a = shc.zeros(4, "i8")
    a.array[:] = 5
    h = a.transfer()
    with monkeypatch.context() as m:
        m.setattr(array_mod, "_view", lambda *args: (_ for _ in ()).throw(Boom()))
        with pytest.raises(Boom):
            SharedArray.attach(h)
    b = SharedArray.attach(h)  # the handle was not used up by the failed attach
    assert b.owner and b.array.sum() == 20
    b.unlink()
    b.close()


def test_transfer_attach_that_fails_after_the_claim_unlinks(monkeypatch):
    """Once claimed, the receiver owns the segment: if it cannot finish attaching, it
    must free it rather than leave it to nobody."""
    a = shc.zeros(4, "i8")
    name = a.name
    h = a.transfer()
    monkeypatch.setattr(array_mod, "_tracker_register", lambda name: (_ for _ in ()).throw(Boom()))
    with pytest.raises(Boom):
        SharedArray.attach(h)
    assert not exists(name)


def test_too_large_is_a_memory_error_naming_the_fix():
    with pytest.raises(MemoryError, match=r"/dev/shm"):
        shc.zeros(1 << 45)


def test_attach_errors():
    with pytest.raises(shc.ArgumentTypeError, match="SharedArrayHandle"):
        SharedArray.attach("shmc_nope")
    missing = array_mod.SharedArrayHandle("shmc_0_missing", (4,), np.dtype("f8"))
    with pytest.raises(shc.SegmentNotFoundError, match="no longer exists"):
        SharedArray.attach(missing)
    with pytest.raises(FileNotFoundError):  # the stdlib type still catches it
        SharedArray.attach(missing)
    # a segment that is not ours
    from multiprocessing import shared_memory

    foreign = shared_memory.SharedMemory(create=True, size=64 * 1024)
    try:
        h = array_mod.SharedArrayHandle(foreign.name, (4,), np.dtype("f8"))
        with pytest.raises(shc.ForeignSegmentError, match="not made by shmcompute"):
            SharedArray.attach(h)
    finally:
        foreign.close()
        foreign.unlink()
    # a handle that does not match the segment
    with shc.zeros(4) as a:
        bad = array_mod.SharedArrayHandle(a.name, (400,), np.dtype("f8"))
        with pytest.raises(shc.ForeignSegmentError, match="describes"):
            SharedArray.attach(bad)


def test_direct_construction_is_refused():
    with pytest.raises(TypeError, match=r"SharedArray\.create"):
        SharedArray()


# --- processes: fork, forkserver, spawn, unrelated ------------------------------------
# Python 3.12+ warns that forking a process with threads (the test run has some) may
# deadlock the child; this test forks on purpose, and its child runs only our code.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_children_attach_zero_copy(method):
    with shc.zeros(1000, "f8") as a:
        a.array[:] = 1.0
        with ProcessPoolExecutor(2, mp_context=mp.get_context(method)) as ex:
            assert ex.submit(_helpers.child_attach_sum, a.handle).result(timeout=60) == 1000.0
            ex.submit(_helpers.child_attach_sum, a, 2.0).result(timeout=60)  # pickled array
        assert a.array.sum() == 2000.0  # the child's writes are ours
        assert exists(a.name)  # exiting attachers did not unlink


LIFECYCLE = textwrap.dedent(
    """
    import multiprocessing as mp, pickle, subprocess, sys
    from concurrent.futures import ProcessPoolExecutor
    import numpy as np
    import shmcompute as shc
    from tests import _helpers

    if __name__ == "__main__":
        a = shc.zeros(100, "f8")
        b = shc.zeros(10, "i8")   # never unlinked explicitly: the exit finalizer must
        for method in ("fork", "forkserver", "spawn"):
            with ProcessPoolExecutor(2, mp_context=mp.get_context(method)) as ex:
                assert ex.submit(_helpers.child_attach_sum, a.handle, 1.0).result(60) == 100
                ex.submit(_helpers.child_attach_sum, b.handle).result(60)
        out = subprocess.run(
            [sys.executable, "-m", "tests._helpers", pickle.dumps(a.handle).hex(), "3"],
            capture_output=True, text=True, timeout=60, check=True)
        assert a.array.sum() == 300, out
        sys.stderr.write(out.stderr)
        print(a.name, b.name)
    """
)


def test_lifecycle_leaves_nothing_and_warns_nothing():
    """Attach under fork, forkserver, spawn and an unrelated process; after all exit,
    /dev/shm holds nothing of ours and nobody printed a resource_tracker warning."""
    proc = subprocess.run(
        [sys.executable, "-c", LIFECYCLE], capture_output=True, text=True, timeout=100, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    names = proc.stdout.split()
    assert len(names) == 2
    for n in names:
        assert not exists(n), f"{n} leaked"
    assert "resource_tracker" not in proc.stderr and "leaked" not in proc.stderr, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr


CRASHING_CREATOR = textwrap.dedent(
    """
    import sys, time
    import shmcompute as shc
    a = shc.zeros(1000, "f8")
    print(a.name, flush=True)
    time.sleep(60)
    """
)


@pytest.mark.crash
def test_reap_removes_segments_of_a_killed_process_group():
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_CREATOR],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        name = proc.stdout.readline().strip()
        assert name.startswith(PREFIX)
        with shc.zeros(4) as mine:
            # SIGKILL the whole group: the creator and its resource tracker die together
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            assert exists(name), "nothing cleaned up after the group kill (as expected)"
            assert name in shc.reap(dry_run=True)
            assert exists(name)
            removed = shc.reap()
            assert name in removed and not exists(name)
            assert mine.name not in removed and exists(mine.name)  # live owners are safe
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        proc.stdout.close()


def test_reap_spares_live_owner_even_with_incomplete_header():
    from multiprocessing import shared_memory

    name = f"{PREFIX}{os.getpid():x}_partial"
    seg = shared_memory.SharedMemory(name=name, create=True, size=4096)
    try:
        assert name not in shc.reap()  # our pid is alive
    finally:
        seg.close()
        seg.unlink()


def test_repr_names_the_state():
    a = shc.zeros(2)
    assert "owner" in repr(a)
    a.close()
    assert "closed" in repr(a)
    a.unlink()
