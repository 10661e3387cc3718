"""The append-only event log: per-workspace sequence numbers with no gaps.

The next ``seq`` is taken by incrementing ``workspaces.event_seq`` inside the writing transaction.
That row lock is held until commit, so transactions of one workspace commit in ``seq`` order and a
reader that sees ``seq = n`` also sees every ``seq < n``: what makes ``Watch`` gap-free. The
writing itself is in store.pg_direct and store.sqlite_direct, with the transaction's job writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select
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


def event_row(draft: Draft) -> dict[str, str]:
    """The columns of a draft's row that do not depend on where it goes in the log."""
    job, worker = draft.job, draft.worker
    return {
        "kind": draft.kind.value,
        "job_id": job.id if job else "",
        "worker_id": worker.id if worker else (job.worker_id if job else ""),
        "reason": draft.reason[:200],
        "data": codec.event_data(job, worker),
    }


def numbered(workspace_id: str, drafts: Sequence[Draft], *, last: int, now: datetime) -> list[Event]:
    """``drafts`` as the events they became, the last one numbered ``last``."""
    first = last - len(drafts) + 1
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
