"""`ias install PATH` as a user runs it: a real subprocess, no control plane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pygit2
import repo_fixtures as fx
from repo_fixtures import snapshot

# Fixtures shared through repo_fixtures (a conftest.py here would shadow tests/conftest.py).
isolated_git = fx.isolated_git
make_repo = fx.make_repo
repo = fx.repo


def ias_install(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # isolated_git already pointed HOME at a temp dir and set GIT_CONFIG_NOSYSTEM=1 in os.environ.
    return subprocess.run(
        [sys.executable, "-m", "worker", "install", *args],
        cwd=cwd,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_install_bootstraps_a_good_repo_and_is_idempotent(repo: pygit2.Repository, tmp_path: Path) -> None:
    workdir = Path(repo.workdir)
    before = snapshot(workdir)
    first = ias_install(str(workdir), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("\n") == 1 and "ias/bootstrap" in first.stdout
    again = ias_install(str(workdir), "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["counts"]["written"] == 0 and result["counts"]["kept"] > 0
    assert result["branch"] == "ias/bootstrap" and result["changed_paths"] == []
    assert repo.lookup_branch("ias/bootstrap") is not None
    assert snapshot(workdir) == before


def test_install_on_a_directory_that_is_not_a_repo(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    failed = ias_install(str(plain), cwd=tmp_path)
    assert failed.returncode == 2
    assert failed.stderr.count("\n") == 1 and "not a git repository" in failed.stderr
    assert "git init" in failed.stderr and "Traceback" not in failed.stderr


def test_install_on_a_repo_without_commits(tmp_path: Path) -> None:
    pygit2.init_repository(str(tmp_path / "empty"), initial_head="main")
    failed = ias_install(str(tmp_path / "empty"), cwd=tmp_path)
    assert failed.returncode == 2
    assert "no commits" in failed.stderr and "commit" in failed.stderr and "Traceback" not in failed.stderr
