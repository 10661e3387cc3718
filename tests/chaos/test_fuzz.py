"""Property-based bad input: wrong Connect frames and random JobService requests never break the plane."""

from __future__ import annotations

import json
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from chaos_support import JobsClient, RawWorker, dump, is_serving, running_plane, settings_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from ias.v1 import job_pb2
from ias.v1 import job_service_pb2 as jpb
from ias.v1 import worker_service_pb2 as wpb

from control_plane.app import ControlPlane
from worker.client import bearer

# Hypothesis keeps caches in the current directory by default; keep the work tree clean.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "ias-chaos-hypothesis")

Code = grpc.StatusCode
ALLOWED = {
    Code.OK,
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.FAILED_PRECONDITION,
    Code.PERMISSION_DENIED,
    Code.RESOURCE_EXHAUSTED,
}
# The one frame kind the server declines by design.
ALLOWED_FRAME_CODES = {c.value[0] for c in ALLOWED} | {Code.UNIMPLEMENTED.value[0]}
REAL = "\0real"  # stands for the job the fuzzed session really holds (at epoch 1)
FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# -- strategies ----------------------------------------------------------------------------------

int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
short = st.text(max_size=40)
# Big strings cheaply: one character repeated, up to well past every field limit but inside 4 MiB.
big = st.builds(lambda ch, n: ch * n, st.characters(codec="utf-8"), st.integers(0, 120_000))
texts = st.one_of(short, short, big)
job_ids = st.one_of(st.just(REAL), st.just(""), short, st.from_regex(r"job_[0-9a-f]{24}", fullmatch=True))
# Never (REAL, 1): that one frame would be valid and may change rows.
refs = st.tuples(job_ids, st.one_of(st.integers(-2, 3), int64)).filter(lambda r: r != (REAL, 1))
statuses = st.one_of(st.sampled_from(list(job_pb2.JobStatus.values())), int32)


@st.composite
def results(draw: st.DrawFn) -> job_pb2.JobResult:
    return job_pb2.JobResult(
        summary=draw(texts),
        commit_sha=draw(short),
        changed_paths=draw(st.lists(short, max_size=600)),
        counts=draw(st.dictionaries(short, int64, max_size=50)),
        error_message=draw(texts),
        retryable=draw(st.booleans()),
        duration_ms=draw(int64),
        metadata_json=draw(st.one_of(texts, st.just("{}"), st.just("[1]"))),
    )


@st.composite
def frames(draw: st.DrawFn) -> dict[str, Any]:
    """One ConnectRequest frame as keyword arguments (job ids may still be REAL)."""
    job_id, epoch = draw(refs)
    kind = draw(
        st.sampled_from(
            ["heartbeat", "accept", "progress", "outcome", "release", "decision", "hello", "empty"]
        )
    )
    if kind == "heartbeat":
        held = draw(st.lists(refs, max_size=2000))
        hb = wpb.Heartbeat(held_jobs=[wpb.HeldJob(job_id=j, lease_epoch=e) for j, e in held])
        return {"heartbeat": hb}
    if kind == "accept":
        accepted = draw(st.booleans())
        return {"accept": wpb.Accept(job_id=job_id, lease_epoch=epoch, accepted=accepted, reason=draw(texts))}
    if kind == "progress":
        return {"progress": wpb.Progress(job_id=job_id, lease_epoch=epoch, message=draw(texts))}
    if kind == "outcome":
        status, result = draw(statuses), draw(results())
        return {"outcome": wpb.Outcome(job_id=job_id, lease_epoch=epoch, status=status, result=result)}
    if kind == "release":
        return {"release": wpb.Release(job_id=job_id, lease_epoch=epoch, reason=draw(texts))}
    if kind == "decision":
        options = draw(st.lists(short, max_size=200))
        request = wpb.DecisionRequest(job_id=job_id, lease_epoch=epoch, prompt=draw(texts), options=options)
        return {"decision_request": request}
    if kind == "hello":
        return {"hello": wpb.Hello(worker_name=draw(texts), capabilities=draw(st.lists(short, max_size=300)))}
    return {}


# -- the fuzzed session ----------------------------------------------------------------------------


@dataclass
class Fuzzed:
    plane: ControlPlane
    address: str
    raw: RawWorker
    jobs: JobsClient
    real: str
    token: str


