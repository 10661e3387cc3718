"""Faults on the worker's machine, with a real control plane, a real `ias worker start` and real git:
the linked checkout deleted before or while a job runs, and the outcome journal on a full disk."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from chaos_support import JobsClient, event_log, finished_per_job
from conftest import eventually
from ias.v1 import job_pb2
from processes import ias, ias_env
from soak_cluster import Daemon, Replica, link_repo, make_repo

pytestmark = pytest.mark.slow

DONE, FAILED, RUNNING = job_pb2.JOB_STATUS_DONE, job_pb2.JOB_STATUS_FAILED, job_pb2.JOB_STATUS_RUNNING
TERMINAL = {DONE, FAILED, job_pb2.JOB_STATUS_BLOCKED, job_pb2.JOB_STATUS_CANCELLED}
JOURNAL_WARNING = "cannot write the outcome journal"


@dataclass
class Cluster:
    """One control plane, one worker daemon with its own IAS_HOME, and (maybe) a linked checkout."""

    replica: Replica
    daemon: Daemon
    jobs: JobsClient
    admin: str
    home: Path
    checkout: Path
    repo_id: str


@asynccontextmanager
async def worker_cluster(
    tmp_path: Path, *, name: str, grace_s: float = 3.0, with_repo: bool = True
) -> AsyncIterator[Cluster]:
    replica = Replica(tmp_path / "replica", db="", grace_s=grace_s, ttl_s=60)
    replica.data_dir.mkdir()
    await asyncio.to_thread(replica.start)
    assert replica.server is not None
    admin = await asyncio.to_thread(replica.server.token, "admin")
    worker = await asyncio.to_thread(replica.server.token, "worker")
    home, checkout, repo_id = tmp_path / "home", tmp_path / "checkout", ""
    home.mkdir(exist_ok=True)
    if with_repo:
        checkout.mkdir()
        make_repo(checkout)
        repo_id = await asyncio.to_thread(
            link_repo, home, checkout, address=replica.address, token=worker, name=name
        )
    daemon = Daemon(name, home, replica, 1, worker)
    daemon.start()
    jobs = JobsClient(replica.address, admin)
    try:
        yield Cluster(replica, daemon, jobs, admin, home, checkout, repo_id)
    finally:
        await jobs.close()
        daemon.stop()
        replica.stop()


async def finished(jobs: JobsClient, job_id: str, timeout: float = 60) -> job_pb2.Job:
    async def terminal() -> bool:
        return (await jobs.get(job_id)).status in TERMINAL

    await eventually(terminal, timeout=timeout, what=f"job {job_id} finished")
    job: job_pb2.Job = await jobs.get(job_id)
    return job


async def run_noop(jobs: JobsClient, payload: str = "{}") -> job_pb2.Job:
    job = await jobs.submit("noop", payload)
    return await finished(jobs, job.id)


# -- the linked checkout deleted -------------------------------------------------------------------


async def open_once_read(fifo: Path, timeout: float = 30) -> int:
    """A write end of `fifo`, opened once a reader waits on it (open fails with ENXIO until then)."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
            await asyncio.sleep(0.02)


async def assert_missing_checkout_reported(c: Cluster, job: job_pb2.Job) -> None:
    """Failed once, for good, naming the checkout; the worker then runs the next job; doctor fails it."""
    assert (job.status, job.attempt) == (FAILED, 1), job
    assert job.result.error_code == "repo_missing" and not job.result.retryable
    assert str(c.checkout) in job.result.error_message and c.repo_id in job.result.error_message
    assert not c.checkout.exists(), "the job recreated part of the deleted checkout"
    assert (await run_noop(c.jobs)).status == DONE
    assert c.daemon.exited_by_itself() is None
    log = c.daemon.log_text()
    assert "Traceback" not in log and "job handler crashed" not in log, log
    doctor = await asyncio.to_thread(ias, "doctor", "--json", env=ias_env(IAS_HOME=str(c.home)))
    assert doctor.returncode == 1, doctor.stderr
    [repo_check] = [
        check for check in json.loads(doctor.stdout)["checks"] if check["name"].startswith("repo ")
    ]
    assert repo_check["status"] == "FAIL" and str(c.checkout) in repo_check["detail"], repo_check


