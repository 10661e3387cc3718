"""install_ias end to end on real repositories: scaffold, idempotency, user edits, the user's checkout."""

from __future__ import annotations

from pathlib import Path

import pygit2
import pytest
import repo_fixtures as fx
from repo_fixtures import SIGNATURE, job, read_blob, snapshot, tree_paths

from worker.handlers import HandlerRegistry, JobFailed
from worker.repo_jobs import install_ias, register
from worker.repo_jobs._common import scaffold_files

# Fixtures shared through repo_fixtures (a conftest.py here would shadow tests/conftest.py).
isolated_git = fx.isolated_git
make_repo = fx.make_repo
repo = fx.repo


EXPECTED = {
    "AGENTS.md",
    "CLAUDE.md",
    "docs/ias/README.md",
    "docs/ias/project-context.md",
    "docs/ias/gaps.md",
    "docs/ias/context/README.md",
    "docs/ias/context/base-goal.md",
    "docs/ias/context/inputs.md",
    "docs/ias/runs/README.md",
    "docs/ias/decisions/README.md",
    "docs/ias/design/README.md",
    "docs/ias/policy/README.md",
    "docs/ias/policy/git.json",
    "docs/ias/policy/validators.md",
    "docs/ias/process/run-protocol.md",
    "docs/ias/process/quality-gates.md",
    "docs/ias/templates/run-log.md",
    "docs/ias/templates/decision-record.md",
}


async def test_bootstrap_commits_the_scaffold_on_its_branch(repo: pygit2.Repository) -> None:
    workdir = Path(repo.workdir)
    before = snapshot(workdir)
    result = await install_ias.handle(job("install_ias", workdir))
    assert result.branch == "ias/bootstrap"
    assert set(result.changed_paths) == set(scaffold_files()) >= EXPECTED
    assert result.counts == {"written": len(scaffold_files()), "kept": 0, "user_edited": 0}
    commit = repo[result.commit_sha]
    assert isinstance(commit, pygit2.Commit)
    assert commit.message.startswith("Bootstrap IAS framework\n")
    assert "IAS-Job-Id: job-install_ias" in commit.message and "IAS-Attempt: 1" in commit.message
    assert commit.author.name == "IAS"  # no identity configured on this "machine"
    assert tree_paths(repo, "ias/bootstrap") >= EXPECTED | {"README.md"}
    context = read_blob(repo, "ias/bootstrap", "docs/ias/project-context.md")
    assert "- production: TODO" in context and "- sensitive_data: TODO" in context
    assert "## Open gaps\n\n- (none)" in read_blob(repo, "ias/bootstrap", "docs/ias/gaps.md")
    assert snapshot(workdir) == before  # the user's checkout never moved


async def test_rerun_changes_nothing(repo: pygit2.Repository) -> None:
    workdir = Path(repo.workdir)
    first = await install_ias.handle(job("install_ias", workdir))
    again = await install_ias.handle(job("install_ias", workdir, job_id="job-2"))
    total = len(scaffold_files())
    assert again.counts == {"written": 0, "kept": total, "user_edited": 0}
    assert again.commit_sha == first.commit_sha and again.changed_paths == ()
    assert "nothing to change" in again.summary


async def test_user_edited_file_is_kept(repo: pygit2.Repository) -> None:
    workdir = Path(repo.workdir)
    first = await install_ias.handle(job("install_ias", workdir))
    # The user fills in project-context.md on the bootstrap branch and removes gaps.md.
    branch_commit = repo[first.commit_sha]
    assert isinstance(branch_commit, pygit2.Commit)
    edited = repo.create_blob(b"# Project context\n\n- production: false\n")
    builder = repo.TreeBuilder(branch_commit.tree / "docs" / "ias")  # type: ignore[operator]
    builder.insert("project-context.md", edited, pygit2.enums.FileMode.BLOB)
    builder.remove("gaps.md")
    docs = repo.TreeBuilder(branch_commit.tree / "docs")  # type: ignore[operator]
    docs.insert("ias", builder.write(), pygit2.enums.FileMode.TREE)
    root = repo.TreeBuilder(branch_commit.tree)
    root.insert("docs", docs.write(), pygit2.enums.FileMode.TREE)
    repo.create_commit(
        "refs/heads/ias/bootstrap", SIGNATURE, SIGNATURE, "fill", root.write(), [first.commit_sha]
    )

    again = await install_ias.handle(job("install_ias", workdir, job_id="job-2"))
    assert again.changed_paths == ("docs/ias/gaps.md",)  # only the missing file comes back
    assert again.counts["user_edited"] == 1 and again.counts["written"] == 1
    assert read_blob(repo, "ias/bootstrap", "docs/ias/project-context.md").endswith("- production: false\n")


async def test_dirty_checkout_is_left_exactly_as_it_was(repo: pygit2.Repository) -> None:
    workdir = Path(repo.workdir)
    (workdir / "README.md").write_text("half-written change\n")
    (workdir / "scratch.py").write_text("print('wip')\n")
    repo.index.add("scratch.py")
    repo.index.write()
    before = snapshot(workdir)
    result = await install_ias.handle(job("install_ias", workdir))
    assert result.commit_sha
    assert snapshot(workdir) == before
    with pytest.raises(JobFailed) as failed:  # and after a failure, too
        await install_ias.handle(job("install_ias", workdir, {"branch": "bad..name"}))
    assert failed.value.code == "invalid_payload" and "branch" in failed.value.message
    assert snapshot(workdir) == before


async def test_missing_mapping_and_custom_branch(repo: pygit2.Repository) -> None:
    with pytest.raises(JobFailed) as failed:
        await install_ias.handle(job("install_ias", None))
    assert failed.value.code == "missing_repo_mapping" and not failed.value.retryable
    result = await install_ias.handle(job("install_ias", Path(repo.workdir), {"branch": "setup/ias"}))
    assert result.branch == "setup/ias"


def test_register_adds_the_six_repository_jobs() -> None:
    registry = HandlerRegistry()
    register(registry)
    assert registry.names() == sorted(
        [
            "install_ias",
            "create_run",
            "context_architect",
            "apply_decision",
            "update_git_policy",
            "git_repair",
        ]
    )
