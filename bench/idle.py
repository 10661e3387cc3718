"""Many connected, idle workers heartbeating at the default interval: what they cost the server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench import postgres
from bench.scenarios import ScenarioFailed, next_xid
from bench.server import RunningServer
from bench.simworker import SimWorker, Tally
from bench.stats import CpuMeter, CpuUsage, Judged

log = logging.getLogger(__name__)

CONNECT_BATCH: Final = 100  # workers connecting at once; a real fleet does not all dial in one tick
BATCH_TIMEOUT_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class IdleParams:
    workers: int
    seconds: float


@dataclass(frozen=True, slots=True)
class IdleResult:
    workers: int
    connect_s: float
    cpu: CpuUsage
    rss_per_worker_kib: float
    db_commits_per_s: float | None
    db_writes_per_s: float | None

    def rows(self) -> dict[str, str | Judged]:
        n = self.workers
        commits = "—" if self.db_commits_per_s is None else f"{self.db_commits_per_s:.1f}"
        writes = "—" if self.db_writes_per_s is None else f"{self.db_writes_per_s:.1f}"
        cpu, rss = self.cpu.server_pct, self.rss_per_worker_kib
        return {
            f"idle {n} workers: time to connect all (s)": f"{self.connect_s:.1f}",
            f"idle {n} workers: server CPU (% of a core)": Judged(f"{cpu:.1f}", "≤ 10", cpu <= 10),
            f"idle {n} workers: server RSS per worker (KiB)": Judged(
                f"{rss:.1f}", "≤ 50 KB (48.8 KiB)", rss <= 50_000 / 1024
            ),
            f"idle {n} workers: PostgreSQL write transactions/s (all commits/s)": f"{writes} ({commits})",
        }


async def run_idle(server: RunningServer, params: IdleParams) -> IdleResult:
    """Connect the workers, let them heartbeat for ``params.seconds``, and read what the server spent."""
    tally = Tally()
    rss_before = rss_kib(server.pid)
    began = time.perf_counter()
    async with idle_fleet(server, params.workers, tally):
        connect_s = time.perf_counter() - began
        await asyncio.sleep(1.0)  # let the connect burst's writes settle before measuring
        meter = CpuMeter(server.pid)
        commits, xid = await _commits(server), await next_xid(server)
        meter.start()
        await asyncio.sleep(params.seconds)
        cpu = meter.stop()
        commits_after, xid_after = await _commits(server), await next_xid(server)
        rss_after = rss_kib(server.pid)
    if tally.problems:
        raise ScenarioFailed(f"idle: {len(tally.problems)} protocol problem(s), first: {tally.problems[0]}")
    per_s = None if commits is None or commits_after is None else (commits_after - commits) / params.seconds
    writes = None if xid is None or xid_after is None else (xid_after - xid) / params.seconds
    return IdleResult(
        workers=params.workers,
        connect_s=connect_s,
        cpu=cpu,
        rss_per_worker_kib=(rss_after - rss_before) / params.workers,
        db_commits_per_s=per_s,
        db_writes_per_s=writes,
    )


@contextlib.asynccontextmanager
async def idle_fleet(
    server: RunningServer, size: int, tally: Tally, *, prefix: str = "idle", reconnect: bool = False
) -> AsyncIterator[list[SimWorker]]:
    """``size`` connected workers, connected ``CONNECT_BATCH`` at a time; all stopped on exit."""
    workers = [
        SimWorker(
            target=server.address,
            token=server.worker_token,
            name=f"{prefix}-{i:04d}",
            tally=tally,
            reconnect=reconnect,
        )
        for i in range(size)
    ]
    try:
        for first in range(0, size, CONNECT_BATCH):
            async with asyncio.timeout(BATCH_TIMEOUT_S):
                await asyncio.gather(*(w.start() for w in workers[first : first + CONNECT_BATCH]))
        log.info("%d %s workers connected", size, prefix)
        yield workers
    finally:
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)


async def _commits(server: RunningServer) -> int | None:
    return await postgres.commits(server.db_url) if server.db_url else None


def rss_kib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0
