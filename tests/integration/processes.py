"""Real `ias` processes for end-to-end tests: servers, workers and CLI calls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pygit2
from conftest import wait_until


def ias_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IAS_") or k == "IAS_HOME"}
    env.update(extra)
    return env


def ias(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `ias ARGS...` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        capture_output=True,
        text=True,
        env=env or ias_env(),
        timeout=timeout,
        check=False,
    )


class Server:
    """`ias server start` as a subprocess on a free loopback port."""

    def __init__(
        self,
        data_dir: Path,
        *,
        db: str = "",
        grace_s: float = 1.0,
        ttl_s: float = 60,
        listen: str = "127.0.0.1:0",
    ) -> None:
        self.data_dir = data_dir
        self.db = db
        self.ready = data_dir / f"ready-{time.monotonic_ns()}.json"
        self.args = [
            "server",
            "start",
            "--data-dir",
            str(data_dir),
            "--listen",
            listen,
            "--reconnect-grace-s",
            str(grace_s),
            "--lease-ttl-s",
            str(ttl_s),
            "--ready-file",
            str(self.ready),
        ]
        if db:
            self.args += ["--db", db]
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""

    def start(self) -> Server:
        self.ready.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", *self.args],
            env=ias_env(),
            stdout=subprocess.DEVNULL,
            stderr=open(self.data_dir / "server.log", "a"),
            text=True,
        )
        wait_until(self.ready.exists, timeout=30, what="server ready")
        self.address = json.loads(self.ready.read_text())["listen"]
        return self

    def token(self, role: str) -> str:
        args = ["server", "token", "create", "--data-dir", str(self.data_dir), "--role", role]
        if self.db:
            args += ["--db", self.db]
        out = ias(*args)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()[-1]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


class Worker:
    """`ias worker start` as a subprocess."""

    def __init__(
        self, address: str, token: str, name: str, *, slots: int = 1, home: Path | None = None
    ) -> None:
        env = ias_env(IAS_CONTROL_PLANE=address, IAS_TOKEN=token)
        if home is not None:
            env["IAS_HOME"] = str(home)
        self.log = (home or Path(env["IAS_HOME"])) / f"worker-{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "worker", "start", "--name", name, "--slots", str(slots)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "a"),
            text=True,
        )

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def submit(address: str, token: str, *args: str) -> dict[str, Any]:
    out = ias("jobs", "submit", "--json", *args, env=ias_env(IAS_CONTROL_PLANE=address, IAS_TOKEN=token))
    assert out.returncode in (0, 1), out.stderr
    return dict(json.loads(out.stdout))


def show(address: str, token: str, job_id: str) -> dict[str, Any]:
    out = ias("jobs", "show", job_id, "--json", env=ias_env(IAS_CONTROL_PLANE=address, IAS_TOKEN=token))
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def make_repo(path: Path, *, origin: str = "git@github.com:acme/widgets.git") -> pygit2.Repository:
    """A small real repository with one commit on main and an `origin` remote (its identity)."""
    sig = pygit2.Signature("Dev", "dev@example.com", 1_700_000_000, 0)
    repo = pygit2.init_repository(str(path), initial_head="main")
    (path / "pyproject.toml").write_text('[project]\nname = "widgets"\n')
    (path / "app.py").write_text("print('hi')\n")
    repo.index.add_all()
    repo.index.write()
    repo.create_commit("HEAD", sig, sig, "initial", repo.index.write_tree(), [])
    repo.remotes.create("origin", origin)
    return repo
