"""Push dispatch: when jobs may be available, claim them for the sessions with free slots and
send the assignments down their streams.

Sessions with the same eligibility (workspace, job types, repositories) are claimed for in one
statement, so an idle fleet of identical workers costs one query per wake, not one per worker.

A job submitted while an eligible session idles and its group is known to have no pending job is
assigned in the submit's own transaction (`Dispatcher.reserve`): it cannot pass a job that waited
longer, and it reaches the worker one transaction and one wake-up sooner.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import logging
import time
from collections import defaultdict
from datetime import datetime

from ias.v1 import worker_service_pb2 as wpb

from control_plane.api import convert
from control_plane.dispatch.sessions import Eligibility, Session, SessionRegistry
from control_plane.domain.jobs import Job
from control_plane.errors import IasError
from control_plane.queue import JobQueue, Refill
from control_plane.transactions import Assignee

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
        # Sessions with free slots in groups known to be empty, per workspace, least recently
        # given a job first (a dict as an ordered set); entries are checked again when used.
        self._ready: dict[str, dict[Eligibility, dict[Session, None]]] = defaultdict(dict)
        self._reserved: dict[str, Session] = {}  # job id → session, until the commit ends

    def wake(self, workspace_id: str = "") -> None:
        """Jobs may be available in ``workspace_id`` (in any workspace if empty)."""
        self._generation += 1
        if workspace_id:
            self._woken[workspace_id] = self._generation
        else:
            self._woken_all = self._generation
            self._empty_since.clear()  # all stale now; this also forgets groups that went away
        self._wake.set()

    def slot_freed(self, session: Session) -> None:
        """``session`` has a free slot again: claim only if jobs may be waiting."""
        if self._known_empty(session.eligibility):
            self._make_ready(session)
        else:
            self._wake.set()

    @property
    def generation(self) -> int:
        """Take it before a claim starts; pass it to `refilled`."""
        return self._generation

    def refill_for(self, session: Session, job_id: str, epoch: int) -> Refill | None:
        """What to claim for ``session`` along with its outcome for (``job_id``, ``epoch``): the
        slot it frees, unless the session holds no such lease, takes no more jobs, or its group is
        known to be empty."""
        if session.held.get(job_id) != epoch or session.draining or session.closed:
            return None
        if self._known_empty(session.eligibility):
            return None
        return Refill(
            types=tuple(sorted(session.eligibility.types)),
            repo_ids=tuple(sorted(session.eligibility.repo_ids)),
            assignee=Assignee(worker_id=session.worker_id, session_id=session.id),
        )

    def refilled(
        self,
        session: Session,
        job: Job | None,
        started: int,
        *,
        committed_at: float,
        ack: wpb.OutcomeAck | None = None,
    ) -> None:
        """The outcome's transaction, committed at ``committed_at``, claimed ``job`` for
        ``session`` (None: nothing was pending); ``ack``, that outcome's acknowledgement, goes in
        the assignment's frame."""
        if job is not None:
            assert job.lease_expires_at is not None
            _push(session, job, job.lease_expires_at, committed_at, ack)
            return
        assert ack is None, "an ack rides only on an assignment"
        eligibility = session.eligibility
        self._empty_since[eligibility] = max(self._empty_since.get(eligibility, started), started)
        self.slot_freed(session)

    def reserve(self, job: Job) -> Assignee | None:
        """A slot for ``job``, which is being submitted, if a session may take it at once.

        The slot stays promised until `deliver` (after the commit) or `unreserve` (the commit
        failed). Only groups known to be empty qualify, so the new job cannot pass a pending one.
        """
        for eligibility, ready in self._ready.get(job.workspace_id, {}).items():
            if not _accepts(eligibility, job) or not self._known_empty(eligibility):
                continue
            for _ in range(len(ready)):
                session = next(iter(ready))
                del ready[session]
                if session.free <= 0 or self._sessions.get(session.id) is not session:
                    continue  # busy or gone since it was listed
                session.reserved += 1
                if session.free > 0:
                    ready[session] = None  # to the back: the next job goes to another session
                self._reserved[job.id] = session
                return Assignee(worker_id=session.worker_id, session_id=session.id)
        return None

    def deliver(self, job: Job, committed_at: float) -> None:
        """The direct assignment of ``job`` was committed: send it to the session it was promised."""
        session = self._reserved.pop(job.id)
        session.reserved -= 1
        assert job.lease_expires_at is not None
        _push(session, job, job.lease_expires_at, committed_at)

    def unreserve(self, job: Job) -> None:
        """The submit of ``job`` failed: its promised slot is free again."""
        session = self._reserved.pop(job.id, None)
        if session is not None:
            session.reserved -= 1
            self.slot_freed(session)

    def _make_ready(self, session: Session) -> None:
        groups = self._ready[session.workspace_id]
        groups.setdefault(session.eligibility, {})[session] = None

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
        """Claim for every group of free sessions; True if some group got all it asked for.

        Groups known to be empty cost nothing, and a claim that finds nothing costs no work per
        session beyond counting free slots: an idle fleet of thousands is polled cheaply.
        """
        saturated = False
        for eligibility, members in self._sessions.groups():
            if self._known_empty(eligibility):
                continue
            free = [s for s in members if s.free > 0]
            slots = sum(s.free for s in free)
            if not slots:
                continue
            self.status = f"claiming for {len(free)} session(s)"
            started = self._generation
            claimed = await self._queue.claim(
                workspace_id=eligibility.workspace_id,
                types=sorted(eligibility.types),
                repo_ids=sorted(eligibility.repo_ids),
                slots=slots,
                pick=functools.partial(_assignees, free),
            )
            by_id = {s.id: s for s in free}
            for job, who in claimed:
                assert job.lease_expires_at is not None
                _push(by_id[who.session_id], job, job.lease_expires_at, claimed.committed_at)
            ready = self._ready[eligibility.workspace_id]
            if len(claimed) == slots:
                saturated = True
                self._empty_since.pop(eligibility, None)
                ready.pop(eligibility, None)
            else:
                self._empty_since[eligibility] = started
                ready[eligibility] = {s: None for s in free if s.free > 0}
        self.status = "idle"
        return saturated


