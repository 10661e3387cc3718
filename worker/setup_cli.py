"""`ias setup`, `ias repo` and `ias doctor`: configure a worker machine and check that it is ready."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import click
import grpc
import pygit2
from pygit2.enums import RepositoryState

from worker.cli import fail
from worker.config import (
    ENV_TWINS,
    ConfigError,
    LocalConfig,
    RepoMapping,
    apply_settings,
    checkout_root,
    config_path,
    load_config,
    open_checkout,
    repo_identity,
    save_config,
)

F = TypeVar("F", bound=Callable[..., Any])
TOKEN_HINT: Final = "create one with `ias server token create --role worker`"
RPC_TIMEOUT_S: Final = 3.0
STALE_LOCK_S: Final = 60  # an index.lock older than this is left over by a git that died
EXPIRY_WARNING_S: Final = 7 * 86400
FLAGS: Final[Mapping[str, str]] = {
    "control_plane": "--control-plane",
    "token": "--token",
    "tls_ca": "--tls-ca",
    "worker_name": "--name",
    "slots": "--slots",
}


def _load(*, env: Mapping[str, str] | None = None) -> LocalConfig:
    try:
        return load_config(env=env)
    except ConfigError as exc:
        fail(str(exc))


def _save(config: LocalConfig) -> Path:
    try:
        return save_config(config)
    except OSError as exc:
        fail(f"cannot write {config_path()}: {exc.strerror or exc}; check IAS_HOME and its permissions")


# --- ias setup ------------------------------------------------------------------------------------


def _setting_option(name: str, metavar: str, help: str) -> Callable[[F], F]:
    """An option whose default is "keep what the file says"; its IAS_* twin counts as given."""
    return click.option(
        FLAGS[name], name, envvar=ENV_TWINS[name], show_envvar=True, default=None, metavar=metavar, help=help
    )


@click.command()
@_setting_option("control_plane", "HOST:PORT", "Control plane address HOST:PORT.")
@_setting_option("token", "TOKEN", f"Worker token (ias_...); {TOKEN_HINT}.")
@_setting_option("tls_ca", "PATH", "CA bundle: connect with TLS.")
@_setting_option("worker_name", "NAME", "Worker name, unique in the workspace (default: host name).")
@_setting_option("slots", "N", "Jobs run at once (1-256).")
def setup(**given: str | None) -> None:
    """Write the local configuration ($IAS_HOME/config.json). Settings not given are kept; linked
    repositories are kept. Asks for missing values only when run in a terminal."""
    path = config_path()
    current = _load(env={})  # the file alone: the environment must not leak into it unasked
    values = {name: value for name, value in given.items() if value is not None}
    if sys.stdin is not None and sys.stdin.isatty():
        values.update(_prompt_missing(current, values, first_time=not path.exists()))
    try:
        config = apply_settings(current, values, labels=FLAGS)
    except ConfigError as exc:
        fail(str(exc))
    if config.token and not config.token.startswith("ias_"):
        fail(f"--token does not look like an IAS token (they start with ias_); {TOKEN_HINT}")
    if config.tls_ca is not None and not config.tls_ca.is_file():
        fail(
            f"--tls-ca {config.tls_ca} is not a file; pass the CA bundle that signed the server's certificate"
        )
    written = _save(config)
    slots = f"{config.slots} slot{'s' if config.slots != 1 else ''}"
    click.echo(
        f"wrote {written} (control plane {config.control_plane}, worker {config.worker_name}, {slots})"
    )
    if not config.token:
        click.echo(f"next: add a token with `ias setup --token ias_...` ({TOKEN_HINT})")
    elif not config.repos:
        click.echo("next: `ias repo link PATH` for each checkout, then `ias doctor`")
    else:
        click.echo("next: `ias doctor`, then `ias worker start`")


def _prompt_missing(current: LocalConfig, values: Mapping[str, str], *, first_time: bool) -> dict[str, str]:
    asked: dict[str, str] = {}
    if first_time and "control_plane" not in values:
        asked["control_plane"] = click.prompt(
            "Control plane address (HOST:PORT)", default=current.control_plane
        )
    if not current.token and "token" not in values:
        token = click.prompt(
            f"Worker token ({TOKEN_HINT}; empty to skip)", default="", show_default=False, hide_input=True
        )
        if token:
            asked["token"] = token
    return asked


# --- ias repo -------------------------------------------------------------------------------------


@click.group()
def repo() -> None:
    """Link local checkouts to the repositories the control plane knows."""


@repo.command("link")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--label", default=None, help="Display name (default: the repository name from its URL).")
def repo_link(path: Path, label: str | None) -> None:
    """Map the checkout at PATH to its repository identity, a hash of its origin URL."""
    try:
        root = checkout_root(path.expanduser())
        repo_id, default_label = repo_identity(root)
    except ConfigError as exc:
        fail(str(exc))
    if label is not None and not label.strip():
        fail("--label is empty; pass a name or leave --label out")
    mapping = RepoMapping(repo_id=repo_id, path=root, label=(label or default_label).strip())
    config = _load(env={})
    _save(config.linked(mapping))
    click.echo(f"linked {mapping.label} {repo_id} -> {root}")


@repo.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def repo_list(as_json: bool) -> None:
    """Show the linked checkouts."""
    repos = _load(env={}).repos
    if as_json:
        click.echo(json.dumps({"repos": [{**asdict(m), "path": str(m.path)} for m in repos]}))
        return
    if not repos:
        click.echo("no repository linked; run `ias repo link PATH`")
    for m in repos:
        click.echo(f"{m.repo_id}  {m.label:<24} {m.path}")


@repo.command("unlink")
@click.argument("path_or_repo_id")
def repo_unlink(path_or_repo_id: str) -> None:
    """Forget a linked checkout, by its path or its repository id."""
    config = _load(env={})
    updated = config.unlinked(path_or_repo_id)
    if updated == config:
        fail(f"no linked repository matches {path_or_repo_id}; `ias repo list` shows them")
    _save(updated)
    for m in set(config.repos) - set(updated.repos):
        click.echo(f"unlinked {m.label} {m.repo_id} ({m.path})")


# --- ias doctor -----------------------------------------------------------------------------------

Status = Literal["PASS", "WARN", "FAIL"]


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the doctor's report: what was checked, how it went, and what to do about it."""

    name: str
    status: Status
    detail: str


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def doctor(as_json: bool) -> None:
    """Check the configuration, the token, the control plane and every linked checkout; exit 1 if
    anything fails."""
    checks = list(_run_checks())
    ok = all(c.status != "FAIL" for c in checks)
    if as_json:
        click.echo(json.dumps({"ok": ok, "checks": [asdict(c) for c in checks]}))
    else:
        for c in checks:
            click.echo(f"{c.status}  {c.name:<16} {c.detail}")
        failed = sum(c.status == "FAIL" for c in checks)
        click.echo("all checks passed" if ok else f"{failed} check{'s' if failed > 1 else ''} failed")
    if not ok:
        raise SystemExit(1)


