"""A controllable asyncio TCP proxy on 127.0.0.1 for network-fault tests: drop, black hole, latency."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Final

CHUNK_BYTES: Final = 64 * 1024
QUEUED_CHUNKS: Final = 64  # per direction: at most 4 MiB in flight inside the proxy


class TcpProxy:
    """Forwards every connection on ``address`` to ``upstream`` (HOST:PORT) under test control."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host.strip("[]"), int(port))
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.latency_s = 0.0
        self.accepted = 0

    @property
    def address(self) -> str:
        assert self._server is not None, "start() first"
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    @property
    def open_links(self) -> int:
        return len(self._links)

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop()
        self._flowing.set()
        if self._server is not None:
            await self._server.wait_closed()

    def drop(self) -> None:
        """Close every current connection at once (both sides see a reset/EOF)."""
        for link in list(self._links):
            link.close()

    def blackhole(self) -> None:
        """Keep sockets open but forward nothing, like a silent network partition."""
        self._flowing.clear()

    def latency(self, seconds: float) -> None:
        """Delay each chunk by ``seconds`` in each direction."""
        self.latency_s = seconds

    def heal(self) -> None:
        """Back to plain pass-through; held-back bytes flow again, in order."""
        self.latency_s = 0.0
        self._flowing.set()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            server_r, server_w = await asyncio.open_connection(*self._upstream)
        except OSError:
            client_w.close()
            return
        link = _Link(self, (client_r, client_w), (server_r, server_w))
        self._links.add(link)
        try:
            await link.run()
        finally:
            self._links.discard(link)


class _Link:
    """One proxied connection: two directions, each a reader task and a writer task."""

    def __init__(
        self,
        proxy: TcpProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self._proxy = proxy
        self._writers = (client[1], server[1])
        self._tasks = [
            *self._direction(client[0], server[1]),
            *self._direction(server[0], client[1]),
        ]

    def _direction(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> list[asyncio.Task[None]]:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=QUEUED_CHUNKS)
        return [
            asyncio.create_task(self._read(src, queue)),
            asyncio.create_task(self._write(queue, dst)),
        ]

    async def run(self) -> None:
        # Either side closing (or a drop) ends the whole link, once what was read has been written.
        await asyncio.wait(self._tasks[1::2], return_when=asyncio.FIRST_COMPLETED)
        self.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for writer in self._writers:
            with contextlib.suppress(Exception):
                writer.transport.abort()

    async def _read(self, src: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]]) -> None:
        data = b"x"
        while data:
            await self._proxy._flowing.wait()
            try:
                data = await src.read(CHUNK_BYTES)
            except OSError:
                data = b""
            # An empty chunk tells the writer the source has ended.
            await queue.put((time.monotonic() + self._proxy.latency_s, data))

    async def _write(self, queue: asyncio.Queue[tuple[float, bytes]], dst: asyncio.StreamWriter) -> None:
        while True:
            due, data = await queue.get()
            if not data:
                return
            await asyncio.sleep(max(due - time.monotonic(), 0))
            await self._proxy._flowing.wait()
            dst.write(data)
            await dst.drain()