@pytest.fixture
async def fuzzed(tmp_path: Path) -> AsyncIterator[Fuzzed]:
    """One control plane and one established session holding one real job at epoch 1."""
    # A long grace: the liveness check must not end a session that only sends fuzz.
    quiet = settings_for(tmp_path, reconnect_grace=timedelta(seconds=60), lease_ttl=timedelta(seconds=120))
    async with running_plane(quiet) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        raw = RawWorker(cp.address, cp.worker)
        await raw.hello("fuzzed")
        job = await jobs.submit("noop")
        assignment = (await raw.read("assignment")).assignment
        assert (assignment.job.id, assignment.lease_epoch) == (job.id, 1)
        await raw.send(accept=wpb.Accept(job_id=job.id, lease_epoch=1, accepted=True))
        try:
            yield Fuzzed(cp.plane, cp.address, raw, jobs, job.id, cp.worker)
        finally:
            await raw.close()
            await jobs.close()
        assert await is_serving(cp.address), "the control plane stopped serving"


def _resolve(fuzzed: Fuzzed, request: wpb.ConnectRequest) -> wpb.ConnectRequest:
    """Swap the REAL placeholder for the held job's id."""
    kind = request.WhichOneof("frame")
    if kind is not None and hasattr(getattr(request, kind), "job_id"):
        msg = getattr(request, kind)
        if msg.job_id == REAL:
            msg.job_id = fuzzed.real
    if kind == "heartbeat":
        for held in request.heartbeat.held_jobs:
            held.job_id = fuzzed.real if held.job_id == REAL else held.job_id
    return request


async def _answer(raw: RawWorker, request: wpb.ConnectRequest) -> None:
    """Send one frame and check its answer: an ack for a heartbeat, a proper rejection otherwise."""
    await raw.call.write(request)
    if request.WhichOneof("frame") == "heartbeat":
        await raw.read("heartbeat_ack", timeout=20)
        return
    rejected = (await raw.read("rejected", timeout=20)).rejected
    assert rejected.code in ALLOWED_FRAME_CODES, rejected


@FUZZ
@given(batch=st.lists(frames(), min_size=1, max_size=4))
async def test_wrong_connect_frames_are_rejected_and_change_nothing(
    fuzzed: Fuzzed, batch: list[dict[str, Any]]
) -> None:
    before = await dump(fuzzed.plane)
    for frame in batch:
        await _answer(fuzzed.raw, _resolve(fuzzed, wpb.ConnectRequest(**frame)))
    assert await dump(fuzzed.plane) == before


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid frame's bytes with a few bytes overwritten, kept only if it still parses."""
    data = bytearray(wpb.ConnectRequest(**draw(frames())).SerializeToString())
    for _ in range(draw(st.integers(0, 4)) if data else 0):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@FUZZ
@given(raw_bytes=mutated_frames())
async def test_mutated_frame_bytes_are_answered_properly(fuzzed: Fuzzed, raw_bytes: bytes) -> None:
    try:
        request = wpb.ConnectRequest.FromString(raw_bytes)
    except Exception:  # an undecodable frame ends the stream; covered separately
        return
    if request.WhichOneof("frame") == "draining":
        return  # valid: it changes the worker's state on purpose
    before = await dump(fuzzed.plane)
    await _answer(fuzzed.raw, _resolve(fuzzed, request))
    assert await dump(fuzzed.plane) == before


# -- JobService ------------------------------------------------------------------------------------


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[tuple[ControlPlane, JobsClient, list[str]]]:
    """A control plane with no worker and a few real jobs to aim at."""
    async with running_plane(settings_for(tmp_path)) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        ids = [(await jobs.submit("noop")).id for _ in range(3)]
        try:
            yield cp.plane, jobs, ids
        finally:
            await jobs.close()
        assert await is_serving(cp.address), "the control plane stopped serving"


payloads = st.one_of(
    texts, st.dictionaries(short, st.one_of(short, int64, st.booleans()), max_size=20).map(json.dumps)
)
submits = st.builds(
    jpb.SubmitJobRequest,
    type=st.one_of(st.sampled_from(["noop", "install_ias"]), texts),
    repo_id=texts,
    payload_json=payloads,
    priority=int32,
    max_attempts=int32,
    idempotency_key=texts,
    run_id=texts,
)
gets = st.builds(jpb.GetJobRequest, job_id=job_ids)
lists = st.builds(jpb.ListJobsRequest, status=statuses, type=texts, limit=int32, before_id=job_ids)
cancels = st.builds(jpb.CancelJobRequest, job_id=job_ids, reason=texts)
METHODS = {
    jpb.SubmitJobRequest: "SubmitJob",
    jpb.GetJobRequest: "GetJob",
    jpb.ListJobsRequest: "ListJobs",
    jpb.CancelJobRequest: "CancelJob",
}


