"""The `install_ias` job: write the docs/ias/ scaffold and agent files on ias/bootstrap, and commit."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from worker.git_ops import Workspace, commit_job
from worker.handlers import HandlerResult, JobContext
from worker.repo_jobs._common import job_request, require_repo, scaffold_files, to_result

log = logging.getLogger(__name__)

JOB_TYPE = "install_ias"
BRANCH_NAME = "bootstrap"  # after the policy's prefix: ias/bootstrap by default
SUBJECT = "Bootstrap IAS framework"


async def handle(ctx: JobContext) -> HandlerResult:
    """Bootstrap the repository; re-running writes only missing files and never overwrites any."""
    repo_path = require_repo(ctx)
    templates = scaffold_files()
    tally: Counter[str] = Counter()

    def edit(workspace: Workspace) -> list[str]:
        tally.clear()  # one count per attempt at the edit
        return _write_missing(workspace, templates, tally)

    request = job_request(ctx, branch_name=BRANCH_NAME, subject=SUBJECT)
    commit = await asyncio.to_thread(commit_job, repo_path, request, edit)
    counts = {"written": tally["written"], "kept": tally["kept"], "user_edited": tally["user_edited"]}
    log.info(
        "install_ias: %s",
        counts,
        extra={"job_id": ctx.job_id, "attempt": ctx.attempt, "lease_epoch": ctx.lease_epoch},
    )
    if commit.committed:
        summary = f"bootstrapped IAS on {commit.branch}: {counts['written']} files written"
    else:
        summary = f"IAS already installed: nothing to change ({counts['kept']} files kept)"
    return to_result(commit, summary=summary, counts=counts)


def _write_missing(workspace: Workspace, templates: dict[str, str], tally: Counter[str]) -> list[str]:
    written: list[str] = []
    for rel, text in templates.items():
        path = workspace.path(rel)
        if not path.exists():
            workspace.write_text(rel, text)
            written.append(rel)
            tally["written"] += 1
            continue
        tally["kept"] += 1
        # Existing files are never overwritten; a difference from the template is the user's edit.
        if not path.is_file() or path.read_bytes() != text.encode("utf-8"):
            tally["user_edited"] += 1
    return written
