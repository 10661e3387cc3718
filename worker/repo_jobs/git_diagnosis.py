"""Diagnose a broken checkout for `git_repair`: read-only, every check and every refusal up front."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pygit2
from pygit2.enums import FileMode, FileStatus, RepositoryOpenFlag, RepositoryState

from worker.handlers import JobFailed

RESCUE_PREFIX = "ias/rescue-"
DEFAULT_BASES = ("main", "master")
PATHS_IN_DETAIL = 10  # a detail line names at most this many paths, then "+N more"

# The states `git_repair` knows how to abort, by the name it reports. Bisect is missing on purpose:
# it is a session the user is in the middle of, not a half-done command.
OPERATIONS: dict[RepositoryState, str] = {
    RepositoryState.MERGE: "merge",
    RepositoryState.REVERT: "revert",
    RepositoryState.REVERT_SEQUENCE: "revert",
    RepositoryState.CHERRYPICK: "cherry_pick",
    RepositoryState.CHERRYPICK_SEQUENCE: "cherry_pick",
    RepositoryState.REBASE: "rebase",
    RepositoryState.REBASE_INTERACTIVE: "rebase",
    RepositoryState.REBASE_MERGE: "rebase",
    RepositoryState.APPLY_MAILBOX: "am",
    RepositoryState.APPLY_MAILBOX_OR_REBASE: "am",
}
REBASE_DIRS = ("rebase-merge", "rebase-apply")


@dataclass(frozen=True, slots=True)
class RepairOptions:
    """What the job asks for, already validated."""

    job_id: str
    lock_max_age: timedelta = timedelta(seconds=60)
    dry_run: bool = False
    require_clean: bool = False
    ensure_branch: str = ""
    base: str = ""


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing found wrong, or one thing done about it: a kind and a metadata-only detail."""

    kind: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class LockFile:
    """A ``*.lock`` under the git directory."""

    path: Path
    rel: str
    age_s: float


@dataclass(frozen=True, slots=True)
class Operation:
    """A merge, rebase, cherry-pick, revert or am stopped half-way, or conflicts left with no operation."""

    kind: str
    conflicted: tuple[str, ...]
    restore_ref: str = ""  # a rebase goes back to this branch (refs/heads/...) ...
    restore_commit: str = ""  # ... or, started from a detached HEAD or its branch gone, to this commit


@dataclass(frozen=True, slots=True)
class HeadPlan:
    """Where a detached HEAD goes: an existing branch at the same commit, or a new rescue branch."""

    commit_id: str
    branch: str
    rescue: bool
    reason: str


@dataclass(slots=True)
class Diagnosis:
    """Everything found; `refusals` non-empty means nothing may be changed."""

    findings: list[Finding] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    stale_locks: list[LockFile] = field(default_factory=list)
    operation: Operation | None = None
    head: HeadPlan | None = None
    missing_branch: str = ""
    base_branch: str = ""

    def add(self, kind: str, detail: str) -> None:
        self.findings.append(Finding(kind, detail))


def open_checkout(path: Path) -> pygit2.Repository:
    """Open the checkout at `path` itself: no search upwards, so a parent repository is never repaired."""
    if not path.is_dir():
        raise JobFailed(f"{path} is not a directory", code="not_a_git_repo")
    try:
        return pygit2.Repository(str(path), RepositoryOpenFlag.NO_SEARCH)
    except pygit2.GitError as exc:
        if (path / ".git").exists():
            # It looks like a repository but libgit2 cannot read it: that is damage, not a wrong path.
            raise JobFailed(f"{path}/.git cannot be opened ({exc})", code="unsafe_to_repair") from exc
        raise JobFailed(f"{path} is not a git repository", code="not_a_git_repo") from exc


def diagnose(repo: pygit2.Repository, options: RepairOptions) -> Diagnosis:
    """Run every check; stops early only when the repository cannot be read at all."""
    diagnosis = Diagnosis()
    if not _check_readable(repo, diagnosis):
        return diagnosis
    _diagnose_locks(repo, options, diagnosis)
    _diagnose_operation(repo, diagnosis)
    if diagnosis.operation is None or not _restores_head(diagnosis.operation):
        diagnosis.head = plan_head(repo)
        if diagnosis.head is not None:
            diagnosis.add("detached_head", f"HEAD is detached at {diagnosis.head.commit_id[:12]}")
    _diagnose_branch(repo, options, diagnosis)
    uncommitted = uncommitted_paths(repo) if options.require_clean else []
    if uncommitted:
        diagnosis.add("uncommitted_changes", describe_paths(uncommitted))
    return diagnosis


