"""Worker pools: ``Pool(backend="process" | "thread")``, a supervised
``concurrent.futures.Executor``; ``pool_size`` for sizing."""

from __future__ import annotations

from .base import Pool, PoolStats, TaskFuture, WorkerHealth
from .process import ProcessPool
from .sizing import ENV_WORKERS, pool_size, usable_cores
from .thread import ThreadPool

__all__ = [
    "ENV_WORKERS",
    "Pool",
    "PoolStats",
    "ProcessPool",
    "TaskFuture",
    "ThreadPool",
    "WorkerHealth",
    "pool_size",
    "usable_cores",
]
