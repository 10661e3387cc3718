"""Job queries: insert, claim, conditional saves fenced by the lease epoch, sweeps."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, insert, literal_column, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from control_plane.domain.jobs import Job, JobStatus
from control_plane.store import codec
from control_plane.store.tables import JobRow, WorkerRow

# Ids per renewal statement: far below PostgreSQL's 32,767 bind parameters.
_RENEW_CHUNK = 4000
_jobs = JobRow.__table__  # type: ignore[attr-defined]
_workers = WorkerRow.__table__  # type: ignore[attr-defined]

JOBS_CHANNEL = "ias_jobs"


def status_is(status: JobStatus) -> ColumnElement[bool]:
    """``status = '<status>'`` with the value in the statement's text: the planner uses a partial
    index (`store.tables`) only for a condition it can match to the index's, never a parameter."""
    condition: ColumnElement[bool] = _jobs.c.status == literal_column(f"'{status.value}'")
    return condition


# Statements built once: building and compiling one per call was ~9% of the server's CPU.
_INSERT = insert(_jobs)
_GET_MANY = select(_jobs).where(_jobs.c.id.in_(bindparam("ids", expanding=True))).order_by(_jobs.c.id)
_GET_MANY_LOCKED = _GET_MANY.with_for_update()
# What a transition may change (the submission itself never changes, and rewriting a large
# payload on every save would be pure waste); bind names are prefixed so they cannot clash with
# column names.
_IMMUTABLE_COLUMNS = frozenset(
    {
        "id",
        "workspace_id",
        "type",
        "repo_id",
        "payload_json",
        "created_at",
        "max_attempts",
        "run_id",
        "idempotency_key",
    }
)
SAVED_COLUMNS = tuple(c.name for c in _jobs.columns if c.name not in _IMMUTABLE_COLUMNS)
_SAVE = (
    update(_jobs)
    .where(
        _jobs.c.id == bindparam("w_id"),
        _jobs.c.status == bindparam("w_status"),
        _jobs.c.lease_epoch == bindparam("w_epoch"),
    )
    .values({column: bindparam(f"v_{column}") for column in SAVED_COLUMNS})
)


async def insert_job(conn: AsyncConnection, *, job: Job) -> None:
    """Insert one job through SQLAlchemy, so a duplicate idempotency key raises its IntegrityError
    (submissions without a key go through store.pg_direct or store.sqlite_direct)."""
    await conn.execute(_INSERT, codec.job_to_row(job))


async def get(conn: AsyncConnection, *, workspace_id: str, job_id: str, lock: bool = False) -> Job | None:
    """One job of the workspace; ``lock`` holds its row until commit (PostgreSQL)."""
    query = select(_jobs).where(_jobs.c.id == job_id, _jobs.c.workspace_id == workspace_id)
    if lock:
        query = query.with_for_update()
    row = (await conn.execute(query)).mappings().first()
    return codec.job_from_row(row) if row else None


async def get_many(conn: AsyncConnection, *, job_ids: Sequence[str], lock: bool = False) -> dict[str, Job]:
    """Jobs by id, of any workspace (callers check it); ``lock`` holds the rows until commit.

    Rows are locked in id order, so two transactions locking overlapping sets cannot deadlock.
    """
    query = _GET_MANY_LOCKED if lock else _GET_MANY
    rows = (await conn.execute(query, {"ids": sorted(set(job_ids))})).mappings()
    return {row["id"]: codec.job_from_row(row) for row in rows}


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
        query = query.where(status_is(status))
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
    sql = pending_query(
        workspace=":workspace_id",
        type_in="IN :types",
        repo_in="IN :repo_ids" if repo_ids else "",
        limit=":limit",
    )
    if conn.dialect.name == "postgresql":
        sql += " FOR UPDATE SKIP LOCKED"
    query = text(sql).bindparams(bindparam("types", expanding=True))
    params: dict[str, object] = {"workspace_id": workspace_id, "types": list(types), "limit": limit}
    if repo_ids:
        query = query.bindparams(bindparam("repo_ids", expanding=True))
        params["repo_ids"] = list(repo_ids)
    typed = query.columns(**_JOB_TYPES)  # read back by name, as stored
    return [codec.job_from_row(row) for row in (await conn.execute(typed, params)).mappings()]


