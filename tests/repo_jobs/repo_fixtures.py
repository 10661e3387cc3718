"""Fixtures and helpers for repository-job tests: real git repositories isolated from the machine.

Not a conftest.py on purpose: tests/conftest.py is imported by name (`from conftest import ...`), and a
second conftest module without a package would shadow it. Test modules import what they use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pygit2
import pytest
from pygit2.enums import ConfigLevel

from worker.handlers import JobContext

SIGNATURE = pygit2.Signature("Test User", "test@example.com", 1_700_000_000, 0)


@pytest.fixture(autouse=True)
def isolated_git(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No user.name, no global or system config: the machine's git setup must not leak in."""
    home = tmp_path_factory.mktemp("home")
    for key in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    # libgit2 resolved its config search path from HOME when pygit2 was imported: point it here too.
    levels = (ConfigLevel.GLOBAL, ConfigLevel.XDG, ConfigLevel.SYSTEM)
    saved = {level: pygit2.settings.search_path[level] for level in levels}
    for level in levels:
        pygit2.settings.search_path[level] = str(home)
    yield
    for level, value in saved.items():
        pygit2.settings.search_path[level] = value


def commit_files(repo: pygit2.Repository, files: Mapping[str, str], message: str = "change") -> pygit2.Oid:
    """Write `files` into the work tree and commit them on the checked-out branch."""
    root = Path(repo.workdir)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
        repo.index.add(rel)
    repo.index.write()
    tree = repo.index.write_tree()
    parents = [] if repo.head_is_unborn else [repo.head.target]
    return repo.create_commit("HEAD", SIGNATURE, SIGNATURE, message, tree, parents)


@pytest.fixture
def make_repo(tmp_path: Path) -> Callable[..., pygit2.Repository]:
    """A repository on `main` with one commit (or the given files)."""

    def make(name: str = "repo", files: Mapping[str, str] | None = None) -> pygit2.Repository:
        repo = pygit2.init_repository(str(tmp_path / name), initial_head="main")
        commit_files(repo, files or {"README.md": "# demo\n"}, "initial")
        return repo

    return make


@pytest.fixture
def repo(make_repo: Callable[..., pygit2.Repository]) -> pygit2.Repository:
    return make_repo()


def job(
    job_type: str, repo_path: Path | None, payload: Mapping[str, Any] | None = None, **kw: Any
) -> JobContext:
    return JobContext(
        job_id=kw.pop("job_id", f"job-{job_type}"),
        job_type=job_type,
        attempt=kw.pop("attempt", 1),
        lease_epoch=1,
        payload=dict(payload or {}),
        repo_path=repo_path,
    )


def snapshot(repo_path: Path) -> dict[str, Any]:
    """Everything a user would notice in their checkout: HEAD, branch, index, status and file bytes."""
    repo = pygit2.Repository(str(repo_path))
    files = {
        str(path.relative_to(repo_path)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(repo_path.rglob("*"))
        if path.is_file() and ".git" not in path.relative_to(repo_path).parts
    }
    return {
        "head": repo.head.name,
        "head_target": str(repo.head.target),
        "index": sorted((entry.path, str(entry.id)) for entry in repo.index),
        "status": sorted(repo.status().items()),
        "files": files,
        "worktrees": repo.list_worktrees(),
    }


def read_blob(repo: pygit2.Repository, ref: str, path: str) -> str:
    """A file as committed at `ref`."""
    commit = repo.revparse_single(ref).peel(pygit2.Commit)
    blob = repo[commit.tree[path].id]
    assert isinstance(blob, pygit2.Blob)
    return blob.data.decode()


def tree_paths(repo: pygit2.Repository, ref: str) -> set[str]:
    commit = repo.revparse_single(ref).peel(pygit2.Commit)
    paths: set[str] = set()

    def walk(tree: pygit2.Tree, prefix: str) -> None:
        for entry in tree:
            if entry.type_str == "tree":
                sub = repo[entry.id]
                assert isinstance(sub, pygit2.Tree)
                walk(sub, f"{prefix}{entry.name}/")
            else:
                paths.add(f"{prefix}{entry.name}")

    walk(commit.tree, "")
    return paths
