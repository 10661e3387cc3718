"""A repository job killed mid-run leaves its worktree behind; later jobs on that branch must still run."""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys
from pathlib import Path

import pygit2
import pytest
from chaos_support import JobsClient
from conftest import eventually, wait_until
from ias.v1 import job_pb2
from soak_cluster import Daemon, Replica, link_repo, make_repo

pytestmark = pytest.mark.slow

TERMINAL = {job_pb2.JOB_STATUS_DONE, job_pb2.JOB_STATUS_FAILED, job_pb2.JOB_STATUS_BLOCKED}


# Runs worktrees.job_worktree in a process of its own and waits there until it is killed.
HOLD_WORKTREE = """
import sys, time
from pathlib import Path
import pygit2
from worker import worktrees
repo = pygit2.Repository(sys.argv[1])
with worktrees.job_worktree(repo, job_id="job_killed_mid_run", attempt=1, branch=sys.argv[2]) as root:
    Path(sys.argv[3]).write_text(str(root))
    time.sleep(120)
"""


def _leave_worktree_of_a_killed_attempt(checkout: Path, branch: str, ready: Path) -> Path:
    """kill -9 of a process inside worktrees.job_worktree: its worktree stays, holding the branch."""
    repo = pygit2.Repository(str(checkout))
    repo.branches.local.create(branch, repo.head.peel())
    args = [sys.executable, "-c", HOLD_WORKTREE, str(checkout), branch, str(ready)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(ready.exists, timeout=30, what="a job worktree held by another process")
    finally:
        proc.kill()
        proc.wait(timeout=10)
    root = Path(ready.read_text())
    assert repo.lookup_branch(branch).is_checked_out() and root.is_dir()
    return root


@pytest.mark.parametrize(
    ("killed", "cleaned_by"),
    [
        # The usual story: the worker was killed with its job and is started again.
        ("before the worker starts", "removed 1 job worktree(s) a stopped run left in"),
        # Another process on this machine (`ias install`, a second worker) was killed meanwhile.
        ("while the worker runs", "removing the worktree"),
    ],
)
async def test_install_ias_runs_after_an_earlier_attempt_was_killed_mid_job(
    tmp_path: Path, killed: str, cleaned_by: str
) -> None:
    replica = Replica(tmp_path / "replica", db="", grace_s=3, ttl_s=60)
    replica.data_dir.mkdir()
    await asyncio.to_thread(replica.start)
    assert replica.server is not None
    admin = await asyncio.to_thread(replica.server.token, "admin")
    worker = await asyncio.to_thread(replica.server.token, "worker")
    checkout, home = tmp_path / "checkout", tmp_path / "home"
    checkout.mkdir()
    home.mkdir()
    make_repo(checkout)
    repo_id = await asyncio.to_thread(
        link_repo, home, checkout, address=replica.address, token=worker, name="laptop"
    )
    kill = functools.partial(
        _leave_worktree_of_a_killed_attempt, checkout, "ias/bootstrap", tmp_path / "held"
    )
    leftover = await asyncio.to_thread(kill) if killed == "before the worker starts" else None
    daemon = Daemon("laptop", home, replica, 1, worker)
    daemon.start()
    jobs = JobsClient(replica.address, admin)
    try:
        if leftover is None:
            noop = await jobs.submit("noop", "{}")  # the worker is up, its start-up sweep long done
            await eventually(lambda: _terminal(jobs, noop.id), timeout=60, what="noop terminal")
            leftover = await asyncio.to_thread(kill)
        else:
            await eventually(lambda: cleaned_by in daemon.log_text(), timeout=30, what="start-up sweep")
        job = await jobs.submit("install_ias", "{}", repo_id=repo_id, max_attempts=3)
        await eventually(lambda: _terminal(jobs, job.id), timeout=60, what="install_ias terminal")
        final = await jobs.get(job.id)
        assert final.status == job_pb2.JOB_STATUS_DONE, f"attempt {final.attempt}: {final.result.error_code}"
        assert final.attempt == 1
        assert not leftover.exists()
        assert pygit2.Repository(str(checkout)).list_worktrees() == []
        assert cleaned_by in daemon.log_text()
    finally:
        await jobs.close()
        daemon.stop()
        replica.stop()


async def _terminal(jobs: JobsClient, job_id: str) -> bool:
    return (await jobs.get(job_id)).status in TERMINAL
