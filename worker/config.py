"""The worker machine's local configuration, ``$IAS_HOME/config.json`` (format: docs/configuration.md)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import pygit2

FORMAT_VERSION: Final = 1
MAX_SLOTS: Final = 256  # the control plane refuses more (worker_servicer.MAX_SLOTS)
MAX_NAME: Final = 200  # the control plane refuses longer worker names
# Each setting a user may override without editing the file, by field name.
ENV_TWINS: Final[Mapping[str, str]] = {
    "control_plane": "IAS_CONTROL_PLANE",
    "token": "IAS_TOKEN",
    "tls_ca": "IAS_TLS_CA",
    "worker_name": "IAS_WORKER_NAME",
    "slots": "IAS_WORKER_SLOTS",
}
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]@]+):(\d{1,5})$")
_GRPC_SCHEMES = ("dns:", "unix:", "ipv4:", "ipv6:")  # gRPC target syntaxes passed through as they are
_SCP_LIKE = re.compile(r"^(?:[^@/\s]+@)?(?P<host>[^:/\s]+):(?P<path>.*)$")


class ConfigError(Exception):
    """The local configuration or a checkout is unusable; the message is one line: problem, then fix."""


@dataclass(frozen=True, slots=True)
class RepoMapping:
    """A linked checkout: the repository identity the control plane knows, and where it lives here."""

    repo_id: str
    path: Path
    label: str


@dataclass(frozen=True, slots=True)
class LocalConfig:
    """Everything `ias` needs on a worker machine; the file's values, then the IAS_* twins on top."""

    control_plane: str = "127.0.0.1:50051"
    token: str = ""
    tls_ca: Path | None = None
    worker_name: str = field(default_factory=socket.gethostname)
    slots: int = 1
    repos: tuple[RepoMapping, ...] = ()

    @property
    def repo_paths(self) -> dict[str, Path]:
        """Repository id → checkout, the shape the worker daemon takes."""
        return {m.repo_id: m.path for m in self.repos}

    def linked(self, new: RepoMapping) -> LocalConfig:
        """With ``new`` in place of any mapping of the same repository or the same checkout: one
        checkout per repository and one repository per checkout."""
        repos: list[RepoMapping] = []
        for old in self.repos:
            if old.repo_id != new.repo_id and old.path != new.path:
                repos.append(old)
            elif new not in repos:
                repos.append(new)  # where the first mapping it replaces was, so `repo list` keeps its order
        return replace(self, repos=tuple(repos) if new in repos else (*repos, new))

    def unlinked(self, path_or_repo_id: str) -> LocalConfig:
        """Without the mappings whose repository id or checkout path is ``path_or_repo_id``."""
        path = Path(path_or_repo_id).expanduser().resolve()
        kept = tuple(m for m in self.repos if path_or_repo_id != m.repo_id and path != m.path)
        return replace(self, repos=kept)


def config_path() -> Path:
    """``$IAS_HOME/config.json``; IAS_HOME defaults to ``~/.ias``."""
    home = os.environ.get("IAS_HOME") or str(Path.home() / ".ias")
    return Path(home).expanduser() / "config.json"


def load_config(path: Path | None = None, *, env: Mapping[str, str] | None = None) -> LocalConfig:
    """The file's configuration (defaults when it does not exist), overridden by the IAS_* twins in
    ``env`` (default: the process environment; pass ``{}`` to read the file alone)."""
    path = config_path() if path is None else path
    config = _read_file(path)
    env = os.environ if env is None else env
    # An empty variable counts as unset, so `IAS_TOKEN= ias doctor` does not blank the token.
    overrides = {name: env[var] for name, var in ENV_TWINS.items() if env.get(var)}
    return apply_settings(config, overrides, labels=ENV_TWINS)


def apply_settings(
    config: LocalConfig, values: Mapping[str, str], *, labels: Mapping[str, str]
) -> LocalConfig:
    """``config`` with settings given as text (environment, command line) by field name; ``labels``
    says how the user spelled each one (``IAS_WORKER_SLOTS``, ``--slots``) for the error message."""
    changes: dict[str, Any] = {}
    for name, raw in values.items():
        try:
            changes[name] = _PARSERS[name](raw.strip())
        except ValueError as exc:
            raise ConfigError(f"{labels[name]} {exc}, not {raw!r}; fix {labels[name]}") from None
    return replace(config, **changes)


