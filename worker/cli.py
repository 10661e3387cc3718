"""The `ias` command. Each package contributes subcommand groups through the ``ias.commands``
entry points; they are imported only when used, so `ias --help` starts fast and this module never
imports the control plane."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from datetime import timedelta
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click

from worker import __version__

ENV_HELP = "Every option has an IAS_* environment twin, shown in each command's --help."


class LazyGroup(click.Group):
    """A group whose subcommands come from entry points, loaded on first use."""

    def _entry_points(self) -> dict[str, Any]:
        return {ep.name: ep for ep in entry_points(group="ias.commands")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._entry_points()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        ep = self._entry_points().get(cmd_name)
        if ep is None:
            return None
        loaded = ep.load()
        assert isinstance(loaded, click.Command)
        return loaded


@click.group(
    cls=LazyGroup, help=f"IAS: a control plane for coding agents on your own machines.\n\n{ENV_HELP}"
)
@click.version_option(__version__, prog_name="ias")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def ias(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose if verbose else logging.INFO
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def fail(message: str, code: int = 2) -> None:
    """Exit with a one-line error and no traceback."""
    click.echo(f"ias: {message}", err=True)
    raise SystemExit(code)


def connection_options(fn: Any) -> Any:
    """--control-plane and --token, with their IAS_* twins."""
    fn = click.option("--token", envvar="IAS_TOKEN", show_envvar=True, help="Bearer token (ias_...).")(fn)
    fn = click.option(
        "--control-plane",
        envvar="IAS_CONTROL_PLANE",
        show_envvar=True,
        default="127.0.0.1:50051",
        show_default=True,
        help="Control plane address HOST:PORT.",
    )(fn)
    return fn


@ias.group()
def worker() -> None:
    """Run and inspect the worker daemon."""


def _state_dir() -> Path:
    return Path(os.environ.get("IAS_HOME", Path.home() / ".ias"))


@worker.command("start")
@connection_options
@click.option(
    "--name",
    envvar="IAS_WORKER_NAME",
    show_envvar=True,
    default=socket.gethostname,
    show_default="host name",
    help="Worker name, unique in the workspace.",
)
@click.option(
    "--slots",
    envvar="IAS_WORKER_SLOTS",
    show_envvar=True,
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Jobs run at once.",
)
@click.option(
    "--repo-id",
    "repo_ids",
    multiple=True,
    envvar="IAS_REPO_IDS",
    show_envvar=True,
    help="Repository identity mapped on this machine (repeatable).",
)
@click.option(
    "--shutdown-grace-s",
    envvar="IAS_SHUTDOWN_GRACE_S",
    show_envvar=True,
    type=click.FloatRange(0, 3600),
    default=30.0,
    show_default=True,
    help="How long a graceful stop waits for running jobs.",
)
@click.option(
    "--tls-ca",
    envvar="IAS_TLS_CA",
    show_envvar=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CA bundle: connect with TLS.",
)
def worker_start(
    control_plane: str,
    token: str | None,
    name: str,
    slots: int,
    repo_ids: tuple[str, ...],
    shutdown_grace_s: float,
    tls_ca: Path | None,
) -> None:
    """Connect to the control plane and run the jobs it pushes until stopped (Ctrl-C: graceful,
    twice: hard)."""
    from worker.daemon import WorkerDaemon, WorkerFatal, WorkerSettings
    from worker.handlers import default_registry

    if not token:
        fail("no token: pass --token or set IAS_TOKEN (ias server token create --role worker prints one)")
    state = _state_dir()
    state.mkdir(parents=True, exist_ok=True)
    settings = WorkerSettings(
        control_plane=control_plane,
        token=token or "",
        name=name,
        slots=slots,
        repo_ids=repo_ids,
        tls_ca=tls_ca,
        shutdown_grace=timedelta(seconds=shutdown_grace_s),
        status_file=state / f"worker-{name}.json",
        journal_dir=state / "journal" / name,
    )
    daemon = WorkerDaemon(settings=settings, registry=default_registry())

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, daemon.stop)
        await daemon.run()

    try:
        asyncio.run(main())
    except WorkerFatal as exc:
        fail(str(exc))


@worker.command("status")
@click.option("--name", envvar="IAS_WORKER_NAME", show_envvar=True, default=None, help="Only this worker.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def worker_status(name: str | None, as_json: bool) -> None:
    """Show what the local worker daemons are doing."""
    files = sorted(_state_dir().glob(f"worker-{name or '*'}.json"))
    states = [json.loads(f.read_text()) for f in files]
    if as_json:
        click.echo(json.dumps(states, indent=2))
        return
    if not states:
        fail("no worker has run on this machine (status files live in $IAS_HOME, default ~/.ias)", 1)
    for st in states:
        running = ", ".join(f"{j['job_id']} ({j['type']})" for j in st["running"]) or "none"
        click.echo(
            f"{st['name']}: {st['status']}; running: {running}; completed: {st['completed']}; "
            f"last ack {st['seconds_since_ack']} s before the last update"
        )


def main() -> None:
    ias(prog_name="ias")
