"""The soak's real processes: control-plane replicas, worker daemons with their own IAS_HOME, proxies."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Run as a script, only tests/chaos is on sys.path; processes.py needs tests/ for conftest.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chaos_support import is_serving  # also puts tests/integration on sys.path
from processes import Server, Worker, ias, ias_env
from processes import make_repo as _make_repo
from tcp_proxy import TcpProxy

__all__ = ["Daemon", "Replica", "is_serving", "link_repo", "make_repo"]

ORIGIN = "git@github.com:acme/soak-widgets.git"
START_TRIES = 3


def make_repo(path: Path) -> None:
    """A small real repository with one commit on main, its own `origin` (so its own repo id)."""
    _make_repo(path, origin=ORIGIN)


def link_repo(home: Path, checkout: Path, *, address: str, token: str, name: str) -> str:
    """`ias setup` + `ias repo link` in ``home``; returns the repository id the worker advertises."""
    env = ias_env(IAS_HOME=str(home))
    for args in (
        ("setup", "--control-plane", address, "--token", token, "--name", name),
        ("repo", "link", str(checkout)),
    ):
        out = ias(*args, env=env)
        assert out.returncode == 0, f"ias {args[0]}: {out.stderr}"
    listed = ias("repo", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    return str(json.loads(listed.stdout)["repos"][0]["repo_id"])


@dataclass
class Replica:
    """One `ias server start`; restarted on the port it first got, so workers find it again."""

    data_dir: Path
    db: str
    grace_s: float
    ttl_s: float
    address: str = ""
    server: Server | None = None
    killed: bool = False

    def start(self) -> None:
        """Blocking (run it in a thread from async code); retries a port still held by the dead process."""
        for attempt in range(START_TRIES):
            server = Server(
                self.data_dir,
                db=self.db,
                grace_s=self.grace_s,
                ttl_s=self.ttl_s,
                listen=self.address or "127.0.0.1:0",
            )
            try:
                server.start()
            except AssertionError:
                server.stop(9)
                if attempt == START_TRIES - 1:
                    raise
                time.sleep(1)
                continue
            self.server, self.address, self.killed = server, server.address, False
            return

    def kill(self) -> None:
        assert self.server is not None and self.server.proc is not None
        self.killed = True
        self.server.proc.kill()
        self.server.proc.wait(timeout=30)

    def exited_by_itself(self) -> int | None:
        """The exit code if the process ended without being killed by the soak."""
        proc = self.server.proc if self.server else None
        if self.killed or proc is None:
            return None
        return proc.poll()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(9)

    def log_tail(self, lines: int = 20) -> str:
        log = self.data_dir / "server.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


@dataclass
class Daemon:
    """One `ias worker start` with its own IAS_HOME (so its journal survives kill -9)."""

    name: str
    home: Path
    replica: Replica
    slots: int
    token: str
    proxy: TcpProxy | None = None
    target: str = ""  # a gRPC target naming several replicas (failover), instead of its replica's
    repo_id: str = ""
    process: Worker | None = None
    killed: bool = False
    starts: list[float] = field(default_factory=list)

    @property
    def address(self) -> str:
        if self.target:
            return self.target
        return self.proxy.address if self.proxy is not None else self.replica.address

    def start(self) -> None:
        self.process = Worker(self.address, self.token, self.name, slots=self.slots, home=self.home)
        self.killed = False
        self.starts.append(time.monotonic())

    def kill(self) -> None:
        if self.process is not None:
            self.killed = True
            self.process.kill()

    def exited_by_itself(self) -> int | None:
        if self.killed or self.process is None:
            return None
        return self.process.proc.poll()

    def stop(self) -> None:
        if self.process is not None and self.process.proc.poll() is None:
            self.process.kill()

    def log_text(self) -> str:
        log = self.home / f"worker-{self.name}.log"
        return log.read_text(errors="replace") if log.exists() else ""
