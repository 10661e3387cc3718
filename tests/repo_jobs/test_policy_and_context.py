"""update_git_policy and context_architect end to end on real repositories."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pygit2
import pytest
import repo_fixtures as fx
from repo_fixtures import commit_files, job, read_blob, snapshot

from worker.handlers import JobFailed
from worker.repo_jobs import context_architect, create_run, install_ias, update_git_policy

# Fixtures shared through repo_fixtures (a conftest.py here would shadow tests/conftest.py).
isolated_git = fx.isolated_git
make_repo = fx.make_repo
repo = fx.repo


PROJECT = {
    "README.md": "# demo\n",
    "pyproject.toml": (
        '[build-system]\nrequires = ["setuptools"]\n\n[project]\nname = "demo"\n'
        'dependencies = ["fastapi>=0.1", "click"]\n\n[project.optional-dependencies]\n'
        'dev = ["pytest>=8"]\n\n[tool.ruff]\nline-length = 100\n'
    ),
    "uv.lock": "version = 1\n",
    "Makefile": "build:\n\tuv build\n\ntest: build\n\tuv run pytest\n",
    "src/demo/__init__.py": "VALUE = 1\n",
    "src/demo/app.py": "SECRET_MARKER = 'do-not-report'\n",
    "web/package.json": "{}\n",
    ".github/workflows/ci.yml": "on: push\n",
}


async def test_policy_changes_the_next_jobs_branch_and_commit_format(repo: pygit2.Repository) -> None:
    workdir = Path(repo.workdir)
    before = snapshot(workdir)
    payload = {"branchPrefix": "bot/", "commitFormat": "chore(ias): {subject}", "pr": {"draft": True}}
    result = await update_git_policy.handle(job("update_git_policy", workdir, payload))
    assert result.branch == "ias/git-policy"  # written under the policy it replaces
    written = json.loads(read_blob(repo, result.branch, "docs/ias/policy/git.json"))
    assert written["branchPrefix"] == "bot/" and written["version"] == 1 and written["push"] is False
    assert written["pr"]["draft"] is True and written["pr"]["mergeMethod"] == "squash"

    run = await create_run.handle(job("create_run", workdir, {"slug": "next", "goal": "g"}))
    assert run.branch.startswith("bot/run/")
    commit = repo[run.commit_sha]
    assert isinstance(commit, pygit2.Commit)
    assert commit.message.startswith("chore(ias): Create run ")
    # Payload overrides beat the policy.
    other = await create_run.handle(
        job("create_run", workdir, {"slug": "other", "goal": "g", "branchPrefix": "x/"})
    )
    assert other.branch.startswith("x/run/")
    assert snapshot(workdir) == before


async def test_committed_policy_on_the_default_branch_wins_once_it_changes(repo: pygit2.Repository) -> None:
    workdir = Path(repo.workdir)
    await update_git_policy.handle(job("update_git_policy", workdir, {"branchPrefix": "bot/"}))
    policy = {"version": 1, "baseBranch": "auto", "branchPrefix": "team/"}
    commit_files(repo, {"docs/ias/policy/git.json": json.dumps(policy)}, "humans edit the policy")
    result = await install_ias.handle(job("install_ias", workdir))
    assert result.branch == "team/bootstrap"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"branchPrefix": "bad..x"}, "branchPrefix"),
        ({"push": "yes"}, "push"),
        ({"commitFormat": "no placeholder"}, "commitFormat"),
        ({"pr": {"mergeMethod": "octopus"}}, "pr"),
        ({"colour": "blue"}, "colour"),
        ({"version": 2}, "version"),
    ],
)
async def test_bad_policy_payloads_are_rejected(
    repo: pygit2.Repository, payload: dict[str, object], field: str
) -> None:
    with pytest.raises(JobFailed) as failed:
        await update_git_policy.handle(job("update_git_policy", Path(repo.workdir), payload))
    assert failed.value.code == "invalid_payload" and field in failed.value.message
    assert repo.lookup_branch("ias/git-policy") is None


async def test_broken_git_json_fails_every_job_clearly(repo: pygit2.Repository) -> None:
    commit_files(repo, {"docs/ias/policy/git.json": "{not json"}, "broken")
    with pytest.raises(JobFailed) as failed:
        await install_ias.handle(job("install_ias", Path(repo.workdir)))
    assert failed.value.code == "invalid_git_policy" and "git.json" in failed.value.message


async def test_context_architect_detects_the_stack(make_repo: Callable[..., pygit2.Repository]) -> None:
    repo = make_repo(files=PROJECT)
    workdir = Path(repo.workdir)
    await install_ias.handle(job("install_ias", workdir))
    before = snapshot(workdir)
    result = await context_architect.handle(job("context_architect", workdir))
    meta = result.metadata
    assert result.branch == "ias/context" and result.changed_paths == ("docs/ias/project-context.md",)
    assert {"FastAPI", "Click", "pytest"} <= set(meta["frameworks"])
    assert meta["package_managers"][:2] == ["uv", "npm"] or "uv" in meta["package_managers"]
    assert meta["commands"]["build"][0] == "make build" and "make test" in meta["commands"]["test"]
    assert "uv run pytest" in meta["commands"]["test"] and "uv run ruff check ." in meta["commands"]["lint"]
    assert meta["top_level_dirs"] == [".github", "src", "web"] and meta["ci"] == ["GitHub Actions"]
    assert result.counts["files"] == len(PROJECT) and meta["language_files"]["Python"] == 2
    assert "do-not-report" not in json.dumps(meta)  # names and counts only
    text = read_blob(repo, result.branch, "docs/ias/project-context.md")
    assert "- production: TODO" in text and "- frameworks: " in text and "`make test`" in text
    assert snapshot(workdir) == before


async def test_context_rerun_replaces_only_its_section(make_repo: Callable[..., pygit2.Repository]) -> None:
    repo = make_repo(files=PROJECT)
    workdir = Path(repo.workdir)
    first = await context_architect.handle(job("context_architect", workdir))
    again = await context_architect.handle(job("context_architect", workdir, job_id="job-2"))
    assert again.changed_paths == () and again.commit_sha == first.commit_sha  # nothing new to say

    # A human fills a field on the context branch; the code gains a Go module; the job re-runs.
    text = read_blob(repo, first.branch, "docs/ias/project-context.md").replace(
        "- production: TODO", "- production: false"
    )
    repo.checkout(repo.lookup_branch(first.branch))
    commit_files(repo, {"docs/ias/project-context.md": text, "go.mod": "module demo\n"}, "human edits")
    repo.checkout(repo.lookup_branch("main"))
    third = await context_architect.handle(job("context_architect", workdir, job_id="job-3"))
    updated = read_blob(repo, third.branch, "docs/ias/project-context.md")
    assert "- production: false" in updated and "go test ./..." in updated
    assert updated.count(context_architect.BEGIN) == 1


async def test_jobs_push_to_origin_only_when_the_policy_says_so(
    repo: pygit2.Repository, tmp_path: Path
) -> None:
    workdir = Path(repo.workdir)
    origin = pygit2.init_repository(str(tmp_path / "origin.git"), bare=True)  # a local path: no network
    repo.remotes.create("origin", str(tmp_path / "origin.git"))
    local = await create_run.handle(job("create_run", workdir, {"slug": "local", "goal": "g"}))
    assert local.metadata["pushed"] is False and origin.lookup_branch(local.branch) is None

    await update_git_policy.handle(job("update_git_policy", workdir, {"push": True}))
    pushed = await create_run.handle(job("create_run", workdir, {"slug": "shared", "goal": "g"}))
    assert pushed.metadata["pushed"] is True
    assert str(origin.lookup_branch(pushed.branch).target) == pushed.commit_sha

    repo.remotes.delete("origin")
    with pytest.raises(JobFailed) as failed:
        await create_run.handle(job("create_run", workdir, {"slug": "nowhere", "goal": "g"}))
    assert failed.value.code == "no_remote"
