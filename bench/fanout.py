"""Console fan-out: many ``ConsoleService.Watch`` subscribers while no-op jobs produce events."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any, Final

from ias.v1 import job_service_pb2_grpc as jpb_grpc

from bench.scenarios import ScenarioFailed, paced, settle
from bench.server import RunningServer
from bench.simworker import Tally, fleet
from bench.stats import CpuMeter, Judged
from worker.client import open_channel

log = logging.getLogger(__name__)

EVENTS_PER_JOB: Final = 3  # submitted, assigned, finished
WORKERS: Final = 20
READY_TIMEOUT_S: Final = 60.0
RESULT_TIMEOUT_S: Final = 90.0  # the watchers may first have to catch up
QUIET_S: Final = 1.0  # after the last job, for its last events to reach every watcher


@dataclass(frozen=True, slots=True)
class FanoutParams:
    subscribers: int
    events_per_s: float
    seconds: float


@dataclass(frozen=True, slots=True)
class FanoutResult:
    params: FanoutParams
    measured: dict[str, Any]
    events_per_s: float
    server_cpu_pct: float

    def rows(self) -> dict[str, str | Judged]:
        m, n = self.measured, self.params.subscribers
        head = f"fan-out {n} watchers"
        return {
            f"{head}: events/s to each watcher": f"{self.events_per_s:.0f}",
            f"{head}: events per response (coalesced)": f"{m['events_per_response']:.1f}",
            f"{head}: commit → received p50 / p99 / max (ms)": Judged(
                _ms(m, "p50_ms", "p99_ms", "max_ms"),
                "p99 ≤ 25",
                m["p99_ms"] is not None and m["p99_ms"] <= 25,
            ),
            f"{head}: transaction's start → received p50 / p99 / max (ms)": _ms(
                m, "start_p50_ms", "start_p99_ms", "start_max_ms"
            ),
            f"{head}: events received without a commit time (read back from the log)": str(
                m["without_commit_time"]
            ),
            f"{head}: streams with a gap or duplicate / still behind": (
                f"{m['streams_with_faults']} / {m['streams_behind']}"
            ),
            f"{head}: last job done → every watcher has its events (s)": f"{m['catch_up_s'] + QUIET_S:.1f}",
            f"{head}: dropped stream resumed: gaps / duplicates": (
                f"{m['resumed_gaps']} / {m['resumed_duplicates']}" if m["resumed"] else "not resumed"
            ),
            f"{head}: CPU: server / watcher process (% of a core)": (
                f"{self.server_cpu_pct:.0f}% / {m['cpu_pct']:.0f}%"
            ),
        }


def _ms(m: dict[str, Any], *keys: str) -> str:
    return " / ".join("—" if m[k] is None else f"{m[k]:.2f}" for k in keys)


async def run_fanout(server: RunningServer, params: FanoutParams) -> FanoutResult:
    args = [sys.executable, "-m", "bench.watchers", server.address, server.admin_token]
    proc = await asyncio.create_subprocess_exec(
        *args,
        str(params.subscribers),
        str(params.seconds / 2),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        await _expect_ready(proc)
        meter = CpuMeter(server.pid)
        meter.start()
        jobs = await _drive(server, params)
        await asyncio.sleep(QUIET_S)
        cpu = meter.stop()
        measured = await _result(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    per_watcher = measured["deliveries"] / params.subscribers / params.seconds
    log.info(
        "fan-out: %d jobs, %.0f events/s to each watcher, %.1f events per response",
        jobs,
        per_watcher,
        measured["events_per_response"],
    )
    if measured["streams_with_faults"] or measured["streams_behind"] or not measured["resumed"]:
        raise ScenarioFailed(f"fan-out: event streams were not exact: {measured}")
    return FanoutResult(
        params=params, measured=measured, events_per_s=per_watcher, server_cpu_pct=cpu.server_pct
    )


async def _expect_ready(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT_S)
    if line.strip() != b"ready":
        raise ScenarioFailed(f"fan-out: the watcher process did not start: {line!r}")


async def _drive(server: RunningServer, params: FanoutParams) -> int:
    """No-op jobs at the rate that makes ``params.events_per_s`` events, for ``params.seconds``."""
    rate = params.events_per_s / EVENTS_PER_JOB
    tally = Tally()
    channel = open_channel(server.address)
    try:
        stub = jpb_grpc.JobServiceStub(channel)
        async with fleet(
            target=server.address, token=server.worker_token, prefix="fan", size=WORKERS, tally=tally
        ):
            ids, _ = await paced(stub, server.admin_token, int(rate * params.seconds), rate)
            await settle(tally, ids, what="fan-out")
    finally:
        await channel.close(grace=None)
    return len(ids)


async def _result(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"stop\n")
    await proc.stdin.drain()
    line = await asyncio.wait_for(proc.stdout.readline(), RESULT_TIMEOUT_S)
    await asyncio.wait_for(proc.wait(), RESULT_TIMEOUT_S)
    try:
        result: dict[str, Any] = json.loads(line)
    except ValueError:
        raise ScenarioFailed(f"fan-out: the watcher process answered {line!r}") from None
    return result
