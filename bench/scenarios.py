"""The two measured scenarios: dispatch latency at a steady rate, and full-lifecycle throughput."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Final

from ias.v1 import job_pb2
from ias.v1 import job_service_pb2 as jpb
from ias.v1 import job_service_pb2_grpc as jpb_grpc

from bench import postgres
from bench.server import RunningServer
from bench.simworker import Tally, fleet
from bench.stats import CpuMeter, CpuUsage, Summary, summarise
from worker.client import bearer, open_channel
from worker.submitter import submitter

log = logging.getLogger(__name__)

RPC_TIMEOUT_S: Final = 10.0
DRAIN_TIMEOUT_S: Final = 30.0  # after the last submission, for the last assignments and acks
LIST_PAGE: Final = 1000


class ScenarioFailed(Exception):
    """A scenario did not complete, or its jobs did not end as expected."""


@dataclass(frozen=True, slots=True)
class LatencyParams:
    jobs: int
    rate: float
    workers: int
    warmup: int


@dataclass(frozen=True, slots=True)
class LatencyResult:
    dispatch_ms: Summary  # the lease committed (the assignment's committed_at) → the worker read it
    from_created_ms: Summary  # created_at (before the submit's insert) → the worker read it
    to_claim_ms: Summary  # created_at → the claim transaction began (the assignment's updated_at)
    claim_to_commit_ms: Summary  # the claim transaction began → it committed
    submit_rtt_ms: Summary
    cpu: CpuUsage
    db_writes_per_job: float | None


@dataclass(frozen=True, slots=True)
class ThroughputParams:
    jobs: int
    workers: int
    submitters: int


@dataclass(frozen=True, slots=True)
class ThroughputResult:
    jobs_per_s: float
    elapsed_s: float
    verified: int
    jobs: int
    cpu: CpuUsage
    db_writes_per_job: float | None


async def run_latency(server: RunningServer, params: LatencyParams) -> LatencyResult:
    """Submit jobs one at a time at ``params.rate``; time committed → assignment received, and
    from the job's creation (before its insert and commit), as the peers are timed."""
    tally = Tally()
    channel = open_channel(server.address)
    try:
        stub = jpb_grpc.JobServiceStub(channel)
        async with fleet(
            target=server.address, token=server.worker_token, prefix="lat", size=params.workers, tally=tally
        ):
            warm, _ = await paced(stub, server.admin_token, params.warmup, params.rate)
            await settle(tally, warm, what="warm-up")
            meter = CpuMeter(server.pid)
            xid = await next_xid(server)
            meter.start()
            ids, rtts = await paced(stub, server.admin_token, params.jobs, params.rate)
            await settle(tally, ids, what="latency")
            cpu = meter.stop()
            writes = await _writes_per_job(server, xid, len(ids))
    finally:
        await channel.close(grace=None)
    _require_clean(tally)
    created, claimed, committed = tally.created_at, tally.claimed_at, tally.committed_at
    received = tally.received_at
    return LatencyResult(
        dispatch_ms=summarise([(received[i] - committed[i]) * 1000 for i in ids]),
        from_created_ms=summarise([(received[i] - created[i]) * 1000 for i in ids]),
        to_claim_ms=summarise([(claimed[i] - created[i]) * 1000 for i in ids]),
        claim_to_commit_ms=summarise([(committed[i] - claimed[i]) * 1000 for i in ids]),
        submit_rtt_ms=summarise(rtts),
        cpu=cpu,
        db_writes_per_job=writes,
    )


async def next_xid(server: RunningServer) -> int | None:
    return await postgres.next_xid(server.db_url) if server.db_url else None


async def _writes_per_job(server: RunningServer, first_xid: int | None, jobs: int) -> float | None:
    """PostgreSQL transactions that wrote, per job, since ``first_xid`` (None on SQLite)."""
    last = await next_xid(server)
    return None if first_xid is None or last is None else (last - first_xid) / jobs


async def paced(
    stub: jpb_grpc.JobServiceAsyncStub, token: str, count: int, rate: float
) -> tuple[list[str], list[float]]:
    """Submit ``count`` jobs on a fixed schedule, open loop (a slow reply does not delay the next
    submission); returns ids and round trips (ms)."""
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def submit() -> tuple[str, float]:
        began = time.perf_counter()
        reply = await stub.SubmitJob(
            jpb.SubmitJobRequest(type="noop"), metadata=bearer(token), timeout=RPC_TIMEOUT_S
        )
        return reply.job.id, (time.perf_counter() - began) * 1000

    tasks = []
    for n in range(count):
        await asyncio.sleep(max(start + n / rate - loop.time(), 0.0))
        tasks.append(asyncio.create_task(submit()))
    done = await asyncio.gather(*tasks)
    return [i for i, _ in done], [rtt for _, rtt in done]


