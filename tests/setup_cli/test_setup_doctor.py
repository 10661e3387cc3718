"""`ias doctor` as a real process: against a real control plane, and on every kind of broken setup."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from setup_support import Server, checkout, fake_token, run_ias

UNREACHABLE = "127.0.0.1:9"  # the discard port: nothing listens there
FUTURE = int(time.time()) + 30 * 86400


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(IAS_HOME, a HOME whose git config has an identity) for the subprocesses."""
    (tmp_path / "ias").mkdir()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".gitconfig").write_text("[user]\n\tname = Dev\n\temail = dev@example.com\n")
    return tmp_path / "ias", tmp_path / "home"


def doctor(home: Path, git_home: Path, **env: str) -> tuple[int, dict[str, tuple[str, str]]]:
    """Exit code and {check name: (status, detail)}, checking the human output along the way."""
    human = run_ias("doctor", home=home, git_home=git_home, **env)
    assert "Traceback" not in human.stderr, human.stderr
    out = run_ias("doctor", "--json", home=home, git_home=git_home, **env)
    assert out.returncode == human.returncode and "Traceback" not in out.stderr, out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] == (out.returncode == 0)
    checks = {c["name"]: (c["status"], c["detail"]) for c in report["checks"]}
    for name, (status, _) in checks.items():
        assert any(line.startswith(f"{status}  {name}") for line in human.stdout.splitlines()), human.stdout
    return out.returncode, checks


def setup(home: Path, git_home: Path, *args: str) -> None:
    out = run_ias("setup", *args, home=home, git_home=git_home)
    assert out.returncode == 0, out.stderr


def link(home: Path, git_home: Path, path: Path) -> None:
    out = run_ias("repo", "link", str(path), home=home, git_home=git_home)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_a_good_setup_passes_against_a_real_control_plane(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    home, git_home = dirs
    (tmp_path / "server").mkdir()
    server = Server(tmp_path / "server").start()
    try:
        checkout(tmp_path / "app", ("origin", "https://github.com/acme/app.git"))
        setup(home, git_home, "--control-plane", server.address, "--token", server.token("worker"))
        link(home, git_home, tmp_path / "app")
        code, checks = doctor(home, git_home)
        assert code == 0, checks
        assert {name: status for name, (status, _) in checks.items()} == {
            "config": "PASS",
            "token": "PASS",
            "control plane": "PASS",
            "token accepted": "PASS",
            "repo app": "PASS",
            "git identity": "PASS",
        }
        assert "worker-scoped" in checks["token accepted"][1]
        assert checks["token"][1].startswith("worker token for workspace")

        code, checks = doctor(home, git_home, IAS_TOKEN=server.token("admin"))
        assert code == 0 and "worker-scoped" not in checks["token accepted"][1]
        assert "IAS_TOKEN from the environment" in checks["config"][1]

        code, checks = doctor(home, git_home, IAS_TOKEN=fake_token({"role": "worker", "exp": FUTURE}))
        assert code == 1 and checks["token accepted"][0] == "FAIL"
        assert "rejects the token" in checks["token accepted"][1]
    finally:
        server.stop()


def test_a_corrupt_config_fails(dirs: tuple[Path, Path]) -> None:
    home, git_home = dirs
    (home / "config.json").write_text('{"slots": ')
    code, checks = doctor(home, git_home)
    assert code == 1
    assert checks["config"][0] == "FAIL" and "not valid JSON" in checks["config"][1]


def test_an_unreachable_control_plane_and_a_deleted_repo_fail(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    home, git_home = dirs
    checkout(tmp_path / "gone", ("origin", "https://github.com/acme/gone"))
    setup(home, git_home, "--control-plane", UNREACHABLE, "--token", fake_token({"exp": FUTURE}))
    link(home, git_home, tmp_path / "gone")
    shutil.rmtree(tmp_path / "gone")
    code, checks = doctor(home, git_home)
    assert code == 1
    assert (
        checks["control plane"][0] == "FAIL" and f"cannot reach {UNREACHABLE}" in checks["control plane"][1]
    )
    assert "token accepted" not in checks  # nothing to ask when nothing answers
    assert checks["repo gone"][0] == "FAIL" and "does not exist" in checks["repo gone"][1]
    assert "ias repo unlink r_" in checks["repo gone"][1]


@pytest.mark.parametrize(
    ("token", "status", "fragment"),
    [
        ("", "FAIL", "no token"),
        ("ias_not-a-jwt", "FAIL", "damaged"),
        ("ias_a.%%%.c", "FAIL", "damaged"),
        (fake_token({"role": "worker", "exp": int(time.time()) - 60}), "FAIL", "expired"),
        (fake_token({"role": "worker", "exp": int(time.time()) + 3600}), "WARN", "expires"),
        (
            fake_token({"role": "admin", "ws": "ws_1", "exp": FUTURE}),
            "PASS",
            "admin token for workspace ws_1",
        ),
    ],
)
def test_the_token_is_read_without_its_secret(
    dirs: tuple[Path, Path], token: str, status: str, fragment: str
) -> None:
    home, git_home = dirs
    setup(home, git_home, "--control-plane", UNREACHABLE)
    _, checks = doctor(home, git_home, IAS_TOKEN=token)
    assert checks["token"][0] == status and fragment in checks["token"][1], checks["token"]


def test_a_half_done_merge_and_a_stale_lock_warn(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    home, git_home = dirs
    repo = checkout(tmp_path / "app", ("origin", "https://github.com/acme/app"))
    setup(home, git_home, "--control-plane", UNREACHABLE)
    link(home, git_home, tmp_path / "app")
    (Path(repo.path) / "MERGE_HEAD").write_text(f"{repo.head.target}\n")
    lock = Path(repo.path) / "index.lock"
    lock.touch()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    _, checks = doctor(home, git_home)
    status, detail = checks["repo app"]
    assert status == "WARN"
    assert "merge is in progress" in detail and "stale index.lock" in detail and "git_repair" in detail


def test_a_changed_remote_fails_and_says_how_to_relink(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    home, git_home = dirs
    repo = checkout(tmp_path / "app", ("origin", "https://github.com/acme/app"))
    setup(home, git_home, "--control-plane", UNREACHABLE)
    link(home, git_home, tmp_path / "app")
    repo.remotes.set_url("origin", "https://github.com/someone-else/app")
    _, checks = doctor(home, git_home)
    assert checks["repo app"][0] == "FAIL" and "ias repo link" in checks["repo app"][1]


def test_a_missing_git_identity_warns(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    home, git_home = dirs
    (git_home / ".gitconfig").unlink()
    setup(home, git_home, "--control-plane", UNREACHABLE)
    _, checks = doctor(home, git_home)
    assert checks["git identity"][0] == "WARN" and "IAS <ias@localhost>" in checks["git identity"][1]
    repo = checkout(tmp_path / "app", ("origin", "https://github.com/acme/app"))
    link(home, git_home, tmp_path / "app")
    _, checks = doctor(home, git_home)
    assert checks["git identity"][0] == "WARN" and "for app" in checks["git identity"][1]
    repo.config["user.name"], repo.config["user.email"] = "Repo", "repo@example.com"
    assert doctor(home, git_home)[1]["git identity"][0] == "PASS"
