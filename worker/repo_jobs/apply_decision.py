"""The `apply_decision` job: record a human's answer in docs/ias/decisions/ and the run, and commit."""

from __future__ import annotations

import asyncio
import logging
import re

from worker.git_ops import Workspace, commit_job
from worker.handlers import HandlerResult, JobContext, JobFailed
from worker.repo_jobs._common import (
    RUN_REF_RE,
    job_request,
    payload_str,
    render,
    repo_template,
    require_repo,
    to_result,
    today,
)

log = logging.getLogger(__name__)

JOB_TYPE = "apply_decision"
DECISION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")
RUN_DECISIONS_HEADER = "# Decisions\n\nDecisions applied to this run, newest last.\n\n"


async def handle(ctx: JobContext) -> HandlerResult:
    """Write the decision record (status accepted) and link it from the run; idempotent by id."""
    repo_path = require_repo(ctx)
    decision_id = payload_str(ctx.payload, "decision_id", pattern=DECISION_ID_RE, max_len=128)
    title = payload_str(ctx.payload, "title", max_len=200, one_line=True)
    answer = payload_str(ctx.payload, "answer")
    prompt = payload_str(ctx.payload, "prompt", required=False)
    run_ref = payload_str(ctx.payload, "run_ref", required=False, pattern=RUN_REF_RE, max_len=120)
    values = {
        "decision_id": decision_id,
        "title": title,
        "answer": answer.strip(),
        "prompt": prompt.strip() or "(not recorded)",
        "run_ref": run_ref or "(none)",
        "date": today().isoformat(),
    }

    def edit(workspace: Workspace) -> list[str]:
        changed = _write_record(workspace, decision_id, values)
        if run_ref:
            changed += _link_from_run(workspace, run_ref, decision_id, title)
        return changed

    request = job_request(
        ctx,
        branch_name=f"run/{run_ref}" if run_ref else "decisions",
        subject=f"Apply decision {decision_id}: {title}",
        trailers=(("IAS-Decision", decision_id),),
    )
    commit = await asyncio.to_thread(commit_job, repo_path, request, edit)
    log.info(
        "apply_decision: %s on %s",
        decision_id,
        commit.branch,
        extra={"job_id": ctx.job_id, "attempt": ctx.attempt, "lease_epoch": ctx.lease_epoch},
    )
    done = "applied" if commit.committed else "was already applied"
    return to_result(
        commit,
        summary=f"decision {decision_id} {done}",
        counts={"files": len(commit.changed_paths)},
        metadata={"decision_id": decision_id, "decision_path": _record_path(decision_id), "run_ref": run_ref},
    )


def _record_path(decision_id: str) -> str:
    return f"docs/ias/decisions/{decision_id}.md"


def _write_record(workspace: Workspace, decision_id: str, values: dict[str, str]) -> list[str]:
    rel = _record_path(decision_id)
    if workspace.exists(rel):
        return []  # applied before: the first answer stands; a change is a new, superseding decision
    workspace.write_text(rel, render(repo_template(workspace, "decision-record.md"), values))
    return [rel]


def _link_from_run(workspace: Workspace, run_ref: str, decision_id: str, title: str) -> list[str]:
    if not workspace.exists(f"docs/ias/runs/{run_ref}"):
        raise JobFailed(f"run {run_ref} does not exist on this branch", code="run_not_found")
    rel = f"docs/ias/runs/{run_ref}/decisions.md"
    text = workspace.read_text(rel) or RUN_DECISIONS_HEADER
    link = f"[{decision_id}](../../decisions/{decision_id}.md)"
    if link in text:
        return []
    if not text.endswith("\n"):
        text += "\n"
    workspace.write_text(rel, f"{text}- {today().isoformat()} {link}: {title}\n")
    return [rel]
