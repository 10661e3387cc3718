"""The job queue's operations: each one a transaction that applies a domain decision, appends
its events to the log, and hands them to live subscribers after commit."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Protocol

import asyncpg
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from control_plane.config import ServerSettings
from control_plane.dispatch.peers import REPLICAS_CHANNEL, Peers
from control_plane.domain import jobs as jobs_domain
from control_plane.domain.jobs import Job, JobResult, JobStatus
from control_plane.domain.workers import Event, EventKind, Worker, WorkerStatus
from control_plane.errors import IasError, InvalidArgument, NotFound, StaleLease
from control_plane.events.hub import EventHub
from control_plane.group_commit import GroupCommit
from control_plane.ids import new_id
from control_plane.store import events as events_store
from control_plane.store import jobs as jobs_store
from control_plane.store import pg_direct, sqlite_direct
from control_plane.store import workers as workers_store
from control_plane.store.db import Database, driver, driver_sqlite
from control_plane.store.events import Draft
from control_plane.store.pg_direct import Claim
from control_plane.store.statistics import Statistics

log = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 256 * 1024
SESSIONS_CHANNEL = "ias_sessions"
CANCEL_CHANNEL = "ias_cancel"
_SWEEP_BATCH = 500
CLAIM_READS = 3  # reads of one claim at most, when other claims took the jobs it found


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Assignee:
    """A worker session with a free slot, as the dispatcher offers it."""

    worker_id: str
    session_id: str


class DirectDispatch(Protocol):
    """Assigns a job in its submit's transaction when a session can take it at once."""

    def reserve(self, job: Job) -> Assignee | None: ...

    def deliver(self, job: Job) -> None: ...

    def unreserve(self, job: Job) -> None: ...


@dataclass(frozen=True, slots=True)
class HeldLease:
    """A (job, epoch) a worker says it holds."""

    job_id: str
    lease_epoch: int


@dataclass(frozen=True, slots=True)
class NewJob:
    """A validated submission."""

    type: str
    repo_id: str = ""
    payload_json: str = "{}"
    priority: int = 0
    max_attempts: int = 0
    idempotency_key: str = ""
    run_id: str = ""


@dataclass(frozen=True, slots=True)
class Refill:
    """Claim the next job for the session reporting an outcome, in the outcome's transaction: the
    freed slot is filled without a dispatch round or a transaction of its own."""

    types: tuple[str, ...]
    repo_ids: tuple[str, ...]
    assignee: Assignee


@dataclass(frozen=True, slots=True)
class _Outcome:
    """A worker's outcome waiting for its group commit."""

    workspace_id: str
    worker_id: str
    job_id: str
    epoch: int
    status: JobStatus
    result: JobResult
    refill: Refill | None = None


_Kind = tuple[str, tuple[str, ...], tuple[str, ...]]  # workspace, job types, repo ids


def _kind(outcome: _Outcome) -> _Kind:
    assert outcome.refill is not None
    return (outcome.workspace_id, outcome.refill.types, outcome.refill.repo_ids)


@dataclass(frozen=True, slots=True)
class _StatusChange:
    """A session going offline or draining, waiting for its group commit."""

    worker_id: str
    session_id: str
    status: WorkerStatus
    reason: str


@dataclass(frozen=True, slots=True)
class _Connect:
    """A worker's hello, waiting for its group commit."""

    start: workers_store.SessionStart
    held: tuple[HeldLease, ...]


@dataclass(slots=True)
class _Tx:
    """A write transaction in the making. Inserts, saves of rows it holds, events and hints are
    queued and written last, together, by store.pg_direct (one statement) or store.sqlite_direct,
    whichever connection the transaction runs on."""

    sql: AsyncConnection | None
    now: datetime
    direct: asyncpg.Connection | None = None
    lite: sqlite3.Connection | None = None
    drafts: dict[str, list[Draft]] = field(default_factory=lambda: defaultdict(list))
    available: set[str] = field(default_factory=set)
    inserts: list[Job] = field(default_factory=list)
    # (job, stored status, stored epoch) of rows this transaction has locked (FOR UPDATE, or
    # SQLite's write lock) and just read: the fence in the statement cannot fail for them.
    saves: list[tuple[Job, JobStatus, int]] = field(default_factory=list)
    # Run the moment the commit is known, before anything else the transaction's end does.
    on_commit: list[Callable[[], None]] = field(default_factory=list)
    quiet: bool = False  # written without notifications (see dispatch.peers)
    claiming: list[str] = field(default_factory=list)  # pending jobs it read to claim (_take_pending)

    @property
    def conn(self) -> AsyncConnection:
        assert self.sql is not None, "a direct transaction has no SQLAlchemy connection"
        return self.sql

    def add(self, workspace_id: str, draft: Draft) -> None:
        self.drafts[workspace_id].append(draft)


