"""`ias server`: run, migrate and mint tokens for a control-plane replica."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import click

from control_plane.config import DEFAULT_LISTEN, DEFAULT_WORKSPACE, ServerSettings
from control_plane.errors import IasError

log = logging.getLogger(__name__)


def daemon_logging() -> None:
    """The server logs what it does (INFO) unless -v asked for more; Alembic stays quiet."""
    root = logging.getLogger()
    root.setLevel(min(root.level, logging.INFO))
    logging.getLogger("alembic").setLevel(logging.WARNING)


def fail(message: str) -> NoReturn:
    click.echo(f"ias: {message}", err=True)
    raise SystemExit(2)


def storage_options(fn: Any) -> Any:
    """--data-dir and --db, shared by every command that opens the database."""
    fn = click.option(
        "--db",
        "db_url",
        envvar="IAS_DB",
        show_envvar=True,
        default="",
        help="Database URL (postgresql://...); default: SQLite in the data dir.",
    )(fn)
    fn = click.option(
        "--data-dir",
        envvar="IAS_DATA_DIR",
        show_envvar=True,
        default="./.ias-data",
        show_default=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Where the SQLite database lives.",
    )(fn)
    return fn


@click.group()
def server() -> None:
    """Run the control plane."""


@server.command("start")
@storage_options
@click.option(
    "--listen",
    envvar="IAS_LISTEN",
    show_envvar=True,
    default=DEFAULT_LISTEN,
    show_default=True,
    help="HOST:PORT to serve gRPC on (port 0 picks a free one).",
)
@click.option(
    "--lease-ttl-s",
    envvar="IAS_LEASE_TTL_S",
    show_envvar=True,
    type=float,
    default=900.0,
    show_default=True,
    help="Lease time-to-live granted per assignment.",
)
@click.option(
    "--reconnect-grace-s",
    envvar="IAS_RECONNECT_GRACE_S",
    show_envvar=True,
    type=float,
    default=15.0,
    show_default=True,
    help="How long a broken session keeps its jobs before they are requeued.",
)
@click.option(
    "--tls-cert",
    envvar="IAS_TLS_CERT",
    show_envvar=True,
    type=click.Path(exists=True, path_type=Path),
    help="PEM certificate chain: serve TLS (with --tls-key).",
)
@click.option(
    "--tls-key",
    envvar="IAS_TLS_KEY",
    show_envvar=True,
    type=click.Path(exists=True, path_type=Path),
    help="PEM private key for --tls-cert.",
)
@click.option(
    "--insecure",
    envvar="IAS_INSECURE",
    show_envvar=True,
    is_flag=True,
    help="Allow plaintext on a non-loopback address.",
)
@click.option(
    "--early-dispatch/--no-early-dispatch",
    envvar="IAS_EARLY_DISPATCH",
    show_envvar=True,
    default=True,
    show_default=True,
    help="PostgreSQL: send a job to an idle worker once its submission commits, before the commit "
    "is on disk (the submitter still hears only once it is).",
)
@click.option(
    "--ready-file",
    envvar="IAS_READY_FILE",
    show_envvar=True,
    type=click.Path(path_type=Path),
    help='Write {"listen": HOST:PORT} here once serving.',
)
def start(
    data_dir: Path,
    db_url: str,
    listen: str,
    lease_ttl_s: float,
    reconnect_grace_s: float,
    tls_cert: Path | None,
    tls_key: Path | None,
    insecure: bool,
    early_dispatch: bool,
    ready_file: Path | None,
) -> None:
    """Serve the control plane until SIGTERM or Ctrl-C (graceful: workers are told to drain)."""
    settings = ServerSettings(
        data_dir=data_dir,
        listen=listen,
        db_url=db_url,
        lease_ttl=timedelta(seconds=lease_ttl_s),
        reconnect_grace=timedelta(seconds=reconnect_grace_s),
        tls_cert=tls_cert,
        tls_key=tls_key,
        allow_insecure=insecure,
        early_dispatch=early_dispatch,
    )
    _run(serve(settings, ready_file=ready_file))


async def serve(settings: ServerSettings, *, ready_file: Path | None = None) -> None:
    """Build, start and run a replica until a signal arrives."""
    from control_plane.app import build

    daemon_logging()
    plane = await build(settings)
    await plane.start()
    if ready_file is not None:
        await asyncio.to_thread(_write_atomically, ready_file, json.dumps({"listen": plane.address}))
    click.echo(f"control plane serving on {plane.address}", err=True)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped.set)
    await stopped.wait()
    click.echo("stopping: telling workers to drain", err=True)
    await plane.stop(grace=5.0)


@server.command("migrate")
@storage_options
def migrate(data_dir: Path, db_url: str) -> None:
    """Upgrade the database schema to the newest version."""

    async def go() -> None:
        from control_plane.app import open_database

        db = await open_database(ServerSettings(data_dir=data_dir, db_url=db_url))
        await db.close()

    _run(go())
    click.echo("database schema is up to date")


@server.group()
def token() -> None:
    """Mint bearer tokens."""


@token.command("create")
@storage_options
@click.option(
    "--workspace",
    envvar="IAS_WORKSPACE",
    show_envvar=True,
    default=DEFAULT_WORKSPACE,
    show_default=True,
    help="The workspace the token is scoped to (created if new).",
)
@click.option("--role", type=click.Choice(["admin", "worker"]), required=True)
@click.option("--subject", default="cli", show_default=True, help="Who the token is for.")
@click.option("--ttl-days", type=click.IntRange(1, 3650), default=365, show_default=True)
def token_create(data_dir: Path, db_url: str, workspace: str, role: str, subject: str, ttl_days: int) -> None:
    """Print a new token on the last line."""
    from control_plane.auth.tokens import Role

    async def go() -> str:
        from control_plane.app import mint_token, open_database

        db = await open_database(ServerSettings(data_dir=data_dir, db_url=db_url))
        try:
            return await mint_token(
                db, workspace_id=workspace, role=Role(role), subject=subject, ttl=timedelta(days=ttl_days)
            )
        finally:
            await db.close()

    if not workspace or len(workspace) > 64:
        fail("--workspace must be 1-64 characters")
    click.echo(_run(go()))


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except IasError as exc:
        fail(exc.message)
    except OSError as exc:
        fail(f"{exc.strerror or exc}")


def _write_atomically(path: Path, text: str) -> None:
    """Write then rename, so a reader polling for the file never sees it half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
