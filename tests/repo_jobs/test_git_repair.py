"""`git_repair` on real repositories broken for real: locks, stopped merges and rebases, detached HEADs."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pygit2
import pytest
from pygit2.enums import FileMode, RepositoryState

from worker.handlers import HandlerResult, JobContext, JobFailed
from worker.repo_jobs.git_repair import handle

SIG = pygit2.Signature("Test User", "test@example.com")
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


@pytest.fixture(autouse=True)
def _no_git_identity(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No developer config: the handler must work with no identity at all."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for key in [key for key in os.environ if key.startswith("GIT_") and key != "GIT_CONFIG_NOSYSTEM"]:
        monkeypatch.delenv(key)


@pytest.fixture
def repo(tmp_path: Path) -> pygit2.Repository:
    """main with one commit: a.txt and b.txt."""
    repo = pygit2.init_repository(str(tmp_path / "repo"), initial_head="main")
    commit(repo, {"a.txt": "line\n", "b.txt": "b\n"}, "init")
    return repo


def workdir(repo: pygit2.Repository) -> Path:
    return Path(repo.workdir)


def commit(repo: pygit2.Repository, files: dict[str, str], message: str) -> pygit2.Oid:
    """Write `files`, stage them and commit on HEAD (a branch or a detached HEAD)."""
    for rel, text in files.items():
        (workdir(repo) / rel).write_text(text)
        repo.index.add(rel)
    repo.index.write()
    parents = [] if repo.head_is_unborn else [repo.head.target]
    return repo.create_commit("HEAD", SIG, SIG, message, repo.index.write_tree(), parents)


def checkout(repo: pygit2.Repository, branch: str) -> None:
    repo.checkout(f"refs/heads/{branch}")


def diverge(repo: pygit2.Repository) -> None:
    """main and `other` both change a.txt's line; HEAD ends on main."""
    repo.branches.local.create("other", repo.head.peel(pygit2.Commit))
    commit(repo, {"a.txt": "main\n"}, "main edit")
    checkout(repo, "other")
    commit(repo, {"a.txt": "other\n", "new.txt": "from other\n"}, "other edit")
    checkout(repo, "main")


def git(repo: pygit2.Repository, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GIT, *args], cwd=workdir(repo), capture_output=True, text=True, check=False)


def context(repo_path: Path | None, **payload: Any) -> JobContext:
    return JobContext(
        job_id="job_t", job_type="git_repair", attempt=1, lease_epoch=1, payload=payload, repo_path=repo_path
    )


async def repair(repo: pygit2.Repository, **payload: Any) -> HandlerResult:
    return await handle(context(workdir(repo), **payload))


async def refused(repo: pygit2.Repository, **payload: Any) -> str:
    """Run the job expecting ``unsafe_to_repair``; returns the reason."""
    with pytest.raises(JobFailed) as failure:
        await repair(repo, **payload)
    assert failure.value.code == "unsafe_to_repair"
    return failure.value.message


def kinds(result: HandlerResult, key: str) -> list[str]:
    return [item["kind"] for item in result.metadata[key]]


def fresh(repo: pygit2.Repository) -> pygit2.Repository:
    """A new handle: the handler changed the repository behind the test's back."""
    return pygit2.Repository(repo.workdir)


def snapshot(repo: pygit2.Repository) -> tuple[object, ...]:
    """HEAD, refs, stashes, status and the git directory's file names: what "changed nothing" means."""
    repo = fresh(repo)
    gitdir = Path(repo.path)
    files = sorted(str(p.relative_to(gitdir)) for p in gitdir.rglob("*") if "objects" not in p.parts)
    refs = sorted((name, str(repo.references[name].target)) for name in repo.references)
    return (gitdir.joinpath("HEAD").read_text(), refs, repo.status(), files, len(repo.listall_stashes()))


def stashed_text(repo: pygit2.Repository, path: str, *, untracked: bool = False) -> str:
    """A file as the newest stash saved it; untracked files live in the stash's third parent."""
    stash = repo[repo.listall_stashes()[0].commit_id]
    assert isinstance(stash, pygit2.Commit)
    tree = stash.parents[2].tree if untracked else stash.tree
    blob = repo[tree[path].id]
    assert isinstance(blob, pygit2.Blob)
    return blob.data.decode()


def backdated_lock(repo: pygit2.Repository, rel: str = "index.lock", age_s: float = 600) -> Path:
    lock = Path(repo.path) / rel
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("")
    old = time.time() - age_s
    os.utime(lock, (old, old))
    return lock


