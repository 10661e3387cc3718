"""PostgreSQL LISTEN: how replicas wake each other. Only ever a hint; the pollers are the net."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping

import asyncpg
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)


def asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class PgListener:
    """Holds one connection that LISTENs on the given channels, reconnecting with jittered backoff."""

    def __init__(
        self,
        *,
        url: str,
        handlers: Mapping[str, Callable[[str], None]],
        on_reconnect: Callable[[], None],
        on_lost: Callable[[], None] = lambda: None,
    ) -> None:
        self._dsn = asyncpg_dsn(url)
        self._handlers = handlers
        self._on_reconnect = on_reconnect
        self._on_lost = on_lost
        self.connected = asyncio.Event()

    async def run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._listen()
                delay = 0.1
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("LISTEN connection lost (%s); reconnecting", exc)
            if self.connected.is_set():
                self.connected.clear()
                self._on_lost()
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)

    async def _listen(self) -> None:
        conn = await asyncpg.connect(self._dsn, timeout=10)
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        try:
            for channel, handler in self._handlers.items():
                await conn.add_listener(channel, _callback(handler))
            self.connected.set()
            # Whatever was notified while we were not listening is picked up by a fresh look.
            self._on_reconnect()
            while not lost.is_set():
                try:
                    async with asyncio.timeout(5):
                        await lost.wait()
                except TimeoutError:
                    await conn.fetchval("SELECT 1", timeout=5)  # detects a silently dead socket
        finally:
            if not conn.is_closed():
                await conn.close(timeout=2)


def _callback(handler: Callable[[str], None]) -> Callable[[object, int, str, str], None]:
    def on_notify(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        handler(payload)

    return on_notify