_JOB_TYPES = {c.name: c.type for c in _jobs.columns}


def pending_query(*, workspace: str, type_in: str, repo_in: str, limit: str) -> str:
    """The pending jobs a session of one kind may take, in the order it takes them.

    The one definition of that choice, rendered by each kind of connection with its own
    placeholders: `claimable` (SQLAlchemy), `pg_direct` (asyncpg) and `sqlite_direct` (sqlite3).
    ``type_in`` and ``repo_in`` are conditions on ``type`` and ``repo_id`` (``repo_in`` is empty
    when the session names no repository: it then takes only jobs that need none).
    """
    repos = f" OR repo_id {repo_in}" if repo_in else ""
    return (
        f"SELECT * FROM jobs WHERE workspace_id = {workspace} AND status = '{JobStatus.PENDING.value}'"
        f" AND type {type_in} AND (repo_id = ''{repos}) ORDER BY priority, id LIMIT {limit}"
    )


async def save(conn: AsyncConnection, *, job: Job, expect_status: JobStatus, expect_epoch: int) -> bool:
    """Write ``job`` if its stored status and epoch are still the expected ones (the fence)."""
    result = await conn.execute(_SAVE, _save_params(job, expect_status, expect_epoch))
    return result.rowcount == 1


def _save_params(job: Job, expect_status: JobStatus, expect_epoch: int) -> dict[str, Any]:
    row = codec.job_to_row(job)
    params = {f"v_{column}": row[column] for column in SAVED_COLUMNS}
    params.update(w_id=job.id, w_status=expect_status.value, w_epoch=expect_epoch)
    return params


async def expired(conn: AsyncConnection, *, now: datetime, limit: int) -> list[Job]:
    """Running jobs whose lease ran out by the server's clock."""
    query = (
        select(_jobs)
        .where(status_is(JobStatus.RUNNING), _jobs.c.lease_expires_at < now)
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
            status_is(JobStatus.RUNNING),
            or_(lost, _workers.c.session_id != _jobs.c.session_id),
        )
        .limit(limit)
        .with_for_update(of=_jobs, skip_locked=True)
    )
    return [codec.job_from_row(row) for row in (await conn.execute(query)).mappings()]


async def held_by_workers(conn: AsyncConnection, *, worker_ids: Sequence[str]) -> dict[str, list[Job]]:
    """The running jobs of each worker, locked, in id order."""
    query = (
        select(_jobs)
        .where(_jobs.c.worker_id.in_(list(worker_ids)), status_is(JobStatus.RUNNING))
        .order_by(_jobs.c.id)
        .with_for_update()
    )
    held: dict[str, list[Job]] = {}
    for row in (await conn.execute(query)).mappings():
        job = codec.job_from_row(row)
        held.setdefault(job.worker_id, []).append(job)
    return held


async def renew(
    conn: AsyncConnection, *, held: Sequence[tuple[str, str]], expires_at: datetime
) -> list[tuple[str, str, int]]:
    """Extend the running leases of ``held`` (job id, session id); returns (job id, session id,
    epoch) renewed. Only leases a session holds are renewed: a row that names a session which no
    longer holds the job expires, and the sweep requeues it."""
    renewed: list[tuple[str, str, int]] = []
    for start in range(0, len(held), _RENEW_CHUNK):
        chunk = held[start : start + _RENEW_CHUNK]
        result = await conn.execute(
            update(_jobs)
            .where(
                status_is(JobStatus.RUNNING),
                _jobs.c.id.in_([job_id for job_id, _ in chunk]),
                _jobs.c.session_id.in_(sorted({session_id for _, session_id in chunk})),
            )
            .values(lease_expires_at=expires_at)
            .returning(_jobs.c.id, _jobs.c.session_id, _jobs.c.lease_epoch)
        )
        renewed += [(r[0], r[1], r[2]) for r in result.all()]
    return renewed


def available_payload(replica_id: str, workspace_id: str) -> str:
    return f"{replica_id}:{workspace_id}"


def parse_available(payload: str) -> tuple[str, str]:
    """(sender replica, workspace) of an ``ias_jobs`` notification; a bare workspace has no sender."""
    replica_id, sep, workspace_id = payload.partition(":")
    return (replica_id, workspace_id) if sep else ("", payload)
