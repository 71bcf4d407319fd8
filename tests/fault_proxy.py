"""A fault-injecting TCP proxy for tests: engine <-> proxy <-> private redis-server.

Faults it can inject, at any moment, on every connection at once:

* ``set_latency(seconds)``: each chunk is delivered that much later (order kept);
* ``cut()``: abort every open connection (both sides see a reset);
* ``blackhole(direction)``: stop delivering bytes in one or both directions.
  Bytes already read are *held*, not dropped, and delivered on ``resume()`` if
  the connection is still there, so a command can reach Redis long after the
  client gave up on it. With ``direction="replies"`` Redis applies every command
  at once and only the replies are held: the ambiguous "timed out after the
  server applied it" case. ``resume(drop=True)`` instead cuts every connection
  that was held, losing what it carried;
* ``resume()``: end a blackhole.

A client that closes its side while a blackhole holds its bytes gets the close
delivered after those bytes, as TCP would (FIN follows data).

``FaultProxy`` runs on the caller's event loop; ``ThreadedFaultProxy`` runs one
in a background thread with a blocking API, for synchronous orchestrators.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

logger = logging.getLogger(__name__)

Direction = Literal["both", "requests", "replies"]
T = TypeVar("T")

_CHUNK = 64 * 1024


@dataclass(slots=True)
class ProxyCounters:
    connections: int = 0
    refused: int = 0  # upstream unreachable: the client was closed at once
    cuts: int = 0
    connections_cut: int = 0
    blackholes: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass(eq=False)
class _Pipe:
    """One direction of one connection: a reader task feeding a delayed writer task."""

    queue: asyncio.Queue[tuple[float, bytes | None]] = field(default_factory=asyncio.Queue)


@dataclass(eq=False)
class _Link:
    client_writer: asyncio.StreamWriter
    server_writer: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    held: bool = False  # saw a blackhole while open (for resume(drop=True))

    def abort(self) -> None:
        for writer in (self.client_writer, self.server_writer):
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream_host:upstream_port`` with faults on demand."""

    def __init__(
        self, upstream_port: int, *, upstream_host: str = "127.0.0.1", listen_port: int = 0
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self._listen_port = listen_port
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._latency = 0.0
        # Set = traffic flows. Cleared by a blackhole of that direction.
        self._up_open = asyncio.Event()
        self._down_open = asyncio.Event()
        self._up_open.set()
        self._down_open.set()
        self.counters = ProxyCounters()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def open_connections(self) -> int:
        return len(self._links)

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self._listen_port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.resume()
        for link in list(self._links):
            link.abort()
        tasks = [task for link in list(self._links) for task in link.tasks]
        await asyncio.gather(*tasks, return_exceptions=True)
        self._links.clear()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # ------------------------------------------------------------------ faults

    def set_latency(self, seconds: float) -> None:
        """Deliver every chunk ``seconds`` later than it was read (0 to stop)."""
        self._latency = max(0.0, seconds)

    def cut(self) -> int:
        """Abort every open connection; returns how many there were."""
        links = list(self._links)
        for link in links:
            link.abort()
        self._links.clear()
        self.counters.cuts += 1
        self.counters.connections_cut += len(links)
        return len(links)

    def blackhole(self, direction: Direction = "both") -> None:
        """Hold traffic in ``direction`` until ``resume()``."""
        if direction in ("both", "requests"):
            self._up_open.clear()
        if direction in ("both", "replies"):
            self._down_open.clear()
        for link in self._links:
            link.held = True
        self.counters.blackholes += 1

    def resume(self, *, drop: bool = False) -> int:
        """End any blackhole; with ``drop`` cut the held connections (their bytes are lost)."""
        cut = 0
        if drop:
            for link in [link for link in self._links if link.held]:
                link.abort()
                self._links.discard(link)
                cut += 1
            self.counters.connections_cut += cut
        for link in self._links:
            link.held = False
        self._up_open.set()
        self._down_open.set()
        return cut

    @property
    def blackholed(self) -> bool:
        return not (self._up_open.is_set() and self._down_open.is_set())

    # ------------------------------------------------------------- forwarding

    async def _accept(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            self.counters.refused += 1
            client_writer.transport.abort()
            return
        self.counters.connections += 1
        link = _Link(client_writer, server_writer, held=self.blackholed)
        self._links.add(link)
        up, down = _Pipe(), _Pipe()
        loop = asyncio.get_running_loop()
        link.tasks = [
            loop.create_task(self._read(client_reader, up, link, upstream=True)),
            loop.create_task(self._write(up, server_writer, self._up_open, link)),
            loop.create_task(self._read(server_reader, down, link, upstream=False)),
            loop.create_task(self._write(down, client_writer, self._down_open, link)),
        ]

    async def _read(
        self, reader: asyncio.StreamReader, pipe: _Pipe, link: _Link, *, upstream: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await reader.read(_CHUNK)
                if upstream:
                    self.counters.bytes_up += len(data)
                else:
                    self.counters.bytes_down += len(data)
                pipe.queue.put_nowait((loop.time() + self._latency, data or None))
                if not data:
                    return
        except (OSError, asyncio.IncompleteReadError):
            pipe.queue.put_nowait((loop.time(), None))

    async def _write(
        self, pipe: _Pipe, writer: asyncio.StreamWriter, gate: asyncio.Event, link: _Link
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                deliver_at, data = await pipe.queue.get()
                delay = deliver_at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # the injected latency itself
                await gate.wait()
                if data is None:
                    # The other side closed: close ours after everything it sent.
                    self._close_link(link)
                    return
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError):
            self._close_link(link, abort=True)

    def _close_link(self, link: _Link, *, abort: bool = False) -> None:
        self._links.discard(link)
        for writer in (link.client_writer, link.server_writer):
            if abort:
                writer.transport.abort()
            elif not writer.is_closing():
                writer.close()
        current = asyncio.current_task()
        for task in link.tasks:
            if task is not current:
                task.cancel()


class ThreadedFaultProxy:
    """A ``FaultProxy`` on its own event loop in a daemon thread, driven by blocking calls."""

    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fault-proxy", daemon=True
        )
        self._thread.start()
        self.proxy = FaultProxy(upstream_port, upstream_host=upstream_host)
        self._run(self.proxy.start())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        async def call() -> Any:
            return fn(*args, **kwargs)

        return self._run(call())

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def url(self) -> str:
        return self.proxy.url

    @property
    def counters(self) -> ProxyCounters:
        return self.proxy.counters

    def set_latency(self, seconds: float) -> None:
        self._call(self.proxy.set_latency, seconds)

    def cut(self) -> int:
        return int(self._call(self.proxy.cut))

    def blackhole(self, direction: Direction = "both") -> None:
        self._call(self.proxy.blackhole, direction)

    def resume(self, *, drop: bool = False) -> int:
        return int(self._call(self.proxy.resume, drop=drop))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._run(self.proxy.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> ThreadedFaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
