"""The `create_run` job: a run folder (intent, proposal, run state, evidence) and its run log, committed."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import Any

from worker.git_ops import Workspace, commit_job
from worker.handlers import HandlerResult, JobContext, JobFailed
from worker.repo_jobs._common import (
    SLUG_RE,
    job_request,
    payload_str,
    render,
    repo_template,
    require_repo,
    to_result,
    today,
)

log = logging.getLogger(__name__)

JOB_TYPE = "create_run"
RUNS_DIR = "docs/ias/runs"


async def handle(ctx: JobContext) -> HandlerResult:
    """Create docs/ias/runs/YYYYMMDD-<slug>/ on the run's branch; fails if the run exists."""
    repo_path = require_repo(ctx)
    slug = payload_str(ctx.payload, "slug", pattern=SLUG_RE, max_len=80)
    goal = payload_str(ctx.payload, "goal")
    run_id = payload_str(ctx.payload, "run_id", required=False, max_len=200, one_line=True)
    run_ref = f"{today():%Y%m%d}-{slug}"
    values = {"run_ref": run_ref, "slug": slug, "goal": goal.strip(), "date": today().isoformat()}

    def edit(workspace: Workspace) -> list[str]:
        if _created_by(workspace, run_ref) == ctx.job_id:
            return []  # a retry of the attempt that already committed the run
        if workspace.exists(f"{RUNS_DIR}/{run_ref}") or workspace.exists(f"{RUNS_DIR}/{run_ref}.md"):
            raise JobFailed(f"run {run_ref} already exists; choose another slug", code="run_exists")
        state = _run_state(run_ref=run_ref, slug=slug, run_id=run_id, job_id=ctx.job_id)
        return _write_run(workspace, run_ref, values, state)

    request = job_request(ctx, branch_name=f"run/{run_ref}", subject=f"Create run {run_ref}")
    commit = await asyncio.to_thread(commit_job, repo_path, request, edit)
    log.info(
        "create_run: %s on %s",
        run_ref,
        commit.branch,
        extra={"job_id": ctx.job_id, "attempt": ctx.attempt, "lease_epoch": ctx.lease_epoch},
    )
    summary = f"created run {run_ref}" if commit.committed else f"run {run_ref} was already created"
    metadata = {"run_ref": run_ref, "run_state_path": f"{RUNS_DIR}/{run_ref}/run-state.json"}
    return to_result(commit, summary=summary, counts={"files": len(commit.changed_paths)}, metadata=metadata)


def _write_run(
    workspace: Workspace, run_ref: str, values: dict[str, str], state: dict[str, Any]
) -> list[str]:
    folder = f"{RUNS_DIR}/{run_ref}"
    files = {
        f"{RUNS_DIR}/{run_ref}.md": render(repo_template(workspace, "run-log.md"), values),
        f"{folder}/intent.md": render(repo_template(workspace, "intent.md"), values),
        f"{folder}/proposal.md": render(repo_template(workspace, "proposal.md"), values),
        f"{folder}/run-state.json": json.dumps(state, indent=2) + "\n",
        f"{folder}/evidence/.gitkeep": "",
    }
    for rel, text in files.items():
        workspace.write_text(rel, text)
    return list(files)


def _run_state(*, run_ref: str, slug: str, run_id: str, job_id: str) -> dict[str, Any]:
    """The machine-readable task state agents keep current while they work."""
    return {
        "version": 1,
        "run_ref": run_ref,
        "run_id": run_id or None,
        "slug": slug,
        "status": "proposed",
        "current_milestone": None,
        "milestones": [],
        "tasks": [],
        "blocked_by_decision": None,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "created_by_job": job_id,
    }


def _created_by(workspace: Workspace, run_ref: str) -> str | None:
    text = workspace.read_text(f"{RUNS_DIR}/{run_ref}/run-state.json")
    if text is None:
        return None
    try:
        state = json.loads(text)
    except ValueError:
        return None
    creator = state.get("created_by_job") if isinstance(state, dict) else None
    return creator if isinstance(creator, str) else None