def save_config(config: LocalConfig, path: Path | None = None) -> Path:
    """Write ``config`` atomically, readable by its owner only (file 0600, directory 0700)."""
    path = config_path() if path is None else path
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _make_private(path.parent)
    text = json.dumps(_to_json(config), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".tmp")  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def repo_identity(path: Path) -> tuple[str, str]:
    """``(repo_id, label)`` of the checkout at ``path``: a hash of its normalised remote URL, so every
    clone of one repository has the same id and the URL itself never leaves this machine."""
    repo = open_checkout(path)
    normalised = normalise_remote_url(_remote_url(repo, path))
    repo_id = "r_" + hashlib.sha256(normalised.encode()).hexdigest()[:32]
    return repo_id, normalised.rstrip("/").rsplit("/", 1)[-1]


def open_checkout(path: Path) -> Any:
    """The ``pygit2.Repository`` of the non-bare checkout containing ``path``, with at least one commit."""
    if not path.exists():
        raise ConfigError(f"{path} does not exist; pass the path of a git checkout")
    found = pygit2.discover_repository(str(path))
    if found is None:
        raise ConfigError(f"{path} is not a git repository; pass the path of a git checkout")
    repo = pygit2.Repository(found)
    if repo.is_bare:
        raise ConfigError(f"{path} is a bare repository; link a checkout with a work tree instead")
    if repo.head_is_unborn:
        raise ConfigError(f"{path} has no commits yet; commit once (git commit --allow-empty -m init)")
    return repo


def checkout_root(path: Path) -> Path:
    """The top of the work tree containing ``path``, resolved."""
    return Path(open_checkout(path).workdir).resolve()


def normalise_remote_url(url: str) -> str:
    """``host/org/repo`` for every spelling of one remote: scheme, user, password and port dropped,
    host lower-cased, SSH host aliases (``github.com-work``) folded, trailing ``.git`` and ``/`` dropped.
    A local path (``/srv/git/app.git``, ``file://...``) stays a path."""
    url = url.strip()
    if not url:
        raise ConfigError("the remote has an empty URL; fix it with `git remote set-url origin URL`")
    host, path = _split_remote(url)
    path = re.sub(r"/{2,}", "/", path).strip("/")
    path = path.removesuffix(".git").rstrip("/")
    if not path:
        raise ConfigError(f"remote URL {url!r} names no repository; fix it with `git remote set-url`")
    return f"{_fold_alias(host)}/{path}" if host else f"/{path}"


def _split_remote(url: str) -> tuple[str, str]:
    """(lower-cased host or "" for a local path, path)."""
    if "://" in url:
        parts = urlsplit(url)
        if parts.scheme.lower() == "file":
            return "", parts.path
        if not parts.hostname:
            raise ConfigError(f"remote URL {url!r} has no host; fix it with `git remote set-url`")
        return parts.hostname.lower(), parts.path
    if ":" not in url or url.startswith(("/", ".", "~")) or re.match(r"^[A-Za-z]:[\\/]", url):
        return "", url.replace("\\", "/")
    scp = _SCP_LIKE.match(url)
    if scp is None:
        raise ConfigError(
            f"remote URL {url!r} is not a URL git understands; fix it with `git remote set-url`"
        )
    return scp["host"].lower(), scp["path"]


def _fold_alias(host: str) -> str:
    """``github.com-work`` → ``github.com``: ~/.ssh/config aliases for several accounts on one host.
    No real top-level domain has a '-' (punycode ``xn--`` ones aside), so the suffix is an alias."""
    head, dot, last = host.rpartition(".")
    if dot and "-" in last and not last.startswith("xn--"):
        return f"{head}.{last.split('-', 1)[0]}"
    return host


def _remote_url(repo: Any, path: Path) -> str:
    remotes = {remote.name: remote for remote in repo.remotes}
    if not remotes:
        raise ConfigError(f"{path} has no remote; add one with `git remote add origin URL`")
    if "origin" in remotes:
        remote = remotes["origin"]
    elif len(remotes) == 1:
        (remote,) = remotes.values()
    else:
        names = ", ".join(sorted(remotes))
        raise ConfigError(
            f"{path} has several remotes ({names}) and none is origin; "
            "rename the main one with `git remote rename NAME origin`"
        )
    return str(remote.url or "")


def _make_private(directory: Path) -> None:
    # It also holds worker status and journals: tighten a directory made earlier or by hand, but leave
    # one owned by someone else (an admin's /etc/ias) alone.
    info = directory.stat()
    if info.st_mode & 0o077 and info.st_uid == os.getuid():
        os.chmod(directory, 0o700)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading and writing the file -----------------------------------------------------------------


