"""SharedArray: NumPy arrays in POSIX shared memory, attached zero-copy by handle.

Ownership rules (the reasons are in DESIGN.md, "Segments"):

* The creator owns the segment. It registers the name with the multiprocessing
  resource tracker (which cleans up if the owner is killed) and unlinks it exactly
  once: ``unlink()``, the context manager, or a finalizer at collection and at
  interpreter exit, whichever comes first.
* Attachers never unlink and never talk to the resource tracker. On Python < 3.13
  ``SharedMemory(name)`` registers every attach (CPython gh-82300), so an exiting
  attacher would destroy the segment and print "leaked shared_memory" warnings;
  we open and map the segment directly instead.
* ``transfer()`` moves ownership (like ``transferList`` in JavaScript): the sender is
  detached at once, the receiver claims ownership when it attaches the returned handle.
* Names are ``shmc_<creator pid>_<random>``; the header records the owner's pid and
  start time, so :func:`reap` can remove segments whose owner is gone (a SIGKILLed
  process group takes its resource tracker with it).

Closing with live views: ``close()`` never unmaps memory a NumPy view still points
at. It drops this object's references; the mapping is released at once when no view
is alive, else when the last view is garbage-collected. A view can therefore never
point at unmapped memory (no segfault), and ``.array`` on a closed SharedArray raises
:class:`~shmcompute.errors.ClosedError`.
"""

from __future__ import annotations

import math
import mmap
import operator
import os
import secrets
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

from . import _layout as L
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    ClosedError,
    DetachedError,
    ForeignSegmentError,
    NotOwnerError,
    SegmentError,
    SegmentNotFoundError,
    SegmentTooLargeError,
)

try:
    import _posixshmem
except ImportError:  # pragma: no cover - Windows
    raise ImportError("shmcompute needs POSIX shared memory (Linux or macOS)") from None

PREFIX = "shmc_"
SHM_DIR = "/dev/shm"
_MAX_NBYTES = 1 << 62

__all__ = ["SharedArray", "SharedArrayHandle", "empty", "from_numpy", "reap", "zeros"]


@dataclass(frozen=True, slots=True)
class SharedArrayHandle:
    """The small picklable value that names a segment; ``SharedArray.attach`` maps it.

    ``transfer_token`` is nonzero only in a handle returned by ``SharedArray.transfer``:
    attaching it claims ownership of the segment (once).
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    transfer_token: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __reduce__(self) -> tuple[Any, ...]:
        # A plain tuple: the default for slotted dataclasses walks dataclasses.fields()
        # (~15 us), and handles cross to workers on every task that names an array.
        dt = self.dtype.str if not self.dtype.fields else self.dtype  # str: ~1 us, not ~3
        return (_handle, (self.name, self.shape, dt, self.transfer_token))


def _handle(name: str, shape: tuple[int, ...], dtype: Any, token: int) -> SharedArrayHandle:
    return SharedArrayHandle(name, shape, np.dtype(dtype), token)


# --- process identity (guards against pid reuse in reap) ---------------------------
def _start_time(pid: int) -> int:
    """Start time of ``pid`` in clock ticks since boot, or -1 if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return -1
    except OSError:  # pragma: no cover - no /proc (macOS): pid check only
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return -1
        except PermissionError:
            pass
        return 0
    # the command name may hold spaces and parentheses: split after the last ')'
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


_self_identity: tuple[int, int] | None = None


def _identity() -> tuple[int, int]:
    global _self_identity
    if _self_identity is None:
        _self_identity = (os.getpid(), _start_time(os.getpid()))
    return _self_identity


def _forget_identity() -> None:
    global _self_identity
    _self_identity = None


os.register_at_fork(after_in_child=_forget_identity)


def _owner_alive(pid: int, start: int) -> bool:
    now = _start_time(pid)
    return now != -1 and (start <= 0 or now <= 0 or now == start)


# --- mapped segments, mirrored into the registry that compiled wait/notify reads --
# base address -> (start, end, wait-table address). The hooks are installed when
# shmcompute.atomics is imported, so plain SharedArray use never imports Numba.
_map_lock = threading.RLock()  # RLock: a finalizer may run from GC inside the lock
_mapped: dict[int, tuple[int, int, int]] = {}
_registry_add: Callable[[int, int, int], None] | None = None
_registry_remove: Callable[[int], None] | None = None


