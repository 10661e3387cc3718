"""Alembic environment: runs on a connection the control plane hands in, or on IAS_DATABASE_URL."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from control_plane.store import tables

config = context.config
target_metadata = tables.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: batch mode copies and moves the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def _run(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: str) -> None:
    from control_plane.store.db import normalise_url

    engine = create_async_engine(normalise_url(url), poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `ias server migrate`")
elif (conn := config.attributes.get("connection")) is not None:
    _run(conn)  # called from inside the server's event loop through AsyncConnection.run_sync
else:
    asyncio.run(_run_async(os.environ["IAS_DATABASE_URL"]))
