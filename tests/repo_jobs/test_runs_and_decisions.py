"""create_run and apply_decision end to end on real repositories."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pygit2
import pytest
import repo_fixtures as fx
from repo_fixtures import job, read_blob, snapshot, tree_paths

from worker.handlers import JobFailed
from worker.repo_jobs import apply_decision, create_run, install_ias

# Fixtures shared through repo_fixtures (a conftest.py here would shadow tests/conftest.py).
isolated_git = fx.isolated_git
make_repo = fx.make_repo
repo = fx.repo


def run_ref(slug: str) -> str:
    return f"{datetime.now(UTC):%Y%m%d}-{slug}"


async def test_create_run_writes_the_run_and_reports_its_pointer(repo: pygit2.Repository) -> None:
    workdir = Path(repo.workdir)
    await install_ias.handle(job("install_ias", workdir))
    before = snapshot(workdir)
    payload = {"slug": "habit-tracker", "goal": "Track daily habits.", "run_id": "run-42"}
    result = await create_run.handle(job("create_run", workdir, payload))
    ref = run_ref("habit-tracker")
    folder = f"docs/ias/runs/{ref}"
    assert result.branch == f"ias/run/{ref}"
    assert set(result.changed_paths) == {
        f"docs/ias/runs/{ref}.md",
        f"{folder}/intent.md",
        f"{folder}/proposal.md",
        f"{folder}/run-state.json",
        f"{folder}/evidence/.gitkeep",
    }
    assert result.metadata["run_ref"] == ref
    assert result.metadata["run_state_path"] == f"{folder}/run-state.json"
    state = json.loads(read_blob(repo, result.branch, f"{folder}/run-state.json"))
    assert state["run_id"] == "run-42" and state["status"] == "proposed" and state["tasks"] == []
    assert "Track daily habits." in read_blob(repo, result.branch, f"{folder}/intent.md")
    assert "Track daily habits." not in json.dumps(result.metadata)  # metadata only, no content
    assert snapshot(workdir) == before


async def test_create_run_fails_clearly_when_the_run_exists(repo: pygit2.Repository) -> None:
    workdir = Path(repo.workdir)
    payload = {"slug": "twice", "goal": "Once."}
    first = await create_run.handle(job("create_run", workdir, payload))
    retry = await create_run.handle(job("create_run", workdir, payload, attempt=2))
    assert retry.commit_sha == first.commit_sha and retry.changed_paths == ()  # same job, retried
    (Path(repo.workdir) / "dirty.txt").write_text("user work\n")
    before = snapshot(workdir)
    with pytest.raises(JobFailed) as failed:
        await create_run.handle(job("create_run", workdir, payload, job_id="another-job"))
    assert failed.value.code == "run_exists" and run_ref("twice") in failed.value.message
    assert snapshot(workdir) == before and repo.list_worktrees() == []


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"goal": "x"}, "slug"),
        ({"slug": "Not_Kebab", "goal": "x"}, "slug"),
        ({"slug": "ok", "goal": ""}, "goal"),
        ({"slug": "ok", "goal": "x", "run_id": 7}, "run_id"),
    ],
)
async def test_create_run_rejects_bad_payloads(
    repo: pygit2.Repository, payload: dict[str, object], field: str
) -> None:
    with pytest.raises(JobFailed) as failed:
        await create_run.handle(job("create_run", Path(repo.workdir), payload))
    assert failed.value.code == "invalid_payload" and f"payload.{field}" in failed.value.message


async def test_apply_decision_records_and_links_idempotently(repo: pygit2.Repository) -> None:
    workdir = Path(repo.workdir)
    run = await create_run.handle(job("create_run", workdir, {"slug": "pick-db", "goal": "Pick a DB."}))
    payload = {
        "decision_id": "blk-abc123",
        "run_ref": run.metadata["run_ref"],
        "title": "Which database?",
        "prompt": "PostgreSQL or SQLite?",
        "answer": "PostgreSQL",
    }
    result = await apply_decision.handle(job("apply_decision", workdir, payload))
    assert result.branch == run.branch  # decisions land on the run's branch
    record = read_blob(repo, result.branch, "docs/ias/decisions/blk-abc123.md")
    assert (
        "- status: accepted" in record
        and "PostgreSQL or SQLite?" in record
        and "## Answer\n\nPostgreSQL" in record
    )
    run_decisions = read_blob(repo, result.branch, f"docs/ias/runs/{run.metadata['run_ref']}/decisions.md")
    assert "[blk-abc123](../../decisions/blk-abc123.md): Which database?" in run_decisions
    commit = repo[result.commit_sha]
    assert isinstance(commit, pygit2.Commit)
    assert "IAS-Decision: blk-abc123" in commit.message and "IAS-Job-Id: job-apply_decision" in commit.message

    again = await apply_decision.handle(job("apply_decision", workdir, payload, job_id="job-again"))
    assert again.commit_sha == result.commit_sha and again.changed_paths == ()
    assert "already applied" in again.summary


async def test_apply_decision_without_run_and_with_unknown_run(repo: pygit2.Repository) -> None:
    workdir = Path(repo.workdir)
    payload = {"decision_id": "d-1", "title": "Naming", "answer": "Use kebab-case."}
    result = await apply_decision.handle(job("apply_decision", workdir, payload))
    assert result.branch == "ias/decisions"
    assert "docs/ias/decisions/d-1.md" in tree_paths(repo, result.branch)
    with pytest.raises(JobFailed) as failed:
        await apply_decision.handle(job("apply_decision", workdir, {**payload, "run_ref": "20990101-nope"}))
    assert failed.value.code == "run_not_found"
    with pytest.raises(JobFailed) as invalid:
        await apply_decision.handle(job("apply_decision", workdir, {**payload, "decision_id": "../x"}))
    assert invalid.value.code == "invalid_payload" and "decision_id" in invalid.value.message
