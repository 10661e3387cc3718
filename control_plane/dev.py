"""`ias dev`: the whole system on one machine in one foreground command, on SQLite.

The control plane runs in this process; the local worker runs as a real `ias worker start`
subprocess, so the worker plane never imports the control plane.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import click

from control_plane.cli import daemon_logging
from control_plane.config import DEFAULT_WORKSPACE, ServerSettings


@click.command()
@click.option(
    "--data-dir",
    envvar="IAS_DEV_DATA_DIR",
    show_envvar=True,
    default="./.ias-dev",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Database, tokens and worker state.",
)
@click.option(
    "--grpc-port",
    envvar="IAS_GRPC_PORT",
    show_envvar=True,
    type=click.IntRange(0, 65535),
    default=50051,
    show_default=True,
    help="Control plane port on 127.0.0.1 (0 picks a free one).",
)
@click.option(
    "--console-port",
    envvar="IAS_CONSOLE_PORT",
    show_envvar=True,
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="Console port on 127.0.0.1, when the Console is installed.",
)
@click.option(
    "--lease-ttl-s", envvar="IAS_LEASE_TTL_S", show_envvar=True, type=float, default=900.0, show_default=True
)
@click.option(
    "--reconnect-grace-s",
    envvar="IAS_RECONNECT_GRACE_S",
    show_envvar=True,
    type=float,
    default=15.0,
    show_default=True,
)
@click.option(
    "--worker-slots",
    envvar="IAS_WORKER_SLOTS",
    show_envvar=True,
    type=click.IntRange(1, 256),
    default=2,
    show_default=True,
)
def dev(
    data_dir: Path,
    grpc_port: int,
    console_port: int,
    lease_ttl_s: float,
    reconnect_grace_s: float,
    worker_slots: int,
) -> None:
    """Start the control plane (SQLite), a local worker and, when installed, the Console."""
    daemon_logging()
    settings = ServerSettings(
        data_dir=data_dir.resolve(),
        listen=f"127.0.0.1:{grpc_port}",
        lease_ttl=timedelta(seconds=lease_ttl_s),
        reconnect_grace=timedelta(seconds=reconnect_grace_s),
    )
    try:
        asyncio.run(_dev(settings, console_port=console_port, worker_slots=worker_slots))
    except OSError as exc:
        click.echo(
            f"ias: cannot start: {exc.strerror or exc} (is port {grpc_port} taken? try --grpc-port 0)",
            err=True,
        )
        raise SystemExit(2) from exc


async def _dev(settings: ServerSettings, *, console_port: int, worker_slots: int) -> None:
    from control_plane.app import build, mint_token
    from control_plane.auth.tokens import Role

    plane = await build(settings)
    await plane.start()
    ttl = timedelta(days=30)
    admin = await mint_token(
        plane.db, workspace_id=DEFAULT_WORKSPACE, role=Role.ADMIN, subject="dev", ttl=ttl
    )
    worker_token = await mint_token(
        plane.db, workspace_id=DEFAULT_WORKSPACE, role=Role.WORKER, subject="dev-worker", ttl=ttl
    )
    env = dict(
        os.environ, IAS_CONTROL_PLANE=plane.address, IAS_TOKEN=worker_token, IAS_HOME=str(settings.data_dir)
    )
    worker_cmd = ["worker", "start", "--name", "dev-local", "--slots", str(worker_slots)]
    children = [await asyncio.create_subprocess_exec(sys.executable, "-m", "worker", *worker_cmd, env=env)]
    console_url = None
    if _console_installed():
        console_url = f"http://127.0.0.1:{console_port}"
        console_cmd = ["console", "start", "--port", str(console_port)]
        children.append(
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "worker", *console_cmd, env=dict(env, IAS_TOKEN=admin)
            )
        )
    info = {
        "control_plane": plane.address,
        "console_url": console_url,
        "token": admin,
        "workspace": DEFAULT_WORKSPACE,
    }
    await asyncio.to_thread((settings.data_dir / "dev.json").write_text, json.dumps(info, indent=2))
    click.echo(
        f"IAS is running (the same in {settings.data_dir / 'dev.json'}).\n"
        f"  control plane  {plane.address}\n"
        f"  console        {console_url or 'not installed'}\n"
        f"  workspace      {DEFAULT_WORKSPACE}\n"
        f"  token          {admin}\n"
        f"Try, in another shell:\n"
        f"  export IAS_CONTROL_PLANE={plane.address} IAS_TOKEN={admin}\n"
        "  ias jobs submit --type noop --payload '{\"seconds\": 1}' --wait\n"
        "Ctrl-C stops everything."
    )
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped.set)
    await stopped.wait()
    for child in children:
        child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            async with asyncio.timeout(35):
                await child.wait()
        except TimeoutError:
            child.kill()
    await plane.stop(grace=2.0)


def _console_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("console_ui") is not None