@pytest.fixture
def live_git(repo: pygit2.Repository) -> Iterator[subprocess.Popen[str]]:
    """A real git process running in the checkout, blocked reading stdin."""
    process = subprocess.Popen(
        [*GIT, "cat-file", "--batch"], cwd=workdir(repo), stdin=subprocess.PIPE, text=True
    )
    yield process
    process.kill()
    process.wait(timeout=10)


# --- healthy, dry run, payload and mapping errors ---------------------------------------------------


async def test_clean_repo_reports_no_findings(repo: pygit2.Repository) -> None:
    before = snapshot(repo)
    result = await repair(repo)
    assert result.counts == {"findings": 0, "actions": 0}
    assert result.branch == "main"
    assert result.summary.startswith("checkout is healthy")
    assert snapshot(repo) == before


async def test_dry_run_diagnoses_and_changes_nothing(repo: pygit2.Repository) -> None:
    lock = backdated_lock(repo)
    repo.set_head(repo.head.target)
    dirty = workdir(repo) / "b.txt"
    dirty.write_text("edited\n")
    before = snapshot(repo)
    result = await repair(repo, dry_run=True, ensure_branch="ias/bootstrap", require_clean=True)
    assert sorted(kinds(result, "findings")) == [
        "detached_head",
        "lock",
        "missing_branch",
        "uncommitted_changes",
    ]
    assert result.metadata["actions"] == [] and result.counts["actions"] == 0
    assert result.summary.startswith("dry run:")
    assert snapshot(repo) == before and lock.exists() and dirty.read_text() == "edited\n"


async def test_missing_mapping_and_non_repo_fail_with_their_codes(tmp_path: Path) -> None:
    with pytest.raises(JobFailed) as missing:
        await handle(context(None))
    assert missing.value.code == "missing_repo_mapping"
    with pytest.raises(JobFailed) as not_repo:
        await handle(context(tmp_path))
    assert not_repo.value.code == "not_a_git_repo"


@pytest.mark.parametrize(
    "payload",
    [{"lock_max_age_s": -1}, {"lock_max_age_s": True}, {"dry_run": "yes"}, {"ensure_branch": "bad..name"}],
)
async def test_invalid_payload_is_rejected(repo: pygit2.Repository, payload: dict[str, Any]) -> None:
    with pytest.raises(JobFailed) as failure:
        await repair(repo, **payload)
    assert failure.value.code == "invalid_payload"


# --- locks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", ["index.lock", "HEAD.lock", "refs/heads/main.lock"])
async def test_stale_lock_is_removed(repo: pygit2.Repository, rel: str) -> None:
    lock = backdated_lock(repo, rel)
    result = await repair(repo)
    assert not lock.exists()
    assert kinds(result, "findings") == ["lock"] and kinds(result, "actions") == ["remove_lock"]
    assert rel in result.metadata["actions"][0]["detail"]
    commit(fresh(repo), {"b.txt": "works again\n"}, "after repair")  # the index is writable again


async def test_lock_younger_than_threshold_is_refused(repo: pygit2.Repository) -> None:
    lock = backdated_lock(repo, age_s=5)
    before = snapshot(repo)
    assert "younger than 60 s" in await refused(repo)
    assert lock.exists() and snapshot(repo) == before


async def test_lock_threshold_comes_from_payload(repo: pygit2.Repository) -> None:
    lock = backdated_lock(repo, age_s=5)
    await repair(repo, lock_max_age_s=1)
    assert not lock.exists()


async def test_lock_with_live_git_process_is_refused(
    repo: pygit2.Repository, live_git: subprocess.Popen[str]
) -> None:
    lock = backdated_lock(repo)
    before = snapshot(repo)
    reason = await refused(repo)
    assert f"pid {live_git.pid}" in reason
    assert lock.exists() and snapshot(repo) == before


# --- half-done operations ---------------------------------------------------------------------------------


