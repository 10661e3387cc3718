"""The driver-level write paths (store.pg_direct, store.sqlite_direct) store exactly what the
SQLAlchemy path stores, so that either reads what the other wrote, and the sweeps' comparisons
(lease expiry by the stored text on SQLite) hold for rows written either way."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from conftest import bare_queue
from sqlalchemy.dialects import sqlite

from control_plane.domain.jobs import Job, JobResult, JobStatus
from control_plane.domain.workers import EventKind
from control_plane.queue import NewJob
from control_plane.store import events as events_store
from control_plane.store import jobs as jobs_store
from control_plane.store import pg_direct, sqlite_direct
from control_plane.store.db import Database, driver
from control_plane.store.events import Draft
from control_plane.store.tables import JobRow

WS = "default"


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(url=database_url)
    await database.migrate()
    await bare_queue(database).ensure_workspace(WS)
    yield database
    await database.close()


def _job(n: int, now: datetime) -> Job:
    return Job(
        id=f"job_{n:04d}",
        workspace_id=WS,
        type="noop",
        status=JobStatus.RUNNING,
        created_at=now,
        updated_at=now + timedelta(microseconds=n),
        lease_epoch=1,
        worker_id="wrk_1",
        session_id="ses_1",
        lease_expires_at=now + timedelta(seconds=n),
        result=JobResult(summary=f"job {n}"),
        idempotency_key="",
    )


def test_sqlite_times_are_stored_as_sqlalchemy_stores_them() -> None:
    column = JobRow.__table__.c.created_at  # type: ignore[attr-defined]
    stored = column.type._cached_bind_processor(sqlite.dialect())
    for value in (
        datetime(2026, 11, 24, 16, 4, 5, 0, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=UTC),
        datetime(2026, 6, 1, 12, 0, tzinfo=UTC).astimezone(),
    ):
        assert sqlite_direct.stored_time(value) == stored(value)


async def test_rows_written_directly_read_back_through_sqlalchemy_and_the_other_way(db: Database) -> None:
    now = datetime(2026, 11, 24, 16, 0, 0, 123456, tzinfo=UTC)
    direct_jobs = [_job(n, now) for n in range(3)]
    drafts = {WS: [Draft(EventKind.JOB_SUBMITTED, job=j) for j in direct_jobs]}
    await _direct_write(db, inserts=direct_jobs, saves=[], drafts=drafts, now=now)
    sqlalchemy_job = _job(7, now)
    async with db.write() as conn:
        await jobs_store.insert_job(conn, job=sqlalchemy_job)

    async with db.read() as conn:
        for job in direct_jobs:
            assert await jobs_store.get(conn, workspace_id=WS, job_id=job.id) == job
        events = await events_store.since(conn, workspace_id=WS, after_seq=0)
        # Expired by the stored value: 0 and 1 s after `now`, not 2 or 7.
        expired = await jobs_store.expired(conn, now=now + timedelta(seconds=1, microseconds=1), limit=10)
    assert [e.job.id if e.job else "" for e in events] == [j.id for j in direct_jobs]
    assert [e.seq for e in events] == [1, 2, 3]
    assert sorted(j.id for j in expired) == ["job_0000", "job_0001"]

    seen, _ = await _direct_view(db, [sqlalchemy_job.id, direct_jobs[0].id])
    assert seen == {sqlalchemy_job.id: sqlalchemy_job, direct_jobs[0].id: direct_jobs[0]}


async def test_a_fenced_direct_write_to_a_row_that_moved_writes_nothing(db: Database) -> None:
    now = datetime(2026, 11, 24, 16, 0, tzinfo=UTC)
    job = _job(1, now)
    await _direct_write(db, inserts=[job], saves=[], drafts={}, now=now)
    done = replace(job, status=JobStatus.DONE, lease_expires_at=None, finished_at=now)
    stale = (done, JobStatus.RUNNING, 2)  # the row is at epoch 1, not 2
    drafts = {WS: [Draft(EventKind.JOB_FINISHED, job=done)]}
    expected: type[Exception] = RuntimeError if db.is_sqlite else pg_direct.Fenced
    with pytest.raises(expected):
        await _direct_write(db, inserts=[], saves=[stale], drafts=drafts, now=now)
    async with db.read() as conn:
        assert await jobs_store.get(conn, workspace_id=WS, job_id=job.id) == job
        assert await events_store.since(conn, workspace_id=WS, after_seq=0) == []


async def test_every_shape_of_write_stores_its_rows_and_numbers_its_events(db: Database) -> None:
    """Inserts and saves in one write, and events in two workspaces (the second workspace's
    statement carries events only): each shape of statement writes what it was given."""
    await bare_queue(db).ensure_workspace("other")
    now = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
    first, second = _job(1, now), _job(2, now)
    await _direct_write(
        db, inserts=[first], saves=[], drafts={WS: [Draft(EventKind.JOB_SUBMITTED, job=first)]}, now=now
    )
    done = replace(first, status=JobStatus.DONE, lease_expires_at=None, finished_at=now)
    drafts = {
        WS: [Draft(EventKind.JOB_FINISHED, job=done), Draft(EventKind.JOB_SUBMITTED, job=second)],
        "other": [Draft(EventKind.JOB_SUBMITTED, job=second)],
    }
    await _direct_write(db, inserts=[second], saves=[(done, JobStatus.RUNNING, 1)], drafts=drafts, now=now)
    async with db.read() as conn:
        assert await jobs_store.get(conn, workspace_id=WS, job_id=first.id) == done
        assert await jobs_store.get(conn, workspace_id=WS, job_id=second.id) == second
        ours = await events_store.since(conn, workspace_id=WS, after_seq=0)
        others = await events_store.since(conn, workspace_id="other", after_seq=0)
    assert [(e.seq, e.kind) for e in ours] == [
        (1, EventKind.JOB_SUBMITTED),
        (2, EventKind.JOB_FINISHED),
        (3, EventKind.JOB_SUBMITTED),
    ]
    assert [(e.seq, e.kind, e.job.id if e.job else "") for e in others] == [
        (1, EventKind.JOB_SUBMITTED, second.id)
    ]


async def test_submissions_and_outcomes_through_the_queue_keep_the_log_gap_free(db: Database) -> None:
    queue = bare_queue(db)
    submitted = [await queue.submit(workspace_id=WS, new=NewJob(type="noop")) for _ in range(5)]
    assert all(not duplicate for _, duplicate in submitted)
    events = await queue.events_since(WS, 0)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert {e.kind for e in events} == {EventKind.JOB_SUBMITTED}


async def test_every_connection_picks_the_same_pending_jobs_in_the_same_order(db: Database) -> None:
    now = datetime(2026, 11, 24, 16, 0, tzinfo=UTC)
    mix = [
        # (type, repo, priority, status)
        ("noop", "", 5, JobStatus.PENDING),
        ("install_ias", "repo-a", 1, JobStatus.PENDING),
        ("install_ias", "repo-b", 0, JobStatus.PENDING),
        ("noop", "repo-a", 5, JobStatus.PENDING),
        ("noop", "", 0, JobStatus.RUNNING),
        ("review", "", 3, JobStatus.PENDING),
        ("noop", "", 5, JobStatus.PENDING),
    ]
    jobs = [
        replace(_job(n, now), type=t, repo_id=repo, priority=prio, status=status)
        for n, (t, repo, prio, status) in enumerate(mix)
    ]
    await _direct_write(db, inserts=jobs, saves=[], drafts={}, now=now)
    kinds: list[pg_direct.Claim] = [
        (WS, ["noop"], [], 10),
        (WS, ["noop", "install_ias"], ["repo-a"], 10),
        (WS, ["install_ias", "review", "noop"], ["repo-a", "repo-b"], 3),
        ("elsewhere", ["noop"], [], 10),
    ]
    expected = [
        ["job_0000", "job_0006"],
        ["job_0001", "job_0000", "job_0003", "job_0006"],
        ["job_0002", "job_0001", "job_0005"],
        [],
    ]
    _, direct = await _direct_view(db, [], kinds)
    assert [[j.id for j in pending] for pending in direct] == expected
    async with db.write() as conn:
        claimed = [
            await jobs_store.claimable(conn, workspace_id=ws, types=types, repo_ids=repos, limit=n)
            for ws, types, repos, n in kinds
        ]
    assert [[j.id for j in pending] for pending in claimed] == expected
    assert claimed[0][0] == jobs[0]


async def _direct_write(
    db: Database,
    *,
    inserts: list[Job],
    saves: list[tuple[Job, JobStatus, int]],
    drafts: dict[str, list[Draft]],
    now: datetime,
) -> None:
    if db.is_sqlite:
        async with db.direct_sqlite() as lite:
            sqlite_direct.write(lite, inserts=inserts, saves=saves, drafts=drafts, now=now)
        return
    async with db.direct() as conn:
        await pg_direct.write(
            conn, inserts=inserts, saves=saves, drafts=drafts, available=[], replica_id="r", now=now
        )


async def _direct_view(
    db: Database, ids: list[str], claims: list[pg_direct.Claim] | None = None
) -> tuple[dict[str, Job], list[list[Job]]]:
    if db.is_sqlite:
        async with db.direct_sqlite() as lite:
            return sqlite_direct.named_and_pending(lite, job_ids=ids, claims=claims or [])
    async with db.write() as conn:
        raw: asyncpg.Connection = await driver(conn)
        return await pg_direct.named_and_pending(raw, job_ids=ids, claims=claims or [])
