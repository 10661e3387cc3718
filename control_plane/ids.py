"""Identifiers: a prefix, the time in milliseconds and a per-process counter, so ids sort by age."""

from __future__ import annotations

import itertools
import secrets
import time

_counter = itertools.count()


def new_id(prefix: str) -> str:
    """A new identifier such as ``job_0193a1b2c3d4e5f6000a7b3c``."""
    millis = time.time_ns() // 1_000_000
    return f"{prefix}_{millis:012x}{next(_counter) % 0x10000:04x}{secrets.token_hex(4)}"
