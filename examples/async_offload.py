"""An asyncio HTTP service that stays responsive while CPU-heavy requests run on a pool.

Run it from the repository root::

    python -m examples.async_offload                     # 127.0.0.1:8080, 2 worker processes
    python -m examples.async_offload --backend thread --workers 4 --port 8081
    python -m examples.async_offload --backend inline    # the anti-pattern, for comparison

and from another shell::

    curl 'http://127.0.0.1:8080/work?n=1500000'    # ~200 ms of CPU on a worker; JSON result
    curl 'http://127.0.0.1:8080/ping'              # answers at once, even while /work runs

What it shows: ``GET /work`` does ``await pool.run(work, n)``, so while a worker burns
the CPU the event loop only waits on a future, and ``GET /ping`` (and every other
connection) keeps being served. With ``--backend inline`` the same call runs on the loop
itself: start a few ``/work`` requests, time a ``/ping``, and it waits behind all of
them. ``tests/test_async_offload.py`` measures this: the loop's worst lag stays under
20 ms with the work on a pool, and is the whole task time when it runs inline.

``--backend process`` (the default) runs ``work`` in worker processes, so any Python
code works there, including code that holds the GIL. ``--backend thread`` runs it in
threads of this process; that keeps the loop free only because the kernel below is
compiled with ``nogil=True``. A pure-Python function on the thread backend would hold the
GIL and stall the loop almost as badly as ``inline``.

The HTTP side is deliberately small and standard-library only: HTTP/1.1 ``GET`` with
keep-alive, JSON responses, no request bodies, no chunked encoding.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from numba import njit

from shmcompute.pool import Pool

DEFAULT_N = 1_500_000  # ~200 ms of CPU on one core of a current server
MAX_N = 20_000_000  # ~3 s: the most one request may ask for
HEAD_TIMEOUT = 10.0  # seconds to receive a request head; also the keep-alive idle limit
MAX_HEAD = 16 * 1024  # bytes of request line plus headers

Offload = Callable[..., Awaitable[Any]]
"""How ``/work`` runs its function: ``pool.run``, or :func:`run_inline`."""


# --- the CPU-heavy work ------------------------------------------------------------------
@njit(nogil=True, cache=True)
def collatz_steps(n: int) -> int:
    """Total Collatz steps of 1 .. n-1: data-dependent loops no compiler can fold away,
    about 140 ns per number. ``nogil=True`` lets threads run it in parallel."""
    total = 0
    for i in range(1, n):
        x = i
        while x != 1:
            x = 3 * x + 1 if x & 1 else x >> 1
            total += 1
    return total


def work(n: int) -> dict[str, Any]:
    """The CPU-heavy part of ``GET /work``; runs wherever the offload puts it.

    A plain module-level function, so the process backend pickles it by reference and a
    worker imports this module (loading the kernel from Numba's disk cache) to run it.
    """
    t0 = time.perf_counter()
    steps = int(collatz_steps(n))
    return {
        "n": n,
        "steps": steps,
        "pid": os.getpid(),
        "thread": threading.current_thread().name,
        "cpu_ms": round((time.perf_counter() - t0) * 1e3, 3),
    }


async def run_inline(fn: Callable[..., Any], /, *args: Any) -> Any:
    """An offload that does not offload: calls ``fn`` on the event loop, blocking it."""
    return fn(*args)


# --- a minimal HTTP/1.1 server -------------------------------------------------------------
class HTTPError(Exception):
    """Answer with ``status`` and ``{"error": message}``."""

    def __init__(
        self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    version: str
    headers: dict[str, str]  # names lower-cased

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


@dataclass(frozen=True, slots=True)
class Response:
    status: HTTPStatus
    payload: Any  # serialised as JSON
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self, keep_alive: bool) -> bytes:
        body = json.dumps(self.payload, separators=(",", ":")).encode() + b"\n"
        headers = {
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            "Connection": "keep-alive" if keep_alive else "close",
            **self.headers,
        }
        head = f"HTTP/1.1 {self.status.value} {self.status.phrase}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return (head + "\r\n").encode("latin-1") + body


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """Read one request (head, and a body if one is announced, which is discarded).

    Returns None when the client closed the connection between requests; raises
    :class:`HTTPError` for a request that cannot be served on this connection.
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial.strip():
            return None
        raise HTTPError(HTTPStatus.BAD_REQUEST, "incomplete request head") from None
    except asyncio.LimitOverrunError:
        raise HTTPError(
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"request head over {MAX_HEAD} bytes"
        ) from None
    # A client may send empty lines between requests (RFC 9112, section 2.2).
    lines = head.lstrip(b"\r\n").decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[1].startswith("/"):
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"malformed request line {lines[0]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HTTPError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"unsupported {version!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"malformed header line {line!r}")
        key = name.lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    if "transfer-encoding" in headers:
        raise HTTPError(HTTPStatus.NOT_IMPLEMENTED, "chunked request bodies are not supported")
    length = headers.get("content-length", "0")
    if not length.isdigit():
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}")
    if int(length) > MAX_HEAD:
        raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
    await reader.readexactly(int(length))  # no route takes a body: drop it
    url = urlsplit(target)
    query = parse_qs(url.query, keep_blank_values=True)
    return Request(method, url.path, query, version, headers)


