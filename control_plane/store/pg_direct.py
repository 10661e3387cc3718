"""PostgreSQL statements sent straight through asyncpg, for the paths every job takes.

A transaction's job writes, its events and its notifications go as one statement.

Each statement is a round trip, and a round trip costs more than the work it carries: a socket
write that wakes a backend, a read, a turn of the event loop, the driver's bookkeeping. A job's
submission used to take six (BEGIN, the insert, the "jobs available" hint, the workspace's event
sequence, the events, COMMIT), an outcome seven. Here the writes a transaction has queued (new
jobs, fenced updates of rows it has locked), the sequence numbers, the events and every
``pg_notify`` go as one statement of data-modifying CTEs, sent straight through asyncpg with arrays
as parameters (one prepared statement for each shape of transaction, whatever the batch size).

A transaction that read nothing before (a submission) needs no BEGIN or COMMIT at all: the one
statement is its own transaction, atomic as any statement is. Outcomes go the same way after one
unlocked read (`named_and_pending`): every write is fenced by the status and lease epoch it read, and
the statement aborts as a whole with a serialization failure (`ias_fence`, migration 0002) if any
fenced row changed meanwhile; the caller then decides again under row locks.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import asyncpg
from sqlalchemy import BigInteger, DateTime, Integer

from control_plane.domain.jobs import Job, JobStatus
from control_plane.store import codec
from control_plane.store.events import EVENTS_CHANNEL, Draft, event_row
from control_plane.store.jobs import JOBS_CHANNEL, SAVED_COLUMNS, available_payload, pending_query
from control_plane.store.tables import JobRow

Fenced = asyncpg.SerializationError  # raised when a fenced write found its row changed

_jobs = JobRow.__table__  # type: ignore[attr-defined]


def _array_type(column: Any) -> str:
    if isinstance(column.type, BigInteger):
        return "bigint[]"
    if isinstance(column.type, Integer):
        return "int[]"
    if isinstance(column.type, DateTime) or isinstance(getattr(column.type, "impl", None), DateTime):
        return "timestamptz[]"
    return "text[]"


_COLUMNS: Final = tuple(c.name for c in _jobs.columns)
_TYPES: Final = {c.name: _array_type(c) for c in _jobs.columns}
_EVENT_FIELDS: Final = ("kind", "job_id", "worker_id", "reason", "data")


def _build(*, notify: bool, inserts: bool, saves: bool, lazy: bool = False) -> str:
    """The write statement; ``notify``: with its ``pg_notify`` calls (see `dispatch.peers`);
    ``inserts``, ``saves``: with the parts that insert new jobs and save fenced ones; ``lazy``:
    committed without waiting for the commit's flush to disk (see `flush`).

    A statement has only the parts its transaction needs: a submission saves nothing and an
    outcome inserts nothing, and each part left out is arrays not encoded and a step not run
    (0.1 ms of a submission's 0.75 here, a sixth of its client CPU).
    """
    n = 0

    def param(array_type: str) -> str:
        nonlocal n
        n += 1
        return f"${n}::{array_type}"

    columns, fields = ", ".join(_COLUMNS), ", ".join(_EVENT_FIELDS)
    parts: list[str] = []
    if inserts:
        inserted = ", ".join(param(_TYPES[c]) for c in _COLUMNS)
        parts.append(f"inserted AS (\n    INSERT INTO jobs ({columns}) SELECT * FROM unnest({inserted})\n)")
    fenced = ""
    if saves:
        fenced = f"${n + 1}::text[]"
        fence = ", ".join(param(t) for t in ("text[]", "text[]", "bigint[]"))  # id, status, epoch
        saved = ", ".join(param(_TYPES[c]) for c in SAVED_COLUMNS)
        sets = ", ".join(f"{c} = v.{c}" for c in SAVED_COLUMNS)
        parts.append(f"""saved AS (
    UPDATE jobs SET {sets}
    FROM unnest({fence}, {saved}) AS v(w_id, w_status, w_epoch, {", ".join(SAVED_COLUMNS)})
    WHERE jobs.id = v.w_id AND jobs.status = v.w_status AND jobs.lease_epoch = v.w_epoch
    RETURNING 1
)""")
    workspace, now = param("text"), param("timestamptz")
    kinds = f"${n + 1}::text[]"  # the first events array, for the number of events
    events = ", ".join(param("text[]") for _ in _EVENT_FIELDS)
    hints = param("text[]")
    picked = ", ".join(f"e.{f}" for f in _EVENT_FIELDS)
    notify_events = f", pg_notify('{EVENTS_CHANNEL}', id || ':' || event_seq)" if notify else ""
    notify_jobs = f"(SELECT count(pg_notify('{JOBS_CHANNEL}', h)) FROM unnest({hints}) AS h)"
    if not notify:
        notify_jobs = f"cardinality({hints})"  # the parameter is still referenced
    # The sequence row is locked last, after every job row (the fenced update runs to the end
    # first, as a one-time filter): every writer locks in that order, so none deadlocks.
    after_saves = " AND (SELECT count(*) FROM saved) >= 0" if saves else ""
    parts.append(f"""seq AS (
    UPDATE workspaces SET event_seq = event_seq + cardinality({kinds})
    WHERE id = {workspace} AND cardinality({kinds}) > 0{after_saves}
    RETURNING event_seq{notify_events}
)""")
    parts.append(f"""appended AS (
    INSERT INTO events (workspace_id, seq, {fields}, occurred_at)
    SELECT {workspace}, seq.event_seq - cardinality({kinds}) + e.n, {picked}, {now}
    FROM seq, unnest({events}) WITH ORDINALITY AS e({fields}, n)
)""")
    fence_check = f",\n       ias_fence(cardinality({fenced}), (SELECT count(*) FROM saved))" if saves else ""
    if lazy:
        # Local to the statement's transaction; referenced, so that it runs.
        parts.append("lazy AS (SELECT set_config('synchronous_commit', 'off', true) AS off)")
        fence_check += ",\n       (SELECT off FROM lazy)"
    return f"""
WITH {", ".join(parts)}
SELECT (SELECT event_seq FROM seq), {notify_jobs}{fence_check}
"""


# By (notify, inserts, saves, lazy).
_STATEMENTS: Final = {
    (notify, inserts, saves, lazy): _build(notify=notify, inserts=inserts, saves=saves, lazy=lazy)
    for notify in (True, False)
    for inserts in (True, False)
    for saves in (True, False)
    for lazy in (True, False)
}

# A write that waits for its commit's flush (`synchronous_commit` at its default): its commit
# record follows, in the write-ahead log, every commit that returned before it began, so once it
# returns those are on disk too. A transactional logical-decoding message is the smallest logged
# write (a commit that wrote nothing is not flushed); it needs no table or privilege.
_FLUSH: Final = "SELECT pg_logical_emit_message(true, 'ias', 'flush')"

# What a replica that stayed quiet sends once another may be listening: for each workspace its
# quiet writes touched, the latest sequence number and that jobs may be waiting.
_HINTS: Final = f"""
SELECT count(pg_notify('{EVENTS_CHANNEL}', w.id || ':' || w.event_seq)),
       count(pg_notify('{JOBS_CHANNEL}', v.hint))
FROM workspaces AS w JOIN unnest($1::text[], $2::text[]) AS v(id, hint) ON w.id = v.id
"""


def _columns(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> list[list[Any]]:
    return [[row[name] for row in rows] for name in names]


def _pending(first: int) -> str:
    """`jobs.pending_query` with parameters from ``$first``: workspace, types, repo ids, limit."""
    ws, types, repos, limit = (f"${first + i}" for i in range(4))
    return pending_query(
        workspace=f"{ws}::text",
        type_in=f"= ANY({types}::text[])",
        repo_in=f"= ANY({repos}::text[])",
        limit=f"{limit}::int",
    )


_NAMED = "SELECT 0 AS ias_part, * FROM jobs WHERE id = ANY($1::text[])"
_NAMED_AND_PENDING = f"({_NAMED}) UNION ALL (SELECT 1, * FROM ({_pending(2)}) AS p)"
_PENDING = _pending(1)

Claim = tuple[str, Sequence[str], Sequence[str], int]  # workspace, types, repo ids, limit


async def named_and_pending(
    conn: asyncpg.Connection, *, job_ids: Sequence[str], claims: Sequence[Claim]
) -> tuple[dict[str, Job], list[list[Job]]]:
    """Without locks: the jobs named, and for each claim the pending jobs a session of that kind
    would take next, in claim order. The first claim shares the jobs' statement."""
    args: list[Any] = [list(job_ids)]
    for workspace_id, types, repo_ids, limit in claims[:1]:
        args += [workspace_id, list(types), list(repo_ids), limit]
    jobs: dict[str, Job] = {}
    pending: list[list[Job]] = [[] for _ in claims]
    for row in await conn.fetch(_NAMED_AND_PENDING if claims else _NAMED, *args):
        job = codec.job_from_row(row)
        if row["ias_part"] == 0:
            jobs[job.id] = job
        else:
            pending[0].append(job)
    for i, (workspace_id, types, repo_ids, limit) in enumerate(claims[1:], start=1):
        rows = await conn.fetch(_PENDING, workspace_id, list(types), list(repo_ids), limit)
        pending[i] = [codec.job_from_row(row) for row in rows]
    return jobs, pending


async def write(
    conn: asyncpg.Connection,
    *,
    inserts: Sequence[Job],
    saves: Sequence[tuple[Job, JobStatus, int]],
    drafts: dict[str, list[Draft]],
    available: Sequence[str],
    replica_id: str,
    now: datetime,
    notify: bool = True,
    lazy: bool = False,
) -> dict[str, int]:
    """Write it all; returns each workspace's last event sequence number. ``notify``: wake other
    replicas (`dispatch.peers` decides); ``lazy``: return once committed, before the commit is on
    disk (the caller waits for `flush` before it tells anyone outside this process).

    One statement per workspace with events (the first carries the job writes and the hints), in
    workspace order, so two transactions lock sequence rows in the same order. Several statements
    run in one transaction: the caller's, or one started here.
    """
    workspaces = sorted(drafts) or [""]
    hints = [available_payload(replica_id, w) for w in sorted(available)] if notify else []
    job_params: list[list[Any]] = []
    if inserts:
        job_params += _columns([codec.job_to_row(job) for job in inserts], _COLUMNS)
    if saves:
        job_params += [
            [job.id for job, _, _ in saves],
            [status.value for _, status, _ in saves],
            [epoch for _, _, epoch in saves],
            *_columns([codec.job_to_row(job) for job, _, _ in saves], SAVED_COLUMNS),
        ]
    last: dict[str, int] = {}

    async def run() -> None:
        for i, workspace_id in enumerate(workspaces):
            events = [event_row(d) for d in drafts.get(workspace_id, ())]
            first = i == 0  # the job writes go with the first workspace's events
            row = await conn.fetchrow(
                _STATEMENTS[notify, first and bool(inserts), first and bool(saves), lazy],
                *(job_params if first else []),
                workspace_id,
                now,
                *_columns(events, _EVENT_FIELDS),
                hints if i == 0 else [],
            )
            assert row is not None
            if row[0] is not None:
                last[workspace_id] = int(row[0])

    if len(workspaces) > 1 and not conn.is_in_transaction():
        async with conn.transaction():
            await run()
    else:
        await run()
    return last


async def flush(conn: asyncpg.Connection) -> None:
    """Return once every commit that returned before this call is on disk.

    Early dispatch: a submission that assigns a job commits without waiting for its flush (a
    ``lazy`` `write`), the job goes to its worker the moment the statement returns, and only then
    does the submission wait here, on the same connection, before its submitter and the Console
    hear of it. Meanwhile the next group commit runs on another connection: the lock on the
    workspace's sequence row went with the commit. One flush per lazy commit, each a round trip;
    concurrent ones share the disk's sync, as any commits do.

    Nothing the control plane has acknowledged can be lost. Should the database crash in the
    fraction of a millisecond between a commit and its flush, a job may have reached a worker that
    the database then forgets: its submitter gets an error and no job id, and the worker's outcome
    is refused (the job is unknown). The outcome's own commit waits for its flush, which covers the
    submission's, so a recorded outcome always has its job.
    """
    await conn.execute(_FLUSH)


async def hint(conn: asyncpg.Connection, *, workspaces: Sequence[str], replica_id: str) -> None:
    """Tell other replicas where to look: the latest event of each workspace, and waiting jobs."""
    await conn.fetchval(_HINTS, list(workspaces), [available_payload(replica_id, w) for w in workspaces])
