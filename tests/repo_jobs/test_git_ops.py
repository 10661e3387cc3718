"""The shared git layer: clear errors, identity, a worktree per job, and a checkout left alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pygit2
import pytest
import repo_fixtures as fx
from repo_fixtures import commit_files, snapshot

from worker.git_ops import (
    GitPolicy,
    JobRequest,
    Workspace,
    commit_job,
    commit_signature,
    open_repo,
    parse_policy,
)
from worker.handlers import JobFailed
from worker.worktrees import job_worktree, prune_worktrees

# Fixtures shared through repo_fixtures (a conftest.py here would shadow tests/conftest.py).
isolated_git = fx.isolated_git
make_repo = fx.make_repo
repo = fx.repo


def request(branch_name: str = "test", **kw: object) -> JobRequest:
    return JobRequest(job_id="job-1", attempt=2, branch_name=branch_name, subject="Test change", **kw)  # type: ignore[arg-type]


def test_open_repo_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(JobFailed) as missing:
        open_repo(tmp_path / "nope")
    assert missing.value.code == "not_a_git_repo"
    (tmp_path / "plain").mkdir()
    with pytest.raises(JobFailed) as plain:
        open_repo(tmp_path / "plain")
    assert plain.value.code == "not_a_git_repo"
    assert "git init" in plain.value.message
    pygit2.init_repository(str(tmp_path / "empty"), initial_head="main")
    with pytest.raises(JobFailed) as empty:
        open_repo(tmp_path / "empty")
    assert empty.value.code == "no_commits"


def test_signature_falls_back_to_ias_and_honours_config(repo: pygit2.Repository) -> None:
    signature = commit_signature(repo)
    assert (signature.name, signature.email) == ("IAS", "ias@localhost")
    repo.config["user.name"] = "Ada"
    repo.config["user.email"] = "ada@example.com"
    signature = commit_signature(repo)
    assert (signature.name, signature.email) == ("Ada", "ada@example.com")


def test_commit_job_commits_only_named_paths_with_trailers(repo: pygit2.Repository) -> None:
    workdir = Path(repo.workdir)

    def edit(workspace: Workspace) -> list[str]:
        workspace.write_text("a/one.txt", "1\n")
        workspace.write_text("stray.txt", "not committed\n")
        assert workspace.root != workdir  # a private worktree, not the user's checkout
        return ["a/one.txt"]

    result = commit_job(workdir, request(), edit)
    assert result.committed and result.branch == "ias/test"
    assert result.changed_paths == ("a/one.txt",)
    commit = repo[result.commit_sha]
    assert isinstance(commit, pygit2.Commit)
    assert commit.message.splitlines()[0] == "Test change"
    assert "IAS-Job-Id: job-1\nIAS-Attempt: 2" in commit.message
    assert commit.parents[0].id == repo.head.target
    assert "stray.txt" not in commit.tree
    assert repo.list_worktrees() == []
    assert not (workdir / "a").exists()


def test_failure_leaves_checkout_untouched_and_cleans_up(repo: pygit2.Repository) -> None:
    workdir = Path(repo.workdir)
    (workdir / "README.md").write_text("uncommitted edit\n")
    (workdir / "notes.txt").write_text("untracked\n")
    before = snapshot(workdir)

    def edit(workspace: Workspace) -> list[str]:
        workspace.write_text("README.md", "job edit\n")
        raise RuntimeError("the job broke halfway")

    with pytest.raises(RuntimeError):
        commit_job(workdir, request(), edit)
    assert snapshot(workdir) == before
    assert repo.lookup_branch("ias/test") is None  # the branch it created is gone again
    assert not any((Path(repo.path) / "ias" / "worktrees").iterdir())


def test_nothing_to_commit_reports_the_base(repo: pygit2.Repository) -> None:
    result = commit_job(Path(repo.workdir), request(), lambda workspace: [])
    assert not result.committed
    assert (result.branch, result.commit_sha) == ("main", str(repo.head.target))
    assert repo.lookup_branch("ias/test") is None


def test_branch_checked_out_by_the_user_is_refused(repo: pygit2.Repository) -> None:
    with pytest.raises(JobFailed) as failed:
        commit_job(Path(repo.workdir), request(overrides={"branch": "main"}), lambda workspace: [])
    assert failed.value.code == "branch_checked_out"


def test_merged_job_branch_moves_up_to_its_base(repo: pygit2.Repository) -> None:
    workdir = Path(repo.workdir)
    repo.branches.local.create("ias/test", repo[repo.head.target])  # type: ignore[arg-type]
    newer = commit_files(repo, {"later.txt": "x\n"}, "later on main")

    def edit(workspace: Workspace) -> list[str]:
        workspace.write_text("f.txt", "f\n")
        return ["f.txt"]

    result = commit_job(workdir, request(), edit)
    commit = repo[result.commit_sha]
    assert isinstance(commit, pygit2.Commit)
    assert commit.parents[0].id == newer


def test_policy_validation_names_the_field() -> None:
    with pytest.raises(JobFailed) as bad:
        parse_policy({"branchPrefix": "bad..prefix"}, where="payload", code="invalid_payload")
    assert bad.value.code == "invalid_payload" and "branchPrefix" in bad.value.message
    with pytest.raises(JobFailed) as unknown:
        parse_policy({"colour": "blue"}, where="payload", code="invalid_payload")
    assert "colour" in unknown.value.message
    policy = parse_policy({"pr": {"draft": True}}, where="payload", code="invalid_payload")
    assert dict(policy.pr)["draft"] is True and dict(policy.pr)["mergeMethod"] == "squash"
    assert GitPolicy().prefix == "ias/"


# -- worktrees left behind --------------------------------------------------------------------------

# Enters worktrees.job_worktree in a process of its own, says where, and waits there to be killed.
HOLD_WORKTREE = """
import sys, time
from pathlib import Path
import pygit2
from worker.worktrees import job_worktree
repo = pygit2.Repository(sys.argv[1])
with job_worktree(repo, job_id=sys.argv[2], attempt=1, branch=sys.argv[3]) as root:
    Path(sys.argv[4]).write_text(str(root))
    time.sleep(120)