def _check_readable(repo: pygit2.Repository, diagnosis: Diagnosis) -> bool:
    if repo.is_bare:
        diagnosis.refusals.append("bare repository: there is no working tree to repair")
        return False
    if repo.head_is_unborn:
        diagnosis.refusals.append("HEAD names a branch with no commit (a new repository or a deleted branch)")
        return False
    try:
        repo.revparse_single("HEAD^{tree}")  # reads the commit and its tree: a missing object raises
        repo.index.read()
    except (pygit2.GitError, KeyError, ValueError) as exc:
        diagnosis.refusals.append(f"corrupt repository: HEAD, its tree or the index cannot be read ({exc})")
        return False
    return True


def _diagnose_locks(repo: pygit2.Repository, options: RepairOptions, diagnosis: Diagnosis) -> None:
    locks = list(find_locks(Path(repo.path)))
    if not locks:
        return
    holders = live_git_processes({Path(repo.workdir).resolve(), Path(repo.path).resolve()})
    max_age_s = options.lock_max_age.total_seconds()
    for lock in locks:
        unchecked = "" if holders is not None else "; no /proc here, so judged by age alone"
        diagnosis.add("lock", f"{lock.rel} ({lock.age_s:.0f} s old{unchecked})")
        if holders:
            pids = ", ".join(str(pid) for pid in holders)
            diagnosis.refusals.append(
                f"{lock.rel} may be in use: git is running in this repository (pid {pids})"
            )
        elif lock.age_s < max_age_s:
            diagnosis.refusals.append(
                f"{lock.rel} is {lock.age_s:.0f} s old, younger than {max_age_s:.0f} s: a git command may "
                "still be writing it; retry later"
            )
        else:
            diagnosis.stale_locks.append(lock)


def find_locks(gitdir: Path) -> Iterator[LockFile]:
    """``*.lock`` files under `gitdir`, skipping the object database (git takes no ``.lock`` there)."""
    now = time.time()
    for root, dirs, files in os.walk(gitdir):
        if Path(root) == gitdir and "objects" in dirs:
            dirs.remove("objects")
        for name in files:
            if name.endswith(".lock"):
                path = Path(root, name)
                try:
                    age_s = max(0.0, now - path.stat().st_mtime)
                except FileNotFoundError:
                    continue  # released while we looked: not ours to report
                yield LockFile(path=path, rel=path.relative_to(gitdir).as_posix(), age_s=age_s)


def live_git_processes(roots: set[Path], proc: Path = Path("/proc")) -> list[int] | None:
    """Pids of running ``git``/``git-*`` processes working inside one of `roots`; None without /proc."""
    if not proc.is_dir():
        return None  # macOS and the BSDs have no /proc: the caller falls back to the lock's age
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            if comm != "git" and not comm.startswith("git-"):
                continue
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            # Gone, or another user's process: it cannot be writing into this user's checkout.
            continue
        if any(cwd == root or root in cwd.parents for root in roots):
            pids.append(int(entry.name))
    return sorted(pids)


def _diagnose_operation(repo: pygit2.Repository, diagnosis: Diagnosis) -> None:
    state = RepositoryState(repo.state())
    conflicts = _conflicts(repo)
    submodules = sorted(path for path, is_gitlink in conflicts.items() if is_gitlink)
    if submodules:
        diagnosis.refusals.append(f"submodule in conflict: {describe_paths(submodules)}; resolve it by hand")
    conflicted = tuple(sorted(conflicts))
    if state == RepositoryState.NONE:
        if conflicted:
            diagnosis.operation = Operation(kind="conflicts", conflicted=conflicted)
            diagnosis.add("conflicts", f"conflicts with no operation: {describe_paths(conflicted)}")
        return
    kind = OPERATIONS.get(state)
    if kind is None:
        diagnosis.refusals.append(f"{state.name.lower()} in progress: finish or reset it by hand")
        return
    operation = _rebase_operation(repo, kind, conflicted) or Operation(kind=kind, conflicted=conflicted)
    diagnosis.operation = operation
    detail = f"{kind} in progress"
    if conflicted:
        detail += f", conflicts: {describe_paths(conflicted)}"
    diagnosis.add("operation_in_progress", detail)


def _rebase_operation(repo: pygit2.Repository, kind: str, conflicted: tuple[str, ...]) -> Operation | None:
    """A rebase moves HEAD; read where it started (``head-name``, ``orig-head``) to go back there."""
    for name in REBASE_DIRS:
        state_dir = Path(repo.path, name)
        head_name = _read_state_file(state_dir / "head-name")
        orig_head = _read_state_file(state_dir / "orig-head")
        if not orig_head:
            continue  # `git am` keeps HEAD on its branch and writes neither
        restore_ref = head_name if head_name.startswith("refs/heads/") else ""
        if restore_ref and repo.references.get(restore_ref) is None:
            restore_ref = ""  # the branch was deleted mid-rebase: go back to its old commit instead
        return Operation(
            kind="rebase" if kind == "am" else kind,
            conflicted=conflicted,
            restore_ref=restore_ref,
            restore_commit=orig_head,
        )
    return None


