"""The replica's periodic work: sweep stale leases, persist held leases in batches, flush
progress, prove the replica alive, and close sessions that stopped heartbeating."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

from ias.v1 import worker_service_pb2 as wpb
from sqlalchemy.exc import SQLAlchemyError

from control_plane.config import ServerSettings
from control_plane.dispatch.dispatcher import Dispatcher
from control_plane.dispatch.sessions import Session, SessionRegistry
from control_plane.errors import IasError
from control_plane.queue import JobQueue

log = logging.getLogger(__name__)

PROGRESS_FLUSH = timedelta(seconds=1)
REPLICA_TOUCH = timedelta(seconds=2)


class Maintenance:
    """Background loops of one replica; each survives database outages and retries."""

    def __init__(
        self, *, queue: JobQueue, sessions: SessionRegistry, dispatcher: Dispatcher, settings: ServerSettings
    ) -> None:
        self._queue = queue
        self._sessions = sessions
        self._dispatcher = dispatcher
        self._settings = settings
        self._sweep_now = asyncio.Event()

    def sweep_soon(self, delay: timedelta = timedelta(0)) -> None:
        """Run a sweep after ``delay`` (used when a session breaks: its grace ends then)."""
        asyncio.get_running_loop().call_later(delay.total_seconds(), self._sweep_now.set)

    async def sweep_loop(self) -> None:
        interval = self._settings.sweep_interval.total_seconds()
        grace = self._settings.reconnect_grace.total_seconds()
        last_touch = 0.0
        reached_since: float | None = None  # the database answered every step since then
        while True:
            try:
                async with asyncio.timeout(interval):  # not wait_for: see Dispatcher.run
                    await self._sweep_now.wait()
            except TimeoutError:
                pass
            self._sweep_now.clear()

            async def step() -> None:
                nonlocal last_touch, reached_since
                try:
                    # Prove liveness several times per grace, so no other replica thinks this one died.
                    touch_every = min(REPLICA_TOUCH, self._settings.reconnect_grace / 4).total_seconds()
                    if time.monotonic() - last_touch >= touch_every:
                        await self._queue.touch_replica(live=self._live_sessions())
                        last_touch = time.monotonic()
                    if reached_since is None:
                        reached_since = time.monotonic()
                    judge = time.monotonic() - reached_since >= grace
                    if await self._queue.sweep(judge_replicas=judge):
                        self._dispatcher.wake()
                    await self._queue.refresh_statistics()
                except BaseException:
                    reached_since = None
                    raise

            await _guarded("sweep", step)

    def _live_sessions(self) -> dict[str, tuple[str, bool]]:
        return {s.worker_id: (s.id, s.draining) for s in self._sessions if not s.closed}

    async def renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.renew_interval.total_seconds())
            await _guarded("lease renewal", self.renew_once)

    async def renew_once(self) -> None:
        """Persist fresh leases for every live session; revoke what the database says was lost."""
        live = [s for s in self._sessions if not s.closed]
        asked = {(job_id, s.id): epoch for s in live for job_id, epoch in s.held.items()}
        if not asked:
            return
        renewed, expires = await self._queue.renew(held=list(asked))
        still = {(job_id, session_id, epoch) for job_id, session_id, epoch in renewed}
        for session in live:
            for job_id, epoch in list(session.held.items()):
                if (job_id, session.id, epoch) in still:
                    session.lease_expires[job_id] = expires
                elif asked.get((job_id, session.id)) == epoch:
                    revoke(session, job_id, epoch, "lease_lost")
                # Otherwise it was assigned while the renewal ran: its lease is newer than this one.

    async def progress_loop(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_FLUSH.total_seconds())
            await _guarded("progress flush", self.flush_progress)

    async def flush_progress(self) -> None:
        updates = []
        for session in self._sessions:
            for job_id, (epoch, message) in session.progress.items():
                updates.append((session.workspace_id, job_id, epoch, message))
            session.progress.clear()
        if updates:
            await self._queue.record_progress(updates=updates)

    async def liveness_loop(self) -> None:
        """Close sessions that hold leases and were silent for three heartbeat intervals (a
        black-holed connection). Idle sessions send no heartbeats: the transport's keepalive pings
        (every heartbeat interval, see `app._server_options`) end those whose peer is gone."""
        interval = self._settings.heartbeat_interval.total_seconds()
        while True:
            await asyncio.sleep(interval)
            deadline = time.monotonic() - 3 * interval
            for session in self._sessions:
                if session.held and session.last_heard < deadline and not session.closed:
                    log.warning("worker %s stopped heartbeating; closing its session", session.worker_name)
                    session.close()


def revoke(session: Session, job_id: str, epoch: int, reason: str) -> None:
    """Tell a session it lost a lease, and forget the job."""
    session.drop(job_id)
    session.send(
        wpb.ConnectResponse(lease_revoked=wpb.LeaseRevoked(job_id=job_id, lease_epoch=epoch, reason=reason))
    )


async def _guarded(what: str, step: Callable[[], Awaitable[None]]) -> None:
    try:
        await step()
    except (IasError, SQLAlchemyError, OSError) as exc:
        log.warning("%s failed, will retry: %s", what, exc)
        await asyncio.sleep(0.5)
