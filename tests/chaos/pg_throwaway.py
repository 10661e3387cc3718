"""A throwaway PostgreSQL cluster in a temp dir on a free 127.0.0.1 port, to stop and start at will."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

BINARIES = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
# PostgreSQL refuses to run as root; the Debian package's `postgres` user owns the cluster instead.
AS_POSTGRES = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def available() -> bool:
    return bool(BINARIES) and (BINARIES[-1] / "initdb").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThrowawayPostgres:
    """initdb into a fresh temp dir; `start`, `stop` (fast) and `remove` it; never the shared cluster."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ias-chaos-pg-"))
        self.root.chmod(0o755)  # the postgres user must reach the data dir inside
        self.data = self.root / "data"
        self.port = _free_port()
        self._bin = BINARIES[-1]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        out = subprocess.run(
            [*AS_POSTGRES, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        assert out.returncode == 0, f"{args[0]} failed: {out.stdout}{out.stderr}"

    def init(self) -> ThrowawayPostgres:
        (self.root / "run").mkdir()  # the socket and the log
        if AS_POSTGRES:
            shutil.chown(self.root / "run", "postgres", "postgres")
            self.data.mkdir(mode=0o700)
            shutil.chown(self.data, "postgres", "postgres")
        self._run(
            str(self._bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        )
        return self

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root / 'run'}"
            " -c max_connections=200 -c fsync=off"
        )
        log = self.root / "run" / "log.txt"
        self._run(
            str(self._bin / "pg_ctl"), "-D", str(self.data), "-l", str(log), "-w", "-o", options, "start"
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self._bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        """Stop at once if running, then delete everything; safe to call in a finally."""
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                [*AS_POSTGRES, str(self._bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        shutil.rmtree(self.root, ignore_errors=True)
