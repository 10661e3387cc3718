"""PostgreSQL: a replica analyzes the jobs table once it has stored as many jobs as the table held
at its last analysis, so the cached plans of the hot statements stop scanning the whole table; and
those plans are made once per connection, not at every execution."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from conftest import bare_queue

from control_plane.domain.jobs import JobResult, JobStatus
from control_plane.queue import JobQueue, NewJob, Refill
from control_plane.store import statistics
from control_plane.store.db import Database
from control_plane.transactions import Assignee

pytestmark = pytest.mark.postgres

WS = "default"


@pytest.fixture
async def queue(pg_url: str) -> AsyncIterator[JobQueue]:
    database = Database(url=pg_url)
    await database.migrate()
    q = bare_queue(database)
    await q.ensure_workspace(WS)
    yield q
    await database.close()


async def _submit(queue: JobQueue, count: int) -> None:
    for _ in range(count // 50):  # in batches, as submitters side by side would
        await asyncio.gather(*(queue.submit(workspace_id=WS, new=NewJob(type="noop")) for _ in range(50)))


async def _standing(queue: JobQueue) -> tuple[float, int]:
    """The planner's row count for jobs, and how many times it was analyzed."""
    async with queue.db.direct() as raw:
        row = await raw.fetchrow(
            "SELECT c.reltuples, s.analyze_count FROM pg_class AS c"
            " JOIN pg_stat_user_tables AS s ON s.relid = c.oid WHERE c.relname = 'jobs'"
        )
    assert row is not None
    return float(row["reltuples"]), int(row["analyze_count"])


async def test_the_jobs_table_is_analyzed_each_time_it_doubles(queue: JobQueue) -> None:
    await _submit(queue, statistics.MIN_GROWTH - 50)
    await queue.refresh_statistics()
    assert await _standing(queue) == (-1.0, 0), "not yet: a small table costs little to scan"

    await _submit(queue, 50)
    await queue.refresh_statistics()
    rows, analyses = await _standing(queue)
    assert (rows, analyses) == (statistics.MIN_GROWTH, 1)

    # The next analysis waits until as many jobs again were stored.
    await _submit(queue, statistics.MIN_GROWTH - 50)
    await queue.refresh_statistics()
    assert await _standing(queue) == (statistics.MIN_GROWTH, 1)
    await _submit(queue, 50)
    await queue.refresh_statistics()
    assert await _standing(queue) == (2 * statistics.MIN_GROWTH, 2)


async def test_a_replica_starting_on_a_large_table_leaves_it_to_autovacuum(queue: JobQueue) -> None:
    await _submit(queue, 2 * statistics.MIN_GROWTH)
    await queue.refresh_statistics()
    assert await _standing(queue) == (2 * statistics.MIN_GROWTH, 1)

    # A new replica on the same database: it has stored nothing yet, and then less than the table holds.
    later = bare_queue(queue.db)
    await later.refresh_statistics()
    await _submit(later, statistics.MIN_GROWTH)
    await later.refresh_statistics()
    assert await _standing(later) == (2 * statistics.MIN_GROWTH, 1)
    await _submit(later, statistics.MIN_GROWTH)
    await later.refresh_statistics()
    assert await _standing(later) == (4 * statistics.MIN_GROWTH, 2)


async def test_the_hot_statements_are_planned_once_per_connection(pg_url: str) -> None:
    """Left to choose, PostgreSQL re-planned the read of named and pending jobs at every execution
    once the table had statistics; the direct connections keep one generic plan per statement."""
    database = Database(url=pg_url, pool_size=1)  # one connection: the one inspected below
    await database.migrate()
    queue = bare_queue(database)
    await queue.ensure_workspace(WS)
    try:
        await _submit(queue, 2 * statistics.MIN_GROWTH)
        await queue.refresh_statistics()
        who = Assignee(worker_id="w", session_id="s")
        refill = Refill(types=("noop",), repo_ids=(), assignee=who)
        for _ in range(10):
            claimed = await queue.claim(
                workspace_id=WS, types=["noop"], repo_ids=[], slots=2, pick=lambda n: [who] * n
            )
            await asyncio.gather(
                *(
                    queue.record_outcome(
                        workspace_id=WS,
                        worker_id="w",
                        job_id=job.id,
                        epoch=job.lease_epoch,
                        status=JobStatus.DONE,
                        result=JobResult(summary="ok"),
                        refill=refill,
                    )
                    for job, _ in claimed
                )
            )
        async with database.direct() as raw:
            plans = await raw.fetch(
                "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements"
                " WHERE statement LIKE '%FROM jobs%' OR statement LIKE '%INTO jobs%'"
            )
    finally:
        await database.close()
    assert len(plans) >= 2, "the read and the write statement"
    assert all(p["custom_plans"] == 0 for p in plans), [dict(p) for p in plans]
    assert sum(p["generic_plans"] for p in plans) > 40