def int_param(query: dict[str, list[str]], name: str, default: int, lo: int, hi: int) -> int:
    """Query parameter ``name`` as an int in ``[lo, hi]``; HTTP 400 otherwise."""
    values = query.get(name)
    if not values:
        return default
    try:
        value = int(values[-1])
    except ValueError:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"{name} must be in [{lo}, {hi}]")
    return value


class Service:
    """The HTTP service: ``GET /ping`` and ``GET /work?n=...``.

    ``offload`` is ``pool.run`` (or :func:`run_inline`). Use it as ``async with
    Service(pool.run) as service:`` then ``port = await service.start(host, 0)``; leaving
    the block closes it.
    """

    def __init__(self, offload: Offload, *, max_n: int = MAX_N) -> None:
        self._offload = offload
        self._max_n = max_n
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._routes: dict[str, Callable[[Request], Awaitable[Response]]] = {
            "/ping": self._ping,
            "/work": self._work,
        }

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0: an ephemeral port); return the port."""
        self._server = await asyncio.start_server(
            self._serve_connection, host, port, limit=MAX_HEAD
        )
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def close(self, timeout: float = 5.0) -> None:
        """Stop listening, end open connections (cancelling requests in progress), and
        wait for them, at most ``timeout`` seconds."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        connections = set(self._connections)
        for task in connections:
            task.cancel()
        if connections:
            await asyncio.wait(connections, timeout=timeout)
        await asyncio.wait_for(server.wait_closed(), timeout)

    async def __aenter__(self) -> Service:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                try:
                    async with asyncio.timeout(HEAD_TIMEOUT):
                        request = await read_request(reader)
                except TimeoutError:
                    break  # idle keep-alive connection, or a client too slow to send
                except HTTPError as e:  # the connection's state is unknown: answer, close
                    writer.write(Response(e.status, {"error": str(e)}, e.headers).encode(False))
                    await writer.drain()
                    break
                if request is None:
                    break
                response = await self._respond(request)
                writer.write(response.encode(request.keep_alive))
                await writer.drain()
                if not request.keep_alive:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _respond(self, request: Request) -> Response:
        route = self._routes.get(request.path)
        try:
            if route is None:
                raise HTTPError(HTTPStatus.NOT_FOUND, f"no route {request.path}")
            if request.method != "GET":
                raise HTTPError(
                    HTTPStatus.METHOD_NOT_ALLOWED, "only GET is served", {"Allow": "GET"}
                )
            return await route(request)
        except HTTPError as e:
            return Response(e.status, {"error": str(e)}, e.headers)

    async def _ping(self, request: Request) -> Response:
        return Response(HTTPStatus.OK, {"ok": True})

    async def _work(self, request: Request) -> Response:
        n = int_param(request.query, "n", DEFAULT_N, 1, self._max_n)
        t0 = time.perf_counter()
        try:
            result = await self._offload(work, n)
        except Exception as e:  # the task raised, or its worker crashed
            raise HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}") from e
        result["total_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        return Response(HTTPStatus.OK, result)


# --- running it ----------------------------------------------------------------------------
async def serve(host: str, port: int, workers: int, backend: str) -> None:
    """Serve until SIGTERM or Ctrl-C, then close connections and shut the pool down."""
    work(1)  # compile the kernel, or load it from the disk cache, before any worker does
    pool = None if backend == "inline" else Pool(workers, backend=backend)
    try:
        offload: Offload = run_inline if pool is None else pool.run
        if pool is not None:
            # Start every worker now, not on the first requests (process workers import
            # this module for their first task).
            await asyncio.gather(*(pool.run(work, 1) for _ in range(workers)))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with Service(offload) as service:
            bound = await service.start(host, port)
            where = "on the event loop" if pool is None else f"on {workers} {backend} workers"
            print(
                f"serving http://{host}:{bound}/work?n={DEFAULT_N} ({where}) and /ping; "
                "Ctrl-C to stop",
                flush=True,
            )
            await stop.wait()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True, timeout=10.0)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.async_offload",
        description="An asyncio HTTP service whose CPU-heavy route runs on a shmcompute pool.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port (0: any free one)")
    parser.add_argument("--workers", type=_positive_int, default=2, help="pool size")
    parser.add_argument(
        "--backend",
        choices=("process", "thread", "inline"),
        default="process",
        help="where /work runs: a process pool, a thread pool, or on the event loop itself",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.workers, args.backend))


if __name__ == "__main__":
    main()
