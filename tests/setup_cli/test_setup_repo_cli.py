"""`ias setup` and `ias repo` as real processes, with no stdin as in CI."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from setup_support import checkout, ias_env, run_ias


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(IAS_HOME, a HOME with no git config) for the subprocesses."""
    (tmp_path / "ias").mkdir()
    (tmp_path / "home").mkdir()
    return tmp_path / "ias", tmp_path / "home"


def config(home: Path) -> dict[str, Any]:
    return dict(json.loads((home / "config.json").read_text()))


def assert_one_line_error(out: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    for fragment in fragments:
        assert fragment in out.stderr


def test_setup_writes_the_file_and_keeps_what_it_is_not_told(dirs: tuple[Path, Path]) -> None:
    home, git_home = dirs
    out = run_ias(
        "setup", "--control-plane", "10.1.2.3:50051", "--token", "ias_a.b.c", home=home, git_home=git_home
    )
    assert out.returncode == 0, out.stderr
    assert f"wrote {home / 'config.json'}" in out.stdout and "next: `ias repo link PATH`" in out.stdout
    assert "ias_a.b.c" not in out.stdout  # never echo a secret
    assert stat.S_IMODE((home / "config.json").stat().st_mode) == 0o600

    out = run_ias("setup", "--slots", "4", "--name", "box", home=home, git_home=git_home)
    assert out.returncode == 0, out.stderr
    written = config(home)
    assert (written["control_plane"], written["token"], written["slots"], written["worker_name"]) == (
        "10.1.2.3:50051",
        "ias_a.b.c",
        4,
        "box",
    )


def test_setup_takes_the_env_twins_and_never_prompts_without_a_terminal(dirs: tuple[Path, Path]) -> None:
    home, git_home = dirs
    out = run_ias("setup", home=home, git_home=git_home, IAS_WORKER_SLOTS="2", IAS_CONTROL_PLANE="cp:1")
    assert out.returncode == 0, out.stderr
    assert "next: add a token" in out.stdout
    assert (config(home)["slots"], config(home)["control_plane"], config(home)["token"]) == (2, "cp:1", "")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--slots", "0"], "--slots must be an integer from 1 to 256"),
        (["--control-plane", "nowhere"], "--control-plane must be HOST:PORT"),
        (["--token", "ghp_secret"], "start with ias_"),
        (["--tls-ca", "/does/not/exist.pem"], "--tls-ca /does/not/exist.pem is not a file"),
    ],
)
def test_setup_rejects_bad_values_in_one_line(
    dirs: tuple[Path, Path], args: list[str], fragment: str
) -> None:
    home, git_home = dirs
    out = run_ias("setup", *args, home=home, git_home=git_home)
    assert_one_line_error(out, fragment)
    assert not (home / "config.json").exists()


def test_setup_refuses_a_corrupt_file_instead_of_overwriting_it(dirs: tuple[Path, Path]) -> None:
    home, git_home = dirs
    (home / "config.json").write_text("{oops")
    out = run_ias("setup", "--slots", "2", home=home, git_home=git_home)
    assert_one_line_error(out, "not valid JSON", "remove it and run `ias setup`")
    assert (home / "config.json").read_text() == "{oops"


