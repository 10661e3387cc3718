"""kill -9 of a real worker process at random points across a batch of jobs: none lost, none doubled."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from pathlib import Path

import pytest
from chaos_support import JobsClient, assert_gap_free, event_log, finished_per_job
from ias.v1 import console_service_pb2 as cpb
from ias.v1 import console_service_pb2_grpc as cpb_grpc
from ias.v1 import event_pb2, job_pb2
from ias.v1 import job_service_pb2 as jpb
from processes import Server, Worker

pytestmark = pytest.mark.slow

JOBS = 50
KILLS = 4
DONE = job_pb2.JOB_STATUS_DONE
TERMINAL = {
    job_pb2.JOB_STATUS_DONE,
    job_pb2.JOB_STATUS_FAILED,
    job_pb2.JOB_STATUS_BLOCKED,
    job_pb2.JOB_STATUS_CANCELLED,
}


async def _listed(jobs: JobsClient) -> list[job_pb2.Job]:
    reply = await jobs.stub.ListJobs(jpb.ListJobsRequest(limit=1000), metadata=jobs.md)
    return list(reply.jobs)


async def _all_terminal(jobs: JobsClient) -> bool:
    listed = await _listed(jobs)
    return len(listed) == JOBS and all(j.status in TERMINAL for j in listed)


async def _victim_busy(jobs: JobsClient) -> bool:
    console = cpb_grpc.ConsoleServiceStub(jobs.channel)
    reply = await console.ListWorkers(cpb.ListWorkersRequest(), metadata=jobs.md)
    return any(w.name == "victim" and w.running > 0 for w in reply.workers)


async def _kill_when_busy(victim: Worker, jobs: JobsClient, rng: random.Random) -> bool:
    """kill -9 at a random moment after the victim took a job; False if the batch ended first."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not await _all_terminal(jobs):
        if await _victim_busy(jobs):
            # A random point inside or just after the job: running, reporting, or awaiting the ack.
            await asyncio.sleep(rng.uniform(0, 0.5))
            victim.kill()
            return True
        await asyncio.sleep(0.05)
    return False


async def _wait_all_terminal(jobs: JobsClient, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await _all_terminal(jobs):
            return
        await asyncio.sleep(0.2)
    statuses = [job_pb2.JobStatus.Name(j.status) for j in await _listed(jobs)]
    raise AssertionError(f"not all terminal after {timeout} s: {statuses}")


async def test_kill_9_at_random_points_loses_and_doubles_nothing(tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    server = Server(tmp_path, grace_s=1.0, ttl_s=30).start()
    admin, worker_token = server.token("admin"), server.token("worker")
    victim_home = tmp_path / "victim-home"
    victim_home.mkdir()
    start = {"address": server.address, "token": worker_token, "name": "victim", "home": victim_home}
    steady = [Worker(server.address, worker_token, f"steady-{i}") for i in (1, 2)]
    victim = Worker(**start)  # type: ignore[arg-type]
    jobs = JobsClient(server.address, admin)
    try:
        for _ in range(JOBS):
            # Kills may hit one job repeatedly (its requeue can go straight back to the victim).
            payload = json.dumps({"seconds": round(rng.uniform(0.05, 0.6), 2)})
            await jobs.submit("noop", payload, max_attempts=KILLS + 1)
        landed = 0
        for _ in range(KILLS):
            landed += await _kill_when_busy(victim, jobs, rng)
            victim.kill()
            victim = Worker(**start)  # type: ignore[arg-type]  # same name and home: the journal replays
        await _wait_all_terminal(jobs, timeout=40)
        listed = await _listed(jobs)
        not_done = [(j.id, j.attempt, j.result.error_message) for j in listed if j.status != DONE]
        assert not_done == [], f"seed {seed}"
        events = await event_log(server.address, admin)
        assert finished_per_job(events) == {j.id: 1 for j in listed}, f"seed {seed}"
        assert_gap_free(events)
        requeued = sum(e.kind == event_pb2.EVENT_KIND_JOB_REQUEUED for e in events)
        print(f"seed {seed}: {landed} kill(s) on a busy victim, {requeued} requeue(s)")
        assert landed >= 1, f"no kill hit the victim mid-batch (seed {seed})"
    finally:
        await jobs.close()
        for worker in [*steady, victim]:
            worker.kill()
        server.stop()
