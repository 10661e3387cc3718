"""SubmitJobs: many submissions over one stream, each committed and answered on its own."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import JobsClient, RawWorker, running_plane, settings_for
from ias.v1 import job_pb2
from ias.v1 import job_service_pb2 as jpb
from ias.v1 import job_service_pb2_grpc as jpb_grpc
from processes import ias, ias_env
from test_protocol_errors import dump

from control_plane.api.job_servicer import SUBMIT_WINDOW
from worker.client import bearer, open_channel
from worker.submitter import StreamEnded, SubmitRefused, Submitter, submitter


async def list_all(client: JobsClient) -> list[job_pb2.Job]:
    reply = await client.stub.ListJobs(jpb.ListJobsRequest(limit=1000), metadata=client.md)
    return list(reply.jobs)


async def test_concurrent_submissions_share_one_stream_and_each_gets_its_own_job(
    tmp_path: Path, database_url: str
) -> None:
    async with running_plane(settings_for(tmp_path, db_url=database_url)) as cp:
        client = JobsClient(cp.address, cp.admin)
        todo = iter(range(300))
        answers: dict[int, jpb.SubmitJobResponse] = {}
        async with asyncio.timeout(30), submitter(client.stub, client.md) as stream:

            async def submit_each() -> None:
                for i in todo:
                    answers[i] = await stream.submit(
                        jpb.SubmitJobRequest(
                            type="noop", payload_json=json.dumps({"i": i}), priority=i % 7 + 1
                        )
                    )

            await asyncio.gather(*(submit_each() for _ in range(16)))
        assert sorted(answers) == list(range(300))
        stored = {job.id: job for job in await list_all(client)}
        assert len(stored) == 300 == len({a.job.id for a in answers.values()})
        for i, answer in answers.items():
            job = stored[answer.job.id]
            assert not answer.existing
            assert json.loads(job.payload_json) == {"i": i}
            assert job.priority == i % 7 + 1
            assert job.status == job_pb2.JOB_STATUS_PENDING
        await client.close()


class CountingCall:
    """A SubmitJobs call that counts the messages each way."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.requests: list[int] = []  # submissions per request
        self.responses: list[int] = []  # results per response

    async def write(self, request: jpb.SubmitJobsRequest) -> None:
        self.requests.append(len(request.submissions))
        await self.call.write(request)

    async def read(self) -> Any:
        reply = await self.call.read()
        if reply is not grpc.aio.EOF:
            self.responses.append(len(reply.results))
        return reply

    async def done_writing(self) -> None:
        await self.call.done_writing()

    def cancel(self) -> None:
        self.call.cancel()


