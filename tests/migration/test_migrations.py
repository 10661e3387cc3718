"""Migrations upgrade an empty database to head on SQLite and PostgreSQL, and match the models."""

from __future__ import annotations

import subprocess
import sys
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


def test_schema_head_is_the_newest_migration() -> None:
    from alembic.script import ScriptDirectory

    from control_plane.store.db import SCHEMA_HEAD, alembic_config

    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == SCHEMA_HEAD


def _downgrade(conn: Connection, revision: str) -> None:
    from alembic import command

    from control_plane.store.db import alembic_config

    cfg = alembic_config()
    cfg.attributes["connection"] = conn
    command.downgrade(cfg, revision)


async def _revision(db: Database) -> str | None:
    async with db.engine.connect() as conn:
        return await db.schema_revision(conn)


async def _check_behind_head(url: str) -> None:
    """A database one migration behind is upgraded; one at head is left as it is."""
    from control_plane.store.db import SCHEMA_HEAD

    db = Database(url=url)
    try:
        assert await _revision(db) is None
        await db.migrate()
        assert await _revision(db) == SCHEMA_HEAD
        async with db.engine.begin() as conn:
            await conn.run_sync(_downgrade, "0002")
        assert await _revision(db) == "0002"
        await db.migrate()
        assert await _revision(db) == SCHEMA_HEAD
        async with db.engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await db.close()


async def test_sqlite_behind_head_is_upgraded(tmp_path: Path) -> None:
    await _check_behind_head(f"sqlite:///{tmp_path / 'm.db'}")


@pytest.mark.postgres
async def test_postgres_behind_head_is_upgraded(pg_url: str) -> None:
    await _check_behind_head(pg_url)


_START_AT_HEAD = """
import asyncio, sys
import control_plane.app, control_plane.cli
from control_plane.store.db import Database
db = Database(url=sys.argv[1])
asyncio.run(db.migrate())
asyncio.run(db.close())
print(sorted(m for m in sys.modules if m.split(".")[0] in ("alembic", "mako")))
"""


def test_a_replica_starting_on_a_database_at_head_leaves_alembic_unloaded(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    run = [sys.executable, "-c", _START_AT_HEAD, url]
    first = subprocess.run(run, capture_output=True, text=True, timeout=60, check=True)
    assert "alembic" in first.stdout, "an empty database is migrated with Alembic"
    again = subprocess.run(run, capture_output=True, text=True, timeout=60, check=True)
    assert again.stdout.strip() == "[]", again.stdout
