"""Job queries: insert, claim, conditional saves fenced by the lease epoch, sweeps."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import and_, insert, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from control_plane.domain.jobs import Job, JobStatus
from control_plane.store import codec
from control_plane.store.tables import JobRow, WorkerRow

_jobs = JobRow.__table__  # type: ignore[attr-defined]
_workers = WorkerRow.__table__  # type: ignore[attr-defined]

JOBS_CHANNEL = "ias_jobs"


async def insert_job(conn: AsyncConnection, *, job: Job) -> None:
    await conn.execute(insert(_jobs).values(**codec.job_to_row(job)))


async def get(conn: AsyncConnection, *, workspace_id: str, job_id: str, lock: bool = False) -> Job | None:
    """One job of the workspace; ``lock`` holds its row until commit (PostgreSQL)."""
    query = select(_jobs).where(_jobs.c.id == job_id, _jobs.c.workspace_id == workspace_id)
    if lock:
        query = query.with_for_update()
    row = (await conn.execute(query)).mappings().first()
    return codec.job_from_row(row) if row else None


async def by_idempotency_key(conn: AsyncConnection, *, workspace_id: str, key: str) -> Job | None:
    query = select(_jobs).where(_jobs.c.workspace_id == workspace_id, _jobs.c.idempotency_key == key)
    row = (await conn.execute(query)).mappings().first()
    return codec.job_from_row(row) if row else None


async def list_jobs(
    conn: AsyncConnection,
    *,
    workspace_id: str,
    status: JobStatus | None,
    job_type: str,
    limit: int,
    before_id: str,
) -> list[Job]:
    """Jobs newest first (ids are time-ordered)."""
    query = select(_jobs).where(_jobs.c.workspace_id == workspace_id)
    if status is not None:
        query = query.where(_jobs.c.status == status.value)
    if job_type:
        query = query.where(_jobs.c.type == job_type)
    if before_id:
        query = query.where(_jobs.c.id < before_id)
    rows = await conn.execute(query.order_by(_jobs.c.id.desc()).limit(limit))
    return [codec.job_from_row(row) for row in rows.mappings()]


async def claimable(
    conn: AsyncConnection,
    *,
    workspace_id: str,
    types: Sequence[str],
    repo_ids: Sequence[str],
    limit: int,
) -> list[Job]:
    """Lock up to ``limit`` pending jobs the worker may run, in priority then submission order.

    PostgreSQL skips rows other replicas have locked; on SQLite the caller's ``BEGIN IMMEDIATE``
    already excludes every other writer.
    """
    repo_filter = _jobs.c.repo_id == ""
    if repo_ids:
        repo_filter = or_(repo_filter, _jobs.c.repo_id.in_(list(repo_ids)))
    query = (
        select(_jobs)
        .where(
            _jobs.c.workspace_id == workspace_id,
            _jobs.c.status == JobStatus.PENDING.value,
            _jobs.c.type.in_(list(types)),
            repo_filter,
        )
        .order_by(_jobs.c.priority, _jobs.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [codec.job_from_row(row) for row in (await conn.execute(query)).mappings()]


async def save(conn: AsyncConnection, *, job: Job, expect_status: JobStatus, expect_epoch: int) -> bool:
    """Write ``job`` if its stored status and epoch are still the expected ones (the fence)."""
    values = codec.job_to_row(job)
    del values["id"], values["workspace_id"]
    result = await conn.execute(
        update(_jobs)
        .where(
            _jobs.c.id == job.id,
            _jobs.c.status == expect_status.value,
            _jobs.c.lease_epoch == expect_epoch,
        )
        .values(**values)
    )
    return result.rowcount == 1


async def save_many(conn: AsyncConnection, *, jobs: Sequence[tuple[Job, JobStatus, int]]) -> int:
    """`save` for several jobs; returns how many were written."""
    written = 0
    for job, status, epoch in jobs:
        written += await save(conn, job=job, expect_status=status, expect_epoch=epoch)
    return written


async def expired(conn: AsyncConnection, *, now: datetime, limit: int) -> list[Job]:
    """Running jobs whose lease ran out by the server's clock."""
    query = (
        select(_jobs)
        .where(_jobs.c.status == JobStatus.RUNNING.value, _jobs.c.lease_expires_at < now)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [codec.job_from_row(row) for row in (await conn.execute(query)).mappings()]


async def orphaned(conn: AsyncConnection, *, now: datetime, grace: timedelta, limit: int) -> list[Job]:
    """Running jobs whose session is gone: the worker has been offline longer than the grace,
    or came back with a new session that did not adopt them."""
    lost = and_(_workers.c.status == "offline", _workers.c.disconnected_at < now - grace)
    query = (
        select(_jobs)
        .join(_workers, _workers.c.id == _jobs.c.worker_id)
        .where(
            _jobs.c.status == JobStatus.RUNNING.value,
            or_(lost, _workers.c.session_id != _jobs.c.session_id),
        )
        .limit(limit)
        .with_for_update(of=_jobs, skip_locked=True)
    )
    return [codec.job_from_row(row) for row in (await conn.execute(query)).mappings()]


async def held_by_worker(conn: AsyncConnection, *, worker_id: str) -> list[Job]:
    query = (
        select(_jobs)
        .where(_jobs.c.worker_id == worker_id, _jobs.c.status == JobStatus.RUNNING.value)
        .with_for_update()
    )
    return [codec.job_from_row(row) for row in (await conn.execute(query)).mappings()]


async def renew(
    conn: AsyncConnection, *, session_ids: Sequence[str], expires_at: datetime
) -> list[tuple[str, str, int]]:
    """Extend every running lease of ``session_ids``; returns (job id, session id, epoch) renewed."""
    if not session_ids:
        return []
    result = await conn.execute(
        update(_jobs)
        .where(_jobs.c.status == JobStatus.RUNNING.value, _jobs.c.session_id.in_(list(session_ids)))
        .values(lease_expires_at=expires_at)
        .returning(_jobs.c.id, _jobs.c.session_id, _jobs.c.lease_epoch)
    )
    return [(r[0], r[1], r[2]) for r in result.all()]


async def notify_available(conn: AsyncConnection, *, workspace_id: str) -> None:
    """Tell other replicas (at commit) that the workspace has pending jobs."""
    await conn.execute(
        text("SELECT pg_notify(:channel, :payload)"),
        {"channel": JOBS_CHANNEL, "payload": workspace_id},
    )
