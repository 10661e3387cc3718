"""The append-only event log: per-workspace sequence numbers with no gaps.

The next ``seq`` is taken by incrementing ``workspaces.event_seq`` inside the writing transaction.
That row lock is held until commit, so transactions of one workspace commit in ``seq`` order and a
reader that sees ``seq = n`` also sees every ``seq < n``: what makes ``Watch`` gap-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from control_plane.domain.jobs import Job
from control_plane.domain.workers import Event, EventKind, Worker
from control_plane.store import codec
from control_plane.store.tables import EventRow, WorkspaceRow

_events = EventRow.__table__  # type: ignore[attr-defined]
_workspaces = WorkspaceRow.__table__  # type: ignore[attr-defined]

EVENTS_CHANNEL = "ias_events"


@dataclass(frozen=True, slots=True)
class Draft:
    """An event before it has a sequence number."""

    kind: EventKind
    job: Job | None = None
    worker: Worker | None = None
    reason: str = ""


async def append(
    conn: AsyncConnection, *, workspace_id: str, drafts: Sequence[Draft], now: datetime, notify: bool
) -> list[Event]:
    """Give ``drafts`` the next sequence numbers of the workspace's log and insert them."""
    if not drafts:
        return []
    result = await conn.execute(
        update(_workspaces)
        .where(_workspaces.c.id == workspace_id)
        .values(event_seq=_workspaces.c.event_seq + len(drafts))
        .returning(_workspaces.c.event_seq)
    )
    last = result.scalar_one()
    first = last - len(drafts) + 1
    rows = [
        {
            "workspace_id": workspace_id,
            "seq": first + i,
            "kind": d.kind.value,
            "job_id": d.job.id if d.job else "",
            "worker_id": d.worker.id if d.worker else (d.job.worker_id if d.job else ""),
            "reason": d.reason[:200],
            "data": codec.event_data(d.job, d.worker),
            "occurred_at": now,
        }
        for i, d in enumerate(drafts)
    ]
    await conn.execute(insert(_events), rows)
    if notify:
        # Delivered at commit; other replicas read the log from their last seq on this hint.
        await conn.execute(
            text("SELECT pg_notify(:channel, :payload)"),
            {"channel": EVENTS_CHANNEL, "payload": f"{workspace_id}:{last}"},
        )
    return [
        Event(
            seq=first + i,
            workspace_id=workspace_id,
            kind=d.kind,
            occurred_at=now,
            job=d.job,
            worker=d.worker,
            reason=d.reason,
        )
        for i, d in enumerate(drafts)
    ]


async def since(
    conn: AsyncConnection, *, workspace_id: str, after_seq: int, limit: int = 1000
) -> list[Event]:
    """Events with ``seq > after_seq``, oldest first."""
    result = await conn.execute(
        select(_events)
        .where(_events.c.workspace_id == workspace_id, _events.c.seq > after_seq)
        .order_by(_events.c.seq)
        .limit(limit)
    )
    return [codec.event_from_row(row) for row in result.mappings()]


async def last_seq(conn: AsyncConnection, *, workspace_id: str) -> int:
    result = await conn.execute(select(_workspaces.c.event_seq).where(_workspaces.c.id == workspace_id))
    return int(result.scalar_one_or_none() or 0)


async def ensure_workspace(conn: AsyncConnection, *, workspace_id: str, now: datetime) -> None:
    """Create the workspace if it does not exist."""
    exists = await conn.execute(select(_workspaces.c.id).where(_workspaces.c.id == workspace_id))
    if exists.first() is None:
        await conn.execute(
            insert(_workspaces).values(id=workspace_id, name=workspace_id, event_seq=0, created_at=now)
        )


async def workspace_exists(conn: AsyncConnection, *, workspace_id: str) -> bool:
    result = await conn.execute(select(_workspaces.c.id).where(_workspaces.c.id == workspace_id))
    return result.first() is not None
