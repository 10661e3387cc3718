"""What the repository jobs share: payload checks, the repo mapping, scaffold templates and results."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from datetime import UTC, date, datetime
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from worker.git_ops import JobCommit, JobRequest, Workspace
from worker.handlers import HandlerResult, JobContext, JobFailed, missing_checkout

SCAFFOLD_ROOT = ("templates", "scaffold")  # inside the `worker` package
SLUG_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
RUN_REF_RE = re.compile(r"^20\d{6}-[a-z0-9]+(-[a-z0-9]+)*$")
BRANCH_OVERRIDE_KEYS = ("branch", "baseBranch", "branchPrefix")
MAX_TEXT = 20_000


def require_repo(ctx: JobContext) -> Path:
    """The user's checkout this job runs against; a worker without the mapping, or whose mapped
    checkout was deleted, cannot help."""
    if ctx.repo_path is None:
        raise JobFailed(
            f"no local checkout is mapped for repository {ctx.repo_id or '(unknown)'} on this worker",
            code="missing_repo_mapping",
            retryable=False,
        )
    missing = missing_checkout(ctx)
    if missing is not None:
        raise missing
    return ctx.repo_path


def payload_str(
    payload: Mapping[str, Any],
    name: str,
    *,
    required: bool = True,
    pattern: re.Pattern[str] | None = None,
    max_len: int = MAX_TEXT,
    one_line: bool = False,
) -> str:
    """A string field of the payload; "" when optional and absent. Errors name the field."""
    value = payload.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise JobFailed(f"payload.{name} must be a non-empty string", code="invalid_payload")
    if len(value) > max_len or (one_line and "\n" in value):
        limit = "one line of " if one_line else ""
        raise JobFailed(f"payload.{name} must be {limit}at most {max_len} characters", code="invalid_payload")
    if pattern is not None and not pattern.fullmatch(value):
        raise JobFailed(f"payload.{name} must match {pattern.pattern}", code="invalid_payload")
    return value


def job_request(
    ctx: JobContext,
    *,
    branch_name: str,
    subject: str,
    trailers: tuple[tuple[str, str], ...] = (),
    overrides: Mapping[str, Any] | None = None,
) -> JobRequest:
    """The commit request of this job; the payload's branch keys override the git policy."""
    if overrides is None:
        overrides = {key: ctx.payload[key] for key in BRANCH_OVERRIDE_KEYS if key in ctx.payload}
    return JobRequest(
        job_id=ctx.job_id,
        attempt=ctx.attempt,
        branch_name=branch_name,
        subject=subject,
        overrides=overrides,
        trailers=trailers,
    )


def to_result(
    commit: JobCommit,
    *,
    summary: str,
    counts: Mapping[str, int] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> HandlerResult:
    """Metadata only: SHA, branch, changed paths, counts, summary. Never file contents."""
    return HandlerResult(
        summary=summary,
        commit_sha=commit.commit_sha,
        branch=commit.branch,
        changed_paths=commit.changed_paths,
        counts=dict(counts or {}),
        metadata={"committed": commit.committed, "pushed": commit.pushed, **(metadata or {})},
    )


def today() -> date:
    return datetime.now(UTC).date()


def scaffold_files() -> dict[str, str]:
    """Repository path → template text of every file `install_ias` writes."""
    root = files("worker").joinpath(*SCAFFOLD_ROOT)
    return {rel: node.read_text(encoding="utf-8") for rel, node in _walk(root, "")}


def repo_template(workspace: Workspace, name: str) -> str:
    """A template from docs/ias/templates/: the repository's own copy if it has one, else ours."""
    rel = f"docs/ias/templates/{name}"
    own = workspace.read_text(rel)
    if own is not None:
        return own
    return files("worker").joinpath(*SCAFFOLD_ROOT, *rel.split("/")).read_text(encoding="utf-8")


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill ``{{name}}`` placeholders; unknown placeholders stay as they are."""
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values.get(m.group(1), m.group(0)), template)


def _walk(node: Traversable, prefix: str) -> Iterator[tuple[str, Traversable]]:
    for child in sorted(node.iterdir(), key=lambda item: item.name):
        rel = f"{prefix}{child.name}"
        if child.is_dir():
            yield from _walk(child, rel + "/")
        elif child.is_file() and not child.name.endswith((".pyc", ".py")):
            yield rel, child
