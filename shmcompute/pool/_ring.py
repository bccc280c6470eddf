"""Reading and writing the task and result rings of a pool's control block.

Both sides use this module: the parent pushes tasks and pops results, a worker pops
tasks and pushes results (see the layout in ``_layout.py``). Slot headers are plain
stores; the ring index that publishes a slot is an atomic store made *after* them (on
x86 stores are not reordered with stores; on weaker CPUs the seq_cst store is a
release), so a reader that sees the index also sees the slot.
"""

from __future__ import annotations

import pickle
import struct
import traceback
from typing import Any

import numpy as np

from .. import _layout as L
from ..array import SharedArray, SharedArrayHandle

# A slot header: SH_SEQ, SH_FLAGS, SH_NBYTES, SH_T_START, SH_T_END, in one struct call
# (~0.1 us; a NumPy slice assignment from a tuple is ~0.6 us, on every task and result).
_HEAD = struct.Struct("=5q")
assert (L.SH_SEQ, L.SH_FLAGS, L.SH_NBYTES, L.SH_T_START, L.SH_T_END) == (0, 1, 2, 3, 4)


class Rings:
    """Views of one control block: int64 ``words`` and a byte memoryview ``raw``."""

    def __init__(self, words: np.ndarray, nslots: int) -> None:
        self.words = words
        self.raw = memoryview(words.data).cast("B")
        self.nslots = nslots
        self._base = [
            (L.ring_offset(nslots, w, False), L.ring_offset(nslots, w, True)) for w in range(nslots)
        ]

    @staticmethod
    def rec(w: int) -> int:
        """Word index of worker ``w``'s record."""
        return L.PC_HEADER_WORDS + w * L.W_WORDS

    def _slot(self, w: int, results: bool, index: int) -> int:
        return self._base[w][results] + (index % L.RING_SLOTS) * L.SLOT_BYTES

    def write(
        self,
        w: int,
        results: bool,
        index: int,
        seq: int,
        flags: int,
        payload: bytes,
        t_start: int = 0,
        t_end: int = 0,
    ) -> None:
        off = self._slot(w, results, index)
        n = len(payload)
        assert n <= L.SLOT_INLINE, "spill large payloads first"
        _HEAD.pack_into(self.raw, off, seq, flags, n, t_start, t_end)
        self.raw[off + L.SLOT_HEAD : off + L.SLOT_HEAD + n] = payload

    def read(self, w: int, results: bool, index: int) -> tuple[int, int, int, int, memoryview]:
        """``(seq, flags, t_start, t_end, payload view)``; the view is valid until the
        slot is released by advancing the ring's head."""
        off = self._slot(w, results, index)
        seq, flags, n, t_start, t_end = _HEAD.unpack_from(self.raw, off)
        return seq, flags, t_start, t_end, self.raw[off + L.SLOT_HEAD : off + L.SLOT_HEAD + n]


# --- payloads too large for a slot travel in their own segment ----------------------
def spill(payload: bytes) -> SharedArray:
    """A new uint8 segment holding ``payload`` (this process owns it)."""
    seg = SharedArray.create(len(payload), np.uint8)
    seg.array[:] = np.frombuffer(payload, np.uint8)
    return seg


def unspill(data: memoryview | bytes) -> bytes:
    """Read a spilled payload from its pickled handle. A transfer handle makes this
    process the owner, and the segment is unlinked once read."""
    handle = pickle.loads(data)
    assert isinstance(handle, SharedArrayHandle)
    with SharedArray.attach(handle) as seg:
        return bytes(seg.array)


# --- exceptions cross with their traceback (as in concurrent.futures.process) ---------
class RemoteTraceback(Exception):
    """The worker's formatted traceback, attached as the ``__cause__`` of its error."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def dump_exception(exc: BaseException) -> bytes:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        return pickle.dumps((exc, tb), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # the exception itself does not pickle
        sub = RuntimeError(
            f"{type(exc).__name__}: {exc} (the worker's exception could not be pickled: "
            f"{type(e).__name__}: {e})"
        )
        return pickle.dumps((sub, tb), protocol=pickle.HIGHEST_PROTOCOL)


def load_exception(data: memoryview | bytes) -> BaseException:
    exc, tb = pickle.loads(data)
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    return exc  # type: ignore[no-any-return]


def describe_call(fn: Any) -> str:
    mod = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return f"{mod}.{name}" if mod else str(name)


def release_spill(task: Any) -> None:
    """Free the segment a large task payload was spilled to (once)."""
    seg, task.spill = task.spill, None
    if seg is not None:
        seg.unlink()
        seg.close()


def load_error(flags: int, payload: bytes) -> BaseException:
    if flags & L.SF_SPILL:
        payload = unspill(payload)
    try:
        return load_exception(payload)
    except Exception as e:  # pragma: no cover - the exception type is not importable here
        err = RuntimeError(f"a worker raised an exception that cannot be unpickled here: {e}")
        err.__cause__ = RemoteTraceback(str(e))
        return err