def _read_file(path: Path) -> LocalConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return LocalConfig()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cannot read {path}: {reason}; fix its permissions or remove it") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); "
            "fix it, or remove it and run `ias setup`"
        ) from None
    return _from_json(data, path)


def _from_json(data: Any, path: Path) -> LocalConfig:
    def bad(name: str, problem: str) -> ConfigError:
        return ConfigError(
            f"{path}: field {name!r} {problem}; fix it, or remove the file and run `ias setup`"
        )

    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object; remove it and run `ias setup`")
    version = data.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise bad("version", f"is {version!r}, this ias reads version {FORMAT_VERSION}")
    known = {f.name for f in fields(LocalConfig)} | {"version"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise bad(unknown[0], "is not a setting (see docs/configuration.md)")
    values: dict[str, Any] = {}
    for name in ("control_plane", "token", "worker_name", "tls_ca", "slots"):
        if name in data:
            values[name] = _checked(name, data[name], bad)
    if "repos" in data:
        values["repos"] = _repos_from_json(data["repos"], bad)
    return LocalConfig(**values)


def _checked(name: str, value: Any, bad: Callable[[str, str], ConfigError]) -> Any:
    """A JSON value of the right type, then validated like a setting given as text."""
    if name == "tls_ca" and value is None:
        return None
    wanted: type = int if name == "slots" else str
    # bool is an int in Python, but `"slots": true` is a mistake, not 1.
    if not isinstance(value, wanted) or isinstance(value, bool):
        raise bad(name, f"must be {'an integer' if wanted is int else 'a string'}, not {json.dumps(value)}")
    try:
        return _PARSERS[name](str(value))
    except ValueError as exc:
        raise bad(name, str(exc)) from None


def _repos_from_json(value: Any, bad: Callable[[str, str], ConfigError]) -> tuple[RepoMapping, ...]:
    if not isinstance(value, list):
        raise bad("repos", "must be a list of {repo_id, path, label} objects")
    repos = []
    for i, item in enumerate(value):
        where = f"repos[{i}]"
        if not isinstance(item, dict) or set(item) != {"repo_id", "path", "label"}:
            raise bad(where, "must be an object with exactly repo_id, path and label")
        for key in ("repo_id", "path", "label"):
            if not isinstance(item[key], str) or not item[key]:
                raise bad(f"{where}.{key}", "must be a non-empty string")
        if not re.fullmatch(r"r_[0-9a-f]{32}", item["repo_id"]):
            raise bad(f"{where}.repo_id", "must be r_ and 32 hex digits (`ias repo link PATH` computes it)")
        repos.append(RepoMapping(repo_id=item["repo_id"], path=Path(item["path"]), label=item["label"]))
    return tuple(repos)


def _to_json(config: LocalConfig) -> dict[str, Any]:
    return {
        "version": FORMAT_VERSION,
        "control_plane": config.control_plane,
        "token": config.token,
        "tls_ca": str(config.tls_ca) if config.tls_ca is not None else None,
        "worker_name": config.worker_name,
        "slots": config.slots,
        "repos": [{"repo_id": m.repo_id, "path": str(m.path), "label": m.label} for m in config.repos],
    }


# --- one parser per setting, shared by the file, the environment and the command line --------------


def _parse_address(raw: str) -> str:
    if raw.startswith(_GRPC_SCHEMES):
        return raw
    match = _ADDRESS.match(raw)
    if match is None or not 1 <= int(match[2]) <= 65535:
        raise ValueError("must be HOST:PORT (for example 127.0.0.1:50051)")
    return raw


def _parse_token(raw: str) -> str:
    if any(c.isspace() for c in raw):
        raise ValueError("must have no spaces")
    return raw


def _parse_tls_ca(raw: str) -> Path | None:
    return Path(raw).expanduser() if raw else None


def _parse_name(raw: str) -> str:
    if not 1 <= len(raw) <= MAX_NAME:
        raise ValueError(f"must be 1 to {MAX_NAME} characters")
    return raw


def _parse_slots(raw: str) -> int:
    try:
        slots = int(raw)
    except ValueError:
        slots = 0
    if not 1 <= slots <= MAX_SLOTS:
        raise ValueError(f"must be an integer from 1 to {MAX_SLOTS}")
    return slots


_PARSERS: Final[Mapping[str, Callable[[str], Any]]] = {
    "control_plane": _parse_address,
    "token": _parse_token,
    "tls_ca": _parse_tls_ca,
    "worker_name": _parse_name,
    "slots": _parse_slots,
}
