"""The documented public names exist, and importing the package stays light."""

from __future__ import annotations

import subprocess
import sys

import shmcompute as shc
import shmcompute.atomics as at
import shmcompute.sync as sync

DOCUMENTED = {
    "SharedArray",
    "SharedArrayHandle",
    "zeros",
    "empty",
    "from_numpy",
    "reap",
    "atomics",
    "sync",
    "Semaphore",
    "Event",
    "Barrier",
    "ShmComputeError",
    "ClosedError",
    "DetachedError",
    "SegmentNotFoundError",
}
ATOMICS = {
    "load",
    "store",
    "add",
    "sub",
    "and_",
    "or_",
    "xor",
    "exchange",
    "compare_exchange",
    "wait",
    "notify",
    "waiters",
    "OK",
    "NOT_EQUAL",
    "TIMED_OUT",
    "ALL",
}


def test_documented_names_exist_and_are_exported():
    assert set(shc.__all__) >= DOCUMENTED
    for name in shc.__all__:
        assert getattr(shc, name) is not None, name
    assert set(at.__all__) >= ATOMICS
    for name in at.__all__ + sync.__all__:
        assert hasattr(at, name) or hasattr(sync, name)
    assert shc.Semaphore is sync.Semaphore


def test_every_error_is_a_shmcompute_error():
    from shmcompute import errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.ShmComputeError)
    assert issubclass(shc.SegmentNotFoundError, FileNotFoundError)
    assert issubclass(shc.ClosedError, ValueError)


def test_import_does_not_load_numba():
    code = (
        "import sys, shmcompute; a = shmcompute.zeros(3); a.unlink(); print('numba' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
