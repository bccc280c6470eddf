"""Task functions for the pool tests: importable by reference from worker processes.

Tests order events through shared memory (a SharedArray counter, a shmcompute Event),
never by sleeping: a task that must be "running" signals it, and the test waits on that.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from typing import Any

import numpy as np

import shmcompute.atomics as at
from shmcompute.array import SharedArray, SharedArrayHandle
from shmcompute.sync import Barrier, Event

_state: dict[str, Any] = {}


def square(x: int) -> int:
    return x * x


def add(a: int, b: int = 0, *, c: int = 0) -> int:
    return a + b + c


def pid() -> int:
    return os.getpid()


def worker_id() -> tuple[int, int]:
    """Which worker ran the task: its process and thread."""
    return os.getpid(), threading.get_ident()


def ident(x: Any) -> Any:
    return x


def raise_value(msg: str) -> None:
    raise ValueError(msg)


class CustomError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"custom {code}")
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (CustomError, (self.code,))


def raise_custom(code: int) -> None:
    raise CustomError(code)


def segfault() -> None:
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def exit_now(code: int) -> None:
    os._exit(code)


def return_unpicklable() -> Any:
    return threading.Lock()


def big_result(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def big_sum(a: Any) -> int:
    return int(np.asarray(a).sum())


# --- sequencing through shared memory --------------------------------------------------
def count(counter: SharedArrayHandle | np.ndarray, index: int = 0) -> int:
    """Atomically bump counter[index]; returns the new value."""
    if isinstance(counter, np.ndarray):
        arr = counter
    elif isinstance(counter, SharedArray):
        arr = counter.array
    else:
        arr = _attach(counter)
    n = int(at.add(arr, index, 1)) + 1
    at.notify(arr, index)  # the test may be waiting on it
    return n


def count_and_wait(counter: Any, gate: Event, timeout: float = 30.0) -> int:
    """Announce "running" on the counter, then block until ``gate`` is set."""
    n = count(counter)
    if not gate.wait(timeout):
        raise TimeoutError("gate was never opened")
    return n


def pid_count_and_wait(counter: Any, gate: Event, timeout: float = 30.0) -> int:
    """Store this process's pid in counter[1], then as ``count_and_wait``."""
    arr = counter.array if isinstance(counter, SharedArray) else _attach(counter)
    at.store(arr, 1, os.getpid())
    return count_and_wait(counter, gate, timeout)


def exit_with(code: int) -> None:
    os._exit(code)


def crash_every_time(counter: Any) -> None:
    """Count the run, then die (os._exit): each retry of it runs and dies again."""
    count(counter)
    os._exit(9)


def crash_first_time(counter: Any, value: int) -> int:
    """Die (os._exit) on the first call across all processes; return value after."""
    if count(counter) == 1:
        os._exit(9)
    return value


def pid_after_barrier(barrier: Barrier, timeout: float = 30.0) -> int:
    """Meet the other parties (they must be running at the same time), then report."""
    barrier.wait(timeout)
    return os.getpid()


def block(gate: Event, timeout: float = 30.0) -> bool:
    return gate.wait(timeout)


def spin_forever_holding_gil(counter: Any) -> None:
    count(counter)
    while True:  # pure-Python loop: keeps the GIL busy; only a kill ends it
        pass


def sleep_for(seconds: float) -> float:
    # A task that takes time; sleeping is the work here, not a synchronization.
    time.sleep(seconds)
    return seconds


def kill_self(sig: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), sig)


def parent_pid() -> int:
    return os.getppid()


def thread_name() -> str:
    return threading.current_thread().name


# --- initializers ----------------------------------------------------------------------
def init_set(value: Any) -> None:
    _state["value"] = value


def get_init_value() -> Any:
    return _state.get("value")


def init_fail() -> None:
    raise RuntimeError("initializer failed on purpose")


def init_fail_first(counter: Any, failures: int) -> None:
    """Fail in the first ``failures`` workers to start, succeed afterwards."""
    if count(counter) <= failures:
        raise RuntimeError("flaky initializer")


def init_fail_nth(counter: Any, nth: int) -> None:
    """Fail in the ``nth`` worker to start only (counting from 1)."""
    if count(counter) == nth:
        raise RuntimeError(f"initializer failed in worker {nth} on purpose")


def init_hold_after(counter: Any, started: int, gate: Event, timeout: float = 30.0) -> None:
    """The first ``started`` workers start at once; later ones (a restart's) wait in
    their initializer until ``gate`` is set: new workers the test holds back."""
    if count(counter) > started and not gate.wait(timeout):
        raise TimeoutError("gate was never opened")


_attached: dict[str, SharedArray] = {}


def _attach(handle: SharedArrayHandle) -> np.ndarray:
    sa = _attached.get(handle.name)
    if sa is None:
        sa = _attached[handle.name] = SharedArray.attach(handle)
    return sa.array


def driver_cache_stats() -> tuple[int, int, int]:
    """In a process worker: its pid, how many driver signatures it loaded from Numba's
    disk cache and how many it had to compile."""
    from shmcompute import _drivers as D

    hits = sum(len(d.stats.cache_hits) for d in D.DRIVERS.values())
    misses = sum(len(d.stats.cache_misses) for d in D.DRIVERS.values())
    return os.getpid(), hits, misses


def driver_cache_stats_of(_: int) -> tuple[int, int, int]:
    return driver_cache_stats()
