"""Guards for every test: nothing leaks (segments, processes, threads), nothing hangs.

A test that blocks past pytest-timeout's limit fails with every thread's stack
(faulthandler); see [tool.pytest.ini_options] in pyproject.toml.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import threading
import time

import psutil
import pytest

from shmcompute.array import PREFIX, SHM_DIR

# Long-lived helpers that multiprocessing keeps for the whole session, not leaks.
_SESSION_HELPERS = ("resource_tracker", "forkserver")


def _our_segments() -> set[str]:
    """Our segments: made by this process tree, or by a process that is gone (a child
    that exited). Segments of other live programs using shmcompute on this machine at
    the same time are none of our business, and must never be removed here."""
    mine = {os.getpid()}
    try:
        mine |= {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        pass
    out = set()
    for name in os.listdir(SHM_DIR):
        if not name.startswith(PREFIX):
            continue
        try:
            pid = int(name[len(PREFIX) :].split("_", 1)[0], 16)
        except ValueError:
            continue
        if pid in mine or not psutil.pid_exists(pid):
            out.add(name)
    return out


def _stray_children() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if not any(h in cmd for h in _SESSION_HELPERS):
            out.append(p)
    return out


@pytest.fixture(scope="session", autouse=True)
def _compiled_once():
    """Compile every kernel in this process before a child can race to cache it."""
    from shmcompute.pool import _spin
    from tests import _helpers

    _helpers.warm_up()
    _spin.warm_up()
    mp.set_forkserver_preload(
        [
            "numpy",
            "numba",
            "shmcompute.atomics",
            "shmcompute.pool.worker",
            "tests._helpers",
            "tests._pool_tasks",
        ]
    )


@pytest.fixture(autouse=True)
def no_leaks():
    segs = _our_segments()
    threads = set(threading.enumerate())
    yield
    gc.collect()
    deadline = time.monotonic() + 5.0
    while True:
        new_segs = _our_segments() - segs
        stray = _stray_children()
        new_threads = [t for t in threading.enumerate() if t not in threads and t.is_alive()]
        if not (new_segs or stray or new_threads) or time.monotonic() > deadline:
            break
        time.sleep(0.02)  # bounded: lets exiting children and threads finish
    for p in stray:
        p.kill()
    for name in new_segs:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass
    assert not new_segs, f"test leaked shared-memory segments: {sorted(new_segs)}"
    assert not stray, f"test left processes running: {[p.pid for p in stray]}"
    assert not new_threads, f"test left threads running: {new_threads}"
