"""Push dispatch, leases and fencing against a real control plane on loopback and real SQLite."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import eventually
from harness import JobsClient, RawWorker, running_daemon, running_plane, settings_for
from ias.v1 import console_service_pb2 as cpb
from ias.v1 import console_service_pb2_grpc as cpb_grpc
from ias.v1 import job_pb2
from ias.v1 import worker_service_pb2 as wpb

from control_plane.domain.jobs import JobStatus
from control_plane.transactions import Assignee


async def test_a_job_is_pushed_to_the_worker_that_can_run_it(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        plain, mapped = RawWorker(cp.address, cp.worker), RawWorker(cp.address, cp.worker)
        await plain.hello("plain", capabilities=("noop",))
        await mapped.hello("mapped", capabilities=("noop", "install_ias"), repo_ids=("repo-a",))
        jobs = JobsClient(cp.address, cp.admin)
        job = await jobs.submit("install_ias", repo_id="repo-a")
        frame = await mapped.read("assignment")
        assert frame.assignment.job.id == job.id
        assert frame.assignment.lease_epoch == 1
        # The other worker can run neither the type nor the repository: it got nothing.
        other = await jobs.submit("install_ias", repo_id="repo-b")
        await asyncio.sleep(0.3)
        assert (await jobs.get(other.id)).status == job_pb2.JOB_STATUS_PENDING
        for w in (plain, mapped):
            await w.close()
        await jobs.close()


async def test_every_assignment_says_when_its_lease_was_committed(tmp_path: Path) -> None:
    """Direct from the submit, from a dispatch round, and as the refill of an outcome: the frame's
    committed_at lies after the claim began (the job's updated_at) and before the frame was read."""
    async with running_plane(settings_for(tmp_path)) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        waiting = [await jobs.submit("noop") for _ in range(2)]  # no worker yet: they wait
        w = RawWorker(cp.address, cp.worker)
        await w.hello("w1", reads_assignment_acks=True)
        from_round = (await w.read("assignment")).assignment
        read_round = time.time()
        await w.send(
            outcome=wpb.Outcome(job_id=from_round.job.id, lease_epoch=1, status=job_pb2.JOB_STATUS_DONE)
        )
        refilled = (await w.read("assignment")).assignment
        read_refill = time.time()
        assert refilled.HasField("outcome_ack"), "the refill of the outcome's freed slot"
        await w.send(
            outcome=wpb.Outcome(job_id=refilled.job.id, lease_epoch=1, status=job_pb2.JOB_STATUS_DONE)
        )
        await w.read("outcome_ack")
        await asyncio.sleep(0.2)  # the freed slot is known idle: the next job goes in its submit
        direct_job = await jobs.submit("noop")
        direct = (await w.read("assignment")).assignment
        read_direct = time.time()
        assert {from_round.job.id, refilled.job.id} == {j.id for j in waiting}
        assert direct.job.id == direct_job.id
        for assignment, read_at in ((from_round, read_round), (refilled, read_refill), (direct, read_direct)):
            committed = assignment.committed_at.ToNanoseconds() / 1e9
            claim_began = assignment.job.updated_at.ToNanoseconds() / 1e9
            assert claim_began <= committed <= read_at
        await w.close()
        await jobs.close()


async def test_a_job_waits_for_a_worker_and_is_delivered_when_one_connects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        job = await jobs.submit("noop", payload='{"seconds": 0}')
        await asyncio.sleep(0.2)
        assert (await jobs.get(job.id)).status == job_pb2.JOB_STATUS_PENDING
        with caplog.at_level(logging.INFO, logger="worker.daemon"):
            async with running_daemon(cp.address, cp.worker, "late"):
                await eventually(lambda: _status(jobs, job.id, job_pb2.JOB_STATUS_DONE), what="job done")
                done = await jobs.get(job.id)
                assert (done.attempt, done.lease_epoch, done.result.summary) == (1, 1, "slept 0 s")
        [started] = [r for r in caplog.records if r.getMessage() == "started job"]
        # The worker logs how long the assignment took from the commit of its lease.
        assert started.__dict__["job_id"] == job.id and 0 <= started.__dict__["dispatch_ms"] < 10_000
        await jobs.close()


async def _status(jobs: JobsClient, job_id: str, status: int) -> bool:
    return bool((await jobs.get(job_id)).status == status)


async def test_a_stale_epoch_outcome_is_rejected_and_changes_nothing(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        w = RawWorker(cp.address, cp.worker)
        await w.hello("w1")
        jobs = JobsClient(cp.address, cp.admin)
        job = await jobs.submit("noop")
        assignment = (await w.read("assignment")).assignment
        before = await jobs.get(job.id)
        for epoch in (assignment.lease_epoch - 1, assignment.lease_epoch + 1):
            await w.send(
                outcome=wpb.Outcome(job_id=job.id, lease_epoch=epoch, status=job_pb2.JOB_STATUS_DONE)
            )
            rejected = (await w.read("rejected")).rejected
            assert rejected.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
            assert rejected.job_id == job.id and rejected.frame == "outcome"
        assert await jobs.get(job.id) == before
        await w.close()
        await jobs.close()


async def test_a_replayed_outcome_is_acknowledged_once_and_applied_once(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        w = RawWorker(cp.address, cp.worker)
        await w.hello("w1")
        jobs = JobsClient(cp.address, cp.admin)
        job = await jobs.submit("noop")
        epoch = (await w.read("assignment")).assignment.lease_epoch
        outcome = wpb.Outcome(
            job_id=job.id,
            lease_epoch=epoch,
            status=job_pb2.JOB_STATUS_DONE,
            result=job_pb2.JobResult(summary="first"),
        )
        await w.send(outcome=outcome)
        assert not (await w.read("outcome_ack")).outcome_ack.duplicate
        outcome.result.summary = "second"
        await w.send(outcome=outcome)
        assert (await w.read("outcome_ack")).outcome_ack.duplicate
        assert (await jobs.get(job.id)).result.summary == "first"
        events = await cp.plane.queue.events_since("default", 0)
        assert [e.kind.value for e in events if e.job and e.job.id == job.id].count("job_finished") == 1
        await w.close()
        await jobs.close()


async def test_lease_expiry_requeues_with_the_next_attempt(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path, lease_ttl=timedelta(seconds=1))) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        job = await jobs.submit("noop")
        # A lease granted to a worker this replica does not know: only its expiry can free the job.
        [(claimed, _)] = await cp.plane.queue.claim(
            workspace_id="default",
            types=["noop"],
            repo_ids=[],
            slots=1,
            pick=lambda n: [Assignee("wrk_ghost", "ses_ghost")][:n],
        )
        assert (claimed.id, claimed.lease_epoch) == (job.id, 1)
        await eventually(lambda: _attempt(jobs, job.id, 2), timeout=10, what="requeue after lease expiry")
        w = RawWorker(cp.address, cp.worker)
        await w.hello("w1")
        again = (await w.read("assignment", timeout=10)).assignment
        assert (again.job.id, again.lease_epoch) == (job.id, 2)
        events = await cp.plane.queue.events_since("default", 0)
        assert [e.reason for e in events if e.kind.value == "job_requeued"] == ["lease_expired"]
        await w.close()
        await jobs.close()


async def _attempt(jobs: JobsClient, job_id: str, attempt: int) -> bool:
    return bool((await jobs.get(job_id)).attempt == attempt)


async def test_a_lease_the_worker_stops_mentioning_is_requeued_not_renewed(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path, reconnect_grace=timedelta(seconds=1))) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        w = RawWorker(cp.address, cp.worker)
        await w.hello("w1", slots=3)
        kept, forgotten, reported = [await jobs.submit("noop") for _ in range(3)]
        assert {(await w.read("assignment")).assignment.job.id for _ in range(3)} == {
            kept.id,
            forgotten.id,
            reported.id,
        }
        # One job runs, one awaits the acknowledgement of its outcome, one the worker does not have.
        beat = wpb.Heartbeat(
            held_jobs=[wpb.HeldJob(job_id=kept.id, lease_epoch=1)],
            reporting=[wpb.HeldJob(job_id=reported.id, lease_epoch=1)],
        )
        stop = asyncio.Event()

        async def beats() -> None:
            # Not cancelled mid-write (that would end the call): told to stop instead.
            for _ in range(50):  # every 0.1 s for at most 5 s (the grace is 1 s)
                if stop.is_set():
                    return
                await w.send(heartbeat=beat)
                await asyncio.sleep(0.1)

        beating = asyncio.create_task(beats())
        revoked = (await w.read("lease_revoked", timeout=5)).lease_revoked
        stop.set()
        await beating
        assert (revoked.job_id, revoked.lease_epoch, revoked.reason) == (forgotten.id, 1, "not_running")
        again = (await w.read("assignment")).assignment
        assert (again.job.id, again.job.attempt, again.lease_epoch) == (forgotten.id, 2, 2)
        events = await cp.plane.queue.events_since("default", 0)
        assert [(e.job.id, e.reason) for e in events if e.kind.value == "job_requeued"] == [
            (forgotten.id, "not_running")
        ]
        # The leases the worker mentioned still stand.
        for job_id in (kept.id, reported.id):
            await w.send(outcome=wpb.Outcome(job_id=job_id, lease_epoch=1, status=job_pb2.JOB_STATUS_DONE))
            ack = (await w.read("outcome_ack")).outcome_ack
            assert (ack.job_id, ack.duplicate) == (job_id, False)
        await w.close()
        await jobs.close()


async def test_a_job_assigned_while_leases_are_renewed_keeps_its_lease(tmp_path: Path) -> None:
    # A long TTL renews once a minute: this test runs the renewals itself.
    settings = settings_for(tmp_path, lease_ttl=timedelta(minutes=4))
    async with running_plane(settings) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        w = RawWorker(cp.address, cp.worker)
        await w.hello("w1", slots=2)
        first = await jobs.submit("noop")
        await w.read("assignment")
        renew = cp.plane.queue.renew
        second: list[str] = []

        async def renew_while_a_job_is_assigned(*, held: list[tuple[str, str]]) -> object:
            answer = await renew(held=held)
            # The dispatcher delivers a job between the renewal's write and its bookkeeping.
            second.append((await jobs.submit("noop")).id)
            await eventually(lambda: _held(cp, second[0]), timeout=10, what="second job held")
            return answer

        cp.plane.queue.renew = renew_while_a_job_is_assigned  # type: ignore[method-assign]
        await cp.plane.maintenance.renew_once()
        cp.plane.queue.renew = renew  # type: ignore[method-assign]
        assert (await w.read("assignment")).assignment.job.id == second[0]
        await cp.plane.maintenance.renew_once()
        # Both leases stand: nothing was revoked, both outcomes are recorded.
        for job_id in (first.id, second[0]):
            await w.send(outcome=wpb.Outcome(job_id=job_id, lease_epoch=1, status=job_pb2.JOB_STATUS_DONE))
            frame = await w.read()
            assert frame.WhichOneof("frame") == "outcome_ack", frame
        assert {(await jobs.get(j)).status for j in (first.id, second[0])} == {job_pb2.JOB_STATUS_DONE}
        await w.close()
        await jobs.close()


async def _held(cp: Any, job_id: str) -> bool:
    return any(job_id in s.held for s in cp.plane.sessions)


async def test_a_broken_stream_requeues_after_the_reconnect_grace(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path, reconnect_grace=timedelta(seconds=1))) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        w1 = RawWorker(cp.address, cp.worker)
        await w1.hello("w1")
        job = await jobs.submit("noop")
        await w1.read("assignment")
        await w1.close()
        w2 = RawWorker(cp.address, cp.worker)
        await w2.hello("w2")
        second = (await w2.read("assignment", timeout=10)).assignment
        assert (second.job.id, second.job.attempt, second.lease_epoch) == (job.id, 2, 2)
        await w2.send(outcome=wpb.Outcome(job_id=job.id, lease_epoch=2, status=job_pb2.JOB_STATUS_DONE))
        await w2.read("outcome_ack")
        done = await jobs.get(job.id)
        assert (done.status, done.attempt, done.worker_id) != (0, 0, "")
        assert done.status == job_pb2.JOB_STATUS_DONE and done.attempt == 2
        await w2.close()
        await jobs.close()


