"""The copy and transfer modes (share mode is the driver itself, in ``transform``).

* copy: every chunk is pickled to a worker and its result pickled back, as
  ``multiprocessing.Pool.map`` does. O(n), kept for comparison.
* transfer: the caller's SharedArrays are detached (``DetachedError`` on use), the job
  owns the arrays, frees consumed inputs, and hands the output back. O(1).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._jobs import Work, copy_task, kernel_name, kernel_ref
from .array import SharedArray
from .errors import ArgumentError, ArgumentTypeError, TransformError
from .pool import Pool

MODES = ("share", "copy", "transfer")


def take_ownership(inputs: Sequence[Any], out: Any, returned: Any) -> tuple[Any, Any, Any]:
    moved: dict[int, SharedArray] = {}

    def move(x: Any, what: str) -> SharedArray:
        if not isinstance(x, SharedArray):
            raise ArgumentTypeError(
                f"transfer mode moves SharedArrays; {what} is a {type(x).__name__} (use "
                "shc.from_numpy, or mode='share'/'copy')"
            )
        if id(x) not in moved:
            if not x.owner:
                raise ArgumentError(
                    f"transfer mode needs the owner of {what}; this one is attached, not owned"
                )
            moved[id(x)] = x._move()  # the caller's object is detached from here on
        return moved[id(x)]

    new_inputs = [move(x, f"input {i}") for i, x in enumerate(inputs)]
    new_out = move(out, "out") if out is not None else None
    new_returned = move(returned, "out") if returned is not None and out is None else new_out
    return new_inputs, new_out, new_returned


def run_copy(w: Work, pool: Pool) -> Any:
    """Copy mode: each chunk pickled to a task, its result pickled back (reduce: return
    the partials)."""
    kind, kernel, arrays, out_arr = w.kind, w.kernel, w.arrays, w.out
    n, chunk, nchunks, overlap = w.n, w.chunk, w.nchunks, w.overlap
    deadline = None if w.timeout is None else time.monotonic() + w.timeout
    k = kernel_ref(kernel) if pool.backend == "process" else kernel
    thread = pool.backend == "thread"
    futures = []
    for i in range(nchunks):
        lo, hi = i * chunk, min(i * chunk + chunk, n)
        s, e = (max(lo - overlap, 0), min(hi + overlap, n)) if kind == "halo" else (lo, hi)
        # Threads share memory; copy anyway, so the mode measures what it names.
        ins = tuple(np.array(a[s:e]) if thread else a[s:e] for a in arrays)
        shape = out_arr.shape[1:] if out_arr is not None else ()
        dt = out_arr.dtype if out_arr is not None else None
        futures.append(pool.submit(copy_task, k, kind, ins, (hi - lo, *shape), dt, lo - s))
    bar = Progress(nchunks) if w.progress else None
    try:
        results = []
        for i, f in enumerate(futures):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                res = f.result(left)
            except TimeoutError:
                for g in futures:
                    g.cancel()
                raise TimeoutError("transform: the job did not finish within its timeout") from None
            except Exception as e:
                for g in futures:
                    g.cancel()
                lo, hi = i * chunk, min(i * chunk + chunk, n)
                raise TransformError(
                    f"kernel {kernel_name(kernel)} raised {type(e).__name__}: {e} on chunk "
                    f"{i} (rows {lo}:{hi})"
                ) from e
            if kind == "reduce":
                results.append(res)
            else:
                lo = i * chunk
                out_arr[lo : lo + res.shape[0]] = res
            if bar is not None:
                bar.update_to(i + 1)
        return results if kind == "reduce" else None
    finally:
        if bar is not None:
            bar.close()


class Progress:
    """A progress bar over chunks: tqdm when installed, else a line on stderr."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.n = 0
        try:
            from tqdm import tqdm

            self.bar: Any = tqdm(total=total, unit="chunk")
        except ImportError:
            self.bar = None

    def update_to(self, n: int) -> None:
        n = min(n, self.total)
        if n <= self.n:
            return
        if self.bar is not None:
            self.bar.update(n - self.n)
        else:
            sys.stderr.write(f"\rshmcompute: {n}/{self.total} chunks")
            sys.stderr.flush()
        self.n = n

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.n:
            sys.stderr.write("\n")
