"""Group commit of outcomes and submissions, on SQLite and on PostgreSQL: every caller gets its own
answer, a bad request in a batch fails alone, and the event log stays gap-free."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import grpc
import pytest
from harness import JobsClient, RawWorker, running_plane, settings_for
from ias.v1 import job_pb2
from ias.v1 import worker_service_pb2 as wpb

from control_plane.config import ServerSettings
from control_plane.domain.jobs import Job, JobResult, JobStatus
from control_plane.domain.workers import Event, EventKind
from control_plane.errors import NotFound, StaleLease
from control_plane.queue import JobQueue, NewJob, Recorded, Refill
from control_plane.store import pg_direct
from control_plane.transactions import Assignee


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    return "" if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))


def assert_gap_free(events: list[Event]) -> None:
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def claimed_jobs(queue: JobQueue, count: int) -> list[Job]:
    """``count`` jobs, each running on its own (ghost) worker at lease epoch 1."""
    for _ in range(count):
        await queue.submit(workspace_id="default", new=NewJob(type="noop"))
    assignees = [Assignee(f"wrk_{i}", f"ses_{i}") for i in range(count)]
    claimed = await queue.claim(
        workspace_id="default",
        types=["noop"],
        repo_ids=[],
        slots=len(assignees),
        pick=lambda n: assignees[:n],
    )
    assert len(claimed) == count
    return [job for job, _ in claimed]


async def test_outcomes_from_many_streams_each_get_their_own_ack(tmp_path: Path, db_url: str) -> None:
    async with running_plane(settings_for(tmp_path, db_url=db_url)) as cp:
        workers = [RawWorker(cp.address, cp.worker) for _ in range(8)]
        for i, w in enumerate(workers):
            await w.hello(f"w{i}")
        jobs = JobsClient(cp.address, cp.admin)
        submitted = {(await jobs.submit("noop")).id for _ in workers}
        assignments = [(await w.read("assignment")).assignment for w in workers]
        assert {a.job.id for a in assignments} == submitted
        await asyncio.gather(
            *(
                w.send(
                    outcome=wpb.Outcome(
                        job_id=a.job.id, lease_epoch=a.lease_epoch, status=job_pb2.JOB_STATUS_DONE
                    )
                )
                for w, a in zip(workers, assignments, strict=True)
            )
        )
        for w, a in zip(workers, assignments, strict=True):
            ack = (await w.read("outcome_ack")).outcome_ack
            assert (ack.job_id, ack.lease_epoch, ack.duplicate) == (a.job.id, 1, False)
        for job_id in submitted:
            assert (await jobs.get(job_id)).status == job_pb2.JOB_STATUS_DONE
        events = await cp.plane.queue.events_since("default", 0)
        assert_gap_free(events)
        finished = [e.job.id for e in events if e.kind is EventKind.JOB_FINISHED and e.job]
        assert sorted(finished) == sorted(submitted)
        for w in workers:
            await w.close()
        await jobs.close()


@pytest.mark.parametrize("reads_assignment_acks", [True, False])
async def test_an_outcome_whose_slot_is_refilled_is_acked_in_the_assignment_frame_if_the_worker_reads_it(
    tmp_path: Path, db_url: str, reads_assignment_acks: bool
) -> None:
    async with running_plane(settings_for(tmp_path, db_url=db_url)) as cp:
        w = RawWorker(cp.address, cp.worker)
        await w.hello("one-slot", reads_assignment_acks=reads_assignment_acks)
        jobs = JobsClient(cp.address, cp.admin)
        first = await jobs.submit("noop")
        assert (await w.read("assignment")).assignment.job.id == first.id
        second = await jobs.submit("noop")  # waits: the only slot is taken
        await w.send(outcome=wpb.Outcome(job_id=first.id, lease_epoch=1, status=job_pb2.JOB_STATUS_DONE))
        frames = [await w.read()]
        if not reads_assignment_acks:
            frames.append(await w.read())
        kinds = [f.WhichOneof("frame") for f in frames]
        assignment = frames[-1].assignment
        assert kinds == (["assignment"] if reads_assignment_acks else ["outcome_ack", "assignment"])
        ack = assignment.outcome_ack if reads_assignment_acks else frames[0].outcome_ack
        assert (ack.job_id, ack.lease_epoch, ack.duplicate) == (first.id, 1, False)
        assert assignment.job.id == second.id
        assert assignment.HasField("outcome_ack") is reads_assignment_acks
        # Nothing left to refill the slot with: the last outcome's ack is a frame of its own.
        await w.send(outcome=wpb.Outcome(job_id=second.id, lease_epoch=1, status=job_pb2.JOB_STATUS_DONE))
        last = await w.read()
        assert last.WhichOneof("frame") == "outcome_ack" and last.outcome_ack.job_id == second.id
        assert {(await jobs.get(j.id)).status for j in (first, second)} == {job_pb2.JOB_STATUS_DONE}
        await w.close()
        await jobs.close()


async def test_a_stale_outcome_in_a_batch_is_rejected_without_touching_the_others(
    tmp_path: Path, db_url: str
) -> None:
    async with running_plane(settings_for(tmp_path, db_url=db_url)) as cp:
        queue = cp.plane.queue
        a, b, c, d = await claimed_jobs(queue, 4)

        def outcome(
            job: Job, *, epoch: int = 1, worker_id: str = "", summary: str = "ok"
        ) -> Awaitable[Recorded]:
            return queue.record_outcome(
                workspace_id="default",
                worker_id=worker_id or job.worker_id,
                job_id=job.id,
                epoch=epoch,
                status=JobStatus.DONE,
                result=JobResult(summary=summary),
            )

        # Started together, these land in one group commit, in this order.
        answers = await asyncio.gather(
            outcome(a, summary="first"),
            outcome(b, epoch=2),  # a lease it never had
            outcome(c, worker_id="wrk_other"),  # not the holder
            outcome(d),
            outcome(a, summary="replay"),  # right behind its original, in the same batch
            queue.record_outcome(
                workspace_id="default",
                worker_id="wrk_0",
                job_id="job_missing",
                epoch=1,
                status=JobStatus.DONE,
                result=JobResult(),
            ),
            return_exceptions=True,
        )
        done_a, stale_b, stale_c, done_d, replay_a, missing = answers
        assert isinstance(done_a, tuple) and done_a[1] is False and done_a[0].status is JobStatus.DONE
        assert isinstance(stale_b, StaleLease) and isinstance(stale_c, StaleLease)
        assert isinstance(done_d, tuple) and done_d[1] is False
        assert isinstance(replay_a, tuple) and replay_a[1] is True
        assert isinstance(missing, NotFound)

        stored = {j: await queue.get(workspace_id="default", job_id=j) for j in (a.id, b.id, c.id, d.id)}
        assert stored[a.id].status is JobStatus.DONE and stored[a.id].result == JobResult(summary="first")
        assert stored[d.id].status is JobStatus.DONE
        for untouched in (b, c):
            assert (stored[untouched.id].status, stored[untouched.id].lease_epoch) == (JobStatus.RUNNING, 1)

        events = await queue.events_since("default", 0)
        assert_gap_free(events)
        finished = [e for e in events if e.kind is EventKind.JOB_FINISHED]
        assert sorted(e.job.id for e in finished if e.job) == sorted([a.id, d.id])
        assert len({e.occurred_at for e in finished}) == 1, "both outcomes in one transaction"


async def test_a_retryable_failure_in_a_batch_requeues_and_is_dispatched_again(
    tmp_path: Path, db_url: str
) -> None:
    async with running_plane(settings_for(tmp_path, db_url=db_url)) as cp:
        queue = cp.plane.queue
        a, b = await claimed_jobs(queue, 2)
        failed, done = await asyncio.gather(
            queue.record_outcome(
                workspace_id="default",
                worker_id=a.worker_id,
                job_id=a.id,
                epoch=1,
                status=JobStatus.FAILED,
                result=JobResult(error_code="flaky", retryable=True),
            ),
            queue.record_outcome(
                workspace_id="default",
                worker_id=b.worker_id,
                job_id=b.id,
                epoch=1,
                status=JobStatus.DONE,
                result=JobResult(),
            ),
        )
        assert (failed[0].status, failed[0].attempt) == (JobStatus.PENDING, 2)
        assert done[0].status is JobStatus.DONE
        w = RawWorker(cp.address, cp.worker)
        await w.hello("w")
        again = (await w.read("assignment")).assignment
        assert (again.job.id, again.job.attempt, again.lease_epoch) == (a.id, 2, 2)
        kinds = [e.kind for e in await queue.events_since("default", 0) if e.job and e.job.id == a.id]
        assert kinds.count(EventKind.JOB_REQUEUED) == 1
        await w.close()


async def test_concurrent_submissions_share_a_transaction_and_keep_the_log_gap_free(
    tmp_path: Path, db_url: str
) -> None:
    async with running_plane(settings_for(tmp_path, db_url=db_url)) as cp:
        queue = cp.plane.queue
        results = await asyncio.gather(
            *(
                queue.submit(workspace_id="default", new=NewJob(type="noop", run_id=f"r{i}"))
                for i in range(20)
            )
        )
        jobs = [job for job, existing in results if not existing]
        assert len({j.id for j in jobs}) == 20
        assert [j.run_id for j in jobs] == [f"r{i}" for i in range(20)]
        # Keyed submissions take their own transaction and still find the first one.
        keyed = [
            await queue.submit(workspace_id="default", new=NewJob(type="noop", idempotency_key="k"))
            for _ in range(2)
        ]
        assert keyed[0][0].id == keyed[1][0].id and keyed[1][1] is True
        events = await queue.events_since("default", 0)
        assert_gap_free(events)
        submitted = [e for e in events if e.kind is EventKind.JOB_SUBMITTED]
        assert [e.job.id for e in submitted if e.job] == [j.id for j in jobs] + [keyed[0][0].id]
        assert len({e.occurred_at for e in submitted[:20]}) == 1, "one transaction for the 20"


async def test_an_outcome_claims_the_next_job_for_its_session_in_the_same_transaction(
    tmp_path: Path, db_url: str
) -> None:
    async with running_plane(settings_for(tmp_path, db_url=db_url)) as cp:
        queue = cp.plane.queue
        [a] = await claimed_jobs(queue, 1)
        b, _ = await queue.submit(workspace_id="default", new=NewJob(type="noop"))
        other, _ = await queue.submit(workspace_id="default", new=NewJob(type="other"))
        refill = Refill(types=("noop",), repo_ids=(), assignee=Assignee(a.worker_id, a.session_id))

        def report(job: Job) -> Awaitable[Recorded]:
            return queue.record_outcome(
                workspace_id="default",
                worker_id=a.worker_id,
                job_id=job.id,
                epoch=1,
                status=JobStatus.DONE,
                result=JobResult(),
                refill=refill,
            )

        before = time.time()
        done, duplicate, following, committed_at = await report(a)
        assert before <= committed_at <= time.time(), "stamped when its transaction committed"
        assert (done.status, duplicate) == (JobStatus.DONE, False)
        assert following is not None and following.id == b.id
        assert (following.status, following.worker_id, following.lease_epoch) == (
            JobStatus.RUNNING,
            a.worker_id,
            1,
        )
        assert (await report(a))[1:3] == (True, None)  # a replay frees no slot
        _, _, nothing, _ = await report(following)  # only a job of a type the session does not run waits
        assert nothing is None
        assert (await queue.get(workspace_id="default", job_id=other.id)).status is JobStatus.PENDING

        events = await queue.events_since("default", 0)
        assert_gap_free(events)
        finished_a = next(
            e for e in events if e.kind is EventKind.JOB_FINISHED and e.job and e.job.id == a.id
        )
        assigned_b = next(
            e for e in events if e.kind is EventKind.JOB_ASSIGNED and e.job and e.job.id == b.id
        )
        assert finished_a.occurred_at == assigned_b.occurred_at, "one transaction"


@asynccontextmanager
async def _one_idle_worker(settings: ServerSettings) -> AsyncIterator[tuple[RawWorker, JobsClient]]:
    """A running plane with one connected worker, known idle, so that a job submitted now is
    assigned in its submit; and a jobs client."""
    async with running_plane(settings) as cp:
        w = RawWorker(cp.address, cp.worker)
        await w.hello("w1")
        jobs = JobsClient(cp.address, cp.admin)
        await asyncio.sleep(0.2)
        try:
            yield w, jobs
        finally:
            await w.close()
            await jobs.close()


@pytest.mark.postgres
async def test_an_idle_worker_gets_a_job_before_its_submitter_hears_that_it_is_on_disk(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Early dispatch: the assignment leaves once the submission has committed; the submitter is
    answered only after the flush that puts the commit on disk (held back here)."""
    disk = asyncio.Event()
    flushed: list[object] = []
    real = pg_direct.flush

    async def held_flush(conn: asyncpg.Connection) -> None:
        await disk.wait()
        await real(conn)
        flushed.append(conn)

    monkeypatch.setattr(pg_direct, "flush", held_flush)
    async with _one_idle_worker(settings_for(tmp_path, db_url=pg_url)) as (w, jobs):
        submit = asyncio.create_task(jobs.submit("noop"))
        assignment = (await w.read("assignment")).assignment
        await asyncio.sleep(0.1)
        assert not submit.done(), "the submitter heard before the commit was on disk"
        disk.set()
        submitted = await asyncio.wait_for(submit, 10)
        assert submitted.id == assignment.job.id
        assert len(flushed) == 1


@pytest.mark.postgres
async def test_a_failed_flush_fails_the_submission_it_covers(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit not known to be on disk is not acknowledged: the submitter gets UNAVAILABLE."""

    async def broken_flush(conn: asyncpg.Connection) -> None:
        raise asyncpg.exceptions.InternalServerError("could not fsync")

    monkeypatch.setattr(pg_direct, "flush", broken_flush)
    async with _one_idle_worker(settings_for(tmp_path, db_url=pg_url)) as (_, jobs):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await jobs.submit("noop")
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "not confirmed on disk" in (failed.value.details() or "")


@pytest.mark.postgres
async def test_without_early_dispatch_a_submission_commits_to_disk_before_anything_leaves(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushed: list[object] = []

    async def counted_flush(conn: asyncpg.Connection) -> None:
        flushed.append(conn)

    monkeypatch.setattr(pg_direct, "flush", counted_flush)
    async with _one_idle_worker(settings_for(tmp_path, db_url=pg_url, early_dispatch=False)) as (w, jobs):
        submitted = await jobs.submit("noop")
        assert (await w.read("assignment")).assignment.job.id == submitted.id
        assert flushed == []  # the commit waited for its own flush
