"""kill -9 of one of two replicas on one PostgreSQL: the survivor serves everything, nothing is
lost and nothing is done twice.

Two kinds of worker were connected to the killed replica. One knows only that replica: the survivor
takes the replica for dead after the grace, and that worker's jobs run again elsewhere. The other was
given both replicas as one gRPC target (as it would get them from one DNS name): it reconnects to the
survivor at once and keeps its jobs, which finish at their first attempt.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from chaos_support import JobsClient, assert_gap_free, event_log, finished_per_job
from conftest import eventually
from ias.v1 import console_service_pb2 as cpb
from ias.v1 import console_service_pb2_grpc as cpb_grpc
from ias.v1 import job_pb2
from soak_cluster import Daemon, Replica

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

GRACE_S = 3.0
JOB = '{"seconds": 4}'  # outlasts the kill, the reconnect and the grace
DONE, RUNNING = job_pb2.JOB_STATUS_DONE, job_pb2.JOB_STATUS_RUNNING


async def test_the_survivor_of_a_replica_killed_mid_job_serves_everything(
    tmp_path: Path, pg_url: str
) -> None:
    replicas = [Replica(tmp_path / f"replica-{i}", db=pg_url, grace_s=GRACE_S, ttl_s=60) for i in range(2)]
    daemons: list[Daemon] = []
    jobs: JobsClient | None = None
    try:
        for replica in replicas:
            replica.data_dir.mkdir()
            await asyncio.to_thread(replica.start)
        doomed, survivor = replicas
        assert doomed.server is not None
        admin = await asyncio.to_thread(doomed.server.token, "admin")
        token = await asyncio.to_thread(doomed.server.token, "worker")
        both = "ipv4:" + ",".join(r.address for r in replicas)  # the doomed replica first
        pinned = Daemon("pinned", tmp_path / "pinned", doomed, 1, token)
        failover = Daemon("failover", tmp_path / "failover", doomed, 2, token, target=both)
        spare = Daemon("spare", tmp_path / "spare", survivor, 2, token)
        for daemon in (pinned, failover):
            daemon.home.mkdir()
            daemon.start()
            daemons.append(daemon)
            await eventually(lambda d=daemon: "connected to" in d.log_text(), timeout=30, what="connected")
        jobs = JobsClient(survivor.address, admin)
        held = [(await jobs.submit("noop", JOB, max_attempts=3)).id for _ in range(3)]
        await eventually(lambda: _all(jobs, held, {RUNNING}), timeout=30, what="three jobs running")
        running_on = {(await jobs.get(i)).worker_id for i in held}
        assert len(running_on) == 2, "the jobs should be spread over both workers of the doomed replica"

        spare.home.mkdir()
        spare.start()
        daemons.append(spare)
        await eventually(lambda: "connected to" in spare.log_text(), timeout=30, what="spare connected")

        killed_at = time.monotonic()
        await asyncio.to_thread(doomed.kill)
        await eventually(
            lambda: failover.log_text().count("connected to") >= 2, timeout=30, what="failover reconnected"
        )
        reconnect_s = time.monotonic() - killed_at
        after = [(await jobs.submit("noop", '{"seconds": 0.1}')).id for _ in range(6)]
        await eventually(lambda: _all(jobs, held + after, {DONE}), timeout=90, what="every job done")
        done_s = time.monotonic() - killed_at

        finals = {i: await jobs.get(i) for i in held}
        by_worker = {w.name: w.id for w in await _workers(jobs)}
        for job in finals.values():
            if job.worker_id == by_worker["failover"] and job.attempt == 1:
                continue  # kept through the failover, finished at its first attempt
            assert job.attempt == 2, f"{job.id} attempt {job.attempt} on {job.worker_id}"
        kept = [j for j in finals.values() if j.attempt == 1]
        assert len(kept) == 2, f"the failover worker's two jobs should be kept: {finals}"

        events = await event_log(survivor.address, admin)
        assert_gap_free(events)
        finished = finished_per_job(events)
        assert all(finished[i] == 1 for i in held + after), finished
        print(f"failover worker back in {reconnect_s:.2f} s; every job done {done_s:.1f} s after the kill")
        for daemon in daemons:
            assert daemon.exited_by_itself() is None, daemon.log_text()[-2000:]
        assert survivor.exited_by_itself() is None, survivor.log_tail()
    finally:
        if jobs is not None:
            await jobs.close()
        for daemon in daemons:
            daemon.stop()
        for replica in replicas:
            replica.stop()


async def _all(jobs: JobsClient, ids: list[str], statuses: set[int]) -> bool:
    return all([(await jobs.get(i)).status in statuses for i in ids])


async def _workers(jobs: JobsClient) -> list[job_pb2.Worker]:
    console = cpb_grpc.ConsoleServiceStub(jobs.channel)
    reply = await console.ListWorkers(cpb.ListWorkersRequest(include_offline=True), metadata=jobs.md)
    return list(reply.workers)