async def test_conflicted_merge_is_aborted_and_user_work_stashed(repo: pygit2.Repository) -> None:
    diverge(repo)
    (workdir(repo) / "b.txt").write_text("user edit, not part of the merge\n")
    (workdir(repo) / "notes.txt").write_text("untracked notes\n")
    repo.merge(repo.branches["other"])
    assert repo.index.conflicts is not None and repo.state() == RepositoryState.MERGE
    (workdir(repo) / "a.txt").write_text("half-done resolution\n")
    result = await repair(repo)
    repo = fresh(repo)
    assert repo.state() == RepositoryState.NONE and repo.index.conflicts is None
    assert kinds(result, "actions") == ["stash", "abort"] and result.branch == "main"
    # The merge's own changes are undone ...
    assert (workdir(repo) / "a.txt").read_text() == "main\n"
    assert not (workdir(repo) / "new.txt").exists()
    # ... the user's unrelated work stays in place, and everything is also in the stash.
    assert (workdir(repo) / "b.txt").read_text() == "user edit, not part of the merge\n"
    assert (workdir(repo) / "notes.txt").exists()
    assert [s.message for s in repo.listall_stashes()] == [
        "On main: ias git_repair job_t: before aborting merge"
    ]
    assert stashed_text(repo, "a.txt") == "half-done resolution\n"
    assert stashed_text(repo, "b.txt") == "user edit, not part of the merge\n"
    assert stashed_text(repo, "notes.txt", untracked=True) == "untracked notes\n"


async def test_cli_merge_with_stale_index_lock(repo: pygit2.Repository) -> None:
    diverge(repo)
    assert git(repo, "merge", "other").returncode != 0
    lock = backdated_lock(repo)
    result = await repair(repo)
    repo = fresh(repo)
    assert not lock.exists() and repo.state() == RepositoryState.NONE
    assert kinds(result, "actions") == ["remove_lock", "stash", "abort"]
    assert not (Path(repo.path) / "MERGE_HEAD").exists() and not (Path(repo.path) / "AUTO_MERGE").exists()
    assert "<<<<<<<" in stashed_text(repo, "a.txt")
    assert git(repo, "status", "--porcelain").stdout == ""


async def test_dry_run_leaves_a_stopped_merge_alone(repo: pygit2.Repository) -> None:
    diverge(repo)
    assert git(repo, "merge", "other").returncode != 0
    before = snapshot(repo)
    result = await repair(repo, dry_run=True)
    assert kinds(result, "findings") == ["operation_in_progress"] and result.counts["actions"] == 0
    assert "merge in progress, conflicts: a.txt" in result.metadata["findings"][0]["detail"]
    assert snapshot(repo) == before and fresh(repo).state() == RepositoryState.MERGE


async def test_cli_cherry_pick_is_aborted(repo: pygit2.Repository) -> None:
    diverge(repo)
    main_tip = repo.head.target
    assert git(repo, "cherry-pick", "other").returncode != 0
    assert repo.state() == RepositoryState.CHERRYPICK
    result = await repair(repo)
    repo = fresh(repo)
    assert repo.state() == RepositoryState.NONE and repo.head.target == main_tip
    assert "cherry_pick in progress" in result.metadata["findings"][0]["detail"]
    assert len(repo.listall_stashes()) == 1 and repo.status() == {}


async def test_cli_rebase_is_aborted_and_rebased_commits_rescued(repo: pygit2.Repository) -> None:
    diverge(repo)
    checkout(repo, "other")
    commit(repo, {"c.txt": "c\n"}, "other: no conflict")  # picked first ...
    commit(repo, {"a.txt": "other again\n"}, "other: conflicts")  # ... then the rebase stops here
    other_tip = repo.head.target
    git(repo, "checkout", "-q", "other")
    git(repo, "rebase", "--onto", "main", "other~2", "other")
    assert repo.state() in (RepositoryState.REBASE_MERGE, RepositoryState.REBASE_INTERACTIVE)
    rebased = fresh(repo).head.target
    result = await repair(repo)
    repo = fresh(repo)
    assert repo.state() == RepositoryState.NONE
    assert result.branch == "other" and repo.head.target == other_tip
    assert kinds(result, "actions") == ["rescue_branch", "stash", "abort"]
    rescue = repo.branches.local[f"ias/rescue-{repo[rebased].short_id}"]
    assert rescue.target == rebased
    assert "<<<<<<<" in stashed_text(repo, "a.txt")
    assert repo.status() == {}


# --- HEAD and branches --------------------------------------------------------------------------------


async def test_detached_head_at_a_branch_tip_is_reattached(repo: pygit2.Repository) -> None:
    tip = repo.head.target
    repo.branches.local.create("feature", repo.head.peel(pygit2.Commit))
    commit(repo, {"b.txt": "ahead\n"}, "main moves on")
    repo.set_head(tip)
    (workdir(repo) / "b.txt").write_text("uncommitted\n")
    result = await repair(repo)
    repo = fresh(repo)
    assert result.branch == "feature" and not repo.head_is_detached and repo.head.target == tip
    assert kinds(result, "actions") == ["reattach_head"]
    assert (workdir(repo) / "b.txt").read_text() == "uncommitted\n"  # the worktree is left alone


