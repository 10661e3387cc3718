"""The `git_repair` job: diagnose a broken checkout, then repair it without ever discarding user work."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pygit2
from pygit2.enums import CheckoutStrategy, FileStatus, ResetMode

from worker.git_ops import commit_signature
from worker.handlers import HandlerResult, JobContext, JobFailed
from worker.repo_jobs._common import payload_str, require_repo
from worker.repo_jobs.git_diagnosis import (
    Diagnosis,
    Finding,
    HeadPlan,
    Operation,
    RepairOptions,
    describe_paths,
    diagnose,
    head_commit,
    is_on_a_branch,
    open_checkout,
    plan_head,
    rescue_branch_name,
    uncommitted_paths,
)

log = logging.getLogger(__name__)

JOB_TYPE = "git_repair"
DEFAULT_LOCK_MAX_AGE_S = 60.0
STAGED = (
    FileStatus.INDEX_NEW
    | FileStatus.INDEX_MODIFIED
    | FileStatus.INDEX_DELETED
    | FileStatus.INDEX_RENAMED
    | FileStatus.INDEX_TYPECHANGE
)
# git 2.39 writes AUTO_MERGE during a conflicted merge; libgit2's state cleanup does not know it.
GIT_ONLY_STATE_FILES = ("AUTO_MERGE",)


@dataclass(slots=True)
class RepairReport:
    """What was found and what was done; metadata only (paths, branch names, SHAs)."""

    findings: list[Finding] = field(default_factory=list)
    actions: list[Finding] = field(default_factory=list)
    branch: str = ""
    dry_run: bool = False

    def act(self, kind: str, detail: str) -> None:
        self.actions.append(Finding(kind, detail))

    def to_result(self) -> HandlerResult:
        return HandlerResult(
            summary=self.summary(),
            branch=self.branch,
            counts={"findings": len(self.findings), "actions": len(self.actions)},
            metadata={
                "dry_run": self.dry_run,
                "findings": [finding.to_json() for finding in self.findings],
                "actions": [action.to_json() for action in self.actions],
            },
        )

    def summary(self) -> str:
        if not self.findings:
            return "checkout is healthy: nothing to repair"
        kinds = ", ".join(sorted({finding.kind for finding in self.findings}))
        if self.dry_run:
            return f"dry run: {len(self.findings)} findings ({kinds}), nothing changed"
        return f"repaired {len(self.findings)} findings ({kinds}) with {len(self.actions)} actions"


async def handle(ctx: JobContext) -> HandlerResult:
    """Diagnose `ctx.repo_path` and, unless ``dry_run``, repair it; refuse with ``unsafe_to_repair``."""
    repo_path = require_repo(ctx)
    options = parse_options(ctx.job_id, ctx.payload)
    ctx.heartbeat("diagnosing the checkout")
    report = await asyncio.to_thread(repair_checkout, repo_path, options)
    for action in report.actions:
        log.info(
            "git_repair job_id=%s attempt=%s lease_epoch=%s %s: %s",
            ctx.job_id,
            ctx.attempt,
            ctx.lease_epoch,
            action.kind,
            action.detail,
        )
    return report.to_result()


def parse_options(job_id: str, payload: Mapping[str, Any]) -> RepairOptions:
    """Validate the payload; errors name the field."""
    return RepairOptions(
        job_id=job_id,
        lock_max_age=timedelta(seconds=_lock_max_age_s(payload)),
        dry_run=_payload_bool(payload, "dry_run"),
        require_clean=_payload_bool(payload, "require_clean"),
        ensure_branch=_payload_branch(payload, "ensure_branch"),
        base=_payload_branch(payload, "base"),
    )


def _lock_max_age_s(payload: Mapping[str, Any]) -> float:
    value = payload.get("lock_max_age_s", DEFAULT_LOCK_MAX_AGE_S)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise JobFailed("payload.lock_max_age_s must be a number of seconds >= 0", code="invalid_payload")
    return float(value)


def _payload_bool(payload: Mapping[str, Any], name: str) -> bool:
    value = payload.get(name, False)
    if not isinstance(value, bool):
        raise JobFailed(f"payload.{name} must be true or false", code="invalid_payload")
    return value


def _payload_branch(payload: Mapping[str, Any], name: str) -> str:
    value = payload_str(payload, name, required=False, max_len=200, one_line=True)
    if value and not pygit2.reference_is_valid_name(f"refs/heads/{value}"):
        raise JobFailed(f"payload.{name} is not a valid branch name: {value!r}", code="invalid_payload")
    return value


def repair_checkout(path: Path, options: RepairOptions) -> RepairReport:
    """Diagnose; refuse before touching anything if any finding is unsafe; else repair in a fixed order."""
    repo = open_checkout(path)
    diagnosis = diagnose(repo, options)
    if diagnosis.refusals:
        raise JobFailed("; ".join(diagnosis.refusals), code="unsafe_to_repair")
    report = RepairReport(findings=list(diagnosis.findings), dry_run=options.dry_run)
    if not options.dry_run:
        _repair(repo, diagnosis, options, report)
    report.branch = "" if repo.head_is_detached else str(repo.head.shorthand)
    return report


def _repair(
    repo: pygit2.Repository, diagnosis: Diagnosis, options: RepairOptions, report: RepairReport
) -> None:
    # Locks first: every later step writes the index or a ref and would fail on them.
    for lock in diagnosis.stale_locks:
        lock.path.unlink(missing_ok=True)
        report.act("remove_lock", f"{lock.rel} ({lock.age_s:.0f} s old, no git process running here)")
    if diagnosis.operation is not None:
        _abort_operation(repo, diagnosis.operation, options, report)
    # Planned again: aborting a rebase that started on a detached HEAD leaves HEAD detached.
    head = plan_head(repo)
    if head is not None:
        if diagnosis.head is None:
            report.findings.append(Finding("detached_head", f"HEAD is detached at {head.commit_id[:12]}"))
        _attach_head(repo, head, report)
    if diagnosis.missing_branch:
        _create_branch(repo, diagnosis.missing_branch, diagnosis.base_branch, report)
    if options.require_clean:
        _stash_uncommitted(repo, options, report)


def _abort_operation(
    repo: pygit2.Repository, operation: Operation, options: RepairOptions, report: RepairReport
) -> None:
    """Save every uncommitted change to a stash, then undo only what the operation did."""
    touched = sorted({*operation.conflicted, *_staged_paths(repo)})
    if operation.restore_commit:
        _rescue_rebased_commits(repo, report)
    _resolve_with_worktree(repo, operation.conflicted)
    stash = _save_stash(repo, f"ias git_repair {options.job_id}: before aborting {operation.kind}", keep=True)
    if stash:
        report.act("stash", f"{stash} keeps every uncommitted change, conflicted files as in the worktree")
    if operation.restore_commit:
        _restore_rebase_start(repo, operation, report)
    else:
        _reset_paths(repo, touched)
        repo.state_cleanup()
        reset = describe_paths(touched) or "no paths"
        report.act("abort", f"{operation.kind} aborted; reset to HEAD: {reset}")
    _remove_git_only_state(repo)


def _staged_paths(repo: pygit2.Repository) -> list[str]:
    return [path for path, flags in repo.status().items() if flags & STAGED]


def _rescue_rebased_commits(repo: pygit2.Repository, report: RepairReport) -> None:
    """Commits a rebase already made (an amended "edit" stop, say) exist nowhere else: keep them."""
    commit = head_commit(repo)
    if not repo.head_is_detached or is_on_a_branch(repo, commit.id):
        return
    name = rescue_branch_name(repo, commit.id)
    repo.branches.local.create(name, commit)
    report.act("rescue_branch", f"{name} at {str(commit.id)[:12]}: commits the rebase had made")


def _resolve_with_worktree(repo: pygit2.Repository, conflicted: tuple[str, ...]) -> None:
    """Stage conflicted files as the worktree has them (markers, half-done resolutions) to stash them."""
    if not conflicted:
        return
    index = repo.index
    workdir = Path(repo.workdir)
    for path in conflicted:
        del index.conflicts[path]
        if (workdir / path).is_file() or (workdir / path).is_symlink():
            index.add(path)
    index.write()


def _save_stash(repo: pygit2.Repository, message: str, *, keep: bool) -> str:
    """Stash staged, unstaged and untracked changes; "" when there are none. ``keep`` leaves them in place."""
    if not uncommitted_paths(repo):
        return ""
    oid = repo.stash(commit_signature(repo), message, include_untracked=True, keep_all=keep)
    return f"stash@{{0}} {oid}"


def _reset_paths(repo: pygit2.Repository, paths: list[str]) -> None:
    """Index and worktree back to HEAD for `paths` only; files HEAD lacks are removed (all are stashed)."""
    if paths:
        # pygit2 ships checkout_tree without annotations; its signature is (treeish, **options).
        repo.checkout_tree(  # type: ignore[no-untyped-call]
            head_commit(repo).tree, paths=paths, strategy=CheckoutStrategy.FORCE
        )


def _restore_rebase_start(repo: pygit2.Repository, operation: Operation, report: RepairReport) -> None:
    """Back to the branch (or detached commit) the rebase started from, as `git rebase --abort` does."""
    repo.state_cleanup()
    if operation.restore_ref:
        repo.set_head(operation.restore_ref)
        where = operation.restore_ref.removeprefix("refs/heads/")
    else:
        repo.set_head(pygit2.Oid(hex=operation.restore_commit))
        where = f"commit {operation.restore_commit[:12]}"
    # The whole tree goes back, as git does: every uncommitted change is already in the stash.
    repo.reset(repo.head.target, ResetMode.HARD)
    report.act("abort", f"{operation.kind} aborted; back on {where}")


def _remove_git_only_state(repo: pygit2.Repository) -> None:
    for name in GIT_ONLY_STATE_FILES:
        Path(repo.path, name).unlink(missing_ok=True)


def _attach_head(repo: pygit2.Repository, head: HeadPlan, report: RepairReport) -> None:
    """Point HEAD at a branch on the same commit: the worktree and index stay exactly as they are."""
    if head.rescue and repo.branches.local.get(head.branch) is None:
        repo.branches.local.create(head.branch, head_commit(repo))
    repo.set_head(f"refs/heads/{head.branch}")
    kind = "rescue_branch" if head.rescue else "reattach_head"
    report.act(kind, f"HEAD attached to {head.branch} at {head.commit_id[:12]}: {head.reason}")


def _create_branch(repo: pygit2.Repository, name: str, base: str, report: RepairReport) -> None:
    commit = repo.branches.local[base].peel(pygit2.Commit)
    repo.branches.local.create(name, commit)
    report.act("create_branch", f"{name} from {base} at {str(commit.id)[:12]}")


def _stash_uncommitted(repo: pygit2.Repository, options: RepairOptions, report: RepairReport) -> None:
    paths = uncommitted_paths(repo)
    stash = _save_stash(repo, f"ias git_repair {options.job_id}", keep=False)
    if stash:
        report.act("stash", f"{stash} holds the uncommitted changes: {describe_paths(paths)}")
