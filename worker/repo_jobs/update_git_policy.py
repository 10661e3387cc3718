"""The `update_git_policy` job: validate and commit docs/ias/policy/git.json, then apply it here."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from worker.git_ops import (
    POLICY_PATH,
    GitPolicy,
    Workspace,
    apply_policy_locally,
    commit_job,
    open_repo,
    parse_policy,
)
from worker.handlers import HandlerResult, JobContext, JobFailed
from worker.repo_jobs._common import job_request, require_repo, to_result

log = logging.getLogger(__name__)

JOB_TYPE = "update_git_policy"
POLICY_KEYS = ("version", "baseBranch", "branchPrefix", "commitFormat", "protectedBranches", "push", "pr")
JOB_KEYS = ("branch",)  # the branch this job itself commits on


async def handle(ctx: JobContext) -> HandlerResult:
    """Merge the payload's keys over the current policy, commit git.json, and apply it to later jobs."""
    repo_path = require_repo(ctx)
    changes = _policy_changes(ctx.payload)
    policy: list[GitPolicy] = []

    def edit(workspace: Workspace) -> list[str]:
        policy[:] = [parse_policy(changes, where="payload", code="invalid_payload", base=workspace.policy)]
        workspace.write_text(POLICY_PATH, json.dumps(policy[0].to_json(), indent=2) + "\n")
        return [POLICY_PATH]

    overrides = {key: ctx.payload[key] for key in JOB_KEYS if key in ctx.payload}
    request = job_request(ctx, branch_name="git-policy", subject="Update git policy", overrides=overrides)
    commit = await asyncio.to_thread(commit_job, repo_path, request, edit)
    applied = await asyncio.to_thread(_apply, repo_path, policy[0])
    log.info(
        "update_git_policy: applied %s",
        applied,
        extra={"job_id": ctx.job_id, "attempt": ctx.attempt, "lease_epoch": ctx.lease_epoch},
    )
    summary = "git policy updated" if commit.committed else "git policy unchanged"
    metadata = {"policy": policy[0].to_json(), "policy_path": POLICY_PATH}
    counts = {"keys": len(changes)}
    return to_result(commit, summary=f"{summary} and applied", counts=counts, metadata=metadata)


def _policy_changes(payload: Any) -> dict[str, Any]:
    """The payload's policy keys, checked against the defaults before any git work starts."""
    for key in payload:
        if key not in POLICY_KEYS and key not in JOB_KEYS:
            raise JobFailed(f"payload.{key} is not a git policy key", code="invalid_payload")
    changes = {key: payload[key] for key in POLICY_KEYS if key in payload}
    parse_policy(changes, where="payload", code="invalid_payload")
    return changes


def _apply(repo_path: Path, policy: GitPolicy) -> Path:
    repo = open_repo(repo_path)
    try:
        return apply_policy_locally(repo, policy)
    finally:
        repo.free()
