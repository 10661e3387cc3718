"""A scratch PostgreSQL database per run: created with a random name, dropped at the end."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import asyncpg

log = logging.getLogger(__name__)

ADMIN_DSN: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
CONNECT_TIMEOUT_S: Final = 5.0
COMMAND_TIMEOUT_S: Final = 30.0


class PostgresUnavailable(Exception):
    """PostgreSQL could not be reached or refused to create the database."""


async def server_version(dsn: str = ADMIN_DSN) -> str:
    """The server's version string, or raise `PostgresUnavailable`."""
    conn = await _connect(dsn)
    try:
        return str(await conn.fetchval("SHOW server_version", timeout=COMMAND_TIMEOUT_S))
    finally:
        await conn.close(timeout=CONNECT_TIMEOUT_S)


async def next_xid(url: str) -> int:
    """The next transaction id PostgreSQL will assign; reading it assigns none.

    The difference of two readings counts the transactions that wrote something in between.
    """
    conn = await _connect(url)
    try:
        query = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
        return int(await conn.fetchval(query, timeout=COMMAND_TIMEOUT_S))
    finally:
        await conn.close(timeout=CONNECT_TIMEOUT_S)


async def commits(url: str) -> int:
    """Transactions committed in ``url``'s database so far (``pg_stat_database``, flushed about once
    a second by each backend, so deltas over many seconds are what is meaningful)."""
    conn = await _connect(url)
    try:
        query = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        return int(await conn.fetchval(query, timeout=COMMAND_TIMEOUT_S))
    finally:
        await conn.close(timeout=CONNECT_TIMEOUT_S)


@asynccontextmanager
async def scratch_database(dsn: str = ADMIN_DSN) -> AsyncIterator[str]:
    """Create ``bench_<hex>`` and yield its URL; the database is dropped on exit, even on error."""
    name = f"bench_{secrets.token_hex(6)}"
    conn = await _connect(dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"', timeout=COMMAND_TIMEOUT_S)
    except asyncpg.PostgresError as exc:
        raise PostgresUnavailable(f"cannot create database {name}: {exc}") from exc
    finally:
        await conn.close(timeout=CONNECT_TIMEOUT_S)
    log.info("created database %s", name)
    try:
        yield dsn.rpartition("/")[0] + f"/{name}"
    finally:
        await _drop(dsn, name)


async def _drop(dsn: str, name: str) -> None:
    try:
        conn = await _connect(dsn)
        try:
            # FORCE ends connections a killed server may have left behind.
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', timeout=COMMAND_TIMEOUT_S)
        finally:
            await conn.close(timeout=CONNECT_TIMEOUT_S)
        log.info("dropped database %s", name)
    except (PostgresUnavailable, OSError, asyncpg.PostgresError) as exc:
        log.error("could not drop database %s: %s", name, exc)


async def _connect(dsn: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise PostgresUnavailable(f"{type(exc).__name__}: {exc}") from exc