async def test_detached_commit_on_no_branch_gets_a_rescue_branch(repo: pygit2.Repository) -> None:
    repo.set_head(repo.head.target)
    orphan = commit(repo, {"b.txt": "made while detached\n"}, "detached work")
    result = await repair(repo)
    repo = fresh(repo)
    name = f"ias/rescue-{repo[orphan].short_id}"
    assert result.branch == name and repo.head.shorthand == name and repo.head.target == orphan
    assert kinds(result, "actions") == ["rescue_branch"]
    assert "on no branch" in result.metadata["actions"][0]["detail"]


async def test_deleted_branch_is_recreated_from_head_branch(repo: pygit2.Repository) -> None:
    repo.branches.local.create("ias/bootstrap", repo.head.peel(pygit2.Commit))
    repo.branches.local.delete("ias/bootstrap")
    result = await repair(repo, ensure_branch="ias/bootstrap")
    repo = fresh(repo)
    assert repo.branches.local["ias/bootstrap"].target == repo.branches.local["main"].target
    assert result.branch == "main" and kinds(result, "actions") == ["create_branch"]


async def test_missing_branch_uses_payload_base(repo: pygit2.Repository) -> None:
    repo.branches.local.create("develop", repo.head.peel(pygit2.Commit))
    commit(repo, {"b.txt": "main only\n"}, "main moves on")
    await repair(repo, ensure_branch="ias/bootstrap", base="develop")
    repo = fresh(repo)
    assert repo.branches.local["ias/bootstrap"].target == repo.branches.local["develop"].target


async def test_missing_base_is_refused(repo: pygit2.Repository) -> None:
    assert "does not exist" in await refused(repo, ensure_branch="ias/bootstrap", base="nope")


async def test_require_clean_stashes_uncommitted_changes(repo: pygit2.Repository) -> None:
    (workdir(repo) / "a.txt").write_text("staged\n")
    repo.index.add("a.txt")
    repo.index.write()
    (workdir(repo) / "b.txt").write_text("unstaged\n")
    (workdir(repo) / "untracked.txt").write_text("new\n")
    result = await repair(repo, require_clean=True)
    repo = fresh(repo)
    assert repo.status() == {} and not (workdir(repo) / "untracked.txt").exists()
    stashes = repo.listall_stashes()
    assert [s.message for s in stashes] == ["On main: ias git_repair job_t"]
    assert str(stashes[0].commit_id) in result.metadata["actions"][0]["detail"]
    assert stashed_text(repo, "a.txt") == "staged\n" and stashed_text(repo, "b.txt") == "unstaged\n"
    assert stashed_text(repo, "untracked.txt", untracked=True) == "new\n"


# --- refusals --------------------------------------------------------------------------------------------


async def test_bare_repository_is_refused(tmp_path: Path) -> None:
    bare = pygit2.init_repository(str(tmp_path / "bare.git"), bare=True)
    with pytest.raises(JobFailed) as failure:
        await handle(context(Path(bare.path)))
    assert failure.value.code == "unsafe_to_repair" and "bare" in failure.value.message


async def test_corrupt_object_database_is_refused(repo: pygit2.Repository) -> None:
    head = str(repo.head.target)
    (Path(repo.path) / "objects" / head[:2] / head[2:]).unlink()
    lock = backdated_lock(repo)
    assert "corrupt" in await refused(repo)
    assert lock.exists()  # nothing is touched once anything is unsafe


async def test_submodule_in_conflict_is_refused(repo: pygit2.Repository) -> None:
    def commit_gitlink(target: str, message: str) -> None:
        builder = repo.TreeBuilder(repo.head.peel(pygit2.Tree))
        builder.insert("sub", pygit2.Oid(hex=target * 40), FileMode.COMMIT)
        repo.create_commit("HEAD", SIG, SIG, message, builder.write(), [repo.head.target])

    commit_gitlink("1", "add submodule")
    repo.branches.local.create("other", repo.head.peel(pygit2.Commit))
    commit_gitlink("2", "bump on main")
    checkout(repo, "other")
    commit_gitlink("3", "bump on other")
    checkout(repo, "main")
    repo.merge(repo.branches["other"])
    assert repo.index.conflicts is not None
    before = snapshot(repo)
    assert "submodule in conflict: sub" in await refused(repo)
    assert snapshot(repo) == before
