"""Network faults between worker and control plane: dropped, black-holed and slow links; skewed clocks."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path

import pytest
from chaos_support import (
    JobsClient,
    RawWorker,
    event_log,
    finished_per_job,
    running_daemon,
    running_plane,
    settings_for,
)
from conftest import eventually
from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import Descriptor
from ias.v1 import event_pb2, job_pb2
from ias.v1 import worker_service_pb2 as wpb
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow

DONE = job_pb2.JOB_STATUS_DONE


def _settings(tmp_path: Path, grace_s: float = 2.0, ttl_s: float = 30.0):  # type: ignore[no-untyped-def]
    return settings_for(
        tmp_path, reconnect_grace=timedelta(seconds=grace_s), lease_ttl=timedelta(seconds=ttl_s)
    )


async def _status_is(jobs: JobsClient, job_id: str, status: int) -> bool:
    return bool((await jobs.get(job_id)).status == status)


def _requeues(events: list) -> list:
    return [e for e in events if e.kind == event_pb2.EVENT_KIND_JOB_REQUEUED]


async def test_a_dropped_connection_mid_job_is_adopted_and_finishes_once(tmp_path: Path) -> None:
    async with running_plane(_settings(tmp_path)) as cp:
        proxy = await TcpProxy(cp.address).start()
        jobs = JobsClient(cp.address, cp.admin)
        try:
            async with running_daemon(proxy.address, cp.worker, name="dropped") as daemon:
                job = await jobs.submit("noop", '{"seconds": 3}')
                await eventually(lambda: daemon.running_jobs == [job.id], timeout=15, what="job running")
                first_session = daemon.session_id
                proxy.drop()
                await eventually(
                    lambda: daemon.session_id not in ("", first_session), timeout=15, what="a new session"
                )
                await eventually(lambda: _status_is(jobs, job.id, DONE), timeout=20, what="job done")
            final = await jobs.get(job.id)
            assert (final.attempt, final.lease_epoch) == (1, 1), "the reconnected session adopted the job"
            assert proxy.accepted >= 2
            events = await event_log(cp.address, cp.admin)
            assert finished_per_job(events) == {job.id: 1}
            assert _requeues(events) == []
        finally:
            await jobs.close()
            await proxy.close()


async def test_a_black_holed_worker_fences_itself_and_the_job_runs_elsewhere_once(tmp_path: Path) -> None:
    async with running_plane(_settings(tmp_path, grace_s=2.0)) as cp:
        proxy = await TcpProxy(cp.address).start()
        jobs = JobsClient(cp.address, cp.admin)
        try:
            async with running_daemon(proxy.address, cp.worker, name="silent") as silent:
                job = await jobs.submit("noop", '{"seconds": 5}')
                await eventually(lambda: silent.running_jobs == [job.id], timeout=15, what="job running")
                cut_session = silent.session_id
                proxy.blackhole()
                cut = time.monotonic()
                await eventually(lambda: not silent.running_jobs, timeout=10, what="self-fence")
                fenced_after = time.monotonic() - cut
                # The server's grace has not run out yet: the job is still the first attempt.
                assert (await jobs.get(job.id)).attempt == 1, (
                    f"requeued before the fence ({fenced_after:.1f} s)"
                )
                async with running_daemon(cp.address, cp.worker, name="rescuer") as rescuer:
                    await eventually(lambda: _status_is(jobs, job.id, DONE), timeout=30, what="job done")
                    proxy.heal()  # a late frame of the silent worker may now arrive
                    await eventually(
                        lambda: silent.session_id != cut_session, timeout=20, what="silent reconnected"
                    )
                    final = await jobs.get(job.id)
                    assert (final.attempt, final.lease_epoch, final.worker_id) == (2, 2, rescuer.worker_id)
            events = await event_log(cp.address, cp.admin)
            assert finished_per_job(events) == {job.id: 1}
            assert len(_requeues(events)) == 1
        finally:
            await jobs.close()
            await proxy.close()


async def test_added_latency_slows_jobs_but_causes_no_requeue(tmp_path: Path) -> None:
    async with running_plane(_settings(tmp_path)) as cp:
        proxy = await TcpProxy(cp.address).start()
        proxy.latency(0.2)
        jobs = JobsClient(cp.address, cp.admin)
        try:
            async with running_daemon(proxy.address, cp.worker, name="slow", slots=2) as daemon:
                ids = [(await jobs.submit("noop", '{"seconds": 0.5}')).id for _ in range(6)]

                async def all_done() -> bool:
                    return all([await _status_is(jobs, i, DONE) for i in ids])

                await eventually(all_done, timeout=40, what="every job done")
                assert daemon.completed == len(ids)
            for job_id in ids:
                assert (await jobs.get(job_id)).attempt == 1
            events = await event_log(cp.address, cp.admin)
            assert finished_per_job(events) == dict.fromkeys(ids, 1)
            assert _requeues(events) == []
        finally:
            await jobs.close()
            await proxy.close()


def _timestamp_paths(message: Descriptor, prefix: str = "", depth: int = 0) -> list[str]:
    """Every field path under ``message`` that carries a wall-clock Timestamp."""
    found = []
    for fld in message.fields:
        if fld.message_type is None or depth > 6:
            continue
        path = f"{prefix}{fld.name}"
        if fld.message_type.full_name == timestamp_pb2.Timestamp.DESCRIPTOR.full_name:
            found.append(path)
        else:
            found += _timestamp_paths(fld.message_type, path + ".", depth + 1)
    return found


def test_a_worker_never_sends_the_server_a_wall_clock_time() -> None:
    assert _timestamp_paths(wpb.ConnectRequest.DESCRIPTOR) == []


async def test_lease_standings_are_durations_on_the_server_s_clock(tmp_path: Path) -> None:
    ttl = 30.0
    async with running_plane(_settings(tmp_path, grace_s=5.0, ttl_s=ttl)) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        raw = RawWorker(cp.address, cp.worker)
        try:
            await raw.hello("clockless")
            job = await jobs.submit("noop")
            assignment = (await raw.read("assignment")).assignment
            assert assignment.lease_ttl.ToTimedelta() == timedelta(seconds=ttl)
            epoch = assignment.lease_epoch
            await raw.send(accept=wpb.Accept(job_id=job.id, lease_epoch=epoch, accepted=True))
            for _ in range(3):
                await raw.send(
                    heartbeat=wpb.Heartbeat(held_jobs=[wpb.HeldJob(job_id=job.id, lease_epoch=epoch)])
                )
                ack = (await raw.read("heartbeat_ack")).heartbeat_ack
                [standing] = ack.leases
                remaining = standing.remaining.ToTimedelta().total_seconds()
                assert (standing.job_id, standing.lease_epoch) == (job.id, epoch)
                # Whatever the worker's clock says, the standing is "this long from now".
                assert ttl - 10 < remaining <= ttl, remaining
        finally:
            await raw.close()
            await jobs.close()


async def test_an_idle_worker_sends_no_heartbeats_and_keeps_its_session(tmp_path: Path) -> None:
    async with running_plane(_settings(tmp_path, grace_s=1.5)) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        try:
            async with running_daemon(cp.address, cp.worker, name="idle") as idle:
                await eventually(lambda: idle.session_id != "", timeout=10, what="connected")
                [session] = list(cp.plane.sessions)
                heard = session.last_heard
                # Six heartbeat intervals (0.5 s each): an idle worker says nothing, and is not
                # taken for silent, since it holds nothing.
                await asyncio.sleep(3.0)
                assert session.last_heard == heard and not session.closed
                job = await jobs.submit("noop", '{"seconds": 2}')
                await eventually(lambda: _status_is(jobs, job.id, DONE), timeout=15, what="job done")
                assert session.last_heard > heard, "a worker running a job heartbeats"
                assert idle.session_id == session.id and (await jobs.get(job.id)).attempt == 1
        finally:
            await jobs.close()


async def test_a_black_holed_idle_worker_is_taken_offline_by_keepalive(tmp_path: Path) -> None:
    # Grace 1.5 s: heartbeat interval 0.5 s, so the server pings every 1 s (its floor) and gives
    # up after 1 s more without an answer.
    async with running_plane(_settings(tmp_path, grace_s=1.5)) as cp:
        proxy = await TcpProxy(cp.address).start()
        jobs = JobsClient(cp.address, cp.admin)
        try:
            async with running_daemon(proxy.address, cp.worker, name="idle"):
                await eventually(lambda: len(list(cp.plane.sessions)) == 1, timeout=10, what="connected")
                proxy.blackhole()
                cut = time.monotonic()
                await eventually(lambda: not list(cp.plane.sessions), timeout=15, what="session ended")
                assert time.monotonic() - cut < 10
                proxy.heal()
        finally:
            await jobs.close()
            await proxy.close()
