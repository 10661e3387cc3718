"""SQLite statements run on the event loop's thread: no worker thread, errors and rollbacks intact."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from control_plane.store.db import Database, sqlite_url


async def test_statements_run_on_the_loop_thread_and_roll_back_on_error(tmp_path: Path) -> None:
    db = Database(url=sqlite_url(tmp_path))
    threads_before = threading.active_count()
    try:
        async with db.write() as conn:
            await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)"))
            await conn.execute(text("INSERT INTO t (id, v) VALUES (1, 'kept')"))
        with pytest.raises(IntegrityError):
            async with db.write() as conn:
                await conn.execute(text("INSERT INTO t (id, v) VALUES (2, 'rolled back')"))
                await conn.execute(text("INSERT INTO t (id, v) VALUES (1, 'duplicate')"))
        async with db.read() as conn:
            rows = (await conn.execute(text("SELECT id, v FROM t ORDER BY id"))).all()
        assert [tuple(r) for r in rows] == [(1, "kept")]
        assert threading.active_count() == threads_before, "a connection started a thread"
        assert db.engine.dialect.driver == "ias_inline"
    finally:
        await db.close()


def test_a_plain_sqlite_url_gets_the_inline_driver() -> None:
    assert Database(url="sqlite:////tmp/x.db").url == "sqlite+ias_inline:////tmp/x.db"


async def test_a_serving_database_checkpoints_its_wal_off_the_event_loop(tmp_path: Path) -> None:
    db = Database(url=sqlite_url(tmp_path), background_checkpoints=True)
    main_file = tmp_path / "ias.db"
    try:
        async with db.write() as conn:
            await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)"))
            autocheckpoint = (await conn.execute(text("PRAGMA wal_autocheckpoint"))).scalar_one()
        assert autocheckpoint == 0, "the engine's own connections must not checkpoint"
        for _ in range(20):
            async with db.write() as conn:
                await conn.execute(
                    text("INSERT INTO t (v) VALUES (:v)"), [{"v": "x" * 500} for _ in range(50)]
                )
        before = main_file.stat().st_size
        loop = asyncio.create_task(db.checkpoint_loop(every_s=0.05))
        for _ in range(100):  # at most 5 s
            await asyncio.sleep(0.05)
            if main_file.stat().st_size > before + 400_000:
                break
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        assert main_file.stat().st_size > before + 400_000, "the WAL was never copied into the database"
    finally:
        await db.close()