async def _call(jobs: JobsClient, request: Any) -> Code:
    try:
        await getattr(jobs.stub, METHODS[type(request)])(request, metadata=jobs.md, timeout=20)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return Code.OK


@FUZZ
@given(request=st.one_of(submits, gets, lists, cancels), pick=st.integers(0, 2))
async def test_random_job_requests_get_a_proper_status(
    plane: tuple[ControlPlane, JobsClient, list[str]], request: Any, pick: int
) -> None:
    db, jobs, ids = plane
    if getattr(request, "job_id", None) == REAL:
        request.job_id = ids[pick]
    if getattr(request, "before_id", None) == REAL:
        request.before_id = ids[pick]
    before = await dump(db)
    code = await _call(jobs, request)
    assert code in ALLOWED, (code, request)
    if code is not Code.OK:
        assert await dump(db) == before


def _generic(jobs: JobsClient, method: str) -> Any:
    return jobs.channel.unary_unary(
        f"/ias.v1.JobService/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )


@FUZZ
@given(method=st.sampled_from(sorted(METHODS.values())), raw_bytes=st.binary(max_size=300))
async def test_random_request_bytes_that_decode_get_a_proper_status(
    plane: tuple[ControlPlane, JobsClient, list[str]], method: str, raw_bytes: bytes
) -> None:
    db, jobs, _ = plane
    kind = next(k for k, v in METHODS.items() if v == method)
    try:
        kind.FromString(raw_bytes)
    except Exception:  # undecodable bytes: test_undecodable_request_bytes_get_invalid_argument
        return
    before = await dump(db)
    try:
        await _generic(jobs, method)(raw_bytes, metadata=jobs.md, timeout=20)
    except grpc.aio.AioRpcError as err:
        assert err.code() in ALLOWED, err
        assert await dump(db) == before


async def test_undecodable_request_bytes_get_invalid_argument(
    plane: tuple[ControlPlane, JobsClient, list[str]],
) -> None:
    _, jobs, _ = plane
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _generic(jobs, "GetJob")(b"\xff\xff\xff", metadata=jobs.md, timeout=20)
    assert err.value.code() == Code.INVALID_ARGUMENT, err.value


async def test_undecodable_connect_frame_ends_the_session_but_not_the_server(fuzzed: Fuzzed) -> None:
    # The generic channel API bypasses the stub's serializer.
    generic = fuzzed.raw.channel.stream_stream(
        "/ias.v1.WorkerService/Connect",
        request_serializer=lambda b: b,
        response_deserializer=wpb.ConnectResponse.FromString,
    )(metadata=bearer(fuzzed.token))
    hello = wpb.ConnectRequest(hello=wpb.Hello(worker_name="garbled", capabilities=["noop"], slots=1))
    await generic.write(hello.SerializeToString())
    assert (await generic.read()).WhichOneof("frame") == "welcome"
    await generic.write(b"\xff\xff\xff")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generic.read()
    assert err.value.code() == Code.INVALID_ARGUMENT, err.value
    assert await is_serving(fuzzed.address)


@pytest.mark.parametrize("kind", ["outcome", "release"])
async def test_a_rejected_stale_frame_leaves_the_held_lease_alone(fuzzed: Fuzzed, kind: str) -> None:
    stale = {"job_id": fuzzed.real, "lease_epoch": 7}
    frame = (
        wpb.Outcome(status=job_pb2.JOB_STATUS_DONE, **stale) if kind == "outcome" else wpb.Release(**stale)
    )
    await fuzzed.raw.send(**{kind: frame})
    assert (await fuzzed.raw.read("rejected")).rejected.code == Code.FAILED_PRECONDITION.value[0]
    await fuzzed.raw.send(heartbeat=wpb.Heartbeat(held_jobs=[wpb.HeldJob(job_id=fuzzed.real, lease_epoch=1)]))
    answer = await fuzzed.raw.read()
    while answer.WhichOneof("frame") not in ("heartbeat_ack", "lease_revoked"):
        answer = await fuzzed.raw.read()
    # Expected: the epoch-1 lease is still held and renewed; observed: revoked as "not_held".
    assert answer.WhichOneof("frame") == "heartbeat_ack", answer
    assert [s.job_id for s in answer.heartbeat_ack.leases] == [fuzzed.real]
