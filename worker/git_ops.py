"""Git for repository jobs: open a checkout, commit under the git policy in the job's worktree
(see worker.worktrees)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import pygit2
from pygit2.enums import BranchType, RepositoryOpenFlag

from worker.handlers import JobFailed
from worker.worktrees import job_worktree, mkdir_below, release_branch

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
    "open_repo",
    "parse_policy",
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
        mkdir_below(self.root, path.parent)
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
    release_branch(repo, branch, job_id=request.job_id, attempt=request.attempt)
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


def _safe_rel(rel: str) -> str:
    """A repository-relative POSIX path that cannot escape the work tree."""
    path = PurePosixPath(rel)
    if path.is_absolute() or not path.parts or ".." in path.parts or path.parts[0] == ".git":
        raise ValueError(f"unsafe repository path {rel!r}")
    return str(path)