async def test_submissions_and_results_ready_together_share_a_message(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        client = JobsClient(cp.address, cp.admin)
        call = CountingCall(client.stub.SubmitJobs(metadata=client.md))
        stream = Submitter(call)
        async with asyncio.timeout(20):
            replies = await asyncio.gather(
                *(stream.submit(jpb.SubmitJobRequest(type="noop")) for _ in range(64))
            )
            await stream.close()
        assert len({r.job.id for r in replies}) == 64
        assert sum(call.requests) == sum(call.responses) == 64
        # Submitted in one turn of the loop: one request. Committed in group commits: fewer
        # responses than jobs.
        assert call.requests == [64]
        assert len(call.responses) < 64
        await client.close()


async def test_a_submitted_job_goes_to_an_idle_worker_and_keys_stay_idempotent(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        w = RawWorker(cp.address, cp.worker)
        await w.hello("w1")
        client = JobsClient(cp.address, cp.admin)
        async with asyncio.timeout(10), submitter(client.stub, client.md) as stream:
            first = await stream.submit(jpb.SubmitJobRequest(type="noop", idempotency_key="k1"))
            again = await stream.submit(jpb.SubmitJobRequest(type="noop", idempotency_key="k1"))
            assigned = (await w.read("assignment")).assignment
        assert (first.existing, again.existing) == (False, True)
        assert again.job.id == first.job.id == assigned.job.id
        assert len(await list_all(client)) == 1
        await w.close()
        await client.close()


async def test_a_refused_request_is_answered_with_its_error_and_the_stream_goes_on(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        client = JobsClient(cp.address, cp.admin)
        before = await dump(cp.plane)
        call = client.stub.SubmitJobs(metadata=client.md)
        bad = [
            jpb.Submission(seq=1, job=jpb.SubmitJobRequest(type="")),
            jpb.Submission(seq=2, job=jpb.SubmitJobRequest(type="noop", payload_json="[1]")),
            jpb.Submission(seq=3),
            jpb.Submission(seq=4, job=jpb.SubmitJobRequest(type="noop", priority=-1)),
        ]
        async with asyncio.timeout(10):
            await call.write(jpb.SubmitJobsRequest(submissions=bad[:2]))
            await call.write(jpb.SubmitJobsRequest(submissions=bad[2:]))
            errors = {}
            while len(errors) < len(bad):
                for result in (await call.read()).results:
                    assert result.WhichOneof("result") == "error"
                    errors[result.seq] = result.error
            assert {seq: e.code for seq, e in errors.items()} == dict.fromkeys(
                (1, 2, 3, 4), "INVALID_ARGUMENT"
            )
            assert "type" in errors[1].message
            assert "payload" in errors[2].message
            assert errors[3].message == "job: required"
            assert "priority" in errors[4].message
            assert await dump(cp.plane) == before  # nothing stored for them
            await call.write(
                jpb.SubmitJobsRequest(
                    submissions=[jpb.Submission(seq=5, job=jpb.SubmitJobRequest(type="noop"))]
                )
            )
            (good,) = (await call.read()).results
            assert (good.seq, good.WhichOneof("result")) == (5, "submitted")
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        # The client raises the refusal for that one submission only.
        async with submitter(client.stub, client.md) as stream:
            with pytest.raises(SubmitRefused) as refused:
                await stream.submit(jpb.SubmitJobRequest(type=""))
            assert refused.value.code == "INVALID_ARGUMENT"
            assert (await stream.submit(jpb.SubmitJobRequest(type="noop"))).job.id
        assert len(await list_all(client)) == 2
        await client.close()


async def test_more_requests_than_the_window_are_all_answered(tmp_path: Path) -> None:
    """The server stops reading at the window; a client that sends everything first still gets
    every answer (flow control holds it back, nothing is dropped)."""
    count = SUBMIT_WINDOW * 2 + 17
    async with running_plane(settings_for(tmp_path)) as cp:
        client = JobsClient(cp.address, cp.admin)
        call = client.stub.SubmitJobs(metadata=client.md)

        async def send_all() -> None:
            for seq in range(1, count + 1, 3):  # several submissions per request too
                await call.write(
                    jpb.SubmitJobsRequest(
                        submissions=[
                            jpb.Submission(seq=s, job=jpb.SubmitJobRequest(type="noop"))
                            for s in range(seq, min(seq + 3, count + 1))
                        ]
                    )
                )
            await call.done_writing()

        async with asyncio.timeout(60):
            sender = asyncio.create_task(send_all())
            seen = []
            while (reply := await call.read()) is not grpc.aio.EOF:
                assert {r.WhichOneof("result") for r in reply.results} == {"submitted"}
                seen += [r.seq for r in reply.results]
            await sender
        assert sorted(seen) == list(range(1, count + 1))
        assert await call.code() == grpc.StatusCode.OK
        await client.close()


async def test_an_undecodable_request_ends_the_stream_and_a_worker_token_is_refused(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        before = await dump(cp.plane)
        async with open_channel(cp.address) as channel:
            raw = channel.stream_stream("/ias.v1.JobService/SubmitJobs")
            call = raw(metadata=bearer(cp.admin))
            await call.write(b"\xff\xff\xff")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async with asyncio.timeout(10):
                    await call.read()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "SubmitJobsRequest" in (err.value.details() or "")

            stub = jpb_grpc.JobServiceStub(channel)
            for token, code in ((cp.worker, grpc.StatusCode.PERMISSION_DENIED), ("", None)):
                metadata = bearer(token) if token else ()
                with pytest.raises(StreamEnded) as ended:
                    async with asyncio.timeout(10), submitter(stub, metadata) as stream:
                        await stream.submit(jpb.SubmitJobRequest(type="noop"))
                expected = (code or grpc.StatusCode.UNAUTHENTICATED).name.lower()
                assert expected in str(ended.value)
        assert await dump(cp.plane) == before


async def test_cli_submit_many_submits_each_line_and_names_refused_ones(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        env = ias_env(IAS_CONTROL_PLANE=cp.address, IAS_TOKEN=cp.admin)
        lines = [json.dumps({"type": "noop", "payload": {"i": i}}) for i in range(40)]
        lines.insert(7, json.dumps({"type": "noop", "priority": 5000}))
        lines.insert(20, "")
        path = tmp_path / "jobs.jsonl"
        path.write_text("\n".join(lines) + "\n")
        done = await asyncio.to_thread(ias, "jobs", "submit-many", str(path), "--json", env=env)
        assert done.returncode == 1, done.stderr
        printed = [json.loads(line) for line in done.stdout.splitlines()]
        assert [p["line"] for p in printed] == [n for n in range(1, 43) if n != 21]
        refused = [p for p in printed if "error" in p]
        assert [p["line"] for p in refused] == [8]
        assert "priority" in refused[0]["error"]
        assert [p["payload"]["i"] for p in printed if "error" not in p] == list(range(40))
        assert "40 job(s) submitted, 1 refused" in done.stderr

        # A malformed line stops the whole file before anything is sent.
        client = JobsClient(cp.address, cp.admin)
        before = len(await list_all(client))
        path.write_text('{"type": "noop"}\n{"type": "noop", "colour": "red"}\n')
        bad = await asyncio.to_thread(ias, "jobs", "submit-many", str(path), env=env)
        assert bad.returncode == 2
        assert "line 2: unknown field 'colour'" in bad.stderr
        assert "Traceback" not in bad.stderr
        assert len(await list_all(client)) == before
        await client.close()