def _run_checks() -> Iterator[Check]:
    path = config_path()
    try:
        config = load_config()
    except ConfigError as exc:
        yield Check("config", "FAIL", str(exc))
        return  # everything else would be checked against settings the user did not write
    yield _check_config_file(path)
    yield (token_check := _check_token(config.token, now=time.time()))
    yield from asyncio.run(_check_control_plane(config, token_ok=token_check.status != "FAIL"))
    for mapping in config.repos:
        yield _check_repo(mapping)
    yield _check_git_identity(config.repos)


def _check_config_file(path: Path) -> Check:
    from_env = [var for var in ENV_TWINS.values() if os.environ.get(var)]
    note = f" ({', '.join(from_env)} from the environment)" if from_env else ""
    if not path.exists():
        return Check("config", "WARN", f"no {path}, using defaults{note}; run `ias setup`")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return Check("config", "WARN", f"{path} is readable by others and holds a token; chmod 600 {path}")
    return Check("config", "PASS", f"{path} is valid{note}")


def _check_token(token: str, *, now: float) -> Check:
    if not token:
        return Check("token", "FAIL", f"no token; run `ias setup --token ias_...` ({TOKEN_HINT})")
    if not token.startswith("ias_"):
        return Check("token", "FAIL", f"the token does not start with ias_; {TOKEN_HINT}")
    try:
        claims = _jwt_claims(token.removeprefix("ias_"))
    except ValueError as exc:
        return Check("token", "FAIL", f"the token is damaged ({exc}); copy it again, or {TOKEN_HINT}")
    who = f"{claims.get('role', '?')} token for workspace {claims.get('ws', '?')}"
    exp = claims.get("exp")
    if not isinstance(exp, int | float):
        return Check("token", "PASS", f"{who}, no expiry")
    when = datetime.fromtimestamp(exp, UTC).strftime("%Y-%m-%d %H:%M UTC")
    if exp <= now:
        return Check("token", "FAIL", f"{who} expired {when}; {TOKEN_HINT}, then `ias setup --token ias_...`")
    if exp - now < EXPIRY_WARNING_S:
        return Check(
            "token", "WARN", f"{who} expires {when}; soon {TOKEN_HINT}, then `ias setup --token ias_...`"
        )
    return Check("token", "PASS", f"{who}, expires {when}")


def _jwt_claims(jwt: str) -> dict[str, Any]:
    """The payload of a JWT, unverified: the secret lives on the control plane only."""
    parts = jwt.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT: three dot-separated parts expected")
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        raise ValueError("its payload is not base64 JSON") from None
    if not isinstance(claims, dict):
        raise ValueError("its payload is not a JSON object")
    return claims


