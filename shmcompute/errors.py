"""One small exception hierarchy, rooted at :class:`ShmComputeError`.

Each error also subclasses the standard-library type a caller would already catch
(``ValueError``, ``TypeError``, ``IndexError``, ``FileNotFoundError``...), so code
written against the stdlib keeps working. Messages say what was wrong and how to fix it.
"""

from __future__ import annotations

import threading


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


__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "AtomicIndexError",
    "BrokenBarrierError",
    "ClosedError",
    "DetachedError",
    "ForeignSegmentError",
    "NotOwnerError",
    "SegmentError",
    "SegmentNotFoundError",
    "SegmentTooLargeError",
    "ShmComputeError",
    "WaitTableFullError",
    "WouldBlock",
]