async def test_a_checkout_deleted_before_its_job_starts_fails_the_job_clearly(tmp_path: Path) -> None:
    async with worker_cluster(tmp_path, name="laptop") as c:
        assert (await run_noop(c.jobs)).status == DONE  # the worker is up before the checkout goes
        shutil.rmtree(c.checkout)
        job = await c.jobs.submit("install_ias", "{}", repo_id=c.repo_id, max_attempts=3)
        await assert_missing_checkout_reported(c, await finished(c.jobs, job.id))


async def test_a_checkout_deleted_while_its_job_runs_fails_the_job_clearly(tmp_path: Path) -> None:
    async with worker_cluster(tmp_path, name="laptop") as c:
        # The job reads the machine's applied git policy from .git/ias/git-policy.json once it has
        # opened the repository; as a FIFO, that read waits inside the job until the test lets go.
        fifo = c.checkout / ".git" / "ias" / "git-policy.json"
        fifo.parent.mkdir()
        os.mkfifo(fifo)
        job = await c.jobs.submit("install_ias", "{}", repo_id=c.repo_id, max_attempts=3)
        writer = await open_once_read(fifo)
        try:
            await eventually(lambda: _status_is(c.jobs, job.id, RUNNING), timeout=30, what="job running")
            shutil.rmtree(c.checkout)
        finally:
            os.close(writer)  # end of file: the job goes on, in a checkout that is gone
        await assert_missing_checkout_reported(c, await finished(c.jobs, job.id))


# -- the journal's disk full -----------------------------------------------------------------------


def mount_tmpfs(folder: Path, size: str) -> None:
    """A tiny filesystem of its own at `folder` (root only; skipped loudly where mounts are refused)."""
    why = "" if os.geteuid() == 0 and shutil.which("mount") else "needs root and mount(8)"
    if not why:
        out = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        why = out.stderr.strip() if out.returncode else ""
    if why:
        pytest.skip(f"SKIPPED LOUDLY: cannot mount a tmpfs ({why}); test_journal_enospc.py covers ENOSPC")


def fill(folder: Path) -> Path:
    """Write a file until the filesystem is full; returns it (delete it to free the space)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for _ in range(1000):
            try:
                f.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
    assert os.statvfs(folder).f_bavail == 0
    return filler


async def test_a_full_journal_disk_loses_no_outcome(tmp_path: Path) -> None:
    journal = tmp_path / "home" / "journal" / "full"  # `ias worker start --name full` journals here
    journal.mkdir(parents=True)
    mount_tmpfs(journal, "64k")
    try:
        filler = fill(journal)
        # A long reconnect grace: the worker keeps its job while the control plane is down.
        async with worker_cluster(tmp_path, name="full", grace_s=60, with_repo=False) as c:
            refused = [await run_noop(c.jobs) for _ in range(2)]
            assert [job.status for job in refused] == [DONE, DONE]  # sent over the live stream
            warnings = [line for line in c.daemon.log_text().splitlines() if JOURNAL_WARNING in line]
            assert len(warnings) == 1, warnings
            assert str(journal) in warnings[0] and os.strerror(errno.ENOSPC) in warnings[0]

            filler.unlink()  # space again: the next outcome must be journaled before it is sent
            job = await c.jobs.submit("noop", '{"seconds": 2}')
            await eventually(
                lambda: _status_is(c.jobs, job.id, RUNNING), timeout=30, what="the noop job running"
            )
            await asyncio.to_thread(c.replica.kill)
            entry = journal / f"{job.id}.frame"
            await eventually(entry.exists, timeout=30, what="the outcome journaled while offline")
            await asyncio.to_thread(c.replica.start)
            async with _client(c) as jobs:
                assert (await finished(jobs, job.id)).status == DONE
                await eventually(lambda: not entry.exists(), timeout=30, what="the journal entry dropped")
                events = await event_log(c.replica.address, c.admin)
            counts = finished_per_job(events)
            assert [counts[j.id] for j in [*refused, job]] == [1, 1, 1], counts
            log = c.daemon.log_text()
            assert "is writable again" in log and log.count(JOURNAL_WARNING) == 1
    finally:
        subprocess.run(["umount", "-l", str(journal)], capture_output=True, timeout=10, check=False)


async def _status_is(jobs: JobsClient, job_id: str, status: int) -> bool:
    return bool((await jobs.get(job_id)).status == status)


@asynccontextmanager
async def _client(c: Cluster) -> AsyncIterator[JobsClient]:
    """A fresh client: the replica was restarted (on the same address)."""
    jobs = JobsClient(c.replica.address, c.admin)
    try:
        yield jobs
    finally:
        await jobs.close()