"""


def kill_inside_job_worktree(repo: pygit2.Repository, branch: str, job_id: str = "job-killed") -> Path:
    """kill -9 of a process in the middle of a job: its worktree stays, checked out on `branch`."""
    if repo.lookup_branch(branch) is None:
        repo.branches.local.create(branch, repo[repo.head.target])  # type: ignore[arg-type]
    ready = Path(repo.path) / f"ready-{job_id}"
    args = [sys.executable, "-c", HOLD_WORKTREE, repo.workdir, job_id, branch, str(ready)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.exists(), proc.stderr.read() if proc.poll() is not None else "timed out"
    finally:
        proc.kill()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()
    root = Path(ready.read_text())
    ready.unlink()
    assert root.is_dir() and repo.lookup_branch(branch).is_checked_out()
    return root


def write_file(workspace: Workspace) -> list[str]:
    workspace.write_text("f.txt", "f\n")
    return ["f.txt"]


def test_the_worktree_of_a_killed_job_is_removed_and_the_next_job_runs(repo: pygit2.Repository) -> None:
    leftover = kill_inside_job_worktree(repo, "ias/test")
    assert leftover.with_name(leftover.name + ".owner").exists()  # names a process that is gone
    result = commit_job(Path(repo.workdir), request(), write_file)
    assert result.committed and result.branch == "ias/test"
    assert not leftover.exists() and repo.list_worktrees() == []
    assert not any((Path(repo.path) / "ias" / "worktrees").iterdir())


@pytest.mark.parametrize("change", ["pid recycled", "machine rebooted"])
def test_a_pid_now_running_something_else_does_not_keep_a_dead_jobs_worktree(
    repo: pygit2.Repository, change: str
) -> None:
    leftover = kill_inside_job_worktree(repo, "ias/test")
    owner = leftover.with_name(leftover.name + ".owner")
    record = json.loads(owner.read_text())
    record["pid"] = os.getpid()  # a live process now, but not the one that ran the job
    if change == "machine rebooted":
        record["started"] = Path(f"/proc/{os.getpid()}/stat").read_text().rpartition(")")[2].split()[19]
        record["boot_id"] = "an-earlier-boot"
    owner.write_text(json.dumps(record))
    assert commit_job(Path(repo.workdir), request(), write_file).committed
    assert not leftover.exists() and repo.list_worktrees() == []


def test_a_worktree_a_live_job_holds_is_left_alone_and_the_job_fails_clearly(
    repo: pygit2.Repository,
) -> None:
    repo.branches.local.create("ias/test", repo[repo.head.target])  # type: ignore[arg-type]
    with job_worktree(repo, job_id="job-live", attempt=1, branch="ias/test") as held:
        (held / "work.txt").write_text("in progress\n")
        with pytest.raises(JobFailed) as busy:
            commit_job(Path(repo.workdir), request(), write_file)
        assert busy.value.code == "branch_busy" and busy.value.retryable
        assert "job job-live" in busy.value.message and f"pid {os.getpid()}" in busy.value.message
        assert (held / "work.txt").read_text() == "in progress\n"
        assert len(repo.list_worktrees()) == 1
    assert repo.list_worktrees() == []


def test_an_earlier_attempt_of_the_same_job_gives_way(repo: pygit2.Repository) -> None:
    repo.branches.local.create("ias/test", repo[repo.head.target])  # type: ignore[arg-type]
    # Still running here (a fenced-off attempt whose thread has not noticed yet): it is stale all the same.
    with job_worktree(repo, job_id="job-1", attempt=1, branch="ias/test") as earlier:
        result = commit_job(Path(repo.workdir), request(), write_file)  # job-1, attempt 2
        assert result.committed and not earlier.exists()
    assert repo.list_worktrees() == []


def test_a_job_worktree_whose_directory_was_deleted_by_hand_is_pruned(repo: pygit2.Repository) -> None:
    repo.branches.local.create("ias/test", repo[repo.head.target])  # type: ignore[arg-type]
    with job_worktree(repo, job_id="job-other", attempt=1, branch="ias/test") as other:
        shutil.rmtree(other)
        [name] = repo.list_worktrees()
        assert repo.lookup_worktree(name).is_prunable
        result = commit_job(Path(repo.workdir), request(), write_file)
        assert result.committed and repo.list_worktrees() == []
        assert not any((Path(repo.path) / "ias" / "worktrees").iterdir())


def test_the_users_own_worktrees_are_never_touched(repo: pygit2.Repository, tmp_path: Path) -> None:
    base = repo[repo.head.target]
    repo.branches.local.create("ias/test", base)  # type: ignore[arg-type]
    repo.branches.local.create("gone", base)  # type: ignore[arg-type]
    mine = repo.add_worktree("mine", str(tmp_path / "mine"), repo.lookup_reference("refs/heads/ias/test"))
    repo.add_worktree("gone", str(tmp_path / "gone"), repo.lookup_reference("refs/heads/gone"))
    shutil.rmtree(tmp_path / "gone")
    leftover = kill_inside_job_worktree(repo, "ias/left")
    with pytest.raises(JobFailed) as refused:
        commit_job(Path(repo.workdir), request(), write_file)
    assert refused.value.code == "branch_checked_out" and str(tmp_path / "mine") in refused.value.message
    assert prune_worktrees(Path(repo.workdir)) == 1  # the killed job's, at a daemon start
    assert not leftover.exists()
    assert sorted(repo.list_worktrees()) == ["gone", "mine"]
    assert Path(mine.path).is_dir()