def _restores_head(operation: Operation) -> bool:
    return bool(operation.restore_ref or operation.restore_commit)


def _read_state_file(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _conflicts(repo: pygit2.Repository) -> dict[str, bool]:
    """Conflicted path → whether any side of it is a submodule (gitlink)."""
    conflicts = repo.index.conflicts
    if conflicts is None:
        return {}
    found: dict[str, bool] = {}
    for sides in conflicts:
        entries = [entry for entry in sides if entry is not None]
        found[entries[0].path] = any(entry.mode == FileMode.COMMIT for entry in entries)
    return found


def plan_head(repo: pygit2.Repository) -> HeadPlan | None:
    """None when HEAD is on a branch; otherwise the branch to attach it to."""
    if not repo.head_is_detached:
        return None
    commit_id = head_commit(repo).id
    tips = [name for name in repo.branches.local if repo.branches.local[name].target == commit_id]
    if len(tips) == 1:
        return HeadPlan(str(commit_id), tips[0], rescue=False, reason=f"it is the tip of {tips[0]}")
    if tips:
        reason = f"it is the tip of {len(tips)} branches ({', '.join(sorted(tips))})"
    elif is_on_a_branch(repo, commit_id):
        reason = "it is on a branch but not its tip"
    else:
        reason = "it is on no branch"
    return HeadPlan(str(commit_id), rescue_branch_name(repo, commit_id), rescue=True, reason=reason)


def head_commit(repo: pygit2.Repository) -> pygit2.Commit:
    commit: pygit2.Commit = repo.head.peel(pygit2.Commit)
    return commit


def is_on_a_branch(repo: pygit2.Repository, commit_id: pygit2.Oid) -> bool:
    """Whether any local or remote-tracking branch reaches `commit_id`."""
    for name in repo.branches:
        tip = repo.branches[name].target
        if tip == commit_id or repo.descendant_of(tip, commit_id):
            return True
    return False


def rescue_branch_name(repo: pygit2.Repository, commit_id: pygit2.Oid) -> str:
    """``ias/rescue-<short sha>``, the full sha if the short name is taken by another commit."""
    for suffix in (repo[commit_id].short_id, str(commit_id)):
        branch = repo.branches.local.get(RESCUE_PREFIX + suffix)
        if branch is None or branch.target == commit_id:
            return RESCUE_PREFIX + suffix
    raise JobFailed(f"no free rescue branch name for {commit_id}", code="unsafe_to_repair")


def _diagnose_branch(repo: pygit2.Repository, options: RepairOptions, diagnosis: Diagnosis) -> None:
    if not options.ensure_branch or repo.branches.local.get(options.ensure_branch) is not None:
        return
    base = options.base or _branch_after_repair(repo, diagnosis) or _first_existing(repo, DEFAULT_BASES)
    if not base or repo.branches.local.get(base) is None:
        diagnosis.refusals.append(
            f"{options.ensure_branch} is missing and its base {base or 'main/master'} does not exist"
        )
        return
    diagnosis.missing_branch = options.ensure_branch
    diagnosis.base_branch = base
    diagnosis.add("missing_branch", f"{options.ensure_branch} does not exist (base: {base})")


def _branch_after_repair(repo: pygit2.Repository, diagnosis: Diagnosis) -> str:
    """The branch HEAD will be on once repaired; a rescue branch is no base for anything."""
    operation = diagnosis.operation
    if operation is not None and operation.restore_ref:
        return operation.restore_ref.removeprefix("refs/heads/")
    if diagnosis.head is not None:
        return "" if diagnosis.head.rescue else diagnosis.head.branch
    return "" if repo.head_is_detached else str(repo.head.shorthand)


def _first_existing(repo: pygit2.Repository, names: Iterable[str]) -> str:
    return next((name for name in names if repo.branches.local.get(name) is not None), "")


def uncommitted_paths(repo: pygit2.Repository) -> list[str]:
    """Paths with staged, unstaged or untracked changes (ignored files do not count)."""
    return sorted(path for path, flags in repo.status().items() if flags != FileStatus.IGNORED)


def describe_paths(paths: Iterable[str]) -> str:
    """``a.txt, b.txt`` or ``3 paths: a, b, c`` style text, bounded in length: metadata, never contents."""
    items = list(paths)
    shown = ", ".join(items[:PATHS_IN_DETAIL])
    more = len(items) - PATHS_IN_DETAIL
    return f"{shown} (+{more} more)" if more > 0 else shown
