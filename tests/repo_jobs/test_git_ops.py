"""The shared git layer: clear errors, identity, a worktree per job, and a checkout left alone."""

from __future__ import annotations

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
