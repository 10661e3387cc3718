"""Bad input gets the right status and changes nothing; auth and Watch behave as promised."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from harness import JobsClient, RawWorker, running_plane, settings_for
from ias.v1 import console_service_pb2 as cpb
from ias.v1 import console_service_pb2_grpc as cpb_grpc
from ias.v1 import job_pb2
from ias.v1 import job_service_pb2 as jpb
from ias.v1 import job_service_pb2_grpc as jpb_grpc
from ias.v1 import worker_service_pb2 as wpb
from sqlalchemy import text

from control_plane.app import ControlPlane
from worker.client import bearer, open_channel

TABLES = ("jobs", "workers", "events", "workspaces")


async def dump(plane: ControlPlane) -> dict[str, list[tuple[object, ...]]]:
    """Every stored row that a bad frame must not change."""
    async with plane.db.read() as conn:
        return {
            t: [tuple(r) for r in (await conn.execute(text(f"SELECT * FROM {t} ORDER BY 1"))).all()]
            for t in TABLES
        }


async def stream_status(w: RawWorker, code: grpc.StatusCode) -> str:
    """Read until the stream ends; assert its status and return the details."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async with asyncio.timeout(10):
            for _ in range(100):
                await w.call.read()
    assert err.value.code() == code, err.value
    return err.value.details() or ""


async def test_outcome_before_hello_ends_the_stream_with_failed_precondition(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        before = await dump(cp.plane)
        w = RawWorker(cp.address, cp.worker)
        await w.send(outcome=wpb.Outcome(job_id="job_x", lease_epoch=1, status=job_pb2.JOB_STATUS_DONE))
        details = await stream_status(w, grpc.StatusCode.FAILED_PRECONDITION)
        assert "first frame must be a hello" in details
        assert await dump(cp.plane) == before
        await w.close()


@pytest.mark.parametrize(
    ("hello", "field"),
    [
        (wpb.Hello(worker_name="", capabilities=["noop"], slots=1), "hello.worker_name"),
        (wpb.Hello(worker_name="w", capabilities=["noop"], slots=0), "hello.slots"),
        (wpb.Hello(worker_name="w", capabilities=[], slots=1), "hello.capabilities"),
        (wpb.Hello(worker_name="w", capabilities=["x" * 65], slots=1), "hello.capabilities"),
    ],
)
async def test_an_invalid_hello_names_the_field(tmp_path: Path, hello: wpb.Hello, field: str) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        before = await dump(cp.plane)
        w = RawWorker(cp.address, cp.worker)
        await w.send(hello=hello)
        assert field in await stream_status(w, grpc.StatusCode.INVALID_ARGUMENT)
        assert await dump(cp.plane) == before
        await w.close()


async def test_frames_about_unknown_or_foreign_jobs_are_rejected_per_frame(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        w = RawWorker(cp.address, cp.worker)
        await w.hello("w1")
        before = await dump(cp.plane)
        cases = [
            (
                {"outcome": wpb.Outcome(job_id="job_nope", lease_epoch=1, status=job_pb2.JOB_STATUS_DONE)},
                grpc.StatusCode.NOT_FOUND,
            ),
            (
                {"outcome": wpb.Outcome(job_id="job_nope", lease_epoch=1, status=job_pb2.JOB_STATUS_RUNNING)},
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            (
                {"outcome": wpb.Outcome(job_id="job_nope", lease_epoch=1, status=42)},
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            (
                {"progress": wpb.Progress(job_id="job_nope", lease_epoch=1, message="hi")},
                grpc.StatusCode.FAILED_PRECONDITION,
            ),
            ({"release": wpb.Release(job_id="job_nope", lease_epoch=1)}, grpc.StatusCode.NOT_FOUND),
            (
                {"hello": wpb.Hello(worker_name="again", capabilities=["noop"], slots=1)},
                grpc.StatusCode.FAILED_PRECONDITION,
            ),
            ({}, grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for frame, code in cases:
            await w.send(**frame)
            rejected = (await w.read("rejected")).rejected
            assert rejected.code == code.value[0], (frame, rejected)
        # The session is still healthy: a heartbeat naming a job it does not hold is answered.
        await w.send(heartbeat=wpb.Heartbeat(held_jobs=[wpb.HeldJob(job_id="job_unknown", lease_epoch=1)]))
        assert (await w.read("lease_revoked")).lease_revoked.reason == "not_held"
        after = await dump(cp.plane)
        assert after == before
        await w.close()


async def test_an_oversize_frame_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path, max_message_bytes=64 * 1024)) as cp:
        w = RawWorker(cp.address, cp.worker)
        await w.hello("w1")
        before = await dump(cp.plane)
        await w.send(progress=wpb.Progress(job_id="j", lease_epoch=1, message="x" * 100_000))
        await stream_status(w, grpc.StatusCode.RESOURCE_EXHAUSTED)
        after = await dump(cp.plane)
        # Only the worker's own row moved (it is offline now); no job, event or workspace changed
        # beyond that disconnect.
        assert after["jobs"] == before["jobs"]
        await w.close()


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"type": ""}, "type"),
        ({"type": "no spaces"}, "type"),
        ({"type": "noop", "payload_json": "[1]"}, "payload_json"),
        ({"type": "noop", "payload_json": "{not json"}, "payload_json"),
        ({"type": "noop", "payload_json": json.dumps({"x": "y" * 300_000})}, "payload_json"),
        ({"type": "noop", "priority": 5000}, "priority"),
        ({"type": "noop", "max_attempts": -1}, "max_attempts"),
    ],
)
async def test_submit_validates_and_names_the_field(
    tmp_path: Path, request_fields: dict[str, object], field: str
) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await jobs.stub.SubmitJob(jpb.SubmitJobRequest(**request_fields), metadata=jobs.md)  # type: ignore[arg-type]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(f"{field}:")
        listed = await jobs.stub.ListJobs(jpb.ListJobsRequest(), metadata=jobs.md)
        assert len(listed.jobs) == 0
        await jobs.close()