def _install_registry(add: Callable[[int, int, int], None], remove: Callable[[int], None]) -> None:
    global _registry_add, _registry_remove
    with _map_lock:
        for start, end, lot in list(_mapped.values()):
            add(start, end, lot)
        _registry_add, _registry_remove = add, remove


def _track_mapping(mm: mmap.mmap) -> int:
    """Record a new mapping; the entry goes away right when the mmap is freed."""
    probe = np.frombuffer(mm, dtype=np.uint8, count=1)
    base = int(probe.ctypes.data)
    del probe  # drop the export, or the mmap could never be closed
    entry = (base, base + len(mm), base + L.SEG_LOT)
    with _map_lock:
        _mapped[base] = entry
        if _registry_add is not None:
            _registry_add(*entry)
    weakref.finalize(mm, _untrack_mapping, base)
    return base


def _untrack_mapping(base: int) -> None:
    with _map_lock:
        if _mapped.pop(base, None) is not None and _registry_remove is not None:
            _registry_remove(base)


# --- resource tracker (owners only) -----------------------------------------------
def _tracker_register(name: str) -> None:
    from multiprocessing import resource_tracker

    resource_tracker.register("/" + name, "shared_memory")


def _tracker_unregister(name: str) -> None:
    from multiprocessing import resource_tracker

    resource_tracker.unregister("/" + name, "shared_memory")


# --- argument checks ----------------------------------------------------------------
def _numpy_max_ndim() -> int:
    """NumPy's limit on array dimensions (64 since NumPy 2, 32 before). NumPy has no
    public constant for it, so ask NumPy itself (two tiny allocations, once)."""
    for n in (64, 32):
        try:
            np.empty((0,) * n, np.uint8)
        except ValueError:
            continue
        return n
    return 32  # pragma: no cover - NumPy has allowed 32 forever


_MAX_NDIM = _numpy_max_ndim()


def _check_dtype(dtype: DTypeLike) -> np.dtype[Any]:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ArgumentTypeError(f"dtype {dtype!r} is not a NumPy dtype ({e})") from None
    if dt.hasobject:
        raise ArgumentTypeError(
            f"dtype {dt} holds Python object pointers, which mean nothing in another "
            "process; use a numeric, bool, fixed-size bytes/str or structured dtype"
        )
    if dt.itemsize == 0:
        raise ArgumentTypeError(
            f"dtype {dt} has no size; give flexible dtypes a length, e.g. 'S16' or 'U8'"
        )
    if dt.subdtype is not None:
        # NumPy turns the subarray into extra dimensions of the array, so the array's
        # dtype and shape would not be what the handle says.
        base, sub = dt.subdtype
        raise ArgumentTypeError(
            f"dtype {dt} is a subarray dtype; put its shape {sub} at the end of the "
            f"array's shape and use dtype {base} (a structured dtype may hold subarray "
            "fields)"
        )
    return dt


def _check_shape(shape: int | Iterable[int]) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, (int, np.integer)) else shape
    try:
        out = tuple(operator.index(d) for d in dims)
    except TypeError:
        raise ArgumentTypeError(f"shape must be an int or a tuple of ints, got {shape!r}") from None
    for d in out:
        if d < 0:
            raise ArgumentError(f"shape must not have negative dimensions, got {out}")
    if len(out) > _MAX_NDIM:
        raise ArgumentError(
            f"shape has {len(out)} dimensions; NumPy arrays have at most {_MAX_NDIM}"
        )
    return out


def _shm_free_bytes() -> int | None:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:  # pragma: no cover - no /dev/shm (macOS)
        return None
    return st.f_bavail * st.f_frsize


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError  # pragma: no cover


def _too_large(nbytes: int, free: int | None) -> SegmentTooLargeError:
    where = f"{_fmt_bytes(free)} free in {SHM_DIR}" if free is not None else "too little"
    return SegmentTooLargeError(
        f"a shared array of {_fmt_bytes(nbytes)} does not fit: {where}. Free space "
        f"(shmcompute.reap() removes segments of dead processes), use a smaller array, "
        f"or enlarge the mount (mount -o remount,size=... {SHM_DIR})"
    )