async def settle(tally: Tally, ids: list[str], *, what: str) -> None:
    """Wait until every job was assigned and its outcome acknowledged, so the fleet is idle."""
    missing = await tally.wait_acked(ids, DRAIN_TIMEOUT_S)
    if missing:
        raise ScenarioFailed(
            f"{what}: {len(missing)} of {len(ids)} jobs not finished after {DRAIN_TIMEOUT_S} s"
        )


def _require_clean(tally: Tally) -> None:
    if tally.problems:
        raise ScenarioFailed(f"{len(tally.problems)} protocol problem(s), first: {tally.problems[0]}")


async def run_throughput(server: RunningServer, params: ThroughputParams) -> ThroughputResult:
    """Submit ``params.jobs`` as fast as the submitters can; time first submit → last outcome ack."""
    tally = Tally()
    channel = open_channel(server.address)
    try:
        stub = jpb_grpc.JobServiceStub(channel)
        async with fleet(
            target=server.address, token=server.worker_token, prefix="tput", size=params.workers, tally=tally
        ):
            meter = CpuMeter(server.pid)
            xid = await next_xid(server)
            meter.start()
            began = time.perf_counter()
            ids = await flood(stub, server.admin_token, params)
            await settle(tally, ids, what="throughput")
            elapsed = time.perf_counter() - began
            cpu = meter.stop()
            writes = await _writes_per_job(server, xid, len(ids))
        verified = await _verify(stub, server.admin_token, ids, tally)
    finally:
        await channel.close(grace=None)
    return ThroughputResult(
        jobs_per_s=len(ids) / elapsed,
        elapsed_s=elapsed,
        verified=verified,
        jobs=len(ids),
        cpu=cpu,
        db_writes_per_job=writes,
    )


async def flood(stub: jpb_grpc.JobServiceAsyncStub, token: str, params: ThroughputParams) -> list[str]:
    """Several submitters share one counter and submit back to back."""
    todo = iter(range(params.jobs))
    ids: list[str] = []

    budget = RPC_TIMEOUT_S + params.jobs * 0.05  # generous: 20 jobs/s would be a disaster anyway
    async with asyncio.timeout(budget), submitter(stub, bearer(token)) as stream:

        async def submit_each() -> None:
            for _ in todo:
                ids.append((await stream.submit(jpb.SubmitJobRequest(type="noop"))).job.id)

        await asyncio.gather(*(submit_each() for _ in range(params.submitters)))
    return ids


async def _verify(stub: jpb_grpc.JobServiceAsyncStub, token: str, ids: list[str], tally: Tally) -> int:
    """Count jobs that are done, on their first lease, with exactly one non-duplicate outcome ack."""
    _require_clean(tally)
    if tally.duplicate_acks:
        raise ScenarioFailed(f"{tally.duplicate_acks} outcome(s) were acknowledged as duplicates")
    stored = await _list_all(stub, token, want=set(ids))
    bad = [
        i
        for i in ids
        if tally.acks[i] != 1
        or i not in stored
        or stored[i].status != job_pb2.JOB_STATUS_DONE
        or stored[i].lease_epoch != 1
    ]
    if bad or len(set(ids)) != len(ids):
        sample = bad[0] if bad else "duplicate id"
        raise ScenarioFailed(f"{len(bad)} of {len(ids)} jobs did not end done exactly once (e.g. {sample})")
    return len(ids)


async def _list_all(
    stub: jpb_grpc.JobServiceAsyncStub, token: str, *, want: set[str]
) -> dict[str, job_pb2.Job]:
    """Page through ListJobs (newest first) until every wanted job was seen."""
    found: dict[str, job_pb2.Job] = {}
    before = ""
    for _ in range(len(want) // LIST_PAGE + 100):
        reply = await stub.ListJobs(
            jpb.ListJobsRequest(limit=LIST_PAGE, before_id=before),
            metadata=bearer(token),
            timeout=RPC_TIMEOUT_S,
        )
        found.update((j.id, j) for j in reply.jobs if j.id in want)
        if not reply.jobs or len(found) == len(want):
            break
        before = reply.jobs[-1].id
    return found