def test_repo_link_list_unlink(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    home, git_home = dirs
    checkout(tmp_path / "widgets", ("origin", "git@github.com-work:acme/widgets.git"))
    checkout(tmp_path / "gadgets", ("origin", "https://github.com/acme/gadgets"))
    assert run_ias("setup", "--token", "ias_a.b.c", home=home, git_home=git_home).returncode == 0

    linked = run_ias("repo", "link", str(tmp_path / "widgets"), home=home, git_home=git_home)
    assert linked.returncode == 0, linked.stderr
    widgets_id = re.search(r"\b(r_[0-9a-f]{32})\b", linked.stdout)
    assert widgets_id is not None
    out = run_ias(
        "repo", "link", str(tmp_path / "gadgets"), "--label", "Gadgets", home=home, git_home=git_home
    )
    assert out.returncode == 0, out.stderr

    listed = run_ias("repo", "list", "--json", home=home, git_home=git_home)
    repos = json.loads(listed.stdout)["repos"]
    assert [(r["label"], r["path"]) for r in repos] == [
        ("widgets", str((tmp_path / "widgets").resolve())),
        ("Gadgets", str((tmp_path / "gadgets").resolve())),
    ]
    assert repos[0]["repo_id"] == widgets_id[1]
    human = run_ias("repo", "list", home=home, git_home=git_home).stdout
    assert widgets_id[1] in human and "Gadgets" in human
    assert "acme" not in (home / "config.json").read_text()  # the URL itself is never stored

    # Linking again (from a subdirectory, with a new label) updates the mapping in place.
    (tmp_path / "widgets" / "src").mkdir()
    run_ias("repo", "link", str(tmp_path / "widgets" / "src"), "--label", "W", home=home, git_home=git_home)
    assert [r["label"] for r in config(home)["repos"]] == ["W", "Gadgets"]

    out = run_ias("repo", "unlink", widgets_id[1], home=home, git_home=git_home)
    assert out.returncode == 0 and "unlinked W" in out.stdout
    out = run_ias("repo", "unlink", str(tmp_path / "gadgets"), home=home, git_home=git_home)
    assert out.returncode == 0 and "unlinked Gadgets" in out.stdout
    assert config(home)["repos"] == [] and config(home)["token"] == "ias_a.b.c"
    assert "no repository linked" in run_ias("repo", "list", home=home, git_home=git_home).stdout


def test_repo_errors_are_one_line(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    home, git_home = dirs
    checkout(tmp_path / "lonely")
    assert_one_line_error(
        run_ias("repo", "link", str(tmp_path / "lonely"), home=home, git_home=git_home),
        "has no remote",
        "git remote add origin URL",
    )
    (tmp_path / "plain").mkdir()
    assert_one_line_error(
        run_ias("repo", "link", str(tmp_path / "plain"), home=home, git_home=git_home), "not a git repository"
    )
    assert_one_line_error(
        run_ias("repo", "unlink", "r_" + "0" * 32, home=home, git_home=git_home), "`ias repo list`"
    )


def test_setup_asks_for_missing_values_in_a_terminal(dirs: tuple[Path, Path]) -> None:
    home, git_home = dirs
    fd, child_tty = pty.openpty()
    # The child makes the terminal its own (as a login shell would), so the token prompt can turn echo off.
    as_login = (
        "import os, sys; os.login_tty(int(sys.argv[1])); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
    )
    args = [str(child_tty), "-m", "worker", "setup", "--slots", "2"]
    env = ias_env(IAS_HOME=str(home), HOME=str(git_home))
    proc = subprocess.Popen([sys.executable, "-c", as_login, *args], env=env, pass_fds=(child_tty,))
    os.close(child_tty)
    transcript = read_until(fd, b"HOST:PORT", b"")
    os.write(fd, b"cp.example.com:443\n")
    transcript = read_until(fd, b"token", transcript)
    os.write(fd, b"ias_typed.secret.token\n")
    transcript = read_until(fd, b"next:", transcript)
    assert proc.wait(timeout=30) == 0, transcript
    os.close(fd)
    assert b"ias_typed" not in transcript  # the token is typed without echo
    written = config(home)
    assert (written["control_plane"], written["token"], written["slots"]) == (
        "cp.example.com:443",
        "ias_typed.secret.token",
        2,
    )


def read_until(fd: int, marker: bytes, seen: bytes, timeout_s: float = 30) -> bytes:
    """Read the terminal until ``marker`` shows up (bounded)."""
    deadline = time.monotonic() + timeout_s
    while marker not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                seen += os.read(fd, 1024)
            except OSError:  # the child closed the terminal
                break
    assert marker in seen, seen
    return seen
