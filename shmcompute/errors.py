"""One small exception hierarchy, rooted at :class:`ShmComputeError`.

Each error also subclasses the standard-library type a caller would already catch
(``ValueError``, ``TypeError``, ``IndexError``, ``FileNotFoundError``...), so code
written against the stdlib keeps working. Messages say what was wrong and how to fix it.
"""

from __future__ import annotations

import threading
from concurrent.futures import BrokenExecutor
from concurrent.futures.process import BrokenProcessPool
from concurrent.futures.thread import BrokenThreadPool


class ShmComputeError(Exception):
    """Base class of every error shmcompute raises on purpose."""


class ArgumentError(ShmComputeError, ValueError):
    """An argument has the right type but a bad value (negative size, misaligned...)."""


class ArgumentTypeError(ShmComputeError, TypeError):
    """An argument has the wrong type (a float index, an object dtype...)."""


class AtomicIndexError(ShmComputeError, IndexError):
    """An atomic operation named an element outside the array."""


class SegmentError(ShmComputeError, OSError):
    """A shared-memory segment could not be created, opened or used."""


class SegmentNotFoundError(SegmentError, FileNotFoundError):
    """No segment of that name exists: its owner unlinked it or exited."""


class ForeignSegmentError(SegmentError):
    """The segment exists but was not made by shmcompute, or does not match the handle."""


class SegmentTooLargeError(SegmentError, MemoryError):
    """The segment would not fit in the shared-memory filesystem (/dev/shm)."""


class ClosedError(ShmComputeError, ValueError):
    """The object was closed; like I/O on a closed file."""


class DetachedError(ClosedError):
    """The SharedArray was transferred to another owner; this handle no longer maps it."""


class NotOwnerError(ShmComputeError, PermissionError):
    """Only the owning SharedArray may do this (unlink, transfer)."""


class WouldBlock(ShmComputeError):
    """A non-blocking call (``acquire_nowait``...) could not proceed at once."""


class WaitTableFullError(ShmComputeError, RuntimeError):
    """Too many threads and processes are blocked in ``wait`` on one segment at once."""


class BrokenBarrierError(ShmComputeError, threading.BrokenBarrierError):
    """The barrier was aborted, reset, or a party timed out while others waited."""


class WorkerCrashedError(ShmComputeError, BrokenProcessPool):
    """A worker process died while running this task (signal, ``os._exit``, OOM kill).

    Only the task that was running fails; the worker is replaced and the pool stays
    usable. Attributes: ``pid``, ``exitcode`` (negative: killed by signal ``-exitcode``),
    ``task`` (a short description of the call).
    """

    def __init__(
        self,
        message: str,
        *,
        pid: int | None = None,
        exitcode: int | None = None,
        task: str | None = None,
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.task = task

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_crash, (str(self), self.pid, self.exitcode, self.task))


def _rebuild_crash(
    message: str, pid: int | None, exitcode: int | None, task: str | None
) -> WorkerCrashedError:
    return WorkerCrashedError(message, pid=pid, exitcode=exitcode, task=task)


class InitializerError(ShmComputeError, BrokenProcessPool, BrokenThreadPool):
    """The pool's ``initializer`` raised in every worker it started, so queued tasks could
    not run. The worker's traceback is the ``__cause__``. The pool tries again when new
    tasks arrive (an initializer that fails only sometimes costs nothing but a restart).
    """


class TaskTimeoutError(ShmComputeError, TimeoutError):
    """A task ran longer than its ``timeout=``; on the process backend its worker was
    killed and replaced."""


class PoolTerminatedError(ShmComputeError, BrokenExecutor):
    """``shutdown(timeout=...)`` ran out of time and terminated the workers while this
    task was still queued or running."""


class TransformError(ShmComputeError, RuntimeError):
    """A kernel raised (or failed to compile) inside ``transform``/``reduce``; the
    message names the kernel and the chunk, the kernel's own error is the ``__cause__``.
    """


__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "AtomicIndexError",
    "BrokenBarrierError",
    "ClosedError",
    "DetachedError",
    "ForeignSegmentError",
    "InitializerError",
    "NotOwnerError",
    "PoolTerminatedError",
    "SegmentError",
    "SegmentNotFoundError",
    "SegmentTooLargeError",
    "ShmComputeError",
    "TaskTimeoutError",
    "TransformError",
    "WaitTableFullError",
    "WorkerCrashedError",
    "WouldBlock",
]
