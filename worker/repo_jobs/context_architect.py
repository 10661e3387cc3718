"""The `context_architect` job: inspect the committed tree and write its section of project-context.md."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pygit2

from worker.git_ops import Workspace, commit_job
from worker.handlers import HandlerResult, JobContext
from worker.repo_jobs._common import job_request, require_repo, scaffold_files, to_result
from worker.repo_jobs.context_scan import MANIFESTS, TreeScan, scan_commit
from worker.repo_jobs.context_stack import Stack, detect_stack

log = logging.getLogger(__name__)

JOB_TYPE = "context_architect"
CONTEXT_PATH = "docs/ias/project-context.md"
BEGIN = "<!-- ias:context-architect:begin -->"
END = "<!-- ias:context-architect:end -->"
MAX_LANGUAGES = 8


async def handle(ctx: JobContext) -> HandlerResult:
    """Write the detected stack, layout and commands; the human-edited fields are kept."""
    repo_path = require_repo(ctx)
    found: dict[str, Any] = {}

    def edit(workspace: Workspace) -> list[str]:
        head = workspace.repo.head.peel(pygit2.Commit)
        assert isinstance(head, pygit2.Commit)
        scan = scan_commit(workspace.repo, head)
        stack = detect_stack(scan)
        found.update(_metadata(scan, stack), analysed_commit=str(head.id))
        current = workspace.read_text(CONTEXT_PATH) or scaffold_files()[CONTEXT_PATH]
        updated = replace_section(current, render_section(scan, stack))
        if updated == current:
            return []
        workspace.write_text(CONTEXT_PATH, updated)
        return [CONTEXT_PATH]

    request = job_request(ctx, branch_name="context", subject="Update project context")
    commit = await asyncio.to_thread(commit_job, repo_path, request, edit)
    log.info(
        "context_architect: %s files, stack %s",
        found.get("files"),
        found.get("frameworks"),
        extra={"job_id": ctx.job_id, "attempt": ctx.attempt, "lease_epoch": ctx.lease_epoch},
    )
    summary = "project context updated" if commit.committed else "project context already current"
    counts = {key: found[key] for key in ("files", "bytes", "languages", "skipped_large")}
    return to_result(commit, summary=summary, counts=counts, metadata=found)


def replace_section(text: str, section: str) -> str:
    """Swap the generated section between the markers, or append it; nothing else changes."""
    start, end = text.find(BEGIN), text.find(END)
    if start != -1 and end > start:
        return text[:start] + section + text[end + len(END) :]
    return text.rstrip("\n") + "\n\n" + section + "\n"


def render_section(scan: TreeScan, stack: Stack) -> str:
    """The generated Markdown: stable for an unchanged tree, so a re-run commits nothing."""
    languages = ", ".join(f"{name} ({count} files)" for name, count in _top_languages(scan))
    ci = ", ".join(f"{system} ({count} files)" for system, count in sorted(scan.ci.items()))
    lines = [
        BEGIN,
        "## Detected context (generated)",
        "",
        "Written by the `context_architect` job from the committed tree; a re-run replaces only this",
        "section. Edit the fields above, not this section.",
        "",
        f"- languages: {languages or 'none detected'}",
        f"- frameworks: {', '.join(stack.frameworks) or 'none detected'}",
        f"- package_managers: {', '.join(stack.package_managers) or 'none detected'}",
        *(f"- {kind}_commands: {_commands(stack.commands[kind])}" for kind in ("build", "test", "lint")),
        f"- layout: {', '.join(f'`{name}/`' for name in sorted(scan.top_dirs)) or 'flat'}",
        f"- ci: {ci or 'none detected'}",
        f"- size: {scan.files} files, {scan.bytes} bytes" + (" (walk truncated)" if scan.truncated else ""),
        END,
    ]
    return "\n".join(lines)


def _commands(commands: list[str]) -> str:
    return ", ".join(f"`{command}`" for command in commands) or "none detected"


def _top_languages(scan: TreeScan) -> list[tuple[str, int]]:
    return sorted(scan.languages.items(), key=lambda item: (-item[1], item[0]))[:MAX_LANGUAGES]


def _metadata(scan: TreeScan, stack: Stack) -> dict[str, Any]:
    """Names, counts and commands for the Context Lake; never file contents."""
    return {
        "files": scan.files,
        "bytes": scan.bytes,
        "skipped_large": scan.skipped_large,
        "truncated": scan.truncated,
        "languages": len(scan.languages),
        "language_files": dict(_top_languages(scan)),
        "frameworks": list(stack.frameworks),
        "package_managers": list(stack.package_managers),
        "commands": {kind: list(commands) for kind, commands in stack.commands.items()},
        "manifests": sorted(scan.root_files & MANIFESTS),
        "top_level_dirs": sorted(scan.top_dirs),
        "ci": sorted(scan.ci),
    }
