"""Guards for every test and benchmark: nothing leaks (segments, processes, threads),
nothing hangs.

Hangs, two layers (limits in [tool.pytest.ini_options], pyproject.toml):

* pytest-timeout (signal method): past a test's limit, every thread's stack is printed
  and the test fails; the session goes on. A signal handler runs only when the main
  thread is back in Python, so a test stuck in compiled code (a Numba loop, a blocking
  wait in a kernel) or in a C call is not interrupted by it.
* ``HANG_GRACE_S`` later, faulthandler's watchdog (a C thread: it needs no GIL) prints
  every thread's stack and ends the session with exit code 1. A stuck test fails the run
  instead of hanging it.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from shmcompute.array import PREFIX, SHM_DIR

HANG_GRACE_S = float(os.environ.get("SHMCOMPUTE_TEST_HANG_GRACE_S", "30"))  # (tests/test_guards.py)
# Long-lived helpers that multiprocessing keeps for the whole session, not leaks.
_SESSION_HELPERS = ("resource_tracker", "forkserver")
# ... and threads shmcompute keeps for the process's life, made on first use.
_PROCESS_THREADS = ("shmcompute-deadlines",)
_stderr = pytest.StashKey[int]()
_SEEN: set[int] = set()  # every process seen in this session's tree, alive or not


def pytest_configure(config: pytest.Config) -> None:
    # Our own copy of the real stderr (as pytest's faulthandler plugin keeps one): the
    # watchdog writes there, past the capture of the test's output.
    config.stash[_stderr] = os.dup(2)


def pytest_unconfigure(config: pytest.Config) -> None:
    faulthandler.cancel_dump_traceback_later()
    os.close(config.stash[_stderr])


def _limit(item: pytest.Item) -> float:
    """The test's pytest-timeout limit (its marker, else --timeout or the ini), 0: none."""
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    value = item.config.getoption("timeout", None) or item.config.getini("timeout")
    return float(value or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    limit = _limit(item)
    if limit > 0:
        faulthandler.dump_traceback_later(
            limit + HANG_GRACE_S, exit=True, file=item.config.stash[_stderr]
        )
    try:
        yield
    finally:
        if limit > 0:
            faulthandler.cancel_dump_traceback_later()


def _tree() -> set[int]:
    """This process and its descendants (remembered in ``_SEEN``)."""
    pids = {os.getpid()}
    try:
        pids |= {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        pass
    _SEEN.update(pids)
    return pids


def _segments() -> dict[str, int]:
    """shmcompute's segments on this machine, by name, with their creators' pids."""
    out = {}
    for name in os.listdir(SHM_DIR):
        if name.startswith(PREFIX):
            try:
                out[name] = int(name[len(PREFIX) :].split("_", 1)[0], 16)
            except ValueError:
                continue
    return out


def _new_segments(before: set[str], others: set[int]) -> set[str]:
    """Segments made since ``before`` by this process tree: by a process in it now or
    seen in it, or by one that is gone and was not another program's (``others``: the
    processes outside the tree when the test began). A child that makes a segment and
    dies within the test is never seen alive; its segment is still ours. Segments of
    other programs using shmcompute on this machine at the same time are none of our
    business, and must never be removed here."""
    tree = _tree()
    out = set()
    for name, pid in _segments().items():
        if name in before or (pid in others and pid not in _SEEN):
            continue
        if pid in tree or pid in _SEEN or not psutil.pid_exists(pid):
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


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    others = set(psutil.pids()) - _tree()
    before = set(_segments())
    threads = set(threading.enumerate())
    yield
    gc.collect()
    deadline = time.monotonic() + 5.0
    while True:
        new_segs = _new_segments(before, others)
        stray = _stray_children()
        new_threads = [
            t
            for t in threading.enumerate()
            if t not in threads and t.is_alive() and t.name not in _PROCESS_THREADS
        ]
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
