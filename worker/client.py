"""One way to reach the control plane: a channel with keepalive and a bearer token per call."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Final

import grpc

CHANNEL_OPTIONS: Final = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # What gRPC really waits for a ping's answer (its default is a minute): an idle worker sends no
    # frames, so these pings are how it finds a control plane that went away silently.
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    # Each worker gets its own connection even when several run in one process (tests, benchmarks).
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.enable_retries", 0),
]


# After the control plane announced a restart, retry this often for this many attempts (about a
# minute): a restart takes seconds, and doubling waits would keep a fleet away far longer than that.
RESTART_RETRY_S: Final = (0.25, 1.0)
RESTART_TRIES: Final = 90


def reconnect_delay(attempt: int, *, after_restart: bool) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (0 for the first retry).

    Normally the wait doubles from 0.2 s up to 30 s, plus up to 0.5 s of jitter. After a drain for
    a server restart the wait is drawn anew between 0.25 and 1 s each time (full jitter spreads a
    fleet over the window, so the new process is not met by every worker in one tick).
    """
    if after_restart and attempt < RESTART_TRIES:
        return random.uniform(*RESTART_RETRY_S)
    return float(min(0.2 * 2**attempt, 30.0) + random.uniform(0, 0.5))


def open_channel(target: str, *, tls_ca: Path | None = None) -> grpc.aio.Channel:
    """A channel to ``target`` (``HOST:PORT``); TLS when a CA bundle is given."""
    if tls_ca is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes())
        return grpc.aio.secure_channel(target, creds, options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the token."""
    return (("authorization", f"Bearer {token}"),)