# --- the segment state, shared by a SharedArray and its finalizer -------------------
class _State:
    """What a finalizer needs, without a reference to the SharedArray itself.

    Invariants: ``closed`` implies ``mm is None and array is None``; ``owner`` is true
    only in the process ``owner_pid`` (a forked child inherits a copy that must never
    unlink); ``unlinked`` implies ``owner`` was true when it was set.
    """

    __slots__ = ("array", "closed", "detached", "mm", "name", "owner", "owner_pid", "unlinked")

    def __init__(self, name: str, mm: mmap.mmap, array: NDArray[Any], owner: bool) -> None:
        self.name = name
        self.mm: mmap.mmap | None = mm
        self.array: NDArray[Any] | None = array
        self.owner = owner
        self.owner_pid = os.getpid()
        self.unlinked = False
        self.closed = False
        self.detached = False

    def close(self) -> None:
        # Drop our references only: CPython frees (and unmaps) the mmap at once when no
        # NumPy view exports it, else when the last view dies. Never mm.close(): with
        # live views it raises BufferError, and forcing it would leave dangling views.
        self.array = None
        self.mm = None
        self.closed = True

    def unlink(self) -> None:
        if self.unlinked or not self.owner or os.getpid() != self.owner_pid:
            return
        self.unlinked = True
        try:
            _posixshmem.shm_unlink("/" + self.name)
        except FileNotFoundError:
            pass  # removed from outside (reap, rm); nothing left to free
        _tracker_unregister(self.name)


def _finalize(state: _State) -> None:
    state.unlink()
    state.close()


