"""PostgreSQL faults under load: terminated connections and restarts of the database itself."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from chaos_support import JobsClient
from conftest import eventually
from ias.v1 import console_service_pb2 as cpb
from ias.v1 import console_service_pb2_grpc as cpb_grpc
from ias.v1 import job_pb2
from ias.v1 import job_service_pb2 as jpb
from pg_throwaway import ThrowawayPostgres, available
from soak import Fault, Soak, SoakConfig, run_soak
from soak_audit import SoakReport, job_statuses, summary_table
from soak_cluster import Daemon, Replica
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection
from tcp_proxy import TcpProxy

from control_plane.store.db import Database

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

LOAD = {"jobs": 150, "repo_jobs": 0, "plain_workers": 3, "repo_workers": 0, "proxied": (), "minutes": 0.75}
RESTARTS = 3
TERMINATE = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()"
)
DONE, RUNNING = job_pb2.JOB_STATUS_DONE, job_pb2.JOB_STATUS_RUNNING


@pytest.fixture
def throwaway_pg() -> Iterator[ThrowawayPostgres]:
    """A started cluster of this test's own (never the shared one on 5432), removed afterwards."""
    if not available():
        message = "no PostgreSQL binaries under /usr/lib/postgresql for a throwaway cluster"
        if os.environ.get("IAS_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip("SKIPPED LOUDLY: " + message)
    pg = ThrowawayPostgres()
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        pg.remove()


def _check(report: SoakReport, kind: str) -> None:
    table = summary_table(report)
    print(table)
    assert report.faults[kind] >= 1, table
    assert report.problems() == [], table + "\nfaults:\n  " + "\n  ".join(report.timeline)


def _terminate_backends(url: str) -> Fault:
    database = url.rsplit("/", 1)[1]

    async def fault(_soak: Soak) -> str:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            terminated = await conn.fetch(TERMINATE, database)
        finally:
            await conn.close()
        return f"{len(terminated)} connection(s)"

    return fault


async def _probe(address: str, token: str) -> str:
    """The status code a replica answers a database read with."""
    jobs = JobsClient(address, token)
    try:
        await jobs.stub.ListJobs(jpb.ListJobsRequest(limit=1), metadata=jobs.md, timeout=15)
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return str(exc.code().name)
    finally:
        await jobs.close()


def _restart_database(pg: ThrowawayPostgres, answers: Counter[str]) -> Fault:
    async def fault(soak: Soak) -> str:
        # Down while jobs run, so that outcomes arrive during the outage.
        if answers.total() >= RESTARTS * len(soak.replicas) or not await _running(soak):
            return ""
        # The first outage outlasts the reconnect grace: no replica may take another for dead.
        outage_s = soak.cfg.grace_s + 1 if answers.total() == 0 else soak.rng.uniform(0.5, 3)
        down = time.monotonic()
        await asyncio.to_thread(pg.stop)
        try:
            for replica in soak.replicas:
                answers[await _probe(replica.address, soak.admin)] += 1
            await asyncio.sleep(max(outage_s - (time.monotonic() - down), 0))
        finally:
            await asyncio.to_thread(pg.start)
        return "postgres"

    return fault


async def _running(soak: Soak) -> bool:
    assert soak.db is not None
    return (await job_statuses(soak.db))["running"] > 0


async def _replicas(tmp_path: Path, url: str, count: int, grace_s: float) -> list[Replica]:
    replicas = []
    for i in range(count):
        replica = Replica(tmp_path / f"replica-{i}", db=url, grace_s=grace_s, ttl_s=60)
        replica.data_dir.mkdir()
        replicas.append(replica)
        await asyncio.to_thread(replica.start)
    return replicas


async def _tokens(replica: Replica) -> tuple[str, str]:
    assert replica.server is not None
    admin = await asyncio.to_thread(replica.server.token, "admin")
    return admin, await asyncio.to_thread(replica.server.token, "worker")


async def _status(jobs: JobsClient, job_id: str) -> int:
    return int((await jobs.get(job_id)).status)


async def test_terminated_connections_lose_and_double_nothing(tmp_path: Path, pg_url: str) -> None:
    cfg = SoakConfig(
        db="postgres", db_url=pg_url, seed=random.randrange(2**32), faults=("db_terminate",), **LOAD
    )  # type: ignore[arg-type]
    _check(await run_soak(cfg, tmp_path, {"db_terminate": _terminate_backends(pg_url)}), "db_terminate")


async def test_a_read_whose_pooled_connection_was_terminated_is_tried_once_more(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(url=pg_url)
    try:
        await db.migrate()

        async def one(conn: AsyncConnection) -> int:
            return int((await conn.execute(text("SELECT 1"))).scalar_one())

        assert await db.reading(one) == 1  # the pool now holds a connection
        await _terminate_backends(pg_url)(None)  # type: ignore[arg-type]
        with caplog.at_level(logging.INFO, logger="control_plane.store.db"):
            assert await db.reading(one) == 1
        assert "trying once more" in caplog.text, "the terminated connection was not the one used"
    finally:
        await db.close()


async def test_replicas_answer_unavailable_while_the_database_is_down_and_serve_after(
    tmp_path: Path, throwaway_pg: ThrowawayPostgres
) -> None:
    replicas = await _replicas(tmp_path, throwaway_pg.url, 2, grace_s=3)
    try:
        admin, _ = await _tokens(replicas[0])
        await asyncio.to_thread(throwaway_pg.stop)
        assert [await _probe(r.address, admin) for r in replicas] == ["UNAVAILABLE"] * 2
        await asyncio.to_thread(throwaway_pg.start)
        for replica in replicas:
            await eventually(lambda r=replica: _answers_ok(r, admin), timeout=30, what="serving again")
            assert replica.exited_by_itself() is None, replica.log_tail()
    finally:
        for replica in replicas:
            replica.stop()


async def _answers_ok(replica: Replica, admin: str) -> bool:
    return await _probe(replica.address, admin) == "OK"


async def test_an_outcome_refused_during_an_outage_is_recorded_once_the_database_is_back(
    tmp_path: Path, throwaway_pg: ThrowawayPostgres
) -> None:
    [replica] = await _replicas(tmp_path, throwaway_pg.url, 1, grace_s=15)
    admin, worker = await _tokens(replica)
    (tmp_path / "solo").mkdir()
    daemon = Daemon("solo", tmp_path / "solo", replica, 1, worker)
    daemon.start()
    jobs = JobsClient(replica.address, admin)
    try:
        job = await jobs.submit("noop", '{"seconds": 3}')
        await eventually(lambda: _is(jobs, job.id, RUNNING), timeout=30, what="job running")
        await asyncio.to_thread(throwaway_pg.stop)
        await eventually(
            lambda: "rejected a outcome frame" in daemon.log_text(), timeout=30, what="the outcome refused"
        )
        await asyncio.to_thread(throwaway_pg.start)
        assert daemon.log_text().count("connected to") == 1, "the session never broke"
        # Far longer than a heartbeat, a sweep and a lease renewal.
        await eventually(lambda: _is(jobs, job.id, DONE), timeout=30, what="the job recorded done")
    finally:
        await jobs.close()
        daemon.stop()
        replica.stop()


async def _is(jobs: JobsClient, job_id: str, status: int) -> bool:
    return await _status(jobs, job_id) == status


async def test_a_worker_of_a_replica_cut_off_from_the_database_runs_jobs_once_it_is_back(
    tmp_path: Path, pg_url: str
) -> None:
    grace_s = 2.0
    # Replica 0 reaches the database through a proxy, so only it can be cut off; replica 1 cannot.
    host_port, database = pg_url.removeprefix("postgresql://postgres@").split("/")
    proxy = await TcpProxy(host_port).start()
    replicas = [
        Replica(tmp_path / f"replica-{i}", db=url, grace_s=grace_s, ttl_s=60)
        for i, url in enumerate((f"postgresql://postgres@{proxy.address}/{database}", pg_url))
    ]
    daemon: Daemon | None = None
    jobs: JobsClient | None = None
    try:
        for replica in replicas:
            replica.data_dir.mkdir()
            await asyncio.to_thread(replica.start)
        admin, worker = await _tokens(replicas[1])
        (tmp_path / "steady").mkdir()
        daemon = Daemon("steady", tmp_path / "steady", replicas[0], 1, worker)
        daemon.start()
        jobs = JobsClient(replicas[1].address, admin)
        await eventually(lambda: "connected to" in daemon.log_text(), timeout=30, what="worker connected")
        proxy.blackhole()
        await asyncio.sleep(grace_s * 2 + 2)  # replica 1 rightly takes replica 0 for dead meanwhile
        proxy.heal()
        await asyncio.sleep(grace_s * 2 + 2)  # replica 0 proves itself alive again, both sweep
        assert daemon.exited_by_itself() is None and daemon.log_text().count("connected to") == 1
        # Each job outlasts a sweep interval, so a worker wrongly taken for lost has it requeued.
        ids = [(await jobs.submit("noop", '{"seconds": 1.5}', max_attempts=3)).id for _ in range(3)]
        await eventually(lambda: _all_terminal(jobs, ids), timeout=60, what="every job terminal")
        statuses = [job_pb2.JobStatus.Name(await _status(jobs, i)) for i in ids]
        assert statuses == ["JOB_STATUS_DONE"] * 3, f"{statuses}; {await _worker_status(jobs)}"
    finally:
        if jobs is not None:
            await jobs.close()
        if daemon is not None:
            daemon.stop()
        for replica in replicas:
            replica.stop()
        await proxy.close()


async def _all_terminal(jobs: JobsClient, ids: list[str]) -> bool:
    return all([await _status(jobs, i) not in (job_pb2.JOB_STATUS_PENDING, RUNNING) for i in ids])


async def _worker_status(jobs: JobsClient) -> str:
    console = cpb_grpc.ConsoleServiceStub(jobs.channel)
    reply = await console.ListWorkers(cpb.ListWorkersRequest(include_offline=True), metadata=jobs.md)
    return ", ".join(f"{w.name} {job_pb2.WorkerStatus.Name(w.status)}" for w in reply.workers)


async def test_a_database_restart_mid_run_loses_and_doubles_nothing(
    tmp_path: Path, throwaway_pg: ThrowawayPostgres
) -> None:
    answers: Counter[str] = Counter()
    # Two replicas: after an outage longer than the grace neither may take the other for dead.
    cfg = SoakConfig(
        db="postgres",
        db_url=throwaway_pg.url,
        seed=random.randrange(2**32),
        faults=("db_restart",),
        replica_count=2,
        **LOAD,  # type: ignore[arg-type]
    )
    report = await run_soak(cfg, tmp_path, {"db_restart": _restart_database(throwaway_pg, answers)})
    assert set(answers) == {"UNAVAILABLE"}, f"replicas answered {dict(answers)} while the database was down"
    _check(report, "db_restart")
    # Every worker stayed connected throughout: none may have been taken for lost.
    assert report.requeue_reasons["worker_lost"] == 0, summary_table(report)


async def test_a_slow_database_never_leaves_a_job_running_that_no_worker_runs(
    tmp_path: Path, pg_url: str
) -> None:
    """While one outcome waits seconds on the database, the worker's other job must keep its lease
    proven (heartbeats answered) or, if it stops the job, the control plane must learn of it."""
    grace_s = 2.0
    host_port, database = pg_url.removeprefix("postgresql://postgres@").split("/")
    proxy = await TcpProxy(host_port).start()
    replica = Replica(
        tmp_path / "replica",
        db=f"postgresql://postgres@{proxy.address}/{database}",
        grace_s=grace_s,
        ttl_s=60,
    )
    replica.data_dir.mkdir()
    daemon: Daemon | None = None
    jobs: JobsClient | None = None
    try:
        await asyncio.to_thread(replica.start)
        admin, worker = await _tokens(replica)
        (tmp_path / "two-slots").mkdir()
        daemon = Daemon("two-slots", tmp_path / "two-slots", replica, 2, worker)
        daemon.start()
        jobs = JobsClient(replica.address, admin)
        await eventually(lambda: "connected to" in daemon.log_text(), timeout=30, what="worker connected")
        short = await jobs.submit("noop", '{"seconds": 1}', max_attempts=3)
        long = await jobs.submit("noop", '{"seconds": 5}', max_attempts=3)
        await eventually(lambda: _is(jobs, long.id, RUNNING), timeout=30, what="both jobs running")
        # Every database round trip now takes longer than the worker may go without an answer.
        proxy.latency(grace_s * 1.5)
        await asyncio.sleep(grace_s * 3)
        proxy.heal()
        ids = [short.id, long.id]
        await eventually(lambda: _all_terminal(jobs, ids), timeout=45, what="both jobs terminal")
        statuses = [job_pb2.JobStatus.Name(await _status(jobs, i)) for i in ids]
        assert statuses == ["JOB_STATUS_DONE"] * 2, f"{statuses}; {await _worker_status(jobs)}"
        # Heartbeats were answered throughout: nothing stopped, nothing ran twice.
        assert [(await jobs.get(i)).attempt for i in ids] == [1, 1]
        log = daemon.log_text()
        assert "stopping job" not in log and log.count("connected to") == 1, log[-3000:]
    finally:
        if jobs is not None:
            await jobs.close()
        if daemon is not None:
            daemon.stop()
        replica.stop()
        await proxy.close()
