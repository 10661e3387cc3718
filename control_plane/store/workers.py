"""Worker rows, replica liveness and signing keys."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from control_plane.domain.jobs import JobStatus
from control_plane.domain.workers import Worker, WorkerStatus
from control_plane.store import codec
from control_plane.store import jobs as jobs_store
from control_plane.store.tables import JobRow, ReplicaRow, SigningKeyRow, WorkerRow

_workers = WorkerRow.__table__  # type: ignore[attr-defined]
_replicas = ReplicaRow.__table__  # type: ignore[attr-defined]
_keys = SigningKeyRow.__table__  # type: ignore[attr-defined]
_jobs = JobRow.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class SessionStart:
    """A worker's hello, as its row records it."""

    workspace_id: str
    name: str
    capabilities: Sequence[str]
    repo_ids: Sequence[str]
    slots: int
    version: str
    session_id: str


async def connect(
    conn: AsyncConnection,
    *,
    starts: Sequence[SessionStart],
    new_id: Callable[[], str],
    replica_id: str,
    now: datetime,
) -> list[Worker]:
    """Record a new session for each worker named (creating it on first connect), in order.

    No worker may be named twice (the caller splits such a batch). Whatever the batch size: one
    read that locks the existing rows, one insert and one update (each for many rows), one read
    back. A fleet reconnecting after a restart arrives in large batches.
    """
    existing: dict[tuple[str, str], str] = {}
    for workspace_id in sorted({s.workspace_id for s in starts}):
        names = sorted({s.name for s in starts if s.workspace_id == workspace_id})
        query = (
            select(_workers.c.id, _workers.c.name)
            .where(_workers.c.workspace_id == workspace_id, _workers.c.name.in_(names))
            .order_by(_workers.c.id)
            .with_for_update()
        )
        for worker_id, name in (await conn.execute(query)).all():
            existing[(workspace_id, name)] = worker_id
    ids: list[str] = []
    inserts: list[dict[str, object]] = []
    updates: list[tuple[str, dict[str, object]]] = []
    for start in starts:
        values: dict[str, object] = {
            "status": WorkerStatus.ONLINE.value,
            "capabilities": json.dumps(sorted(start.capabilities)),
            "repo_ids": json.dumps(sorted(start.repo_ids)),
            "slots": start.slots,
            "version": start.version,
            "session_id": start.session_id,
            "replica_id": replica_id,
            "connected_at": now,
            "disconnected_at": None,
        }
        worker_id = existing.get((start.workspace_id, start.name))
        if worker_id is None:
            worker_id = new_id()
            inserts.append(
                {"id": worker_id, "workspace_id": start.workspace_id, "name": start.name, **values}
            )
        else:
            updates.append((worker_id, values))
        ids.append(worker_id)
    if inserts:
        await conn.execute(insert(_workers), inserts)
    if updates:
        statement = (
            update(_workers)
            .where(_workers.c.id == bindparam("w_id"))
            .values({column: bindparam(f"v_{column}") for column in updates[0][1]})
        )
        params = [{"w_id": i, **{f"v_{k}": v for k, v in values.items()}} for i, values in updates]
        await conn.execute(statement, params)
    rows = (await conn.execute(select(_workers).where(_workers.c.id.in_(ids)))).mappings().all()
    by_id = {row["id"]: codec.worker_from_row(row) for row in rows}
    return [by_id[worker_id] for worker_id in ids]


async def get(conn: AsyncConnection, *, worker_id: str) -> Worker:
    row = (await conn.execute(select(_workers).where(_workers.c.id == worker_id))).mappings().one()
    return codec.worker_from_row(row)


_SET_STATUS = (
    update(_workers)
    .where(_workers.c.id == bindparam("w_id"), _workers.c.session_id == bindparam("w_session"))
    .values(status=bindparam("v_status"), disconnected_at=bindparam("v_disconnected"))
)


async def set_statuses(
    conn: AsyncConnection, *, changes: Sequence[tuple[str, str, WorkerStatus]], now: datetime
) -> list[Worker | None]:
    """`set_status` for many (worker id, session id, status) at once: one read, one executemany.

    Each answer is the changed worker, or None where the session is no longer the worker's.
    """
    ids = sorted({worker_id for worker_id, _, _ in changes})
    query = select(_workers).where(_workers.c.id.in_(ids)).with_for_update()
    current = {row["id"]: dict(row) for row in (await conn.execute(query)).mappings()}
    answers: list[Worker | None] = []
    params = []
    for worker_id, session_id, status in changes:
        row = current.get(worker_id)
        if row is None or row["session_id"] != session_id:
            answers.append(None)
            continue
        row["status"] = status.value
        if status is WorkerStatus.OFFLINE:
            row["disconnected_at"] = now
        params.append(
            {
                "w_id": worker_id,
                "w_session": session_id,
                "v_status": row["status"],
                "v_disconnected": row["disconnected_at"],
            }
        )
        answers.append(codec.worker_from_row(row))
    if params:
        await conn.execute(_SET_STATUS, params)
    return answers