async def test_unknown_job_is_not_found_and_idempotency_key_returns_the_first(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await jobs.get("job_missing")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        first = await jobs.stub.SubmitJob(
            jpb.SubmitJobRequest(type="noop", idempotency_key="k1"), metadata=jobs.md
        )
        second = await jobs.stub.SubmitJob(
            jpb.SubmitJobRequest(type="noop", idempotency_key="k1"), metadata=jobs.md
        )
        assert (second.job.id, second.existing, first.existing) == (first.job.id, True, False)
        await jobs.close()


async def test_credentials_are_checked_on_every_call(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        channel = open_channel(cp.address)
        stub = jpb_grpc.JobServiceStub(channel)
        cases = [
            ((), grpc.StatusCode.UNAUTHENTICATED),
            (bearer("ias_garbage"), grpc.StatusCode.UNAUTHENTICATED),
            (bearer("not-ours"), grpc.StatusCode.UNAUTHENTICATED),
            (bearer(cp.worker), grpc.StatusCode.PERMISSION_DENIED),
        ]
        for md, code in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListJobs(jpb.ListJobsRequest(), metadata=md)
            assert err.value.code() == code
        # Health needs no credential.
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await channel.close()


async def test_every_call_taken_is_counted_for_the_pacing_refused_and_public_ones_too(tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with running_plane(settings_for(tmp_path)) as cp:
        calls_taken = cp.plane.hub._pacer.calls_taken
        assert calls_taken is not None
        channel = open_channel(cp.address)
        before = calls_taken()
        stub = jpb_grpc.JobServiceStub(channel)
        await stub.ListJobs(jpb.ListJobsRequest(), metadata=bearer(cp.admin))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.ListJobs(jpb.ListJobsRequest(), metadata=bearer(cp.worker))
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert calls_taken() - before == 3
        await channel.close()


async def test_watch_resumes_from_since_seq_with_no_gap_and_no_duplicate(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        console = cpb_grpc.ConsoleServiceStub(jobs.channel)
        for _ in range(5):
            await jobs.submit("noop")
        seen: list[int] = []

        async def watch(since: int, count: int) -> None:
            async with asyncio.timeout(10):
                async for reply in console.Watch(cpb.WatchRequest(since_seq=since), metadata=jobs.md):
                    seen.append(reply.event.seq)
                    if len(seen) >= count:
                        return

        await watch(0, 3)
        assert seen == [1, 2, 3]
        # Resume after 3 while more events are committed concurrently with the replay.
        submitter = asyncio.create_task(_submit_many(jobs, 20))
        await watch(3, 3 + 2 + 20)
        await submitter
        assert seen == list(range(1, 26))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in console.Watch(cpb.WatchRequest(workspace_id="other"), metadata=jobs.md):
                pass
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await jobs.close()


async def _submit_many(jobs: JobsClient, n: int) -> None:
    for _ in range(n):
        await jobs.submit("noop")
