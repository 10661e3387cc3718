"""Job worktrees: each repository job runs in a linked worktree of its branch under
<gitdir>/ias/worktrees/, with an owner file naming the process that runs it, so a worktree whose
worker was killed is found and removed (before the branch is used again, and at start-up) and one
a live job holds is never touched."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pygit2
from pygit2.enums import RepositoryOpenFlag

from worker.handlers import JobFailed

log = logging.getLogger(__name__)

__all__ = ["job_worktree", "mkdir_below", "prune_worktrees", "release_branch"]


@contextmanager
def job_worktree(repo: pygit2.Repository, *, job_id: str, attempt: int, branch: str) -> Iterator[Path]:
    """A linked worktree of `branch` under <gitdir>/ias/worktrees/, removed and pruned on exit.

    A job worktree on `branch` that no live process runs any more (its worker was killed) is
    removed first; one a running job holds fails this job as `branch_busy`, which is retried.
    """
    name = _worktree_name(job_id, attempt)
    root = _worktrees_dir(repo) / name
    _remove_worktree(repo, name, root)  # a crashed earlier run of this attempt may have left one
    release_branch(repo, branch, job_id=job_id, attempt=attempt)
    ref = repo.lookup_reference(f"refs/heads/{branch}")
    mkdir_below(Path(repo.path), root.parent)
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


def release_branch(repo: pygit2.Repository, branch: str, *, job_id: str, attempt: int) -> None:
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


def mkdir_below(base: Path, folder: Path) -> None:
    """`folder` and its parents up to `base`, which is never created: a checkout deleted while a
    job runs must stay deleted, and the job must fail rather than write into a new, empty tree."""
    current = base
    for part in folder.relative_to(base).parts:
        current = current / part
        current.mkdir(exist_ok=True)
