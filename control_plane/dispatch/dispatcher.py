"""Push dispatch: when jobs may be available, claim them for the sessions with free slots and
send the assignments down their streams.

Sessions with the same eligibility (workspace, job types, repositories) are claimed for in one
statement, so an idle fleet of identical workers costs one query per wake, not one per worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from datetime import datetime

from ias.v1 import worker_service_pb2 as wpb

from control_plane.api import convert
from control_plane.dispatch.sessions import Eligibility, Session, SessionRegistry
from control_plane.domain.jobs import Job
from control_plane.errors import IasError
from control_plane.queue import Assignee, JobQueue

log = logging.getLogger(__name__)

# A safety net under the wake-ups (PostgreSQL NOTIFY can be lost while a listener reconnects).
POLL_INTERVAL_S = 2.0


class Dispatcher:
    """Claims jobs for free slots whenever woken, and every few seconds regardless.

    A group whose last claim found fewer jobs than it asked for is known to be empty, and is
    skipped until something may have added a job to its workspace (a submit, requeue or release
    here, a NOTIFY from another replica, the poll). A freed slot alone does not make a job appear,
    so an outcome wakes the dispatcher only for groups not known to be empty.
    """

    def __init__(self, *, queue: JobQueue, sessions: SessionRegistry) -> None:
        self._queue = queue
        self._sessions = sessions
        self._wake = asyncio.Event()
        self.status = "idle"
        # Wake generations: a group is empty while no wake of its workspace came after the start
        # of the claim that found it empty (a wake always follows the commit that added the job).
        self._generation = 0
        self._woken_all = 0
        self._woken: dict[str, int] = {}
        self._empty_since: dict[Eligibility, int] = {}

    def wake(self, workspace_id: str = "") -> None:
        """Jobs may be available in ``workspace_id`` (in any workspace if empty)."""
        self._generation += 1
        if workspace_id:
            self._woken[workspace_id] = self._generation
        else:
            self._woken_all = self._generation
            self._empty_since.clear()  # all stale now; this also forgets groups that went away
        self._wake.set()

    def slot_freed(self, eligibility: Eligibility) -> None:
        """A session of ``eligibility`` has a free slot again: claim only if jobs may be waiting."""
        if not self._known_empty(eligibility):
            self._wake.set()

    def _known_empty(self, eligibility: Eligibility) -> bool:
        since = self._empty_since.get(eligibility)
        if since is None:
            return False
        return since >= max(self._woken_all, self._woken.get(eligibility.workspace_id, 0))

    async def run(self) -> None:
        last_poll = time.monotonic()
        while True:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
                # races with the event, and this loop would then never stop.
                async with asyncio.timeout(POLL_INTERVAL_S):
                    await self._wake.wait()
            except TimeoutError:
                pass
            if time.monotonic() - last_poll >= POLL_INTERVAL_S:
                # The safety net looks at every group, even those known to be empty, also while
                # other groups keep the dispatcher busy.
                last_poll = time.monotonic()
                self.wake()
            self._wake.clear()
            try:
                if await self.dispatch_round():
                    self._wake.set()  # every slot was filled: there may be more
            except IasError as exc:
                log.warning("dispatch round failed: %s", exc.message)
                await asyncio.sleep(0.2)

    async def dispatch_round(self) -> bool:
        """Claim for every group of free sessions; True if some group got all it asked for."""
        groups: dict[Eligibility, list[Session]] = defaultdict(list)
        for session in self._sessions:
            if session.free > 0 and not self._known_empty(session.eligibility):
                groups[session.eligibility].append(session)
        saturated = False
        for eligibility, members in groups.items():
            self.status = f"claiming for {len(members)} session(s)"
            assignees = _spread(members)
            started = self._generation
            claimed = await self._queue.claim(
                workspace_id=eligibility.workspace_id,
                types=sorted(eligibility.types),
                repo_ids=sorted(eligibility.repo_ids),
                assignees=[Assignee(worker_id=s.worker_id, session_id=s.id) for s in assignees],
            )
            by_id = {s.id: s for s in members}
            for job, who in claimed:
                session = by_id[who.session_id]
                assert job.lease_expires_at is not None
                _push(session, job, job.lease_expires_at)
            if len(claimed) == len(assignees):
                saturated = True
                self._empty_since.pop(eligibility, None)
            else:
                self._empty_since[eligibility] = started
        self.status = "idle"
        return saturated


def _spread(members: list[Session]) -> list[Session]:
    """One entry per free slot, round-robin over the least busy sessions first."""
    order = sorted(members, key=lambda s: (len(s.held), s.id))
    slots = {s.id: s.free for s in order}
    spread: list[Session] = []
    while any(slots.values()):
        for session in order:
            if slots[session.id] > 0:
                spread.append(session)
                slots[session.id] -= 1
    return spread


def _push(session: Session, job: Job, expires: datetime) -> None:
    session.hold(job.id, job.lease_epoch, expires)
    frame = wpb.ConnectResponse(
        assignment=wpb.Assignment(
            job=convert.job_to_pb(job),
            lease_epoch=job.lease_epoch,
            lease_ttl=convert.duration(expires - job.updated_at),
        )
    )
    # A closed session keeps the job until the reconnect grace requeues it, like any lost stream.
    session.send(frame)
    log.debug(
        "assigned job", extra={"job_id": job.id, "attempt": job.attempt, "lease_epoch": job.lease_epoch}
    )
