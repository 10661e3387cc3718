"""`ias install PATH`: bootstrap a repository locally, with no control plane at all."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import click

from worker.cli import fail
from worker.handlers import HandlerResult, JobContext, JobFailed
from worker.repo_jobs import install_ias


@click.command("install")
@click.argument("path", type=click.Path(path_type=Path), default=".")
@click.option("--branch", default=None, help="Branch to commit on (default: ias/bootstrap).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def install(path: Path, branch: str | None, as_json: bool) -> None:
    """Write the docs/ias/ scaffold, AGENTS.md and CLAUDE.md into the git repository at PATH.

    The files are committed on their own branch (ias/bootstrap) in a separate worktree, so your
    checkout and uncommitted changes are left alone. Running it again changes nothing.
    """
    payload: dict[str, Any] = {"branch": branch} if branch else {}
    ctx = JobContext(
        job_id=f"local-{uuid.uuid4().hex[:12]}",
        job_type=install_ias.JOB_TYPE,
        attempt=1,
        lease_epoch=0,
        payload=payload,
        repo_path=path.resolve(),
    )
    try:
        result = asyncio.run(install_ias.handle(ctx))
    except JobFailed as exc:
        fail(exc.message)
        return
    click.echo(json.dumps(_as_dict(result), indent=2) if as_json else _one_line(result))


def _one_line(result: HandlerResult) -> str:
    return f"{result.summary} (branch {result.branch}, commit {result.commit_sha[:12]})"


def _as_dict(result: HandlerResult) -> dict[str, Any]:
    return {
        "summary": result.summary,
        "commit_sha": result.commit_sha,
        "branch": result.branch,
        "changed_paths": list(result.changed_paths),
        "counts": dict(result.counts),
    }
