"""SQLite for the async engine without a thread hop per statement.

aiosqlite runs every call (execute, fetch, commit) on a thread of its own and wakes the event loop
with the result. On a local WAL database a statement takes tens of microseconds, and the hop costs
more than that: a queue put, a GIL handover, a self-pipe write and a trip round the event loop, a
dozen times per job. This dialect keeps aiosqlite's interface (so SQLAlchemy's adapter is unchanged)
but runs each call at once on the event loop's thread.

That is safe here because one process owns the database and serialises its writers itself
(``Database.write``), WAL lets readers and the writer proceed without waiting on each other, and so
SQLite's busy handler, which would sleep on the loop, never has anything to wait for.
"""

from __future__ import annotations

import sqlite3
import types
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import aiosqlite
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_dbapi, SQLiteDialect_aiosqlite

DRIVER = "ias_inline"


class _RunNow:
    """Stands in for aiosqlite's queue to its worker thread: each call runs as it is queued."""

    def put_nowait(self, item: tuple[Any, Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except Exception as exc:
            if future is not None and not future.done():
                future.set_exception(exc)
            return
        if future is not None and not future.done():
            future.set_result(result)


class InlineConnection(aiosqlite.Connection):
    """An aiosqlite connection whose calls run on the caller's thread (no worker thread)."""

    def __init__(self, connector: Callable[[], sqlite3.Connection], iter_chunk_size: int) -> None:
        super().__init__(connector, iter_chunk_size)
        self._tx = _RunNow()  # type: ignore[assignment]

    def __await__(self) -> Generator[Any, None, aiosqlite.Connection]:
        return self._connect().__await__()  # no thread to start

    @property
    def sqlite3_connection(self) -> sqlite3.Connection:
        """The connection itself, for statements sent past SQLAlchemy in its transaction."""
        return self._conn


def connect(database: str | Path, *, iter_chunk_size: int = 64, **kwargs: Any) -> InlineConnection:
    def connector() -> sqlite3.Connection:
        connection: sqlite3.Connection = sqlite3.connect(str(database), **kwargs)
        return connection

    return InlineConnection(connector, iter_chunk_size)


def _module() -> types.ModuleType:
    """aiosqlite's namespace (its errors, Row, …) with our connect and connection class."""
    module = types.ModuleType("ias_inline_aiosqlite")
    module.__dict__.update(vars(aiosqlite))
    module.__dict__.update(connect=connect, Connection=InlineConnection)
    return module


class SQLiteDialect_inline(SQLiteDialect_aiosqlite):
    driver = DRIVER
    supports_statement_cache = True

    @classmethod
    def import_dbapi(cls) -> AsyncAdapt_aiosqlite_dbapi:
        return AsyncAdapt_aiosqlite_dbapi(_module(), sqlite3)


registry.register(f"sqlite.{DRIVER}", __name__, "SQLiteDialect_inline")