async def _check_control_plane(config: LocalConfig, *, token_ok: bool) -> list[Check]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from ias.v1 import job_service_pb2, job_service_pb2_grpc

    from worker.client import bearer, open_channel

    where = config.control_plane
    fix = "start it (`ias server start`) or fix the address with `ias setup --control-plane HOST:PORT`"
    if config.tls_ca is not None and not config.tls_ca.is_file():
        return [
            Check("control plane", "FAIL", f"TLS CA {config.tls_ca} is missing; `ias setup --tls-ca PATH`")
        ]
    async with open_channel(where, tls_ca=config.tls_ca) as channel:
        try:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            return [Check("control plane", "FAIL", f"cannot reach {where} ({_rpc_error(exc)}); {fix}")]
        if health.status != health_pb2.HealthCheckResponse.SERVING:
            return [Check("control plane", "FAIL", f"{where} is not serving (shutting down?); {fix}")]
        checks = [Check("control plane", "PASS", f"{where} is serving")]
        if token_ok:
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            request = job_service_pb2.ListJobsRequest(limit=1)
            try:
                await stub.ListJobs(request, metadata=bearer(config.token), timeout=RPC_TIMEOUT_S)
                checks.append(Check("token accepted", "PASS", f"{where} accepts the token"))
            except grpc.aio.AioRpcError as exc:
                checks.append(_token_rejection(where, exc))
        return checks


def _token_rejection(where: str, exc: grpc.aio.AioRpcError) -> Check:
    code = exc.code()
    if code == grpc.StatusCode.PERMISSION_DENIED:
        # Listing jobs is for admins; being refused it proves the token itself was accepted.
        return Check("token accepted", "PASS", f"{where} accepts the token (worker-scoped: cannot list jobs)")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Check(
            "token accepted",
            "FAIL",
            f"{where} rejects the token ({exc.details()}); is it for this control plane? {TOKEN_HINT}",
        )
    return Check("token accepted", "FAIL", f"{where} failed the check ({_rpc_error(exc)}); see its log")


def _rpc_error(exc: grpc.aio.AioRpcError) -> str:
    # gRPC's connection errors list every address tried; the code alone is what a user acts on.
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer within {RPC_TIMEOUT_S:g} s"
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return "unavailable"
    details = (exc.details() or "").splitlines()
    return f"{exc.code().name.lower()}: {details[0]}" if details else exc.code().name.lower()


def _check_repo(mapping: RepoMapping) -> Check:
    name = f"repo {mapping.label}"
    path, unlink = mapping.path, f"`ias repo unlink {mapping.repo_id}`"
    if not path.exists():
        return Check(
            name, "FAIL", f"{path} does not exist; `ias repo link NEWPATH` if it moved, else {unlink}"
        )
    try:
        repo_id, _ = repo_identity(path)
        repo = open_checkout(path)
    except ConfigError as exc:
        return Check(name, "FAIL", f"{exc} (or {unlink})")
    if repo_id != mapping.repo_id:
        return Check(
            name,
            "FAIL",
            f"{path}'s remote is now another repository ({repo_id}, linked as {mapping.repo_id}); "
            f"`ias repo link {path}` to update the mapping",
        )
    problems = _unfinished_git(repo)
    if problems:
        repair = f"`ias jobs submit --type git_repair --repo {repo_id}`"
        return Check(name, "WARN", f"{path}: {'; '.join(problems)}; finish it by hand or run {repair}")
    return Check(name, "PASS", f"{path} ({repo_id}) is clean")


def _unfinished_git(repo: Any) -> list[str]:
    problems = []
    state = RepositoryState(repo.state())
    if state != RepositoryState.NONE:
        problems.append(f"a {state.name.lower().replace('_', ' ')} is in progress")
    lock = Path(repo.path) / "index.lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        age = 0.0
    if age > STALE_LOCK_S:
        problems.append(f"a stale index.lock ({int(age)} s old) blocks git")
    return problems


def _check_git_identity(repos: tuple[RepoMapping, ...]) -> Check:
    fallback = "IAS commits as `IAS <ias@localhost>`; set `git config --global user.name/user.email`"
    missing = [m.label for m in repos if not _has_identity(_repo_config(m.path))]
    if repos and missing:
        return Check("git identity", "WARN", f"no user.name/email for {', '.join(missing)}; {fallback}")
    if not repos and not any(_has_identity(c) for c in _user_configs()):
        return Check("git identity", "WARN", f"no user.name/email in your git config; {fallback}")
    return Check("git identity", "PASS", "commits get your user.name and user.email")


def _repo_config(path: Path) -> Any:
    try:
        return open_checkout(path).config
    except (ConfigError, pygit2.GitError):
        return None  # the repository's own check reports why


def _user_configs() -> Iterator[Any]:
    for get in (pygit2.Config.get_global_config, pygit2.Config.get_xdg_config):
        try:
            yield get()
        except (OSError, pygit2.GitError):
            continue  # that file does not exist


def _has_identity(config: Any) -> bool:
    if config is None:
        return True
    try:
        return bool(config["user.name"]) and bool(config["user.email"])
    except KeyError:
        return False
