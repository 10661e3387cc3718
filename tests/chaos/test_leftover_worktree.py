"""A repository job killed mid-run leaves its worktree behind; later jobs on that branch must still run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pygit2
import pytest
from chaos_support import JobsClient
from conftest import eventually
from ias.v1 import job_pb2
from soak_cluster import Daemon, Replica, link_repo, make_repo

from worker import git_ops

pytestmark = pytest.mark.slow

TERMINAL = {job_pb2.JOB_STATUS_DONE, job_pb2.JOB_STATUS_FAILED, job_pb2.JOB_STATUS_BLOCKED}


def _leave_worktree_of_a_killed_attempt(checkout: Path, branch: str) -> None:
    """Exactly what kill -9 inside git_ops.job_worktree leaves: the attempt's worktree, checked out."""
    repo = pygit2.Repository(str(checkout))
    repo.branches.local.create(branch, repo.head.peel())
    name = git_ops._worktree_name("job_killed_mid_run", 1)
    root = Path(repo.path) / "ias" / "worktrees" / name
    root.parent.mkdir(parents=True, exist_ok=True)
    repo.add_worktree(name, str(root), repo.lookup_reference(f"refs/heads/{branch}"))


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="worker/git_ops.py job_worktree removes only its own attempt's worktree: one left by a killed "
    "attempt keeps the branch checked out, so every later job on it fails branch_busy",
)
async def test_install_ias_runs_after_an_earlier_attempt_was_killed_mid_job(tmp_path: Path) -> None:
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
    _leave_worktree_of_a_killed_attempt(checkout, "ias/bootstrap")
    daemon = Daemon("laptop", home, replica, 1, worker)
    daemon.start()
    jobs = JobsClient(replica.address, admin)
    try:
        job = await jobs.submit("install_ias", "{}", repo_id=repo_id, max_attempts=3)
        await eventually(lambda: _terminal(jobs, job.id), timeout=60, what="install_ias terminal")
        final = await jobs.get(job.id)
        assert final.status == job_pb2.JOB_STATUS_DONE, f"attempt {final.attempt}: {final.result.error_code}"
    finally:
        await jobs.close()
        daemon.stop()
        replica.stop()


async def _terminal(jobs: JobsClient, job_id: str) -> bool:
    return (await jobs.get(job_id)).status in TERMINAL