class JobQueue:
    """Every state change of jobs and workers goes through here."""

    def __init__(
        self,
        *,
        db: Database,
        hub: EventHub,
        settings: ServerSettings,
        on_available: Callable[[str], None] = lambda _ws: None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._db = db
        self._hub = hub
        self._settings = settings
        self._on_available = on_available
        self._clock = clock
        self._started = clock()
        self.direct: DirectDispatch | None = None
        # PostgreSQL: whether commits must notify other replicas (None: always).
        self.peers: Peers | None = None
        self._statistics = Statistics()
        # Pending jobs that a transaction of this replica read to claim and has not ended yet.
        self._claiming: set[str] = set()
        self._submits: GroupCommit[Job, Job] = GroupCommit(self._insert_jobs)
        self._outcomes: GroupCommit[_Outcome, tuple[Job, bool, Job | None]] = GroupCommit(
            self._record_outcomes
        )
        # A fleet reconnecting after a restart, or a replica stopping, changes many workers at once.
        self._connects: GroupCommit[_Connect, tuple[Worker, list[Job]]] = GroupCommit(self._connect_workers)
        self._statuses: GroupCommit[_StatusChange, None] = GroupCommit(self._set_statuses, max_batch=256)

    @property
    def db(self) -> Database:
        return self._db

    @asynccontextmanager
    async def _write(self, *, direct: bool = False) -> AsyncIterator[_Tx]:
        """A write transaction. ``direct``: past SQLAlchemy, on a driver connection (an asyncpg
        connection with no transaction open, whose one write statement is fenced; or the SQLite
        write connection under the write lock); the body reads through ``tx.direct`` or
        ``tx.lite``, if at all."""
        if direct and self._db.is_sqlite:
            began: _Tx | None = None
            try:
                async with self._db.direct_sqlite() as lite:
                    tx = began = _Tx(sql=None, lite=lite, now=self._clock())
                    yield tx
                    published = await self._flush_sqlite(tx, lite)
            finally:
                if began is not None:
                    self._ended(began)
            _run_all(tx.on_commit)
        elif direct:
            async with self._db.direct() as raw:
                tx = _Tx(sql=None, direct=raw, now=self._clock())
                try:
                    yield tx
                    published = await self._flush_postgres(tx, raw)
                finally:
                    self._ended(tx)
                # The statement was its own transaction: committed. Before the connection goes
                # back to its pool (a few turns of the event loop).
                _run_all(tx.on_commit)
        else:
            began = None
            try:
                async with self._db.write() as conn:
                    tx = began = _Tx(sql=conn, now=self._clock())
                    yield tx
                    published = await (
                        self._flush_sqlite(tx) if self._db.is_sqlite else self._flush_postgres(tx)
                    )
            finally:
                if began is not None:
                    self._ended(began)  # after the commit, or the rollback
            _run_all(tx.on_commit)
        self._hub.publish(published)
        for workspace_id in tx.available:
            self._on_available(workspace_id)

    async def _flush_sqlite(self, tx: _Tx, lite: sqlite3.Connection | None = None) -> list[Event]:
        last = sqlite_direct.write(
            lite or await driver_sqlite(tx.conn),
            inserts=tx.inserts,
            saves=tx.saves,
            drafts=tx.drafts,
            now=tx.now,
        )
        return _numbered(tx, last)

    async def _flush_postgres(self, tx: _Tx, raw: asyncpg.Connection | None = None) -> list[Event]:
        if not (tx.inserts or tx.saves or tx.drafts or tx.available):
            return []
        tx.quiet = self.peers is not None and self.peers.quiet_write()
        self._statistics.added(len(tx.inserts))
        last = await pg_direct.write(
            raw or await driver(tx.conn),
            inserts=tx.inserts,
            saves=tx.saves,
            drafts=tx.drafts,
            available=sorted(tx.available),
            replica_id=self._settings.replica_id,
            now=tx.now,
            notify=not tx.quiet,
        )
        return _numbered(tx, last)

    def _ended(self, tx: _Tx) -> None:
        """A transaction ended, committed or not."""
        self._claiming.difference_update(tx.claiming)
        if tx.quiet and self.peers is not None:
            self.peers.quiet_done({*tx.drafts, *tx.available})

    def _assign(self, tx: _Tx, job: Job, who: Assignee) -> Job:
        """``job`` leased to ``who`` as of this transaction, with its event (the caller saves it)."""
        running = jobs_domain.assign(
            job, worker_id=who.worker_id, session_id=who.session_id, now=tx.now, ttl=self._settings.lease_ttl
        )
        tx.add(job.workspace_id, Draft(EventKind.JOB_ASSIGNED, job=running))
        return running

    async def _notify(self, tx: _Tx, channel: str, payload: str) -> None:
        await self._notify_all(tx, channel, [payload])

    async def _notify_all(self, tx: _Tx, channel: str, payloads: Sequence[str]) -> None:
        if payloads and not self._db.is_sqlite:
            await tx.conn.execute(
                text("SELECT count(pg_notify(:c, p)) FROM unnest(CAST(:ps AS text[])) AS p"),
                {"c": channel, "ps": list(payloads)},
            )

    # -- submissions and reads -------------------------------------------------------------

    async def submit(self, *, workspace_id: str, new: NewJob) -> tuple[Job, bool]:
        """Store a new job (or return the one with the same idempotency key)."""
        _validate(new)
        now = self._clock()
        job = Job(
            id=new_id("job"),
            workspace_id=workspace_id,
            type=new.type,
            status=JobStatus.PENDING,
            created_at=now,
            updated_at=now,
            repo_id=new.repo_id,
            payload_json=new.payload_json or "{}",
            priority=new.priority or jobs_domain.DEFAULT_PRIORITY,
            max_attempts=new.max_attempts or jobs_domain.DEFAULT_MAX_ATTEMPTS,
            run_id=new.run_id,
            idempotency_key=new.idempotency_key,
        )
        if not new.idempotency_key:
            return await self._submits(job), False
        try:
            async with self._write() as tx:
                existing = await jobs_store.by_idempotency_key(
                    tx.conn, workspace_id=workspace_id, key=new.idempotency_key
                )
                if existing is not None:
                    return existing, True
                await jobs_store.insert_job(tx.conn, job=job)
                tx.add(workspace_id, Draft(EventKind.JOB_SUBMITTED, job=job))
                tx.available.add(workspace_id)
        except IntegrityError:
            # A concurrent submission with the same key won the race; return its job.
            existing = await self._db.reading(
                partial(jobs_store.by_idempotency_key, workspace_id=workspace_id, key=new.idempotency_key)
            )
            if existing is None:
                raise
            return existing, True
        return job, False

    async def _insert_jobs(self, jobs: Sequence[Job]) -> list[Job | Exception]:
        """Store submissions without an idempotency key, many per transaction (group commit).

        A job an idle session can take at once is stored already assigned to it and sent after the
        commit (see `DirectDispatch`); the rest wait for the dispatcher.
        """
        direct = self.direct
        stored: list[Job] = []
        assigned: list[Job] = []
        try:
            async with self._write(direct=True) as tx:
                for job in jobs:
                    who = direct.reserve(job) if direct is not None else None
                    tx.add(job.workspace_id, Draft(EventKind.JOB_SUBMITTED, job=job))
                    if who is None:
                        stored.append(job)
                        tx.available.add(job.workspace_id)
                        continue
                    running = self._assign(tx, job, who)
                    stored.append(running)
                    assigned.append(running)
                tx.inserts += stored
                if direct is not None and assigned:
                    # The first moment the assignments are durable: on their way at once.
                    tx.on_commit.extend(partial(direct.deliver, job) for job in assigned)
        except BaseException:
            for job in assigned:
                assert direct is not None
                direct.unreserve(job)  # a no-op for a job already delivered
            raise
        return [*stored]

    async def get(self, *, workspace_id: str, job_id: str) -> Job:
        job = await self._db.reading(partial(jobs_store.get, workspace_id=workspace_id, job_id=job_id))
        return jobs_domain.require(job, job_id)

    async def list_jobs(
        self, *, workspace_id: str, status: JobStatus | None, job_type: str, limit: int, before_id: str
    ) -> list[Job]:
        if not 0 <= limit <= 1000:
            raise InvalidArgument("limit", "must be between 1 and 1000")
        return await self._db.reading(
            partial(
                jobs_store.list_jobs,
                workspace_id=workspace_id,
                status=status,
                job_type=job_type,
                limit=limit or 100,
                before_id=before_id,
            )
        )

    async def list_workers(self, *, workspace_id: str, include_offline: bool) -> list[Worker]:
        return await self._db.reading(
            partial(workers_store.list_workers, workspace_id=workspace_id, include_offline=include_offline)
        )

    async def events_since(self, workspace_id: str, after_seq: int) -> list[Event]:
        return await self._db.reading(
            partial(events_store.since, workspace_id=workspace_id, after_seq=after_seq)
        )

    async def last_seq(self, workspace_id: str) -> int:
        return await self._db.reading(partial(events_store.last_seq, workspace_id=workspace_id))

    # -- the lease lifecycle ---------------------------------------------------------------

    async def claim(
        self,
        *,
        workspace_id: str,
        types: Sequence[str],
        repo_ids: Sequence[str],
        slots: int,
        pick: Callable[[int], Sequence[Assignee]],
    ) -> list[tuple[Job, Assignee]]:
        """Atomically take up to ``slots`` pending jobs in priority order; ``pick(n)`` names the
        sessions for the ``n`` found (so an empty queue costs nothing per free session).

        Like outcomes (see `_record_outcomes`): one unlocked read and one fenced write, straight to
        the driver; if another replica claimed one of the jobs meanwhile, again under row locks.
        """
        claim = (workspace_id, types, repo_ids, slots)
        try:
            async with self._write(direct=True) as tx:
                _, (pending,) = await self._named_and_pending(tx, job_ids=(), claims=[claim])
                return self._claimed(tx, pending, pick)
        except pg_direct.Fenced:
            log.info("a claim raced with another write; claiming again under row locks")
        async with self._write() as tx:
            (locked,) = await self._claimable(tx, [claim])
            return self._claimed(tx, locked, pick)

    def _claimed(
        self, tx: _Tx, pending: Sequence[Job], pick: Callable[[int], Sequence[Assignee]]
    ) -> list[tuple[Job, Assignee]]:
        assignees = pick(len(pending)) if pending else []
        claimed = [(self._assign(tx, job, who), who) for job, who in zip(pending, assignees, strict=False)]
        tx.saves += [
            (new, old.status, old.lease_epoch) for old, (new, _) in zip(pending, claimed, strict=False)
        ]
        return claimed

    async def _named_and_pending(
        self, tx: _Tx, *, job_ids: Sequence[str], claims: Sequence[Claim]
    ) -> tuple[dict[str, Job], list[list[Job]]]:
        """Without locks (`store.pg_direct`), or under SQLite's write lock: the jobs named, and
        for each claim the pending jobs it takes (see `_take_pending`)."""
        named: dict[str, Job] = {}

        async def read(wider: Sequence[Claim]) -> list[list[Job]]:
            nonlocal named
            if tx.lite is not None:
                named, found = sqlite_direct.named_and_pending(tx.lite, job_ids=job_ids, claims=wider)
            else:
                assert tx.direct is not None
                named, found = await pg_direct.named_and_pending(tx.direct, job_ids=job_ids, claims=wider)
            return found

        pending = await self._take_pending(tx, claims, read)
        return named, pending

    async def _claimable(self, tx: _Tx, claims: Sequence[Claim]) -> list[list[Job]]:
        """Under row locks, skipping rows other transactions hold: the pending jobs each claim takes."""

        async def read(wider: Sequence[Claim]) -> list[list[Job]]:
            return [
                await jobs_store.claimable(tx.conn, workspace_id=ws, types=types, repo_ids=repos, limit=n)
                for ws, types, repos, n in wider
            ]

        return await self._take_pending(tx, claims, read)

    async def _take_pending(
        self, tx: _Tx, claims: Sequence[Claim], read: Callable[[Sequence[Claim]], Awaitable[list[list[Job]]]]
    ) -> list[list[Job]]:
        """For each claim, the first pending jobs that no other transaction of this replica is
        claiming (and no earlier claim of this one), marked as this transaction's until it ends.

        The dispatcher's claims and the refills of outcome batches run side by side and read
        without locks. Without the marks both would pick the same first pending job, and one of
        the two fenced writes would fail and be redone under row locks: at full load a fifth to a
        third of the outcome batches did. A read asks for as many more jobs as are marked and as
        its claims want together. Reads in flight together cannot see each other's marks; when
        the marks hid so many jobs that a read may have missed some, it is made again (bounded).
        """
        demand = sum(n for *_, n in claims)  # claims of one read may want the same jobs
        for attempt in range(CLAIM_READS):
            extra = len(self._claiming) + demand
            wider = [(ws, types, repos, extra) for ws, types, repos, _ in claims]
            found = await read(wider)
            taken: list[list[Job]] = []
            ids: set[str] = set()
            short = False
            for jobs, (*_, n), (*_, asked) in zip(found, claims, wider, strict=True):
                free = [job for job in jobs if job.id not in self._claiming and job.id not in ids][:n]
                short = short or (len(free) < n and len(jobs) == asked)
                ids.update(job.id for job in free)
                taken.append(free)
            if not short:
                break
            log.debug("claim read %d found its jobs taken by other claims; reading again", attempt + 1)
        self._claiming.update(ids)
        tx.claiming += ids
        return taken

    async def record_outcome(
        self,
        *,
        workspace_id: str,
        worker_id: str,
        job_id: str,
        epoch: int,
        status: JobStatus,
        result: JobResult,
        refill: Refill | None = None,
    ) -> tuple[Job, bool, Job | None]:
        """Apply a worker's outcome, fenced by ``epoch``; a replay returns ``duplicate=True``. With
        ``refill``, the next pending job for the reporting session, if any, is assigned in the same
        transaction (only when the outcome freed its slot) and returned third.

        Outcomes arriving together (from many worker streams) are recorded in one transaction.
        """
        return await self._outcomes(
            _Outcome(
                workspace_id=workspace_id,
                worker_id=worker_id,
                job_id=job_id,
                epoch=epoch,
                status=status,
                result=result,
                refill=refill,
            )
        )

    async def _record_outcomes(
        self, outcomes: Sequence[_Outcome]
    ) -> list[tuple[Job, bool, Job | None] | Exception]:
        """Record a batch of outcomes in one transaction; each gets its own answer.

        Every job of the batch is read in one statement, with the pending jobs the refilled
        sessions would take next; each outcome is then decided in arrival order against the
        latest state (so a replay right behind its original in the same batch is a duplicate), and
        every changed job is written with the events, last.

        Both go straight to the driver (store.pg_direct, store.sqlite_direct). On PostgreSQL the
        read takes no locks and the write is fenced: two round trips, no BEGIN or COMMIT. If
        anything it read changed before the write (a sweep, another replica's claim), the write
        aborts whole and the batch is decided again under row locks.
        """
        wanted: dict[_Kind, int] = defaultdict(int)  # refills asked for, by kind of session
        for outcome in outcomes:
            if outcome.refill is not None:
                wanted[_kind(outcome)] += 1
        claims: list[Claim] = [(*kind, n) for kind, n in wanted.items()]
        ids = [o.job_id for o in outcomes]
        try:
            async with self._write(direct=True) as tx:
                jobs, pending = await self._named_and_pending(tx, job_ids=ids, claims=claims)
                answers = self._decide_outcomes(tx, outcomes, jobs, dict(zip(wanted, pending, strict=True)))
            return answers
        except pg_direct.Fenced:
            log.info("outcomes raced with another write; deciding them again under row locks")
        async with self._write() as tx:
            jobs = await jobs_store.get_many(tx.conn, job_ids=ids, lock=True)
            pending = await self._claimable(tx, claims)
            answers = self._decide_outcomes(tx, outcomes, jobs, dict(zip(wanted, pending, strict=True)))
        return answers

    def _decide_outcomes(
        self,
        tx: _Tx,
        outcomes: Sequence[_Outcome],
        jobs: dict[str, Job],
        pending: dict[_Kind, list[Job]],
    ) -> list[tuple[Job, bool, Job | None] | Exception]:
        """Each outcome decided in order; a session that asked for a refill (and whose outcome
        was not a replay) is given the next of the ``pending`` jobs of its kind."""
        answers: list[tuple[Job, bool, Job | None] | Exception] = []
        writes: dict[str, tuple[Job, JobStatus, int]] = {}
        queues = {key: iter(jobs_of_kind) for key, jobs_of_kind in pending.items()}
        for outcome in outcomes:
            try:
                job, duplicate = self._decide_outcome(tx, outcome, jobs, writes)
            except IasError as exc:
                answers.append(exc)
                continue
            following = None
            if outcome.refill is not None and not duplicate:
                candidate = next(queues[_kind(outcome)], None)
                if candidate is not None:
                    following = self._assign(tx, candidate, outcome.refill.assignee)
                    writes[candidate.id] = (following, candidate.status, candidate.lease_epoch)
            answers.append((job, duplicate, following))
        tx.saves += writes.values()
        return answers

    def _decide_outcome(
        self,
        tx: _Tx,
        outcome: _Outcome,
        jobs: dict[str, Job],
        writes: dict[str, tuple[Job, JobStatus, int]],
    ) -> tuple[Job, bool]:
        found = jobs.get(outcome.job_id)
        if found is not None and found.workspace_id != outcome.workspace_id:
            found = None  # another workspace's job does not exist for this caller
        job = jobs_domain.require(found, outcome.job_id)
        if job.worker_id != outcome.worker_id:
            raise StaleLease(f"job {job.id} is not held by this worker")
        if jobs_domain.is_recorded_outcome(job, epoch=outcome.epoch, status=outcome.status):
            return job, True
        done = jobs_domain.finish(
            job, epoch=outcome.epoch, status=outcome.status, result=outcome.result, now=tx.now
        )
        # Keyed by job: a later change in the same batch is written over the same stored row.
        stored = writes.get(job.id, (job, job.status, job.lease_epoch))
        writes[job.id] = (done, stored[1], stored[2])
        jobs[job.id] = done
        if done.status is JobStatus.PENDING:
            tx.add(outcome.workspace_id, Draft(EventKind.JOB_REQUEUED, job=done, reason="retryable_failure"))
            tx.available.add(outcome.workspace_id)
        else:
            tx.add(outcome.workspace_id, Draft(EventKind.JOB_FINISHED, job=done))
        return done, False

    async def release(
        self, *, workspace_id: str, worker_id: str, job_id: str, epoch: int, reason: str
    ) -> Job:
        """Put a job back in the queue without using up an attempt."""
        async with self._write() as tx:
            job = jobs_domain.require(
                await jobs_store.get(tx.conn, workspace_id=workspace_id, job_id=job_id, lock=True), job_id
            )
            if job.worker_id != worker_id:
                raise StaleLease(f"job {job_id} is not held by this worker")
            released = jobs_domain.release(job, epoch=epoch, now=tx.now)
            await jobs_store.save(tx.conn, job=released, expect_status=job.status, expect_epoch=epoch)
            tx.add(workspace_id, Draft(EventKind.JOB_REQUEUED, job=released, reason=reason or "released"))
            tx.available.add(workspace_id)
        return released

    async def requeue_lost(
        self, *, workspace_id: str, worker_id: str, job_id: str, epoch: int, reason: str
    ) -> bool:
        """Requeue a running job its worker turned out not to have, as its next attempt (or fail
        it when none are left); False if the lease moved on meanwhile."""
        async with self._write() as tx:
            job = await jobs_store.get(tx.conn, workspace_id=workspace_id, job_id=job_id, lock=True)
            if job is None or job.worker_id != worker_id or job.lease_epoch != epoch:
                return False
            return await self._requeue(tx, job, reason) == 1

    async def cancel(self, *, workspace_id: str, job_id: str, reason: str) -> tuple[Job, Job]:
        """Cancel an unfinished job; returns (before, after) so a running holder can be told."""
        async with self._write() as tx:
            job = jobs_domain.require(
                await jobs_store.get(tx.conn, workspace_id=workspace_id, job_id=job_id, lock=True), job_id
            )
            cancelled = jobs_domain.cancel(job, now=tx.now)
            await jobs_store.save(
                tx.conn, job=cancelled, expect_status=job.status, expect_epoch=job.lease_epoch
            )
            tx.add(workspace_id, Draft(EventKind.JOB_CANCELLED, job=cancelled, reason=reason[:200]))
            if job.status is JobStatus.RUNNING:
                await self._notify(tx, CANCEL_CHANNEL, f"{job.id}:{job.lease_epoch}")
        return job, cancelled

    async def record_progress(self, *, updates: Sequence[tuple[str, str, int, str]]) -> None:
        """Persist the latest progress of several jobs: (workspace, job id, epoch, message)."""
        async with self._write() as tx:
            for workspace_id, job_id, epoch, message in updates:
                job = await jobs_store.get(tx.conn, workspace_id=workspace_id, job_id=job_id)
                if job is None or job.status is not JobStatus.RUNNING or job.lease_epoch != epoch:
                    continue
                moved = replace(job, progress=message[:500], updated_at=tx.now)
                await jobs_store.save(tx.conn, job=moved, expect_status=job.status, expect_epoch=epoch)
                tx.add(workspace_id, Draft(EventKind.JOB_PROGRESS, job=moved))

    async def renew(self, *, held: Sequence[tuple[str, str]]) -> tuple[list[tuple[str, str, int]], datetime]:
        """Persist fresh leases for the (job id, session id) pairs the live sessions hold (one
        write per batch); returns the (job id, session id, epoch) renewed and the new expiry."""
        async with self._write() as tx:
            expires = tx.now + self._settings.lease_ttl
            renewed = await jobs_store.renew(tx.conn, held=held, expires_at=expires)
        return renewed, expires

    async def sweep(self, *, judge_replicas: bool = True) -> int:
        """Requeue jobs whose lease expired or whose worker is gone; returns how many moved.

        ``judge_replicas`` is false while this replica has not itself reached the database for a
        whole grace: after an outage every replica's proof of life is equally old, and taking the
        others for dead then would strand workers that are fine.
        """
        grace = self._settings.reconnect_grace
        async with self._write() as tx:
            stranded = (
                await workers_store.strand_dead_replicas(
                    tx.conn, now=tx.now, grace=grace, own_replica_id=self._settings.replica_id
                )
                if judge_replicas
                else []
            )
            for worker in stranded:
                tx.add(
                    worker.workspace_id,
                    Draft(EventKind.WORKER_DISCONNECTED, worker=worker, reason="replica_lost"),
                )
            moved = 0
            lost: list[Job] = []
            # A replica that just started gives every worker one grace to reconnect first: their
            # sessions broke when the previous process stopped, however long ago that was.
            if tx.now - self._started >= grace:
                lost = await jobs_store.orphaned(tx.conn, now=tx.now, grace=grace, limit=_SWEEP_BATCH)
            for reason, stale in (
                ("lease_expired", await jobs_store.expired(tx.conn, now=tx.now, limit=_SWEEP_BATCH)),
                ("worker_lost", lost),
            ):
                for job in stale:
                    moved += await self._requeue(tx, job, reason)
        return moved

    async def _requeue(self, tx: _Tx, job: Job, reason: str) -> int:
        if job.status is not JobStatus.RUNNING:
            return 0
        after = jobs_domain.requeue(job, now=tx.now, reason=reason)
        if not await jobs_store.save(
            tx.conn, job=after, expect_status=job.status, expect_epoch=job.lease_epoch
        ):
            return 0
        if after.status is JobStatus.PENDING:
            tx.add(job.workspace_id, Draft(EventKind.JOB_REQUEUED, job=after, reason=reason))
            tx.available.add(job.workspace_id)
        else:
            tx.add(job.workspace_id, Draft(EventKind.JOB_FINISHED, job=after, reason=reason))
        log.info(
            "requeued job",
            extra={
                "job_id": job.id,
                "attempt": job.attempt,
                "lease_epoch": job.lease_epoch,
                "reason": reason,
            },
        )
        return 1

    # -- worker sessions -------------------------------------------------------------------

    async def connect_worker(
        self,
        *,
        workspace_id: str,
        name: str,
        capabilities: Sequence[str],
        repo_ids: Sequence[str],
        slots: int,
        version: str,
        held: Sequence[HeldLease],
        session_id: str,
    ) -> tuple[Worker, list[Job]]:
        """Start a session: adopt the jobs the worker still runs, requeue the ones it lost.

        Hellos arriving together (a fleet reconnecting after a restart) share one transaction.
        """
        return await self._connects(
            _Connect(
                start=workers_store.SessionStart(
                    workspace_id=workspace_id,
                    name=name,
                    capabilities=tuple(capabilities),
                    repo_ids=tuple(repo_ids),
                    slots=slots,
                    version=version,
                    session_id=session_id,
                ),
                held=tuple(held),
            )
        )

    async def _connect_workers(
        self, hellos: Sequence[_Connect]
    ) -> list[tuple[Worker, list[Job]] | Exception]:
        """Record a batch of hellos in one transaction, a few statements for the whole batch.

        A worker named twice in the batch (a reconnect racing its own earlier hello) is recorded
        once per round, in arrival order, so the later session is the one that stays.
        """
        answers: list[tuple[Worker, list[Job]] | Exception] = []
        async with self._write() as tx:
            rounds: list[list[int]] = []
            seen: dict[tuple[str, str], int] = {}
            for i, hello in enumerate(hellos):
                key = (hello.start.workspace_id, hello.start.name)
                turn = seen[key] = seen.get(key, -1) + 1
                if turn == len(rounds):
                    rounds.append([])
                rounds[turn].append(i)
            connected: dict[int, tuple[Worker, list[Job]]] = {}
            for indices in rounds:
                batch = [hellos[i] for i in indices]
                workers = await workers_store.connect(
                    tx.conn,
                    starts=[h.start for h in batch],
                    new_id=lambda: new_id("wrk"),
                    replica_id=self._settings.replica_id,
                    now=tx.now,
                )
                held = await jobs_store.held_by_workers(tx.conn, worker_ids=[w.id for w in workers])
                for i, hello, worker in zip(indices, batch, workers, strict=True):
                    adopted = await self._adopt(tx, hello, held.get(worker.id, []))
                    tx.add(hello.start.workspace_id, Draft(EventKind.WORKER_CONNECTED, worker=worker))
                    connected[i] = (worker, adopted)
            answers.extend(connected[i] for i in range(len(hellos)))
            await self._notify_all(
                tx,
                SESSIONS_CHANNEL,
                [f"{worker.id}:{hellos[i].start.session_id}" for i, (worker, _) in connected.items()],
            )
        return answers

    async def _adopt(self, tx: _Tx, hello: _Connect, held: Sequence[Job]) -> list[Job]:
        """The jobs a reconnecting worker still runs, with its new session; the rest requeued."""
        held_epochs = {h.job_id: h.lease_epoch for h in hello.held}
        adopted = []
        for job in held:
            if held_epochs.get(job.id) == job.lease_epoch:
                kept = replace(
                    job,
                    session_id=hello.start.session_id,
                    lease_expires_at=tx.now + self._settings.lease_ttl,
                    updated_at=tx.now,
                )
                await jobs_store.save(
                    tx.conn, job=kept, expect_status=job.status, expect_epoch=job.lease_epoch
                )
                adopted.append(kept)
            else:
                await self._requeue(tx, job, "worker_restarted")
        return adopted

    async def set_worker_status(
        self, *, worker_id: str, session_id: str, status: WorkerStatus, reason: str = ""
    ) -> None:
        """Record that a session went offline or started draining (no-op if it was replaced).

        Changes arriving together (a replica stopping, a network partition) share one transaction.
        """
        await self._statuses(
            _StatusChange(worker_id=worker_id, session_id=session_id, status=status, reason=reason)
        )

    async def _set_statuses(self, changes: Sequence[_StatusChange]) -> list[Exception | None]:
        async with self._write() as tx:
            workers = await workers_store.set_statuses(
                tx.conn, changes=[(c.worker_id, c.session_id, c.status) for c in changes], now=tx.now
            )
            for change, worker in zip(changes, workers, strict=True):
                if worker is not None:
                    kind = (
                        EventKind.WORKER_DISCONNECTED
                        if change.status is WorkerStatus.OFFLINE
                        else EventKind.WORKER_CONNECTED
                    )
                    tx.add(worker.workspace_id, Draft(kind, worker=worker, reason=change.reason))
        return [None] * len(changes)

    async def touch_replica(self, *, live: dict[str, tuple[str, bool]] | None = None) -> None:
        """Prove this replica alive and, if another replica took it for dead meanwhile (it was cut
        off from the database longer than the grace), mark its live sessions' workers online again.

        ``live`` maps worker id to (session id, draining) for the sessions open on this replica.
        A row stored anew is announced to the other replicas, and `peers` learns how many others
        are live.
        """
        replica_id = self._settings.replica_id
        async with self._write() as tx:
            if await workers_store.touch_replica(tx.conn, replica_id=replica_id, now=tx.now):
                await self._notify(tx, REPLICAS_CHANNEL, replica_id)
            await self._reclaim_stranded(tx, live)
        if self.peers is not None:
            await self.peers.look()

    async def leave(self) -> None:
        """This replica stops: its row goes (its sessions have recorded themselves offline)."""
        async with self._write() as tx:
            await workers_store.remove_replica(tx.conn, replica_id=self._settings.replica_id)

    async def count_other_replicas(self) -> int:
        since = self._clock() - self._settings.reconnect_grace
        return await self._db.reading(
            partial(workers_store.other_replicas, replica_id=self._settings.replica_id, since=since)
        )

    async def refresh_statistics(self) -> None:
        """PostgreSQL: analyze the jobs table if it grew enough since (see `store.statistics`)."""
        if self._db.is_sqlite or not self._statistics.due:
            return
        async with self._db.direct() as raw:
            await self._statistics.refresh(raw)

    async def hint_peers(self, workspaces: list[str]) -> None:
        """After quiet writes: where other replicas should look (see `dispatch.peers`)."""
        async with self._db.direct() as raw:
            await pg_direct.hint(raw, workspaces=workspaces, replica_id=self._settings.replica_id)

    async def _reclaim_stranded(self, tx: _Tx, live: dict[str, tuple[str, bool]] | None) -> None:
        if not live:
            return
        for worker in await workers_store.reclaim_stranded(
            tx.conn,
            replica_id=self._settings.replica_id,
            live=live,
            now=tx.now,
            grace=self._settings.reconnect_grace,
        ):
            log.warning("worker %s was taken for stranded while its session lived; online again", worker.name)
            tx.add(
                worker.workspace_id, Draft(EventKind.WORKER_CONNECTED, worker=worker, reason="replica_back")
            )

    async def ensure_workspace(self, workspace_id: str) -> None:
        async with self._write() as tx:
            await events_store.ensure_workspace(tx.conn, workspace_id=workspace_id, now=tx.now)

    async def require_workspace(self, workspace_id: str) -> None:
        if not await self._db.reading(partial(events_store.workspace_exists, workspace_id=workspace_id)):
            raise NotFound(f"workspace {workspace_id} not found")


def _run_all(callbacks: Sequence[Callable[[], None]]) -> None:
    for callback in callbacks:
        callback()


def _numbered(tx: _Tx, last: dict[str, int]) -> list[Event]:
    """The transaction's drafts as the events they became, given each workspace's last number."""
    published: list[Event] = []
    for workspace_id in sorted(tx.drafts):
        if workspace_id not in last:
            raise NotFound(f"workspace {workspace_id} not found")
        published += events_store.numbered(
            workspace_id, tx.drafts[workspace_id], last=last[workspace_id], now=tx.now
        )
    return published


def _validate(new: NewJob) -> None:
    if not new.type or len(new.type) > 64 or not all(c.isalnum() or c in "_-." for c in new.type):
        raise InvalidArgument("type", "must be 1-64 letters, digits, '_', '-' or '.'")
    if len(new.repo_id) > 128:
        raise InvalidArgument("repo_id", "must be at most 128 characters")
    if len(new.payload_json.encode()) > MAX_PAYLOAD_BYTES:
        raise InvalidArgument("payload_json", f"must be at most {MAX_PAYLOAD_BYTES} bytes")
    if new.payload_json:
        try:
            payload = json.loads(new.payload_json)
        except ValueError as exc:
            raise InvalidArgument("payload_json", f"is not valid JSON ({exc})") from exc
        if not isinstance(payload, dict):
            raise InvalidArgument("payload_json", "must be a JSON object")
    if not 0 <= new.priority <= 1000:
        raise InvalidArgument("priority", "must be between 0 and 1000")
    if not 0 <= new.max_attempts <= 100:
        raise InvalidArgument("max_attempts", "must be between 0 and 100")
    if len(new.idempotency_key) > 200:
        raise InvalidArgument("idempotency_key", "must be at most 200 characters")
    if len(new.run_id) > 64:
        raise InvalidArgument("run_id", "must be at most 64 characters")
