"""One way to reach the control plane: a channel with keepalive and a bearer token per call."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import grpc

CHANNEL_OPTIONS: Final = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    # Each worker gets its own connection even when several run in one process (tests, benchmarks).
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.enable_retries", 0),
]


def open_channel(target: str, *, tls_ca: Path | None = None) -> grpc.aio.Channel:
    """A channel to ``target`` (``HOST:PORT``); TLS when a CA bundle is given."""
    if tls_ca is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes())
        return grpc.aio.secure_channel(target, creds, options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the token."""
    return (("authorization", f"Bearer {token}"),)
