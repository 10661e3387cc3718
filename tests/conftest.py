"""Shared fixtures: a clean environment, real PostgreSQL databases and bounded polling."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pytest

if TYPE_CHECKING:
    from control_plane.queue import JobQueue
    from control_plane.store.db import Database

PG_ADMIN_URL = os.environ.get("IAS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No IAS_* setting of the developer's shell leaks into a test; state goes to a temp home."""
    for key in list(os.environ):
        if key.startswith("IAS_") and key not in ("IAS_REQUIRE_POSTGRES", "IAS_TEST_PG_URL"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("IAS_HOME", str(tmp_path_factory.mktemp("ias-home")))


def _postgres_missing(reason: str) -> None:
    message = f"PostgreSQL unreachable at {PG_ADMIN_URL}: {reason}"
    if os.environ.get("IAS_REQUIRE_POSTGRES") == "1":
        pytest.fail(message + " (IAS_REQUIRE_POSTGRES=1 turns this skip into a failure)")
    pytest.skip("SKIPPED LOUDLY: " + message)


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_URL.replace("postgresql+asyncpg", "postgresql"), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    name = f"ias_test_{secrets.token_hex(6)}"
    try:
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        _postgres_missing(str(exc))
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each backend in turn: a SQLite file in the test's directory, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ias.db'}"
    return str(request.getfixturevalue("pg_url"))


def bare_queue(database: Database) -> JobQueue:
    """A JobQueue over ``database`` whose event hub reads nothing back (no Watch subscribers)."""
    from control_plane.config import ServerSettings
    from control_plane.domain.workers import Event
    from control_plane.events.hub import EventHub
    from control_plane.queue import JobQueue

    async def no_events(_workspace_id: str, _after: int) -> list[Event]:
        return []

    async def no_seq(_workspace_id: str) -> int:
        return 0

    hub = EventHub(read_since=no_events, last_seq=no_seq)
    return JobQueue(db=database, hub=hub, settings=ServerSettings(data_dir=Path()))  # settings unread


@pytest.fixture
async def queue(database_url: str) -> AsyncIterator[JobQueue]:
    """A bare queue (`bare_queue`) on each backend in turn, migrated, with workspace "default"."""
    from control_plane.store.db import Database

    database = Database(url=database_url)
    await database.migrate()
    q = bare_queue(database)
    await q.ensure_workspace("default")
    yield q
    await database.close()


def wait_until(predicate: Callable[[], object], *, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll a condition (bounded); fail with ``what`` if it does not hold in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def eventually(
    predicate: Callable[[], object], *, timeout: float = 10.0, what: str = "condition"
) -> None:
    """`wait_until` for async tests."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
