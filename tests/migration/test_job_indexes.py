"""The partial indexes on jobs serve the queries that need them, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import literal_column, select, text
from sqlalchemy.engine import Connection

from control_plane.domain.jobs import JobStatus
from control_plane.store import jobs as jobs_store
from control_plane.store.db import Database

JOBS = 3000

# Mostly finished jobs, a few pending and running: what a queue that has been up a while holds.
_FILL = """
INSERT INTO jobs (id, workspace_id, type, repo_id, payload_json, status, priority, attempt,
                  max_attempts, lease_epoch, worker_id, session_id, lease_expires_at, created_at,
                  updated_at, finished_at, progress, result_json, run_id, idempotency_key)
VALUES (:id, 'ws', 'noop', '', '{}', :status, 50, 1, 3, 1, :worker, :session, :expires,
        '2026-01-01 00:00:00+00', '2026-01-01 00:00:00+00', NULL, '', '', '', :key)
"""


def _rows() -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for i in range(JOBS):
        status = "pending" if i % 100 == 0 else "running" if i % 100 == 1 else "done"
        running = status == "running"
        rows.append(
            {
                "id": f"job_{i:08d}",
                "status": status,
                "worker": f"wrk_{i % 7}" if running else "",
                "session": "ses_1" if running else "",
                "expires": datetime(2026, 1, 1, 0, 1, tzinfo=UTC) if running else None,
                "key": f"key-{i}" if i % 50 == 0 else None,
            }
        )
    return rows


def _plan(conn: Connection, sql: str) -> str:
    if conn.dialect.name == "sqlite":
        return " ".join(str(row[-1]) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
    return " ".join(str(row[0]) for row in conn.exec_driver_sql(f"EXPLAIN {sql}"))


def _literal(query: object, conn: Connection) -> str:
    return str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))  # type: ignore[attr-defined]


def _check_plans(conn: Connection) -> None:
    jobs = jobs_store._jobs
    pending = jobs_store.pending_query(workspace="'ws'", type_in="IN ('noop')", repo_in="", limit="10")
    running = select(jobs).where(jobs.c.worker_id == "wrk_1", jobs_store.status_is(JobStatus.RUNNING))
    expiring = select(jobs).where(
        jobs_store.status_is(JobStatus.RUNNING),
        jobs.c.lease_expires_at < literal_column("'2026-01-01 00:00:30'"),
    )
    keyed = select(jobs).where(jobs.c.workspace_id == "ws", jobs.c.idempotency_key == "key-50")
    assert "ix_jobs_pending" in _plan(conn, pending)
    assert "ix_jobs_running" in _plan(conn, _literal(running, conn))
    assert "ix_jobs_lease" in _plan(conn, _literal(expiring, conn))
    assert "uq_jobs_idempotency_key" in _plan(conn, _literal(keyed, conn))


async def test_partial_indexes_serve_the_claim_the_sweeps_and_idempotency(database_url: str) -> None:
    db = Database(url=database_url)
    try:
        await db.migrate()
        async with db.engine.begin() as conn:
            await conn.execute(text(_FILL), _rows())
            await conn.execute(text("ANALYZE"))
        async with db.engine.connect() as conn:
            await conn.run_sync(_check_plans)
    finally:
        await db.close()