async def test_a_worker_that_comes_back_keeps_its_jobs_and_loses_the_rest(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path, reconnect_grace=timedelta(seconds=30))) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        w = RawWorker(cp.address, cp.worker)
        await w.hello("w1", slots=2)
        a, b = await jobs.submit("noop"), await jobs.submit("noop")
        got = {(await w.read("assignment")).assignment.job.id for _ in range(2)}
        assert got == {a.id, b.id}
        await w.close()
        back = RawWorker(cp.address, cp.worker)
        welcome = await back.hello("w1", slots=2, held=((a.id, 1),))
        assert [h.job_id for h in welcome.adopted_jobs] == [a.id]
        # b was not reported: requeued at once (attempt 2) and offered again.
        again = (await back.read("assignment")).assignment
        assert (again.job.id, again.job.attempt) == (b.id, 2)
        await back.send(outcome=wpb.Outcome(job_id=a.id, lease_epoch=1, status=job_pb2.JOB_STATUS_DONE))
        await back.read("outcome_ack")
        assert (await jobs.get(a.id)).status == job_pb2.JOB_STATUS_DONE
        await back.close()
        await jobs.close()


async def test_a_new_session_fences_out_the_old_one(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        old = RawWorker(cp.address, cp.worker)
        await old.hello("same")
        new = RawWorker(cp.address, cp.worker)
        await new.hello("same")
        drain = (await old.read("drain")).drain
        assert drain.reason == "session_replaced"
        await old.close()
        await new.close()


async def test_a_retryable_failure_runs_again_and_a_final_one_fails(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        async with running_daemon(cp.address, cp.worker, "d"):
            job = await jobs.submit("noop", payload='{"fail": "flaky", "retryable": true}', max_attempts=2)
            await eventually(lambda: _status(jobs, job.id, job_pb2.JOB_STATUS_FAILED), what="job failed")
            failed = await jobs.get(job.id)
            assert (failed.attempt, failed.lease_epoch, failed.result.error_code) == (2, 2, "noop_failed")
        await jobs.close()


async def test_cancelling_a_running_job_stops_it_on_the_worker(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        async with running_daemon(cp.address, cp.worker, "d") as daemon:
            job = await jobs.submit("noop", payload='{"seconds": 30}')
            await eventually(lambda: job.id in daemon.running_jobs, what="job running")
            from ias.v1 import job_service_pb2 as jpb

            cancelled = (await jobs.stub.CancelJob(jpb.CancelJobRequest(job_id=job.id), metadata=jobs.md)).job
            assert cancelled.status == job_pb2.JOB_STATUS_CANCELLED
            await eventually(lambda: job.id not in daemon.running_jobs, what="worker stopped the job")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await jobs.stub.CancelJob(jpb.CancelJobRequest(job_id=job.id), metadata=jobs.md)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await jobs.close()


async def test_graceful_worker_stop_hands_back_what_it_cannot_finish(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        grace = timedelta(milliseconds=300)
        async with running_daemon(cp.address, cp.worker, "d", shutdown_grace=grace) as daemon:
            job = await jobs.submit("noop", payload='{"seconds": 60}')
            await eventually(lambda: job.id in daemon.running_jobs, what="job running")
        back = await jobs.get(job.id)
        assert (back.status, back.attempt) == (job_pb2.JOB_STATUS_PENDING, 1)
        await jobs.close()


def test_status_enum_matches_the_domain() -> None:
    names = {
        job_pb2.JobStatus.Name(v).removeprefix("JOB_STATUS_").lower() for v in job_pb2.JobStatus.values()
    }
    assert names - {"unspecified"} == {s.value for s in JobStatus}


async def test_a_restarted_replica_lets_workers_reconnect_before_requeueing(tmp_path: Path) -> None:
    grace = timedelta(seconds=1)
    async with running_plane(settings_for(tmp_path, reconnect_grace=grace)) as first:
        w = RawWorker(first.address, first.worker)
        await w.hello("w1")
        jobs = JobsClient(first.address, first.admin)
        job = await jobs.submit("noop")
        epoch = (await w.read("assignment")).assignment.lease_epoch
        await jobs.close()
    await w.close()
    await asyncio.sleep(1.5)  # the control plane stays down for longer than the grace
    async with running_plane(settings_for(tmp_path, reconnect_grace=grace)) as second:
        await asyncio.sleep(0.5)  # a few sweeps run before the worker is back, within the grace
        back = RawWorker(second.address, second.worker)
        welcome = await back.hello("w1", held=((job.id, epoch),))
        assert [h.job_id for h in welcome.adopted_jobs] == [job.id]
        await back.send(outcome=wpb.Outcome(job_id=job.id, lease_epoch=epoch, status=job_pb2.JOB_STATUS_DONE))
        assert not (await back.read("outcome_ack")).outcome_ack.duplicate
        jobs = JobsClient(second.address, second.admin)
        done = await jobs.get(job.id)
        assert (done.status, done.attempt) == (job_pb2.JOB_STATUS_DONE, 1)
        await back.close()
        await jobs.close()


async def test_list_workers_shows_live_status_and_running_jobs(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        w = RawWorker(cp.address, cp.worker)
        await w.hello("busy", slots=2, repo_ids=("r1",))
        jobs = JobsClient(cp.address, cp.admin)
        await jobs.submit("noop")
        await w.read("assignment")
        console = cpb_grpc.ConsoleServiceStub(jobs.channel)
        [worker] = (await console.ListWorkers(cpb.ListWorkersRequest(), metadata=jobs.md)).workers
        assert (worker.name, worker.status, worker.running, worker.slots) == (
            "busy",
            job_pb2.WORKER_STATUS_ONLINE,
            1,
            2,
        )
        assert list(worker.repo_ids) == ["r1"]
        await w.close()
        await eventually(lambda: _offline(console, jobs), what="worker offline")
        await jobs.close()


async def _offline(console: cpb_grpc.ConsoleServiceAsyncStub, jobs: JobsClient) -> bool:
    reply = await console.ListWorkers(cpb.ListWorkersRequest(include_offline=True), metadata=jobs.md)
    return [w.status for w in reply.workers] == [job_pb2.WORKER_STATUS_OFFLINE]