def _write_header(mm: mmap.mmap, nbytes: int, pid: int, start: int) -> None:
    head = np.frombuffer(mm, dtype=np.int64, count=L.SEG_HEADER_SIZE // 8)
    head[L.SEG_VERSION // 8] = L.VERSION
    head[L.SEG_OWNER_PID // 8] = pid
    head[L.SEG_OWNER_START // 8] = start
    head[L.SEG_DATA_OFFSET // 8] = L.DATA_OFFSET
    head[L.SEG_DATA_NBYTES // 8] = nbytes
    head[L.SEG_MAGIC // 8] = L.MAGIC  # last: a header with MAGIC is complete
    del head


def _view(mm: mmap.mmap, shape: tuple[int, ...], dtype: np.dtype[Any]) -> NDArray[Any]:
    count = math.prod(shape)
    if count == 0:
        flat = np.frombuffer(mm, dtype=np.uint8, count=0, offset=0).view(dtype)
    else:
        flat = np.frombuffer(mm, dtype=dtype, count=count, offset=L.DATA_OFFSET)
    return flat.reshape(shape)


class SharedArray:
    """A NumPy array in shared memory that any process or thread attaches zero-copy.

    Create one with :meth:`create` (or :func:`zeros`, :func:`empty`,
    :func:`from_numpy`); send :attr:`handle` (or the SharedArray itself: pickling
    sends only the handle) to another process, which calls :meth:`attach`.

    Example::

        with shc.zeros(1_000_000, "f8") as a:    # owner: unlinks on exit
            a.array[:] = 1.0
            pool.submit(work, a.handle)          # the worker attaches by handle
    """

    __slots__ = ("__weakref__", "_finalizer", "_handle", "_state")
    _state: _State
    _handle: SharedArrayHandle
    _finalizer: weakref.finalize[Any, Any]

    def __init__(self) -> None:
        raise TypeError(
            "use SharedArray.create(shape, dtype), shmcompute.zeros/empty/from_numpy, "
            "or SharedArray.attach(handle)"
        )

    @classmethod
    def _new(cls, state: _State, handle: SharedArrayHandle) -> SharedArray:
        self = object.__new__(cls)
        self._state = state
        self._handle = handle
        self._finalizer = weakref.finalize(self, _finalize, state)
        return self

    # --- construction ---------------------------------------------------------------
    @classmethod
    def create(cls, shape: int | Iterable[int], dtype: DTypeLike = np.float64) -> SharedArray:
        """Create a new zero-filled shared array; this process owns it.

        Raises:
            ArgumentError / ArgumentTypeError: bad ``shape`` or ``dtype``.
            SegmentTooLargeError: it would not fit in /dev/shm.
        """
        dims = _check_shape(shape)
        dt = _check_dtype(dtype)
        nbytes = math.prod(dims) * dt.itemsize
        if nbytes >= _MAX_NBYTES:
            raise ArgumentError(f"shape {dims} of {dt} is {nbytes} bytes: too large")
        total = L.DATA_OFFSET + nbytes
        free = _shm_free_bytes()
        if free is not None and total > free:
            raise _too_large(total, free)

        pid, start = _identity()
        for _ in range(8):
            name = f"{PREFIX}{pid:x}_{secrets.token_hex(6)}"
            try:
                fd = _posixshmem.shm_open(
                    "/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600
                )
                break
            except FileExistsError:  # pragma: no cover - 48 random bits collided
                continue
        else:  # pragma: no cover
            raise SegmentError("could not find a free shared-memory name")
        try:
            try:
                # Reserve the pages now: tmpfs otherwise overcommits, and touching a page
                # that does not fit later kills the process with SIGBUS.
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, total)
                else:  # pragma: no cover - macOS
                    os.ftruncate(fd, total)
            except OSError as e:
                raise _too_large(total, _shm_free_bytes()) from e
            mm = mmap.mmap(fd, total)
        except BaseException:
            os.close(fd)
            _posixshmem.shm_unlink("/" + name)
            raise
        os.close(fd)
        registered = False
        try:
            _write_header(mm, nbytes, pid, start)
            _tracker_register(name)
            registered = True
            _track_mapping(mm)
            view = _view(mm, dims, dt)
        except BaseException:
            # The segment exists but no SharedArray owns it yet, so nothing would ever
            # unlink it (the arguments were checked above: an interrupt or an OS error).
            _unlink_quietly(name)
            if registered:
                _tracker_unregister(name)
            # Not mm.close(): as everywhere (see _State.close), the mapping goes when the
            # mmap object does, and its registry entry with it (_track_mapping). Closed
            # here, its address could be mapped again while the entry's finalizer still
            # waits for this frame to let go, and would then remove the new entry.
            raise
        handle = SharedArrayHandle(name, dims, dt)
        return cls._new(_State(name, mm, view, owner=True), handle)

    @classmethod
    def attach(cls, handle: SharedArrayHandle, *, readonly: bool = False) -> SharedArray:
        """Map the segment named by ``handle``, zero-copy. Attachers never unlink.

        A handle from :meth:`transfer` makes this SharedArray the owner.

        Raises:
            SegmentNotFoundError: the segment is gone (its owner unlinked it or exited).
            ForeignSegmentError: the segment is not one of ours or does not match.
        """
        if not isinstance(handle, SharedArrayHandle):
            raise ArgumentTypeError(
                f"handle must be a SharedArrayHandle (SharedArray.handle), got "
                f"{type(handle).__name__}"
            )
        name = handle.name
        try:
            fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        except FileNotFoundError:
            raise SegmentNotFoundError(
                f"shared array {name!r} no longer exists: its owner unlinked it (unlink(),"
                " end of a with block, garbage collection) or its process exited. Keep "
                "the owning SharedArray alive until every attacher is done"
            ) from None
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, L.SEG_HEADER_SIZE, 0)
            words = np.frombuffer(head, dtype=np.int64) if len(head) == L.SEG_HEADER_SIZE else None
            if words is None or int(words[L.SEG_MAGIC // 8]) != L.MAGIC:
                raise ForeignSegmentError(
                    f"shared-memory segment {name!r} was not made by shmcompute (or its "
                    "creator died while making it); attach only handles from SharedArray"
                )
            nbytes = int(words[L.SEG_DATA_NBYTES // 8])
            if nbytes != handle.nbytes or size < L.DATA_OFFSET + nbytes:
                raise ForeignSegmentError(
                    f"handle for {name!r} describes {handle.nbytes} bytes "
                    f"({handle.shape} of {handle.dtype}) but the segment holds {nbytes}; "
                    "the handle was altered or belongs to another segment"
                )
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        # Everything that can fail comes before the claim: a transfer handle whose
        # attach failed there is still unclaimed, and can be attached again.
        _track_mapping(mm)
        view = _view(mm, handle.shape, handle.dtype)
        if readonly:
            view.flags.writeable = False
        owner = False
        if handle.transfer_token:
            _claim_transfer(mm, handle)
            try:
                _tracker_register(name)
            except BaseException:
                # The claim made this process the owner and it cannot finish taking the
                # segment over: unlink it, as create does. (Handing ownership back, by
                # restoring the token, would leave it to a sender that may be gone.)
                _unlink_quietly(name)
                raise
            owner = True
        state = _State(name, mm, view, owner=owner)
        return cls._new(state, SharedArrayHandle(name, handle.shape, handle.dtype))

    # --- access ---------------------------------------------------------------------
    def _live(self) -> _State:
        st = self._state
        if st.closed:
            if st.detached:
                raise DetachedError(
                    f"shared array {st.name!r} was transferred (transfer()) and this "
                    "handle no longer maps it; use the receiver's SharedArray"
                )
            raise ClosedError(f"shared array {st.name!r} is closed")
        return st

    @property
    def array(self) -> NDArray[Any]:
        """The zero-copy ``np.ndarray`` view of the shared memory."""
        arr = self._live().array
        assert arr is not None  # invariant: not closed implies array is set
        return arr

    @property
    def handle(self) -> SharedArrayHandle:
        """A small picklable handle; ``SharedArray.attach(handle)`` maps it anywhere."""
        self._live()
        return self._handle

    @property
    def name(self) -> str:
        return self._state.name

    @property
    def shape(self) -> tuple[int, ...]:
        return self._handle.shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._handle.dtype

    @property
    def nbytes(self) -> int:
        return self._handle.nbytes

    @property
    def size(self) -> int:
        return math.prod(self._handle.shape)

    @property
    def owner(self) -> bool:
        """True in the process that owns (and will unlink) the segment."""
        st = self._state
        return st.owner and not st.detached and os.getpid() == st.owner_pid

    @property
    def closed(self) -> bool:
        return self._state.closed

    @property
    def detached(self) -> bool:
        return self._state.detached

    def __len__(self) -> int:
        if not self._handle.shape:
            raise TypeError("len() of unsized object")  # what NumPy says for a 0-d array
        return self._handle.shape[0]

    def __array__(self, dtype: DTypeLike | None = None, copy: bool | None = None) -> NDArray[Any]:
        arr = self.array
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            if copy is False:
                raise ValueError("a dtype conversion needs a copy")
            return arr.astype(dtype)
        return arr.copy() if copy else arr

    # --- lifecycle ------------------------------------------------------------------
    def close(self) -> None:
        """Stop using the segment from this object (idempotent).

        The owner's segment still exists until :meth:`unlink`. The mapping is released
        at once if no NumPy view of it is alive, else when the last one is collected.
        """
        self._state.close()

    def unlink(self) -> None:
        """Remove the segment's name (owner only; idempotent). Live mappings stay valid
        until they are closed, then the memory is freed."""
        st = self._state
        if st.detached:
            raise DetachedError(f"shared array {st.name!r} was transferred; the receiver owns it")
        if not self.owner:
            raise NotOwnerError(
                f"only the owner unlinks shared array {st.name!r}; this process attached "
                "it. Call close() here and let the owner unlink"
            )
        st.unlink()

    def transfer(self) -> SharedArrayHandle:
        """Move ownership: returns a handle whose first ``attach`` becomes the owner.

        This object is detached at once: any use raises
        :class:`~shmcompute.errors.DetachedError`. O(1): no data moves. The handle is in
        flight until attached, and may outlive this process (a producer that hands its
        result over and exits); one that is never attached stays until ``reap()``
        (``shmcompute reap``) removes it once this process is gone.
        """
        st = self._live()
        if not self.owner:
            raise NotOwnerError(f"only the owner can transfer shared array {st.name!r}")
        token = secrets.randbits(62) | 1
        assert st.mm is not None
        head = np.frombuffer(st.mm, dtype=np.int64, count=L.SEG_HEADER_SIZE // 8)
        head[L.SEG_TRANSFER_TOKEN // 8] = token
        del head
        # Unregister before the handle can reach a receiver: its register must come after
        # ours in the (possibly shared) resource tracker, or the tracker loses the name.
        _tracker_unregister(st.name)
        st.owner = False
        st.detached = True
        st.close()
        self._finalizer.detach()
        return SharedArrayHandle(st.name, self.shape, self.dtype, transfer_token=token)

    def _move(self) -> SharedArray:
        """Transfer within this process: a new owner object takes over this mapping and
        this one is detached, as with :meth:`transfer`, but without unmapping and
        re-mapping the segment (unmapping touched pages costs O(size))."""
        st = self._live()
        if not self.owner:
            raise NotOwnerError(f"only the owner can transfer shared array {st.name!r}")
        assert st.mm is not None and st.array is not None
        moved = _State(st.name, st.mm, st.array, owner=True)
        st.owner = False
        st.detached = True
        st.array = None  # the mapping now belongs to ``moved``; do not unmap it here
        st.mm = None
        st.closed = True
        self._finalizer.detach()
        return SharedArray._new(moved, self._handle)

    def __enter__(self) -> SharedArray:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.owner:
            self._state.unlink()
        self.close()

    def __reduce__(self) -> tuple[Callable[..., SharedArray], tuple[SharedArrayHandle]]:
        return (SharedArray.attach, (self.handle,))

    def __repr__(self) -> str:
        st = self._state
        flags = (
            "detached"
            if st.detached
            else "closed"
            if st.closed
            else ("owner" if self.owner else "attached")
        )
        return f"<SharedArray {st.name} shape={self.shape} dtype={self.dtype} {flags}>"


def _unlink_quietly(name: str) -> None:
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass  # removed from outside (reap, rm) meanwhile


def _claim_transfer(mm: mmap.mmap, handle: SharedArrayHandle) -> None:
    from . import atomics  # noqa: F401 - sets up the atomics' registry (imports Numba)
    from ._atomics_core import _cas_address

    probe = np.frombuffer(mm, dtype=np.int64, count=L.SEG_HEADER_SIZE // 8)
    base = int(probe.ctypes.data)
    try:
        won = _cas_address(base + L.SEG_TRANSFER_TOKEN, handle.transfer_token, 0)
        if won != handle.transfer_token:
            raise NotOwnerError(
                f"the transfer handle of {handle.name!r} was already claimed; a transfer "
                "handle is attached once (attach the plain .handle for more views)"
            )
        pid, start = _identity()
        probe[L.SEG_OWNER_PID // 8] = pid
        probe[L.SEG_OWNER_START // 8] = start
    finally:
        del probe


# --- module-level constructors ------------------------------------------------------
def zeros(shape: int | Iterable[int], dtype: DTypeLike = np.float64) -> SharedArray:
    """A new zero-filled shared array (shared memory starts zeroed: no extra pass)."""
    return SharedArray.create(shape, dtype)


def empty(shape: int | Iterable[int], dtype: DTypeLike = np.float64) -> SharedArray:
    """A new shared array. The memory is zeroed anyway (the kernel hands out zero pages)."""
    return SharedArray.create(shape, dtype)


def from_numpy(arr: Any) -> SharedArray:
    """A new shared array holding a copy of ``arr`` (copied once, here)."""
    src = np.asarray(arr)
    out = SharedArray.create(src.shape, src.dtype)
    out.array[...] = src
    return out


# --- crash recovery -----------------------------------------------------------------
def _segment_owner(name: str) -> tuple[int, int]:
    """(pid, start time) of the owner; from the name if the header is incomplete."""
    fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0o600)
    try:
        head = os.pread(fd, L.SEG_HEADER_SIZE, 0)
    finally:
        os.close(fd)
    if len(head) == L.SEG_HEADER_SIZE:
        words = np.frombuffer(head, dtype=np.int64)
        if int(words[L.SEG_MAGIC // 8]) == L.MAGIC:
            return int(words[L.SEG_OWNER_PID // 8]), int(words[L.SEG_OWNER_START // 8])
    try:
        return int(name[len(PREFIX) :].split("_")[0], 16), 0
    except ValueError:
        return -1, 0


def reap(*, dry_run: bool = False) -> list[str]:
    """Remove shmcompute segments whose owning process is gone; return their names.

    Normal exits and crashes of the owner alone need no reaping (the owner's finalizer
    or its resource tracker unlinks). Use this after a whole process group was
    SIGKILLed (or the OOM killer struck), e.g. at the start of a job or from
    ``shmcompute reap``. Live owners are never touched: owners are identified by pid
    and start time, so a reused pid is not mistaken for the owner.
    """
    try:
        names = sorted(n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX))
    except FileNotFoundError:  # pragma: no cover - macOS: no listing of POSIX shm
        return []
    removed = []
    for name in names:
        try:
            pid, start = _segment_owner(name)
        except (FileNotFoundError, PermissionError):
            continue
        if pid > 0 and _owner_alive(pid, start):
            continue
        if not dry_run:
            try:
                _posixshmem.shm_unlink("/" + name)
            except FileNotFoundError:
                continue
        removed.append(name)
    return removed
