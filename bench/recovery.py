"""Recovery: a control-plane restart under many connected workers, and a worker killed with SIGKILL
while it holds a job."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
from ias.v1 import console_service_pb2 as cpb
from ias.v1 import console_service_pb2_grpc as cpb_grpc
from ias.v1 import job_pb2
from ias.v1 import job_service_pb2 as jpb
from ias.v1 import job_service_pb2_grpc as jpb_grpc

from bench.idle import idle_fleet
from bench.scenarios import RPC_TIMEOUT_S, ScenarioFailed, ThroughputParams, flood, settle
from bench.server import RunningServer
from bench.simworker import Tally, fleet
from bench.stats import Judged
from worker.client import bearer, open_channel

log = logging.getLogger(__name__)

BACK_TIMEOUT_S: Final = 120.0
POLL_S: Final = 0.05
RUNNING_TIMEOUT_S: Final = 30.0
RESCUE_TIMEOUT_S: Final = 90.0
OFFLINE_POLL_S: Final = 0.01
VICTIM_JOB_S: Final = 600  # far longer than the run: the job must be taken over, not finish
SUBMITTERS: Final = 8


@dataclass(frozen=True, slots=True)
class RecoveryParams:
    workers: int


@dataclass(frozen=True, slots=True)
class RecoveryResult:
    workers: int
    ready_s: float  # SIGTERM sent → the new process serves
    all_back_s: float  # SIGTERM sent → every worker welcomed again
    jobs_done_s: float  # SIGTERM sent → one job per worker submitted after that, all acknowledged
    offline_s: float  # SIGKILL of the worker holding a job → ListWorkers shows it offline
    rescue_s: float  # SIGKILL of the worker holding a job → the job assigned to another worker

    def rows(self) -> dict[str, str | Judged]:
        n = self.workers
        return {
            f"restart under {n} workers: server serving again (s)": f"{self.ready_s:.1f}",
            f"restart under {n} workers: all workers back (s)": Judged(
                f"{self.all_back_s:.1f}", "≤ 5", self.all_back_s <= 5
            ),
            f"restart under {n} workers: then {n} jobs done (s)": f"{self.jobs_done_s:.1f}",
            "kill -9 of a worker holding a job: worker shown offline (s)": Judged(
                f"{self.offline_s:.2f}", "≤ 1", self.offline_s <= 1
            ),
            "kill -9 of a worker holding a job: job runs elsewhere (s)": f"{self.rescue_s:.1f}",
        }


async def run_recovery(server: RunningServer, params: RecoveryParams) -> RecoveryResult:
    ready_s, back_s, done_s = await _restart_under_fleet(server, params.workers)
    offline_s, rescue_s = await _kill_holder(server)
    return RecoveryResult(params.workers, ready_s, back_s, done_s, offline_s, rescue_s)


async def _restart_under_fleet(server: RunningServer, workers: int) -> tuple[float, float, float]:
    tally = Tally()
    async with idle_fleet(server, workers, tally, prefix="rec", reconnect=True):
        began = time.time()
        await server.restart()
        ready = time.time() - began
        back = await _all_back(tally, workers, since=began) - began
        channel = open_channel(server.address)
        try:
            stub = jpb_grpc.JobServiceStub(channel)
            ids = await flood(stub, server.admin_token, ThroughputParams(workers, workers, SUBMITTERS))
            await settle(tally, ids, what="after restart")
        finally:
            await channel.close(grace=None)
        done = time.time() - began
    if tally.problems:
        raise ScenarioFailed(f"restart: {len(tally.problems)} protocol problem(s): {tally.problems[0]}")
    return ready, back, done


async def _all_back(tally: Tally, workers: int, *, since: float) -> float:
    """The time the last worker was welcomed again after ``since``."""
    for _ in range(int(BACK_TIMEOUT_S / POLL_S)):
        back = {name: at for name, at in tally.welcomes if at >= since}
        if len(back) >= workers:
            return max(back.values())
        await asyncio.sleep(POLL_S)
    raise ScenarioFailed(f"restart: not all {workers} workers came back within {BACK_TIMEOUT_S:.0f} s")


async def _kill_holder(server: RunningServer) -> tuple[float, float]:
    """A real `ias worker start` takes a long job; SIGKILL it; time until the control plane shows
    it offline, and until a simulated worker gets its job."""
    channel = open_channel(server.address)
    try:
        stub = jpb_grpc.JobServiceStub(channel)
        async with _real_worker(server) as victim:
            reply = await stub.SubmitJob(
                jpb.SubmitJobRequest(type="noop", payload_json=f'{{"seconds": {VICTIM_JOB_S}}}'),
                metadata=bearer(server.admin_token),
                timeout=RPC_TIMEOUT_S,
            )
            job_id = reply.job.id
            await _wait_running(stub, server.admin_token, job_id)
            tally = Tally()
            async with fleet(
                target=server.address, token=server.worker_token, prefix="rescue", size=1, tally=tally
            ):
                killed = time.time()
                os.kill(victim.pid, signal.SIGKILL)
                offline = await _offline(channel, server.admin_token, "victim") - killed
                # The job comes back after the reconnect grace (15 s); a loaded machine may take longer.
                if await tally.wait_acked([job_id], RESCUE_TIMEOUT_S):
                    raise ScenarioFailed(
                        f"kill -9 rescue: job {job_id} not done elsewhere after {RESCUE_TIMEOUT_S:.0f} s; "
                        f"the control plane logged:\n{_log_about(server.log_path, job_id, 'victim')}"
                    )
                return offline, tally.received_at[job_id] - killed
    finally:
        await channel.close(grace=None)


async def _offline(channel: grpc.aio.Channel, token: str, name: str) -> float:
    """The time ``name`` was first seen offline in ListWorkers, polled every 10 ms."""
    stub = cpb_grpc.ConsoleServiceStub(channel)
    request = cpb.ListWorkersRequest(include_offline=True)
    for _ in range(int(RESCUE_TIMEOUT_S / OFFLINE_POLL_S)):
        reply = await stub.ListWorkers(request, metadata=bearer(token), timeout=RPC_TIMEOUT_S)
        if any(w.name == name and w.status == job_pb2.WORKER_STATUS_OFFLINE for w in reply.workers):
            return time.time()
        await asyncio.sleep(OFFLINE_POLL_S)
    raise ScenarioFailed(f"kill -9: worker {name} not shown offline within {RESCUE_TIMEOUT_S:.0f} s")


def _log_about(path: Path, *needles: str) -> str:
    """The server log's lines that mention any of ``needles`` (the last 20)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join([line for line in lines if any(n in line for n in needles)][-20:])


