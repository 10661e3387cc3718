"""Git for repository jobs: open a checkout, isolate each job in a worktree, commit under the git policy."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import pygit2
from pygit2.enums import BranchType, RepositoryOpenFlag

from worker.handlers import JobFailed

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = ("IAS", "ias@localhost")
POLICY_PATH = "docs/ias/policy/git.json"
APPLIED_POLICY_FILE = "git-policy.json"  # under <gitdir>/ias/: machine-local, never committed
DEFAULT_PREFIX = "ias/"
DEFAULT_PR: Mapping[str, Any] = {
    "openPr": True,
    "draft": False,
    "autoMerge": False,
    "mergeMethod": "squash",
    "deleteBranchOnMerge": True,
}
MERGE_METHODS = ("merge", "squash", "rebase")
OVERRIDE_KEYS = ("baseBranch", "branchPrefix")  # policy keys a job payload may override

__all__ = [
    "POLICY_PATH",
    "GitPolicy",
    "JobCommit",
    "JobRequest",
    "Workspace",
    "apply_policy_locally",
    "commit_job",
    "commit_message",
    "commit_signature",
    "default_branch",
    "effective_policy",
    "job_worktree",
    "open_repo",
    "parse_policy",
    "prune_worktrees",
]


@dataclass(frozen=True, slots=True)
class GitPolicy:
    """git.json v1 (baseBranch, branchPrefix, pr) plus IAS's commitFormat, protectedBranches and push."""

    base_branch: str = "auto"
    branch_prefix: str = "auto"
    commit_format: str = "{subject}"
    protected_branches: tuple[str, ...] = ()
    push: bool = False  # jobs only commit locally unless the repository asks for pushes
    pr: tuple[tuple[str, Any], ...] = tuple(DEFAULT_PR.items())

    @property
    def prefix(self) -> str:
        return DEFAULT_PREFIX if self.branch_prefix == "auto" else self.branch_prefix

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "baseBranch": self.base_branch,
            "branchPrefix": self.branch_prefix,
            "commitFormat": self.commit_format,
            "protectedBranches": list(self.protected_branches),
            "push": self.push,
            "pr": dict(self.pr),
        }


@dataclass(frozen=True, slots=True)
class JobRequest:
    """One job's commit: who made it, which branch (after the policy prefix), and the message."""

    job_id: str
    attempt: int
    branch_name: str  # e.g. "bootstrap"; the policy's prefix is put in front
    subject: str
    body: str = ""
    overrides: Mapping[str, Any] = field(default_factory=dict)  # payload: branch, baseBranch, branchPrefix
    trailers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class JobCommit:
    """What a job did to the repository; `committed` is False when the files were already right."""

    commit_sha: str
    branch: str
    changed_paths: tuple[str, ...]
    committed: bool
    pushed: bool = False


@dataclass(frozen=True, slots=True)
class Workspace:
    """A job's private checkout of its branch; writes here never reach the user's working tree."""

    root: Path
    repo: pygit2.Repository
    policy: GitPolicy

    def read_text(self, rel: str) -> str | None:
        path = self.path(rel)
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def write_text(self, rel: str, text: str) -> None:
        path = self.path(rel)
        _mkdir_below(self.root, path.parent)
        path.write_text(text, encoding="utf-8")

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def path(self, rel: str) -> Path:
        return self.root / _safe_rel(rel)


Edit = Callable[[Workspace], Sequence[str]]  # writes into the workspace, returns the paths to commit


def open_repo(path: Path) -> pygit2.Repository:
    """Open the checkout at `path` itself (no search upwards); it must have a work tree and a commit."""
    fix = f"run `git init` in {path} and commit once"
    if not path.is_dir():
        raise JobFailed(f"{path} is not a directory; {fix}", code="not_a_git_repo")
    try:
        repo = pygit2.Repository(str(path), RepositoryOpenFlag.NO_SEARCH)
    except pygit2.GitError as exc:
        raise JobFailed(f"{path} is not a git repository; {fix}", code="not_a_git_repo") from exc
    if repo.is_bare:
        raise JobFailed(f"{path} is a bare repository; map a checkout instead", code="bare_repo")
    if repo.head_is_unborn:
        raise JobFailed(
            f"{path} has no commits yet; commit once (git commit --allow-empty -m init)",
            code="no_commits",
        )
    return repo


