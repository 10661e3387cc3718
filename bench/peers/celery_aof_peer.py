"""Celery with a Redis that fsyncs every write before answering it, as IAS's commits are durable.

The machine's Redis keeps nothing on disk, so an enqueue there waits for no flush; this peer runs
a Redis of its own (``redis-server`` on 127.0.0.1, a free port, its append-only file in a scratch
directory, ``appendfsync always``) and is otherwise `celery_peer`'s workload: the same client,
the same prefork worker with 2 processes.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import redis

from bench.peers.celery_peer import CelerySession, on_redis
from bench.peers.common import PeerFailed

START_TIMEOUT_S: Final = 10.0
STOP_TIMEOUT_S: Final = 10.0
PING_EVERY_S: Final = 0.05


@asynccontextmanager
async def session(admin_url: str, out: str, *, connections: int) -> AsyncIterator[CelerySession]:
    del admin_url  # Celery uses Redis, not PostgreSQL
    binary = shutil.which("redis-server")
    if binary is None:
        raise PeerFailed("redis-server is not installed (Debian's redis-server package)")
    with tempfile.TemporaryDirectory(prefix="ias-bench-redis-") as data_dir:
        port = _free_port()
        server = await asyncio.create_subprocess_exec(
            binary,
            *("--bind", "127.0.0.1", "--port", str(port), "--dir", data_dir, "--save", ""),
            *("--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            await _wait_serving(server, url)
            async with on_redis(url, out, connections=connections) as celery:
                yield celery
        finally:
            if server.returncode is None:
                server.terminate()
                try:
                    await asyncio.wait_for(server.wait(), STOP_TIMEOUT_S)
                except TimeoutError:
                    server.kill()
                    await server.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _wait_serving(server: asyncio.subprocess.Process, url: str) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        for _ in range(int(START_TIMEOUT_S / PING_EVERY_S)):
            if server.returncode is not None:
                raise PeerFailed(f"redis-server exited with {server.returncode}")
            try:
                if await asyncio.to_thread(client.ping):
                    fsync = (await asyncio.to_thread(client.config_get, "appendfsync")).get("appendfsync")
                    if fsync != "always":
                        raise PeerFailed(f"redis-server runs with appendfsync {fsync!r}, not 'always'")
                    return
            except redis.ConnectionError:
                pass
            await asyncio.sleep(PING_EVERY_S)
        raise PeerFailed(f"redis-server did not answer within {START_TIMEOUT_S:g} s")
    finally:
        client.close()
