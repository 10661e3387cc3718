"""The `ias` command. Each package contributes subcommand groups through the ``ias.commands``
entry points; they are imported only when used, so `ias --help` starts fast and this module never
imports the control plane."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from datetime import timedelta
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, NoReturn

import click

from worker import __version__
from worker.log_format import FieldsFormatter

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
    # One-shot commands log warnings only; daemons raise this to INFO (see `daemon_logging`).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(FieldsFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=max(logging.WARNING - 10 * verbose, logging.DEBUG), handlers=[handler])


def daemon_logging() -> None:
    """Long-running commands log what they do (INFO) unless -v asked for more."""
    root = logging.getLogger()
    root.setLevel(min(root.level, logging.INFO))
    logging.getLogger("alembic").setLevel(logging.WARNING)


def fail(message: str, code: int = 2) -> NoReturn:
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
@click.option(
    "--control-plane",
    default=None,
    help="Control plane HOST:PORT.  [config: control_plane; "
    "env var: IAS_CONTROL_PLANE; default: 127.0.0.1:50051]",
)
@click.option("--token", default=None, help="Worker token (ias_...).  [config: token; env var: IAS_TOKEN]")
@click.option(
    "--name",
    default=None,
    help="Worker name, unique in the workspace.  [config: worker_name; "
    "env var: IAS_WORKER_NAME; default: the host name]",
)
@click.option(
    "--slots",
    type=click.IntRange(1, 256),
    default=None,
    help="Jobs run at once.  [config: slots; env var: IAS_WORKER_SLOTS; default: 1]",
)
@click.option(
    "--tls-ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CA bundle: connect with TLS.  [config: tls_ca; env var: IAS_TLS_CA]",
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
def worker_start(
    control_plane: str | None,
    token: str | None,
    name: str | None,
    slots: int | None,
    tls_ca: Path | None,
    shutdown_grace_s: float,
) -> None:
    """Connect to the control plane and run the jobs it pushes until stopped (Ctrl-C: graceful,
    twice: hard). Settings come from flags, then IAS_* variables, then $IAS_HOME/config.json
    (written by `ias setup`); jobs run only for the repositories linked with `ias repo link`."""
    from worker.config import ConfigError, load_config
    from worker.daemon import WorkerDaemon, WorkerFatal, WorkerSettings
    from worker.registry import full_registry

    daemon_logging()
    try:
        config = load_config()
    except ConfigError as exc:
        fail(str(exc))
    token = token or config.token
    if not token:
        fail(
            "no token: run `ias setup --token ...`, pass --token or set IAS_TOKEN "
            "(`ias server token create --role worker` prints one)"
        )
    name = name or config.worker_name
    state = _state_dir()
    state.mkdir(parents=True, exist_ok=True)
    settings = WorkerSettings(
        control_plane=control_plane or config.control_plane,
        token=token or "",
        name=name,
        slots=slots or config.slots,
        repo_ids=tuple(config.repo_paths),
        repo_paths=config.repo_paths,
        tls_ca=tls_ca or config.tls_ca,
        shutdown_grace=timedelta(seconds=shutdown_grace_s),
        status_file=state / f"worker-{name}.json",
        journal_dir=state / "journal" / name,
    )
    daemon = WorkerDaemon(settings=settings, registry=full_registry())

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
