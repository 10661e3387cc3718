"""Settings of one control-plane process, built once in ``main()`` and passed down."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from control_plane.errors import InvalidArgument
from control_plane.ids import new_id
from control_plane.store.db import sqlite_url

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_WORKSPACE = "default"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Everything ``ias server start`` can be told; each field has a flag and an ``IAS_*`` twin."""

    data_dir: Path
    listen: str = DEFAULT_LISTEN
    db_url: str = ""
    lease_ttl: timedelta = timedelta(minutes=15)
    reconnect_grace: timedelta = timedelta(seconds=15)
    sweep_interval: timedelta = timedelta(seconds=1)
    max_message_bytes: int = 4 * 1024 * 1024
    default_workspace: str = DEFAULT_WORKSPACE
    tls_cert: Path | None = None
    tls_key: Path | None = None
    allow_insecure: bool = False
    # PostgreSQL: a job an idle session takes at once goes out when its submission has committed,
    # before the commit is on disk; the submitter hears once it is (see store.pg_direct.flush).
    early_dispatch: bool = True
    replica_id: str = field(default_factory=lambda: new_id("rep"))

    @property
    def database_url(self) -> str:
        return self.db_url or sqlite_url(self.data_dir)

    @property
    def heartbeat_interval(self) -> timedelta:
        """A third of the shorter of lease TTL and reconnect grace, so two beats can be lost."""
        return min(self.lease_ttl, self.reconnect_grace) / 3

    @property
    def renew_interval(self) -> timedelta:
        """How often held leases are persisted: well inside the TTL, one batch write per replica."""
        return min(self.lease_ttl / 4, timedelta(minutes=1))

    def validate(self) -> None:
        """Refuse settings that are unsafe or cannot work."""
        if not timedelta(seconds=1) <= self.lease_ttl <= timedelta(hours=24):
            raise InvalidArgument("lease-ttl-s", "must be between 1 and 86400 seconds")
        if not timedelta(milliseconds=200) <= self.reconnect_grace <= timedelta(hours=1):
            raise InvalidArgument("reconnect-grace-s", "must be between 0.2 and 3600 seconds")
        host = split_host_port(self.listen)[0]
        tls = self.tls_cert is not None and self.tls_key is not None
        if not tls and not self.allow_insecure and not is_loopback(host):
            raise InvalidArgument(
                "listen",
                f"{host} is not a loopback address; give --tls-cert/--tls-key, or --insecure to "
                "serve plaintext on purpose",
            )


def split_host_port(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgument("listen", f"{listen!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
