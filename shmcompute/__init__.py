"""shmcompute: parallel array compute on one machine, on shared memory.

Public names are re-exported here. Modules that import Numba (``atomics``, ``sync``)
load on first use, so ``import shmcompute`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .array import SharedArray, SharedArrayHandle, empty, from_numpy, reap, zeros
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    AtomicIndexError,
    BrokenBarrierError,
    ClosedError,
    DetachedError,
    ForeignSegmentError,
    InitializerError,
    NotOwnerError,
    PoolTerminatedError,
    SegmentError,
    SegmentNotFoundError,
    SegmentTooLargeError,
    ShmComputeError,
    TaskTimeoutError,
    WaitTableFullError,
    WorkerCrashedError,
    WouldBlock,
)

if TYPE_CHECKING:
    from . import atomics, sync
    from .pool import Pool, PoolStats, WorkerHealth, pool_size
    from .sync import Barrier, Event, Semaphore
    from .transform import reduce, transform

__version__ = "0.1.0"

_LAZY_MODULES = {"atomics", "sync", "pool"}  # "transform" is also a function: see below
_LAZY_NAMES = {
    "Semaphore": "sync",
    "Barrier": "sync",
    "Event": "sync",
    "Pool": "pool",
    "PoolStats": "pool",
    "WorkerHealth": "pool",
    "pool_size": "pool",
    "transform": "transform",
    "reduce": "transform",
    "TransformError": "errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'shmcompute' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "AtomicIndexError",
    "Barrier",
    "BrokenBarrierError",
    "ClosedError",
    "DetachedError",
    "Event",
    "ForeignSegmentError",
    "InitializerError",
    "NotOwnerError",
    "Pool",
    "PoolStats",
    "PoolTerminatedError",
    "Semaphore",
    "SegmentError",
    "SegmentNotFoundError",
    "SegmentTooLargeError",
    "SharedArray",
    "SharedArrayHandle",
    "ShmComputeError",
    "TaskTimeoutError",
    "TransformError",
    "WaitTableFullError",
    "WorkerCrashedError",
    "WorkerHealth",
    "WouldBlock",
    "__version__",
    "atomics",
    "empty",
    "from_numpy",
    "pool",
    "pool_size",
    "reduce",
    "reap",
    "sync",
    "transform",
    "zeros",
]
