"""SQLite statements on a plain sqlite3 connection, for the paths every job takes.

The embedded database answers a statement in microseconds; SQLAlchemy's checkout, BEGIN hook,
statement compilation and result processing cost ten times that. Submissions and outcomes run
here whole, on a connection of their own under the same process-wide write lock as every other
writer (`Database.direct_sqlite`), so no write waits and no fence can fail; every other write
transaction ends here too, with its queued writes sent past SQLAlchemy on its own connection.
Rows are stored as SQLAlchemy stores them (datetimes in its SQLite text form), so that stored
values compare and sort alike whichever path wrote them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

from control_plane.domain.jobs import Job, JobStatus
from control_plane.store import codec
from control_plane.store.events import Draft, event_row
from control_plane.store.jobs import SAVED_COLUMNS, pending_query
from control_plane.store.tables import JobRow

_jobs = JobRow.__table__  # type: ignore[attr-defined]
_COLUMNS: Final = tuple(c.name for c in _jobs.columns)
_TIMES: Final = frozenset({"lease_expires_at", "created_at", "updated_at", "finished_at"})

_INSERT: Final = f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"
_SETS: Final = ", ".join(f"{c} = ?" for c in SAVED_COLUMNS)
_SAVE: Final = f"UPDATE jobs SET {_SETS} WHERE id = ? AND status = ? AND lease_epoch = ?"
_NEXT_SEQ: Final = "UPDATE workspaces SET event_seq = event_seq + ? WHERE id = ? RETURNING event_seq"
_INSERT_EVENT: Final = (
    "INSERT INTO events (workspace_id, seq, kind, job_id, worker_id, reason, data, occurred_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def stored_time(value: datetime | None) -> str | None:
    """A datetime as SQLAlchemy stores it in SQLite: naive UTC, microseconds always written."""
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _read_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value).replace(tzinfo=UTC) if value else None


def _job(row: sqlite3.Row) -> Job:
    values = dict(zip(row.keys(), row, strict=True))
    for name in _TIMES:
        values[name] = _read_time(values[name])
    return codec.job_from_row(values)


def _values(job: Job, names: Sequence[str]) -> list[Any]:
    row = codec.job_to_row(job)
    return [stored_time(row[n]) if n in _TIMES else row[n] for n in names]


def named_and_pending(
    conn: sqlite3.Connection,
    *,
    job_ids: Sequence[str],
    claims: Sequence[tuple[str, Sequence[str], Sequence[str], int]],
) -> tuple[dict[str, Job], list[list[Job]]]:
    """The jobs named, and for each (workspace, types, repo ids, limit) the pending jobs a session
    of that kind takes next, in claim order (see `pg_direct.named_and_pending`)."""
    marks = ", ".join("?" for _ in job_ids)
    named = conn.execute(f"SELECT * FROM jobs WHERE id IN ({marks})", job_ids) if job_ids else ()
    jobs = {job.id: job for job in map(_job, named)}
    pending = []
    for workspace_id, types, repo_ids, limit in claims:
        query = pending_query(
            workspace="?",
            type_in=f"IN ({', '.join('?' for _ in types)})",
            repo_in=f"IN ({', '.join('?' for _ in repo_ids)})" if repo_ids else "",
            limit="?",
        )
        rows = conn.execute(query, [workspace_id, *types, *repo_ids, limit])
        pending.append([_job(row) for row in rows])
    return jobs, pending


def write(
    conn: sqlite3.Connection,
    *,
    inserts: Sequence[Job],
    saves: Sequence[tuple[Job, JobStatus, int]],
    drafts: dict[str, list[Draft]],
    now: datetime,
) -> dict[str, int]:
    """Write new jobs, fenced saves and each workspace's events; returns each workspace's last
    event sequence number."""
    if inserts:
        conn.executemany(_INSERT, [_values(job, _COLUMNS) for job in inserts])
    if saves:
        before = conn.total_changes
        conn.executemany(
            _SAVE,
            [[*_values(job, SAVED_COLUMNS), job.id, status.value, epoch] for job, status, epoch in saves],
        )
        if conn.total_changes - before != len(saves):
            # The write lock is held from the read to here: a row that moved is a bug, not a race.
            raise RuntimeError(
                f"{len(saves) - (conn.total_changes - before)} fenced write(s) found their row changed"
            )
    last: dict[str, int] = {}
    occurred = stored_time(now)
    for workspace_id in sorted(drafts):
        batch = drafts[workspace_id]
        rows = conn.execute(_NEXT_SEQ, (len(batch), workspace_id)).fetchall()
        if not rows:
            continue
        last[workspace_id] = int(rows[0][0])
        first = last[workspace_id] - len(batch) + 1
        conn.executemany(
            _INSERT_EVENT,
            [(workspace_id, first + i, *event_row(d).values(), occurred) for i, d in enumerate(batch)],
        )
    return last
