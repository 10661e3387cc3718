"""Waiting for commits to reach the disk, one flush for every caller that came meanwhile.

A submission on PostgreSQL commits without waiting for its flush (``synchronous_commit`` off, for
that statement alone): the moment its statement returns the job is visible and, when an idle
session takes it at once, on its way to that worker. Only then does the submission wait until its
commit is on disk, and only then is the submitter told, and the Console. The flush costs no fsync
of its own as a rule: a write that does wait for its flush (`store.pg_direct.flush`), begun after
the commits it covers, is on disk only once they are, since its commit record comes after theirs
in the write-ahead log; one such write in flight covers every commit that returned before it
began, so under load many submissions share one.

Nothing the control plane has acknowledged can be lost. Should the database crash in the fraction
of a millisecond between a commit and its flush, a job may have reached a worker that the database
then forgets: its submitter gets an error and no job id, and the worker's outcome is refused (the
job is unknown). The outcome's own commit waits for its flush, which covers the submission's, so a
recorded outcome always has its job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from control_plane.errors import Unavailable

log = logging.getLogger(__name__)


class Flushes:
    """Runs ``flush`` (one at a time); `wait` returns once one has begun and ended after the call."""

    def __init__(self, flush: Callable[[], Awaitable[None]]) -> None:
        self._flush = flush
        self._current: asyncio.Future[None] | None = None  # the flush under way
        self._next: asyncio.Future[None] | None = None  # the next, for callers that came meanwhile
        self._runner: asyncio.Task[None] | None = None
        self.flushes = 0  # flushes run, for tests and diagnostics

    async def wait(self) -> None:
        """Once every commit that returned before this call is on disk; `Unavailable` if that
        could not be made sure of."""
        loop = asyncio.get_running_loop()
        if self._current is None:
            future = self._current = loop.create_future()
            self._runner = loop.create_task(self._run(), name="flushes")
        else:
            if self._next is None:
                self._next = loop.create_future()
            future = self._next
        # Shared by every caller that came meanwhile: one giving up must not cancel it for all.
        await asyncio.shield(future)

    async def _run(self) -> None:
        try:
            while (future := self._current) is not None:
                self.flushes += 1
                try:
                    await self._flush()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("could not make sure commits reached the disk: %s", exc)
                    _settle(future, Unavailable(f"the commit was not confirmed on disk: {exc}"))
                else:
                    _settle(future, None)
                self._current, self._next = self._next, None
        finally:
            for left in (self._current, self._next):
                if left is not None:
                    _settle(left, Unavailable("the control plane is stopping"))
            self._current = self._next = self._runner = None


def _settle(future: asyncio.Future[None], error: Exception | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
        future.add_done_callback(lambda f: f.exception())  # retrieved, if every waiter gave up
