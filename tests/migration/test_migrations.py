"""Migrations upgrade an empty database to head on SQLite and PostgreSQL, and match the models."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from control_plane.store.db import Database
from control_plane.store.tables import metadata


def _diff(conn: Connection) -> list[object]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


def _tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


async def _check(url: str) -> None:
    db = Database(url=url)
    try:
        await db.migrate()
        await db.migrate()  # idempotent: a second start changes nothing
        async with db.engine.connect() as conn:
            assert await conn.run_sync(_tables) >= {
                "jobs",
                "workers",
                "events",
                "workspaces",
                "alembic_version",
            }
            assert await conn.run_sync(_diff) == []
    finally:
        await db.close()


async def test_sqlite_upgrades_to_head_with_no_drift(tmp_path: Path) -> None:
    await _check(f"sqlite:///{tmp_path / 'm.db'}")


@pytest.mark.postgres
async def test_postgres_upgrades_to_head_with_no_drift(pg_url: str) -> None:
    await _check(pg_url)
