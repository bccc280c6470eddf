"""Task functions and an echo loop for benchmarks/test_pool.py.

Worker processes receive these by reference (module and name), so they live in an
importable module rather than in the test file; the benchmark preloads this module in
the forkserver, so no peer pays for importing it in a fresh worker.
"""

from __future__ import annotations

from typing import Any


def inc(x: int) -> int:
    """The trivial task every pool runs: as little work as a call can carry."""
    return x + 1


def echo_pipe(conn: Any) -> None:
    """The raw-IPC floor: answer each message on ``conn`` until ``None`` arrives."""
    try:
        while (msg := conn.recv()) is not None:
            conn.send(msg)
    finally:
        conn.close()