async def _wait_running(stub: jpb_grpc.JobServiceAsyncStub, token: str, job_id: str) -> None:
    for _ in range(int(RUNNING_TIMEOUT_S / POLL_S)):
        reply = await stub.GetJob(
            jpb.GetJobRequest(job_id=job_id), metadata=bearer(token), timeout=RPC_TIMEOUT_S
        )
        if reply.job.status == job_pb2.JOB_STATUS_RUNNING:
            return
        await asyncio.sleep(POLL_S)
    raise ScenarioFailed(
        f"kill -9: the real worker did not start job {job_id} within {RUNNING_TIMEOUT_S:.0f} s"
    )


@contextlib.asynccontextmanager
async def _real_worker(server: RunningServer) -> AsyncIterator[asyncio.subprocess.Process]:
    home = server.data_dir / "victim-home"
    home.mkdir(exist_ok=True)
    args = [sys.executable, "-m", "worker", "worker", "start", "--control-plane", server.address]
    env = {**os.environ, "IAS_HOME": str(home), "IAS_TOKEN": server.worker_token, "IAS_WORKER_NAME": "victim"}
    with (server.data_dir / "victim.log").open("wb") as out:
        proc = await asyncio.create_subprocess_exec(*args, env=env, stdout=out, stderr=out)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
