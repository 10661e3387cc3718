"""Job handlers: an explicit registry, a context per job, and the built-in ``noop`` type.

A handler is ``async def handler(ctx: JobContext) -> HandlerResult``. It raises `JobFailed` to
fail on purpose; any other exception fails the attempt as retryable with its type and message.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class JobFailed(Exception):
    """A handler gives up on a job on purpose."""

    def __init__(self, message: str, *, code: str = "failed", retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.retryable = retryable


class DuplicateHandler(ValueError):
    """Two handlers registered for one job type."""


@dataclass(frozen=True, slots=True)
class HandlerResult:
    """What a handler reports: metadata only, never file contents."""

    summary: str = ""
    blocked: bool = False
    commit_sha: str = ""
    branch: str = ""
    changed_paths: tuple[str, ...] = ()
    pr_url: str = ""
    counts: Mapping[str, int] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class JobContext:
    """Everything a handler may use: its job, a workdir, progress reporting and abort checks."""

    job_id: str
    job_type: str
    attempt: int
    lease_epoch: int
    payload: Mapping[str, Any]
    repo_id: str = ""
    repo_path: Path | None = None  # the user's checkout mapped to repo_id on this machine
    workdir: Path | None = None
    _progress: Callable[[str], None] = lambda _message: None
    _abort: asyncio.Event = field(default_factory=asyncio.Event)

    def heartbeat(self, progress: str) -> None:
        """Report progress; never blocks, and only the latest message is sent."""
        self._progress(progress)

    def should_abort(self) -> bool:
        """True once the job was cancelled or its lease lost: stop at the next safe point."""
        return self._abort.is_set()

    async def sleep(self, seconds: float) -> bool:
        """Sleep unless aborted; returns False if the sleep was cut short by an abort."""
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            async with asyncio.timeout(seconds):
                await self._abort.wait()
            return False
        except TimeoutError:
            return True


def missing_checkout(ctx: JobContext) -> JobFailed | None:
    """The failure of a job whose mapped checkout no longer exists (deleted or moved), else None.

    Whatever error the vanished files caused along the way, this is what the job reports.
    """
    path = ctx.repo_path
    if path is None or path.exists():
        return None
    of_repo = f" of repository {ctx.repo_id}" if ctx.repo_id else ""
    hint = (
        f"; `ias repo link NEWPATH` if it moved, else `ias repo unlink {ctx.repo_id}`" if ctx.repo_id else ""
    )
    return JobFailed(f"the checkout {path}{of_repo} no longer exists{hint}", code="repo_missing")


Handler = Callable[[JobContext], Awaitable[HandlerResult]]


class HandlerRegistry:
    """Job type → handler. Registering a type twice fails at import time."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, job_type: str) -> Callable[[Handler], Handler]:
        def decorate(handler: Handler) -> Handler:
            self.add(job_type, handler)
            return handler

        return decorate

    def add(self, job_type: str, handler: Handler) -> None:
        if job_type in self._handlers:
            raise DuplicateHandler(f"a handler for {job_type!r} is already registered")
        self._handlers[job_type] = handler

    def get(self, job_type: str) -> Handler | None:
        return self._handlers.get(job_type)

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


async def noop(ctx: JobContext) -> HandlerResult:
    """Sleep ``seconds`` (default 0), for health checks and benchmarks.

    ``{"fail": "message", "retryable": true}`` fails on purpose, to exercise retries.
    """
    seconds = ctx.payload.get("seconds", 0)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
        raise JobFailed("payload.seconds must be a number", code="invalid_payload")
    if not 0 <= seconds <= 86_400:
        raise JobFailed("payload.seconds must be between 0 and 86400", code="invalid_payload")
    remaining = float(seconds)
    while remaining > 0:
        step = min(remaining, 1.0)
        if not await ctx.sleep(step):
            return HandlerResult(summary="aborted")
        remaining -= step
        if remaining > 0:
            ctx.heartbeat(f"{seconds - remaining:.0f}/{seconds:g} s")
    if "fail" in ctx.payload:
        raise JobFailed(
            str(ctx.payload["fail"]), code="noop_failed", retryable=bool(ctx.payload.get("retryable"))
        )
    return HandlerResult(summary=f"slept {seconds:g} s", counts={"seconds_ms": int(seconds * 1000)})


def default_registry() -> HandlerRegistry:
    """The handlers every worker has."""
    registry = HandlerRegistry()
    registry.add("noop", noop)
    return registry
