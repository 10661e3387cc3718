"""The control plane under test, run as ``ias server start`` in its own OS process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

START_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 20.0
TOKEN_TIMEOUT_S: Final = 60.0
READY_POLL_S: Final = 0.05


class ServerFailed(Exception):
    """The control plane did not start, or a command of it failed."""


@dataclass(eq=False)
class RunningServer:
    """A started control plane and the credentials to use it."""

    address: str
    admin_token: str
    worker_token: str
    log_path: Path
    db_url: str  # empty for SQLite
    data_dir: Path
    proc: asyncio.subprocess.Process

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def restart(self) -> None:
        """Stop gracefully (SIGTERM) and start again on the same address; returns once it serves."""
        await _stop(self.proc, self.log_path)
        self.proc, address = await _start(self.data_dir, self.db_url, self.address, self.log_path)
        if address != self.address:
            raise ServerFailed(f"restarted on {address}, not {self.address}")


def _ias(*args: str) -> list[str]:
    # `python -m worker` is the `ias` entry point; using this interpreter keeps the venv.
    return [sys.executable, "-m", "worker", *args]


def _storage(data_dir: Path, db_url: str) -> list[str]:
    return ["--data-dir", str(data_dir), *(["--db", db_url] if db_url else [])]


async def create_token(data_dir: Path, db_url: str, role: str) -> str:
    """Mint a token with ``ias server token create``; it prints the token on its last line."""
    args = _ias(
        "server", "token", "create", *_storage(data_dir, db_url), "--role", role, "--subject", "bench"
    )
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TOKEN_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ServerFailed(f"`ias server token create --role {role}` timed out") from None
    lines = out.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise ServerFailed(f"`ias server token create --role {role}` failed: {err.decode().strip()}")
    return lines[-1].strip()


@contextlib.asynccontextmanager
async def control_plane(data_dir: Path, db_url: str = "") -> AsyncIterator[RunningServer]:
    """Mint tokens, start the server on 127.0.0.1 with a free port, and stop it on exit.

    `ias` creates ``data_dir`` if needed.
    """
    admin = await create_token(data_dir, db_url, "admin")
    worker = await create_token(data_dir, db_url, "worker")
    log_path = data_dir / "server.log"
    proc, address = await _start(data_dir, db_url, "127.0.0.1:0", log_path)
    server = RunningServer(
        address=address,
        admin_token=admin,
        worker_token=worker,
        log_path=log_path,
        db_url=db_url,
        data_dir=data_dir,
        proc=proc,
    )
    try:
        log.info("control plane %d serving on %s", proc.pid, address)
        yield server
    finally:
        await _stop(server.proc, log_path)


async def _start(
    data_dir: Path, db_url: str, listen: str, log_path: Path
) -> tuple[asyncio.subprocess.Process, str]:
    ready = data_dir / "ready.json"
    ready.unlink(missing_ok=True)
    args = _ias("server", "start", "--listen", listen, "--ready-file", str(ready))
    with log_path.open("ab") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *args, *_storage(data_dir, db_url), stdout=log_file, stderr=log_file
        )
    try:
        return proc, await _wait_ready(proc, ready, log_path)
    except BaseException:
        await _stop(proc, log_path)
        raise


async def _wait_ready(proc: asyncio.subprocess.Process, ready: Path, log_path: Path) -> str:
    for _ in range(int(START_TIMEOUT_S / READY_POLL_S)):
        if proc.returncode is not None:
            raise ServerFailed(f"the control plane exited with {proc.returncode}:\n{tail(log_path)}")
        address = _read_ready(ready)
        if address:
            return address
        await asyncio.sleep(READY_POLL_S)
    raise ServerFailed(f"the control plane was not ready within {START_TIMEOUT_S:.0f} s:\n{tail(log_path)}")


def _read_ready(ready: Path) -> str:
    try:
        return str(json.loads(ready.read_text())["listen"])
    except (OSError, ValueError, KeyError):
        return ""  # not written yet, or caught mid-write: read it again on the next poll


async def _stop(proc: asyncio.subprocess.Process, log_path: Path) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.error("the control plane ignored SIGTERM for %.0f s; killing it", STOP_TIMEOUT_S)
            proc.kill()
            await proc.wait()
    if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
        log.warning("the control plane exited with %s:\n%s", proc.returncode, tail(log_path))


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