def _accepts(eligibility: Eligibility, job: Job) -> bool:
    """Whether sessions of ``eligibility`` may run ``job`` (the claim's filter, in memory)."""
    return job.type in eligibility.types and (not job.repo_id or job.repo_id in eligibility.repo_ids)


def _assignees(free: list[Session], n: int) -> list[Assignee]:
    return [Assignee(worker_id=s.worker_id, session_id=s.id) for s in _spread(free, n)]


def _spread(free: list[Session], n: int) -> list[Session]:
    """``n`` slots of the ``free`` sessions, round-robin over the least busy first."""
    order = heapq.nsmallest(n, free, key=lambda s: (len(s.held), s.id))
    left = {s.id: s.free for s in order}
    spread: list[Session] = []
    for _ in range(n):  # each pass gives every session with a slot left one more job
        for session in order:
            if len(spread) < n and left[session.id] > 0:
                spread.append(session)
                left[session.id] -= 1
        if len(spread) >= n:
            break
    return spread


def _push(
    session: Session, job: Job, expires: datetime, committed_at: float, ack: wpb.OutcomeAck | None = None
) -> None:
    session.hold(job.id, job.lease_epoch, expires)
    frame = wpb.ConnectResponse(
        assignment=wpb.Assignment(
            job=convert.job_to_pb(job),
            lease_epoch=job.lease_epoch,
            lease_ttl=convert.duration(expires - job.updated_at),
            outcome_ack=ack,
            committed_at=convert.unix_timestamp(committed_at),
        )
    )
    # A closed session keeps the job until the reconnect grace requeues it, like any lost stream.
    session.send(frame)
    log.debug(
        "assigned job", extra={"job_id": job.id, "attempt": job.attempt, "lease_epoch": job.lease_epoch}
    )