def commit_signature(repo: pygit2.Repository) -> pygit2.Signature:
    """user.name/email from the repo's or the user's git config, else IAS's own identity."""
    # Never rely on repo.default_signature: it raises when no identity is configured.
    name = _config_value(repo.config, "user.name") or DEFAULT_SIGNATURE[0]
    email = _config_value(repo.config, "user.email") or DEFAULT_SIGNATURE[1]
    return pygit2.Signature(name, email)


def commit_message(policy: GitPolicy, request: JobRequest) -> str:
    """The subject in the policy's format, the body, then the IAS trailers."""
    trailers = [("IAS-Job-Id", request.job_id), ("IAS-Attempt", str(request.attempt)), *request.trailers]
    parts = [policy.commit_format.replace("{subject}", request.subject)]
    if request.body:
        parts.append(request.body.strip())
    parts.append("\n".join(f"{key}: {value}" for key, value in trailers))
    return "\n\n".join(parts) + "\n"


def default_branch(repo: pygit2.Repository) -> str:
    """The checked-out branch, else main or master, else the empty string (a detached HEAD)."""
    if not repo.head_is_detached:
        return repo.head.shorthand
    for name in ("main", "master"):
        if repo.lookup_branch(name) is not None:
            return name
    return ""


def effective_policy(repo: pygit2.Repository, overrides: Mapping[str, Any] | None = None) -> GitPolicy:
    """Payload overrides > the policy applied on this machine > git.json on the default branch > defaults."""
    blob_id, committed = _committed_policy(repo)
    policy = _applied_policy(repo, blob_id) or committed
    return policy_from_overrides(policy, overrides or {})


def apply_policy_locally(repo: pygit2.Repository, policy: GitPolicy) -> Path:
    """Make `policy` govern the next jobs here at once, until git.json on the default branch changes."""
    blob_id, _ = _committed_policy(repo)
    path = Path(repo.path) / "ias" / APPLIED_POLICY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"version": 1, "replaces": blob_id, "policy": policy.to_json()}
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def commit_job(repo_path: Path, request: JobRequest, edit: Edit) -> JobCommit:
    """Run `edit` in a fresh worktree on the job's branch and commit the paths it names.

    The user's checkout (HEAD, index, working tree) is never touched; on failure the worktree is
    removed and a branch this job created is deleted again.
    """
    repo = open_repo(repo_path)
    policy = effective_policy(repo, request.overrides)
    branch = _job_branch(repo, policy, request)
    base_name, base = _resolve_base(repo, policy)
    # Before the branch is looked at: a killed job's worktree would still hold it.
    _release_branch(repo, branch, job_id=request.job_id, attempt=request.attempt)
    created = _ensure_branch(repo, branch, base)
    result: JobCommit | None = None
    try:
        with job_worktree(repo, job_id=request.job_id, attempt=request.attempt, branch=branch) as root:
            workspace = Workspace(root=root, repo=pygit2.Repository(str(root)), policy=policy)
            paths = edit(workspace)
            result = _commit_paths(workspace, paths, commit_message(policy, request), branch)
            workspace.repo.free()
    finally:
        if created and (result is None or not result.committed):
            repo.branches.local.delete(branch)  # leave no trace of a job that changed nothing
    if not result.committed and created:
        result = JobCommit(commit_sha=str(base.id), branch=base_name, changed_paths=(), committed=False)
    elif policy.push:
        _push(repo, branch)
        result = replace(result, pushed=True)
    return result


