"""The copy and transfer modes (share mode is the driver itself, in ``transform``).

* copy: every chunk is pickled to a worker and its result pickled back, as
  ``multiprocessing.Pool.map`` does. O(n), kept for comparison.
* transfer: the caller's SharedArrays are detached (``DetachedError`` on use), the job
  owns the arrays, frees consumed inputs, and hands the output back. O(1).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._jobs import Work, copy_task, kernel_name, kernel_ref
from .array import SharedArray
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    DetachedError,
    TaskTimeoutError,
    TransformError,
    WorkerCrashedError,
)
from .pool import Pool

MODES = ("share", "copy", "transfer")


def check_transfer(inputs: Sequence[Any], out: Any) -> None:
    """Transfer mode moves SharedArrays its caller owns: check every one before any
    moves (``take_ownership``), so that an error leaves the caller's arrays as they were."""
    for x, what in (*((x, f"input {i}") for i, x in enumerate(inputs)), (out, "out")):
        if x is None:
            continue
        if not isinstance(x, SharedArray):
            raise ArgumentTypeError(
                f"transfer mode moves SharedArrays; {what} is a {type(x).__name__} (use "
                "shc.from_numpy, or mode='share'/'copy')"
            )
        if x.detached:
            raise DetachedError(f"{what} was detached (moved to another owner) before this call")
        if not x.owner:
            raise ArgumentError(
                f"transfer mode needs the owner of {what}; this one is attached, not owned "
                "(transfer it from the process that created it, or use mode='share')"
            )


def take_ownership(inputs: Sequence[Any], out: Any, returned: Any) -> tuple[Any, Any, Any]:
    """Move the arrays (``check_transfer`` passed): the caller's objects are detached
    from here on, the job's new ones own the segments."""
    moved: dict[int, SharedArray] = {}

    def move(x: SharedArray) -> SharedArray:
        if id(x) not in moved:
            moved[id(x)] = x._move()
        return moved[id(x)]

    new_inputs = [move(x) for x in inputs]
    new_out = move(out) if out is not None else None
    new_returned = move(returned) if returned is not None and out is None else new_out
    return new_inputs, new_out, new_returned


def run_copy(w: Work, pool: Pool, retries: int) -> Any:
    """Copy mode: each chunk pickled to a task, its result pickled back (reduce: return
    the partials). A chunk whose worker died runs again, up to ``retries`` times (its
    task has its own copy of the chunk: nothing was written in place)."""
    kind, kernel, arrays, out_arr = w.kind, w.kernel, w.arrays, w.out
    n, chunk, nchunks, overlap = w.n, w.chunk, w.nchunks, w.overlap
    deadline = None if w.timeout is None else time.monotonic() + w.timeout
    k = kernel_ref(kernel) if pool.backend == "process" else kernel
    thread = pool.backend == "thread"
    submit = pool.options(retries=retries).submit
    futures = []
    for i in range(nchunks):
        lo, hi = i * chunk, min(i * chunk + chunk, n)
        s, e = (max(lo - overlap, 0), min(hi + overlap, n)) if kind == "halo" else (lo, hi)
        # Threads share memory; copy anyway, so the mode measures what it names.
        ins = tuple(np.array(a[s:e]) if thread else a[s:e] for a in arrays)
        shape = out_arr.shape[1:] if out_arr is not None else ()
        dt = out_arr.dtype if out_arr is not None else None
        futures.append(submit(copy_task, k, kind, ins, (hi - lo, *shape), dt, lo - s))
    bar = Progress(nchunks) if w.progress else None
    try:
        results = []
        for i, f in enumerate(futures):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                res = f.result(left)
            except TaskTimeoutError as e:  # (the pool's task_timeout, not the job's)
                for g in futures:
                    g.cancel()
                lo, hi = i * chunk, min(i * chunk + chunk, n)
                raise TaskTimeoutError(
                    f"chunk {i} (rows {lo}:{hi}) of {kernel_name(kernel)}'s copy-mode job ran "
                    "past the pool's task_timeout; the output is incomplete and was not "
                    "returned"
                ) from e
            except TimeoutError:
                for g in futures:
                    g.cancel()
                raise TimeoutError("transform: the job did not finish within its timeout") from None
            except Exception as e:
                for g in futures:
                    g.cancel()
                lo, hi = i * chunk, min(i * chunk + chunk, n)
                if isinstance(e, WorkerCrashedError):
                    raise WorkerCrashedError(
                        f"a worker died during {kernel_name(kernel)}'s job on chunk {i} "
                        f"(rows {lo}:{hi}), and retries ran out ({retries}); the output is "
                        "incomplete and was not returned",
                        pid=e.pid,
                        exitcode=e.exitcode,
                    ) from e
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
        self._lock = threading.Lock()  # (the caller's thread and follow's)
        self._stop: threading.Event | None = None
        self._ticker: threading.Thread | None = None
        try:
            from tqdm import tqdm

            self.bar: Any = tqdm(total=total, unit="chunk")
        except ImportError:
            self.bar = None

    def follow(self, done: Callable[[], int], every: float = 0.1) -> None:
        """Update from ``done()`` (the job's shared chunk counter) every ``every``
        seconds, from a thread of its own, until ``close``: on threads the caller runs
        chunks itself, in compiled code, and would only update the bar at the end."""
        stop = self._stop = threading.Event()

        def tick() -> None:
            while not stop.wait(every):
                self.update_to(done())

        self._ticker = threading.Thread(target=tick, name="shmcompute-progress", daemon=True)
        self._ticker.start()

    def update_to(self, n: int) -> None:
        with self._lock:
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
        if self._stop is not None and self._ticker is not None:
            self._stop.set()
            self._ticker.join(5.0)  # (it only waits on the event and updates the bar)
        if self.bar is not None:
            self.bar.close()
        elif self.n:
            sys.stderr.write("\n")
