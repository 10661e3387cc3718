"""Helpers for the setup, repo and doctor tests: real checkouts, an isolated git config, `ias` runs.

Not a conftest.py on purpose: tests/conftest.py is imported by name (`from conftest import ...`, also by
tests/integration/processes.py), and a second conftest module outside a package would shadow it.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pygit2
import pytest
from pygit2.enums import ConfigLevel

INTEGRATION = str(Path(__file__).resolve().parents[1] / "integration")
if INTEGRATION not in sys.path:
    sys.path.insert(0, INTEGRATION)

from processes import Server, ias_env  # noqa: E402

__all__ = ["Server", "checkout", "fake_token", "ias_env", "isolated_git", "run_ias"]

SIGNATURE = pygit2.Signature("Test User", "test@example.com", 1_700_000_000, 0)


@pytest.fixture
def isolated_git(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A home with no git config: the machine's user.name must not leak into identity checks."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    # libgit2 resolved its config search path when pygit2 was imported: point it at the new home.
    levels = (ConfigLevel.GLOBAL, ConfigLevel.XDG, ConfigLevel.SYSTEM)
    saved = {level: pygit2.settings.search_path[level] for level in levels}
    for level in levels:
        pygit2.settings.search_path[level] = str(home)
    yield home
    for level, value in saved.items():
        pygit2.settings.search_path[level] = value


def checkout(path: Path, *remotes: tuple[str, str], commit: bool = True) -> pygit2.Repository:
    """A repository on `main` at ``path`` with one commit (unless ``commit`` is false) and ``remotes``."""
    repo = pygit2.init_repository(str(path), initial_head="main")
    if commit:
        (path / "README.md").write_text("# demo\n")
        repo.index.add("README.md")
        repo.index.write()
        repo.create_commit("HEAD", SIGNATURE, SIGNATURE, "initial", repo.index.write_tree(), [])
    for name, url in remotes:
        repo.remotes.create(name, url)
    return repo


def fake_token(claims: dict[str, Any]) -> str:
    """A token shaped like the control plane's (``ias_`` + JWT) with these claims and no valid signature."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"ias_{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


def run_ias(*args: str, home: Path, git_home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`ias ARGS` as a subprocess with no stdin (as in CI), IAS_HOME=home, and a git config of its own."""
    full_env = ias_env(IAS_HOME=str(home), HOME=str(git_home), XDG_CONFIG_HOME=str(git_home / ".config"))
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        check=False,
    )