@contextmanager
def job_worktree(repo: pygit2.Repository, *, job_id: str, attempt: int, branch: str) -> Iterator[Path]:
    """A linked worktree of `branch` under <gitdir>/ias/worktrees/, removed and pruned on exit.

    A job worktree on `branch` that no live process runs any more (its worker was killed) is
    removed first; one a running job holds fails this job as `branch_busy`, which is retried.
    """
    name = _worktree_name(job_id, attempt)
    root = _worktrees_dir(repo) / name
    _remove_worktree(repo, name, root)  # a crashed earlier run of this attempt may have left one
    _release_branch(repo, branch, job_id=job_id, attempt=attempt)
    ref = repo.lookup_reference(f"refs/heads/{branch}")
    _mkdir_below(Path(repo.path), root.parent)
    # The owner comes first, so no other job or sweep ever finds this worktree without one.
    _write_owner(root, job_id=job_id, attempt=attempt)
    try:
        repo.add_worktree(name, str(root), ref)
    except pygit2.GitError as exc:
        _owner_path(root).unlink(missing_ok=True)
        raise JobFailed(
            f"cannot check out {branch} for this job: {exc}", code="branch_busy", retryable=True
        ) from exc
    log.debug("job worktree %s on %s", root, branch, extra={"job_id": job_id, "attempt": attempt})
    try:
        yield root
    finally:
        _remove_worktree(repo, name, root)


def prune_worktrees(repo_path: Path) -> int:
    """Remove the job worktrees of `repo_path` that no live process runs; returns how many.

    Only worktrees under <gitdir>/ias/worktrees are IAS's; a worktree the user made is never
    touched. Problems are logged, never raised: this is housekeeping.
    """
    removed = 0
    try:
        repo = pygit2.Repository(str(repo_path), RepositoryOpenFlag.NO_SEARCH)
        with _REMOVING:
            for wt in _worktrees(repo):
                if wt.ours and (not wt.root.is_dir() or _live_owner(wt, job_id="", attempt=0) is None):
                    _remove_worktree(repo, wt.name, wt.root)
                    removed += 1
            removed += _remove_unregistered(repo)
    except (pygit2.GitError, OSError) as exc:
        log.warning("cannot check %s for leftover job worktrees: %s", repo_path, exc)
    return removed


def parse_policy(
    data: Mapping[str, Any], *, where: str, code: str, base: GitPolicy | None = None
) -> GitPolicy:
    """Validate git.json v1 keys over `base`; errors name the field and where it came from."""
    base = base or GitPolicy()
    for key in data:
        if key != "version" and key not in _CHECKS:
            raise JobFailed(f"unknown key {key} in {where}", code=code)
    if "version" in data and (data["version"] != 1 or isinstance(data["version"], bool)):
        raise JobFailed(f"version in {where} must be 1", code=code)
    changes = {
        attr: check(data[key], f"{key} in {where}", code, base)
        for key, (attr, check) in _CHECKS.items()
        if key in data
    }
    return replace(base, **changes)


def policy_from_overrides(policy: GitPolicy, payload: Mapping[str, Any]) -> GitPolicy:
    """Apply the policy keys a job payload may override."""
    overrides = {key: payload[key] for key in OVERRIDE_KEYS if key in payload}
    return (
        parse_policy(overrides, where="payload", code="invalid_payload", base=policy) if overrides else policy
    )