async def list_workers(conn: AsyncConnection, *, workspace_id: str, include_offline: bool) -> list[Worker]:
    query = select(_workers).where(_workers.c.workspace_id == workspace_id)
    if not include_offline:
        query = query.where(_workers.c.status != WorkerStatus.OFFLINE.value)
    rows = (await conn.execute(query.order_by(_workers.c.name))).mappings().all()
    running = await conn.execute(
        select(_jobs.c.worker_id, func.count())
        .where(_jobs.c.workspace_id == workspace_id, jobs_store.status_is(JobStatus.RUNNING))
        .group_by(_jobs.c.worker_id)
    )
    counts: dict[str, int] = {row[0]: row[1] for row in running.all()}
    return [codec.worker_from_row(row, running=counts.get(row["id"], 0)) for row in rows]


async def touch_replica(conn: AsyncConnection, *, replica_id: str, now: datetime) -> bool:
    """Prove this replica is alive (one small write every few seconds, not per heartbeat); true if
    its row had to be stored anew."""
    result = await conn.execute(
        update(_replicas).where(_replicas.c.id == replica_id).values(last_seen_at=now)
    )
    if result.rowcount:
        return False
    await conn.execute(insert(_replicas).values(id=replica_id, started_at=now, last_seen_at=now))
    return True


async def other_replicas(conn: AsyncConnection, *, replica_id: str, since: datetime) -> int:
    """How many other replicas proved themselves alive since then."""
    query = select(func.count()).where(_replicas.c.id != replica_id, _replicas.c.last_seen_at >= since)
    return int((await conn.execute(query)).scalar_one())


async def reclaim_stranded(
    conn: AsyncConnection,
    *,
    replica_id: str,
    live: dict[str, tuple[str, bool]],
    now: datetime,
    grace: timedelta,
) -> list[Worker]:
    """Mark online again the workers of live sessions that another replica took for stranded.

    ``live`` maps worker id to (session id, draining) for this replica's open sessions. Stranding
    dates ``disconnected_at`` at least a grace back, so a session that is closing right now (marked
    offline with the current time) is not brought back.
    """
    rows = (
        await conn.execute(
            select(_workers.c.id, _workers.c.session_id).where(
                _workers.c.replica_id == replica_id,
                _workers.c.status == WorkerStatus.OFFLINE.value,
                _workers.c.disconnected_at <= now - grace,
            )
        )
    ).all()
    workers = []
    for worker_id, session_id in rows:
        session = live.get(worker_id)
        if session is None or session[0] != session_id:
            continue
        status = WorkerStatus.DRAINING if session[1] else WorkerStatus.ONLINE
        result = await conn.execute(
            update(_workers)
            .where(
                _workers.c.id == worker_id,
                _workers.c.session_id == session_id,
                _workers.c.status == WorkerStatus.OFFLINE.value,
            )
            .values(status=status.value, disconnected_at=None)
        )
        if result.rowcount == 1:
            workers.append(await get(conn, worker_id=worker_id))
    return workers


async def remove_replica(conn: AsyncConnection, *, replica_id: str) -> None:
    await conn.execute(delete(_replicas).where(_replicas.c.id == replica_id))


async def strand_dead_replicas(
    conn: AsyncConnection, *, now: datetime, grace: timedelta, own_replica_id: str
) -> list[Worker]:
    """Mark offline the workers whose replica died (not seen for the grace) or was removed.

    ``disconnected_at`` becomes the replica's last sign of life, so their jobs are requeued at once
    by the orphan sweep rather than after another grace.
    """
    live = select(_replicas.c.id).where(
        or_(_replicas.c.last_seen_at >= now - grace, _replicas.c.id == own_replica_id)
    )
    query = (
        select(_workers.c.id, _workers.c.replica_id)
        .where(_workers.c.status != WorkerStatus.OFFLINE.value, _workers.c.replica_id.not_in(live))
        .with_for_update(skip_locked=True)
    )
    stranded = (await conn.execute(query)).all()
    workers = []
    for worker_id, replica_id in stranded:
        seen = (
            await conn.execute(select(_replicas.c.last_seen_at).where(_replicas.c.id == replica_id))
        ).scalar_one_or_none()
        await conn.execute(
            update(_workers)
            .where(_workers.c.id == worker_id)
            .values(status=WorkerStatus.OFFLINE.value, disconnected_at=seen or now - grace)
        )
        workers.append(await get(conn, worker_id=worker_id))
    return workers


async def signing_key(conn: AsyncConnection, *, now: datetime) -> tuple[str, str]:
    """The current (key id, secret), created on first use."""
    row = (await conn.execute(select(_keys.c.id, _keys.c.secret).order_by(_keys.c.created_at.desc()))).first()
    if row is not None:
        return row[0], row[1]
    # A fixed id for the first key: replicas creating it at once collide instead of diverging.
    key_id, secret = "k1", secrets.token_urlsafe(48)
    await conn.execute(insert(_keys).values(id=key_id, secret=secret, created_at=now))
    return key_id, secret


async def signing_keys(conn: AsyncConnection) -> dict[str, str]:
    rows = await conn.execute(select(_keys.c.id, _keys.c.secret))
    return {r[0]: r[1] for r in rows.all()}
