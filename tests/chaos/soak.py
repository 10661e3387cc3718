"""Chaos soak: real replicas and workers run thousands of jobs through random kills and network faults."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

# Run as a script, only tests/chaos is on sys.path; processes.py needs tests/ for conftest.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpg
import grpc
from chaos_support import event_log
from conftest import PG_ADMIN_URL
from ias.v1 import job_service_pb2 as jpb
from ias.v1 import job_service_pb2_grpc as jpb_grpc
from soak_audit import SoakReport, audit_events, audit_jobs, job_statuses, stale_running, summary_table
from soak_cluster import Daemon, Replica, link_repo, make_repo
from tcp_proxy import TcpProxy

from control_plane.errors import Unavailable
from control_plane.store.db import Database, sqlite_url
from worker.client import CHANNEL_OPTIONS, bearer

FAULTS = ("worker_kill", "replica_kill", "net_drop", "net_blackhole", "net_latency")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN}
# A replica down for a restart must not be mistaken for lost work: wait this long after it is back.
SETTLE = timedelta(seconds=8)
SUBMITTERS = 6
SUBMIT_TRIES = 400
# The daemon exits when its stream breaks while it writes a frame (test_broken_stream.py shows it).
KNOWN_CRASH = "InvalidStateError: RPC already finished"
# The soak's own clients reconnect quickly after a replica restart instead of backing off for minutes.
CLIENT_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.max_reconnect_backoff_ms", 1000)]


# A fault a test adds (say, on the database): given the soak, returns its target or "" to skip.
Fault = Callable[["Soak"], Awaitable[str]]


@dataclass(frozen=True)
class SoakConfig:
    """One soak: how many jobs, on which database, how long at most, how many daemons of each kind."""

    jobs: int = 300
    repo_jobs: int = 20
    db: str = "sqlite"
    db_url: str = ""
    seed: int = 0
    minutes: float = 1.25
    plain_workers: int = 4
    repo_workers: int = 2
    proxied: tuple[int, ...] = (2, 3, 5)  # indexes (plain first, then repo) of daemons behind a proxy
    slots: int = 2
    grace_s: float = 3.0
    ttl_s: float = 30.0
    max_attempts: int = 10
    noop_max_s: float = 0.3
    faults: tuple[str, ...] = FAULTS
    replica_count: int = 0  # 0: two replicas on PostgreSQL, one on SQLite

    @property
    def replicas(self) -> int:
        return self.replica_count or (2 if self.db == "postgres" else 1)


@dataclass
class Soak:
    """The running system under chaos and what it has done to it."""

    cfg: SoakConfig
    work: Path
    rng: random.Random
    replicas: list[Replica] = field(default_factory=list)
    daemons: list[Daemon] = field(default_factory=list)
    proxies: list[TcpProxy] = field(default_factory=list)
    report: SoakReport | None = None
    admin: str = ""
    db: Database | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    extra_faults: dict[str, Fault] = field(default_factory=dict)
    busy: set[int] = field(default_factory=set)  # proxies (by index) under a timed fault
    restarting: set[int] = field(default_factory=set)  # replicas (by index) being restarted
    settled_at: float = 0.0
    began: float = field(default_factory=time.monotonic)
    submitted: int = 0

    # -- start and stop ------------------------------------------------------------------------

    async def start(self) -> None:
        url = self.cfg.db_url
        for i in range(self.cfg.replicas):
            replica = Replica(
                self.work / f"replica-{i}", db=url, grace_s=self.cfg.grace_s, ttl_s=self.cfg.ttl_s
            )
            replica.data_dir.mkdir()
            await asyncio.to_thread(replica.start)
            self.replicas.append(replica)
        self.settled_at = time.monotonic()
        first = self.replicas[0]
        self.admin = await asyncio.to_thread(first.server.token, "admin")  # type: ignore[union-attr]
        worker_token = await asyncio.to_thread(first.server.token, "worker")  # type: ignore[union-attr]
        self.db = Database(url=url or sqlite_url(first.data_dir), pool_size=2)
        await self._start_daemons(worker_token)

    async def _start_daemons(self, token: str) -> None:
        total = self.cfg.plain_workers + self.cfg.repo_workers
        for i in range(total):
            repo = i >= self.cfg.plain_workers
            name = f"{'repo' if repo else 'plain'}-{i}"
            replica = self.replicas[i % len(self.replicas)]
            proxy = None
            if i in self.cfg.proxied:
                proxy = await TcpProxy(replica.address).start()
                self.proxies.append(proxy)
            daemon = Daemon(name, self.work / name, replica, self.cfg.slots, token, proxy=proxy)
            daemon.home.mkdir()
            if repo:
                checkout = self.work / f"{name}-checkout"
                checkout.mkdir()
                await asyncio.to_thread(make_repo, checkout)
                daemon.repo_id = await asyncio.to_thread(
                    link_repo, daemon.home, checkout, address=daemon.address, token=token, name=name
                )
            daemon.start()
            self.daemons.append(daemon)

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for daemon in self.daemons:
            await asyncio.to_thread(daemon.stop)
        for replica in self.replicas:
            await asyncio.to_thread(replica.stop)
        for proxy in self.proxies:
            await proxy.close()
        if self.db is not None:
            await self.db.close()

    # -- submitting ----------------------------------------------------------------------------

    def plan(self) -> list[tuple[str, str, str]]:
        """(type, repo id, payload) for every job, shuffled so repository jobs run throughout."""
        repo_id = next((d.repo_id for d in self.daemons if d.repo_id), "")
        planned = [
            ("noop", "", json.dumps({"seconds": round(self.rng.uniform(0, self.cfg.noop_max_s), 2)}))
            for _ in range(self.cfg.jobs)
        ]
        for i in range(self.cfg.repo_jobs):
            if i % 2:
                payload = {"slug": f"soak-{self.cfg.seed}-{i}", "goal": f"Soak goal {i}"}
                planned.append(("create_run", repo_id, json.dumps(payload)))
            else:
                planned.append(("install_ias", repo_id, "{}"))
        self.rng.shuffle(planned)
        return planned

    async def submit_all(self, planned: list[tuple[str, str, str]]) -> None:
        queue: asyncio.Queue[tuple[int, tuple[str, str, str]]] = asyncio.Queue()
        for item in enumerate(planned):
            queue.put_nowait(item)
        channels = [grpc.aio.insecure_channel(r.address, options=CLIENT_OPTIONS) for r in self.replicas]
        try:
            await asyncio.gather(*(self._submitter(queue, channels, k) for k in range(SUBMITTERS)))
        finally:
            for channel in channels:
                await channel.close()

    async def _submitter(
        self, queue: asyncio.Queue[tuple[int, tuple[str, str, str]]], channels: list, turn: int
    ) -> None:
        while not queue.empty():
            i, (job_type, repo_id, payload) = queue.get_nowait()
            request = jpb.SubmitJobRequest(
                type=job_type,
                repo_id=repo_id,
                payload_json=payload,
                max_attempts=self.cfg.max_attempts,
                idempotency_key=f"soak-{self.cfg.seed}-{i}",
            )
            for _ in range(SUBMIT_TRIES):
                turn += 1
                stub = jpb_grpc.JobServiceStub(channels[turn % len(channels)])
                try:
                    await stub.SubmitJob(request, metadata=bearer(self.admin), timeout=10)
                    break
                except grpc.aio.AioRpcError as exc:
                    # The idempotency key makes a retry after an ambiguous failure safe.
                    if exc.code() not in RETRYABLE:
                        raise
                    await asyncio.sleep(0.25)
            else:
                raise AssertionError(f"could not submit job {i} in {SUBMIT_TRIES} tries")
            self.submitted += 1

    # -- faults --------------------------------------------------------------------------------

    def _later(self, delay: float, action: object) -> None:
        async def run() -> None:
            await asyncio.sleep(delay)
            result = action()  # type: ignore[operator]
            if asyncio.iscoroutine(result):
                await result

        task = asyncio.create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def inject(self, kind: str) -> str:
        """Inject one fault of ``kind``; returns its target, or "" when none is free for it now."""
        extra = self.extra_faults.get(kind)
        target: str = await (extra(self) if extra else getattr(self, f"_{kind}")())
        return target

    async def _worker_kill(self) -> str:
        candidates = [d for d in self.daemons if not d.killed]
        if not candidates:
            return ""
        daemon = self.rng.choice(candidates)
        await asyncio.to_thread(daemon.kill)
        self._later(self.rng.uniform(0.2, 1.5), daemon.start)
        return daemon.name

    async def _replica_kill(self) -> str:
        idle = [i for i in range(len(self.replicas)) if i not in self.restarting]
        # One replica down at a time, and not again before the system settled from the last.
        if len(idle) < len(self.replicas) or time.monotonic() < self.settled_at:
            return ""
        index = self.rng.choice(idle)
        self.restarting.add(index)
        await asyncio.to_thread(self.replicas[index].kill)

        async def restart() -> None:
            await asyncio.to_thread(self.replicas[index].start)
            self.restarting.discard(index)
            self.settled_at = time.monotonic() + SETTLE.total_seconds() + self.cfg.grace_s

        self._later(self.rng.uniform(0.2, 1.5), restart)
        return f"replica-{index}"

    def _free_proxy(self) -> int | None:
        free = [i for i in range(len(self.proxies)) if i not in self.busy]
        return self.rng.choice(free) if free else None

    def _proxied(self, index: int) -> str:
        return next(d.name for d in self.daemons if d.proxy is self.proxies[index])

    async def _net_drop(self) -> str:
        index = self._free_proxy()
        if index is None:
            return ""
        self.proxies[index].drop()
        return self._proxied(index)

    async def _net_blackhole(self) -> str:
        return self._timed_proxy_fault(lambda p: p.blackhole(), self.rng.uniform(1, 8))

    async def _net_latency(self) -> str:
        seconds = round(self.rng.uniform(0.05, 0.4), 2)
        return self._timed_proxy_fault(lambda p: p.latency(seconds), self.rng.uniform(2, 6))

    def _timed_proxy_fault(self, apply: object, duration: float) -> str:
        index = self._free_proxy()
        if index is None:
            return ""
        self.busy.add(index)
        apply(self.proxies[index])  # type: ignore[operator]

        def heal() -> None:
            self.proxies[index].heal()
            self.busy.discard(index)

        self._later(duration, heal)
        return f"{self._proxied(index)} for {duration:.1f} s"

    # -- the run -------------------------------------------------------------------------------

    def restart_crashed(self) -> None:
        """A process that died without being killed is a finding; restart it, as a supervisor would."""
        assert self.report is not None
        for daemon in self.daemons:
            code = daemon.exited_by_itself()
            if code is not None:
                self._record_crash(daemon)
                daemon.start()
        for replica in self.replicas:
            code = replica.exited_by_itself()
            if code is not None:
                self.report.anomalies.append(f"replica {replica.address} exited with {code}")
                replica.killed = True  # so it is restarted and counted once
                self._later(0, lambda r=replica: asyncio.to_thread(r.start))

    def _record_crash(self, daemon: Daemon) -> None:
        assert self.report is not None
        tail = daemon.log_text()[-6000:]
        if KNOWN_CRASH in tail:
            self.report.known_crashes.append(daemon.name)
            return
        last = tail.strip().splitlines()[-1:] or [""]
        self.report.anomalies.append(f"worker {daemon.name} exited by itself: {last[0][:200]}")

    async def all_terminal(self, planned: int) -> bool:
        assert self.db is not None
        try:
            statuses = await job_statuses(self.db)
        except Unavailable:  # a database fault of the soak itself
            return False
        done = sum(n for s, n in statuses.items() if s in ("done", "failed", "blocked", "cancelled"))
        return self.submitted == planned and done == planned

    async def check_running(self) -> None:
        assert self.db is not None and self.report is not None
        settled = not self.restarting and time.monotonic() >= self.settled_at
        grace = timedelta(seconds=self.cfg.grace_s)
        try:
            found = await stale_running(self.db, grace=grace, slack=SETTLE, settled=settled)
        except Unavailable:
            return
        for problem in found:
            if problem not in self.report.stale_running:
                self.report.stale_running.append(problem)

    async def drive(self, planned: int, deadline: float, submitting: asyncio.Task[None]) -> None:
        """Inject faults, each kind once per shuffled round, until every job is terminal."""
        assert self.report is not None
        round_: list[str] = []
        while time.monotonic() < deadline:
            if submitting.done():
                submitting.result()  # a submission that failed for good ends the soak here
            self.restart_crashed()
            if await self.all_terminal(planned):
                return
            if not round_:
                round_ = self.rng.sample(self.cfg.faults, len(self.cfg.faults))
            kind = round_[-1]
            target = await self.inject(kind)
            if target:
                round_.pop()
                self.report.faults[kind] += 1
                self.report.timeline.append(f"{time.monotonic() - self.began:6.1f} s {kind} {target}")
            await self.check_running()
            await asyncio.sleep(self.rng.uniform(0.5, 2.5))

    async def quiesce(self, planned: int, deadline: float) -> None:
        """Heal every fault and give the jobs the rest of the time to finish (bounded)."""
        pending = time.monotonic() + 30
        while self.tasks and time.monotonic() < pending:
            await asyncio.sleep(0.2)
        for proxy in self.proxies:
            proxy.heal()
        while time.monotonic() < deadline and not await self.all_terminal(planned):
            self.restart_crashed()
            await asyncio.sleep(0.5)

    async def audit(self) -> None:
        assert self.db is not None and self.report is not None
        self.report.rejected_stale = sum(d.log_text().count("rejected a outcome frame") for d in self.daemons)
        terminal = await audit_jobs(self.db, self.report)
        await self.check_running()
        address = next(r.address for r in self.replicas if not r.killed)
        timeout = 60 + self.report.stored_jobs * 0.05
        events = await event_log(address, self.admin, idle_s=3, timeout=timeout)
        await audit_events(self.db, events, terminal, self.report)


async def run_soak(cfg: SoakConfig, work: Path, extra_faults: dict[str, Fault] | None = None) -> SoakReport:
    """Start everything, submit, inject faults until every job is terminal, audit, stop."""
    began = time.monotonic()
    soak = Soak(cfg, work, random.Random(cfg.seed), extra_faults=extra_faults or {})
    report = soak.report = SoakReport(db=cfg.db, seed=cfg.seed, planned=Counter())
    try:
        await soak.start()
        planned = soak.plan()
        report.planned = Counter(job_type for job_type, _, _ in planned)
        deadline = time.monotonic() + cfg.minutes * 60
        submitting = asyncio.create_task(soak.submit_all(planned))
        try:
            await soak.drive(len(planned), deadline, submitting)
            await soak.quiesce(len(planned), deadline + 15)
        finally:
            if not submitting.done():
                submitting.cancel()
            await asyncio.gather(submitting, return_exceptions=True)
        await soak.audit()
    finally:
        await soak.stop()
        report.seconds = time.monotonic() - began
    return report


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="ias-soak-"))
    db_name = f"ias_soak_{os.getpid()}"
    url = ""
    if args.db == "postgres":
        await _pg_admin(f'CREATE DATABASE "{db_name}"')
        url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{db_name}"
    cfg = SoakConfig(
        jobs=args.jobs, repo_jobs=args.repo_jobs, db=args.db, db_url=url, seed=args.seed, minutes=args.minutes
    )
    try:
        report = await run_soak(cfg, work)
    finally:
        if url:
            await _pg_admin(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
    print(summary_table(report))
    if report.problems():
        print("faults:", *report.timeline, sep="\n  ")
    if report.problems() or args.keep:
        print(f"work directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if report.problems() else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=5000, help="noop jobs")
    parser.add_argument("--repo-jobs", type=int, default=200, help="install_ias and create_run jobs")
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    parser.add_argument("--minutes", type=float, default=30, help="give up on unfinished jobs after this")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, homes)")
    return asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