def check_branch_name(value: Any, label: str, *, code: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 200:
        raise JobFailed(f"{label} must be a branch name", code=code)
    if not pygit2.reference_is_valid_name(f"refs/heads/{value}"):
        raise JobFailed(f"{label} is not a valid branch name: {value!r}", code=code)
    return value


def _check_base(value: Any, label: str, code: str, _base: GitPolicy) -> str:
    return "auto" if value == "auto" else check_branch_name(value, label, code=code)


def _check_prefix(value: Any, label: str, code: str, _base: GitPolicy) -> str:
    if value in ("auto", ""):
        return str(value)
    check_branch_name(f"{value}x", label, code=code)  # a prefix must make valid names
    return str(value)


def _check_format(value: Any, label: str, code: str, _base: GitPolicy) -> str:
    if not isinstance(value, str) or "{subject}" not in value or "\n" in value or len(value) > 200:
        raise JobFailed(f"{label} must be one line containing {{subject}}", code=code)
    return value


def _check_protected(value: Any, label: str, code: str, _base: GitPolicy) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise JobFailed(f"{label} must be a list of branch names", code=code)
    return tuple(check_branch_name(item, label, code=code) for item in value)


def _check_push(value: Any, label: str, code: str, _base: GitPolicy) -> bool:
    if not isinstance(value, bool):
        raise JobFailed(f"{label} must be true or false", code=code)
    return value


def _check_pr(value: Any, label: str, code: str, base: GitPolicy) -> tuple[tuple[str, Any], ...]:
    if not isinstance(value, dict):
        raise JobFailed(f"{label} must be an object", code=code)
    merged = dict(base.pr)
    for key, item in value.items():
        if key == "mergeMethod" and item in MERGE_METHODS:
            merged[key] = item
        elif key in DEFAULT_PR and key != "mergeMethod" and isinstance(item, bool):
            merged[key] = item
        else:
            raise JobFailed(f"{label} has a bad or unknown key {key}", code=code)
    return tuple(merged.items())


_Check = Callable[[Any, str, str, GitPolicy], Any]
_CHECKS: dict[str, tuple[str, _Check]] = {
    "baseBranch": ("base_branch", _check_base),
    "branchPrefix": ("branch_prefix", _check_prefix),
    "commitFormat": ("commit_format", _check_format),
    "protectedBranches": ("protected_branches", _check_protected),
    "push": ("push", _check_push),
    "pr": ("pr", _check_pr),
}


# -- internals -----------------------------------------------------------------------------------


def _config_value(config: pygit2.Config, key: str) -> str:
    try:
        value = config[key]
    except (KeyError, pygit2.GitError):
        return ""
    return value.strip() if isinstance(value, str) else ""


def _default_commit(repo: pygit2.Repository) -> pygit2.Commit:
    name = default_branch(repo)
    branch = repo.lookup_branch(name) if name else None
    target = branch.peel(pygit2.Commit) if branch is not None else repo.head.peel(pygit2.Commit)
    assert isinstance(target, pygit2.Commit)
    return target


def _committed_policy(repo: pygit2.Repository) -> tuple[str | None, GitPolicy]:
    """git.json as committed on the default branch, with its blob id (None when absent)."""
    try:
        entry = _default_commit(repo).tree[POLICY_PATH]
    except KeyError:
        return None, GitPolicy()
    blob = repo[entry.id]
    if not isinstance(blob, pygit2.Blob):
        raise JobFailed(f"{POLICY_PATH} is not a file", code="invalid_git_policy")
    try:
        data = json.loads(blob.data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise JobFailed(f"{POLICY_PATH} is not valid JSON: {exc}", code="invalid_git_policy") from exc
    if not isinstance(data, dict):
        raise JobFailed(f"{POLICY_PATH} must hold a JSON object", code="invalid_git_policy")
    return str(blob.id), parse_policy(data, where=POLICY_PATH, code="invalid_git_policy")


def _applied_policy(repo: pygit2.Repository, committed_blob: str | None) -> GitPolicy | None:
    """The locally applied policy, while git.json on the default branch is the one it replaced."""
    path = Path(repo.path) / "ias" / APPLIED_POLICY_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None
    if not isinstance(record, dict) or record.get("replaces") != committed_blob:
        return None  # git.json changed since (merged or edited): the committed file wins again
    policy = record.get("policy")
    if not isinstance(policy, dict):
        return None
    return parse_policy(policy, where=str(path), code="invalid_git_policy")


def _job_branch(repo: pygit2.Repository, policy: GitPolicy, request: JobRequest) -> str:
    explicit = request.overrides.get("branch")
    if explicit is not None:
        branch = check_branch_name(explicit, "branch", code="invalid_payload")
    else:
        branch = check_branch_name(policy.prefix + request.branch_name, "branch", code="invalid_payload")
    if branch in policy.protected_branches:
        raise JobFailed(f"branch {branch} is protected by {POLICY_PATH}", code="protected_branch")
    if not repo.head_is_detached and repo.head.shorthand == branch:
        raise JobFailed(
            f"branch {branch} is checked out in {repo.workdir}; jobs never touch your working tree, "
            "so switch to another branch or pass a different branch",
            code="branch_checked_out",
        )
    return branch


def _resolve_base(repo: pygit2.Repository, policy: GitPolicy) -> tuple[str, pygit2.Commit]:
    name = default_branch(repo) if policy.base_branch == "auto" else policy.base_branch
    ref = None
    if name:
        # A base that exists only on the remote (a fresh clone of another branch) still works.
        ref = repo.lookup_branch(name) or repo.lookup_branch(f"origin/{name}", BranchType.REMOTE)
        if ref is None:
            raise JobFailed(f"base branch {name} does not exist", code="unknown_base_branch")
    commit = (ref or repo.head).peel(pygit2.Commit)
    assert isinstance(commit, pygit2.Commit)
    return name or "HEAD", commit


def _ensure_branch(repo: pygit2.Repository, branch: str, base: pygit2.Commit) -> bool:
    """Create `branch` at `base`; an existing one is reused, fast-forwarded if it was merged."""
    existing = repo.lookup_branch(branch)
    if existing is None:
        repo.branches.local.create(branch, base)
        return True
    tip = existing.target
    # A branch with no commits of its own moves up to the base, so jobs never work on a stale tree.
    if not existing.is_checked_out() and tip != base.id and repo.descendant_of(base.id, tip):
        existing.set_target(base.id, f"ias: fast-forward {branch} to its base")
    return False


def _commit_paths(workspace: Workspace, paths: Sequence[str], message: str, branch: str) -> JobCommit:
    wt = workspace.repo
    parent = wt.head.peel(pygit2.Commit)
    assert isinstance(parent, pygit2.Commit)
    index = wt.index
    for rel in sorted(set(paths)):
        if (workspace.root / _safe_rel(rel)).exists():
            index.add(rel)
        else:
            index.remove(rel)
    index.write()
    tree_id = index.write_tree()
    if tree_id == parent.tree_id:
        return JobCommit(commit_sha=str(parent.id), branch=branch, changed_paths=(), committed=False)
    tree = wt[tree_id]
    assert isinstance(tree, pygit2.Tree)
    changed = tuple(sorted({delta.new_file.path for delta in parent.tree.diff_to_tree(tree).deltas}))
    signature = commit_signature(wt)
    oid = wt.create_commit("HEAD", signature, signature, message, tree_id, [parent.id])
    return JobCommit(commit_sha=str(oid), branch=branch, changed_paths=changed, committed=True)


def _push(repo: pygit2.Repository, branch: str) -> None:
    if "origin" not in repo.remotes.names():
        raise JobFailed("the git policy says push, but the repository has no origin remote", code="no_remote")
    try:
        repo.remotes["origin"].push([f"refs/heads/{branch}:refs/heads/{branch}"])
    except pygit2.GitError as exc:
        raise JobFailed(
            f"push of {branch} to origin failed: {exc}", code="push_failed", retryable=True
        ) from exc


def _worktree_name(job_id: str, attempt: int) -> str:
    # Worktree names become directory names; keep them safe and still unique per job.
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", job_id)[:40].strip(".-") or "job"
    digest = hashlib.sha1(job_id.encode(), usedforsecurity=False).hexdigest()[:8]
    return f"ias-{safe}-{digest}-{attempt}"


def _remove_worktree(repo: pygit2.Repository, name: str, root: Path) -> None:
    with _REMOVING:
        shutil.rmtree(root, ignore_errors=True)
        try:
            if name in repo.list_worktrees():
                repo.lookup_worktree(name).prune(True)
        except pygit2.GitError:
            if name in repo.list_worktrees():
                raise  # still there, so not pruned by another process in between
        _owner_path(root).unlink(missing_ok=True)


# -- job worktrees and who runs them --------------------------------------------------------------

OWNER_SUFFIX = ".owner"  # <gitdir>/ias/worktrees/<name>.owner names the process running <name>
# Jobs (each in its own thread) and the start-up sweep may find the same stale worktree; one at a
# time removes it, so no removal fails halfway because another is deleting the same files.
_REMOVING = threading.RLock()


@dataclass(frozen=True, slots=True)
class _Worktree:
    """A linked worktree as the repository lists it; `ours` when IAS made it for a job."""

    name: str
    root: Path
    branch: str  # "" when detached or unreadable
    ours: bool


@dataclass(frozen=True, slots=True)
class _Owner:
    """The process running a job worktree: pid plus what tells a recycled pid or a reboot apart."""

    job_id: str
    attempt: int
    pid: int
    started: str = ""  # the process's start time in clock ticks after boot; "" where unknown
    boot_id: str = ""  # "" where unknown

    def alive(self) -> bool:
        current_boot = _boot_id()
        if self.pid <= 0 or (self.boot_id and current_boot and self.boot_id != current_boot):
            return False
        try:
            os.kill(self.pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # it exists, under another user
        started, zombie = _process_start(self.pid)
        if zombie:
            return False
        return not (self.started and started) or started == self.started


def _worktrees_dir(repo: pygit2.Repository) -> Path:
    return Path(repo.path) / "ias" / "worktrees"


def _owner_path(root: Path) -> Path:
    return root.with_name(root.name + OWNER_SUFFIX)


def _worktrees(repo: pygit2.Repository) -> list[_Worktree]:
    gitdir = Path(repo.path)
    common = gitdir / "commondir"  # present when the checkout is itself a linked worktree
    common_dir = (gitdir / common.read_text().strip()).resolve() if common.is_file() else gitdir
    ias_dirs = {_worktrees_dir(repo).resolve(), (common_dir / "ias" / "worktrees").resolve()}
    found = []
    for name in repo.list_worktrees():
        try:
            root = Path(repo.lookup_worktree(name).path)
        except pygit2.GitError:
            continue  # pruned in between
        admin = common_dir / "worktrees" / name
        # A worktree the user locked (`git worktree lock`) is theirs to remove, wherever it is.
        ours = root.parent.resolve() in ias_dirs and not (admin / "locked").exists()
        found.append(_Worktree(name=name, root=root, branch=_head_branch(admin), ours=ours))
    return found


def _head_branch(admin: Path) -> str:
    try:
        head = (admin / "HEAD").read_text(encoding="utf-8").strip()
    except OSError:
        return ""
    return head.removeprefix("ref: refs/heads/") if head.startswith("ref: refs/heads/") else ""


def _release_branch(repo: pygit2.Repository, branch: str, *, job_id: str, attempt: int) -> None:
    """Remove job worktrees that hold `branch` but no longer run; fail if a live one or the user's does."""
    with _REMOVING:
        for wt in _worktrees(repo):
            if not wt.root.is_dir():
                if wt.ours:
                    _remove_worktree(repo, wt.name, wt.root)  # deleted by hand: nothing can run there
                continue  # git does not count a worktree whose directory is gone as holding its branch
            if wt.branch != branch:
                continue
            if not wt.ours:
                raise JobFailed(
                    f"branch {branch} is checked out in the worktree {wt.root}, which IAS does not manage; "
                    "jobs never touch it, so switch it to another branch or pass a different branch",
                    code="branch_checked_out",
                )
            owner = _live_owner(wt, job_id=job_id, attempt=attempt)
            if owner is not None:
                raise JobFailed(
                    f"branch {branch} is in use by job {owner.job_id} (attempt {owner.attempt}, pid "
                    f"{owner.pid}) in {wt.root}; this job can run once that one ends",
                    code="branch_busy",
                    retryable=True,
                )
            log.info(
                "removing the worktree %s that a stopped run left on %s",
                wt.root,
                branch,
                extra={"job_id": job_id, "attempt": attempt},
            )
            _remove_worktree(repo, wt.name, wt.root)


def _live_owner(wt: _Worktree, *, job_id: str, attempt: int) -> _Owner | None:
    """The live process running job worktree `wt`, or None when nothing runs there any more."""
    if job_id:
        prefix = _worktree_name(job_id, 0)[:-1]
        earlier = wt.name.removeprefix(prefix)
        if wt.name.startswith(prefix) and re.fullmatch(r"[0-9]+", earlier) and int(earlier) <= attempt:
            return None  # an earlier attempt of this job: the control plane has fenced it off
    owner = _read_owner(wt.root)
    return owner if owner is not None and owner.alive() else None


def _remove_unregistered(repo: pygit2.Repository) -> int:
    """Directories and owner files under ias/worktrees that git no longer lists and no live job owns."""
    folder = _worktrees_dir(repo)
    if not folder.is_dir():
        return 0
    registered = {wt.root.name for wt in _worktrees(repo)}
    removed = 0
    for entry in sorted(folder.iterdir()):
        root = folder / entry.name.removesuffix(OWNER_SUFFIX)
        if root.name in registered or not (entry.is_dir() or entry.name.endswith(OWNER_SUFFIX)):
            continue
        owner = _read_owner(root)
        if owner is None or not owner.alive():  # alive: a job is creating this worktree right now
            shutil.rmtree(root, ignore_errors=True)
            _owner_path(root).unlink(missing_ok=True)
            removed += entry.is_dir()
    return removed


def _write_owner(root: Path, *, job_id: str, attempt: int) -> None:
    pid = os.getpid()
    record = {
        "job_id": job_id,
        "attempt": attempt,
        "pid": pid,
        "started": _process_start(pid)[0],
        "boot_id": _boot_id(),
    }
    path = _owner_path(root)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    tmp.replace(path)


def _read_owner(root: Path) -> _Owner | None:
    """The recorded owner; None when there is none or it is unreadable (no live job wrote it)."""
    try:
        record = json.loads(_owner_path(root).read_text(encoding="utf-8"))
        owner = _Owner(
            job_id=str(record["job_id"]),
            attempt=int(record["attempt"]),
            pid=int(record["pid"]),
            started=str(record.get("started", "")),
            boot_id=str(record.get("boot_id", "")),
        )
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return owner


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return ""  # not Linux: reboots are told apart by the pid check alone


def _process_start(pid: int) -> tuple[str, bool]:
    """(start time in clock ticks after boot, is a zombie) from /proc; ("", False) where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return "", False
    fields = stat.rpartition(")")[2].split()  # the command name in (...) may hold spaces
    if len(fields) < 20:
        return "", False
    return fields[19], fields[0] == "Z"


def _mkdir_below(base: Path, folder: Path) -> None:
    """`folder` and its parents up to `base`, which is never created: a checkout deleted while a
    job runs must stay deleted, and the job must fail rather than write into a new, empty tree."""
    current = base
    for part in folder.relative_to(base).parts:
        current = current / part
        current.mkdir(exist_ok=True)


def _safe_rel(rel: str) -> str:
    """A repository-relative POSIX path that cannot escape the work tree."""
    path = PurePosixPath(rel)
    if path.is_absolute() or not path.parts or ".." in path.parts or path.parts[0] == ".git":
        raise ValueError(f"unsafe repository path {rel!r}")
    return str(path)
