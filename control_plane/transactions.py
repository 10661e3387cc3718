"""The job queue's write transactions, and what all its operations share.

An operation opens a transaction (`Transactions._write`) and queues its changes on it (`Tx`): new
jobs, fenced saves of rows it read, events and hints. They are written last and together, on the
connection the transaction runs on (store.pg_direct: one statement; store.sqlite_direct), then what
waited for the commit runs and the events go to live subscribers. Claims read pending jobs through
`Transactions._take_pending`, which keeps the claims of one replica from taking the same job.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from control_plane.config import ServerSettings
from control_plane.dispatch.peers import Peers
from control_plane.domain import jobs as jobs_domain
from control_plane.domain.jobs import Job, JobStatus
from control_plane.domain.workers import Event, EventKind
from control_plane.errors import NotFound, Unavailable
from control_plane.events.hub import EventHub
from control_plane.store import events as events_store
from control_plane.store import jobs as jobs_store
from control_plane.store import pg_direct, sqlite_direct
from control_plane.store.db import Database, driver, driver_sqlite
from control_plane.store.events import Draft
from control_plane.store.pg_direct import Claim
from control_plane.store.statistics import Statistics

log = logging.getLogger(__name__)

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

    def deliver(self, job: Job, committed_at: float) -> None: ...

    def unreserve(self, job: Job) -> None: ...


@dataclass(slots=True)
class Tx:
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
    # Run the moment the commit is known, before anything else the transaction's end does, with
    # that moment (`committed_at`).
    on_commit: list[Callable[[float], None]] = field(default_factory=list)
    # When the commit was known, by the wall clock (`time.time()`): where dispatch latency starts
    # for the jobs the transaction leased. 0.0 until then.
    committed_at: float = 0.0
    quiet: bool = False  # written without notifications (see dispatch.peers)
    claiming: list[str] = field(default_factory=list)  # pending jobs it read to claim (_take_pending)
    # Direct, PostgreSQL: ``on_commit`` sends jobs to workers, so it runs once the statement has
    # committed, before the commit is on disk; the rest of the transaction's end waits for that
    # (see `store.pg_direct.flush`). Off with ``ServerSettings.early_dispatch``.
    early: bool = False
    # Run first once the transaction is durable, before its events go out and its connection goes
    # back to its pool: answers for the callers waiting for it (`group_commit.Batch.answer`).
    on_durable: list[Callable[[], None]] = field(default_factory=list)

    @property
    def conn(self) -> AsyncConnection:
        assert self.sql is not None, "a direct transaction has no SQLAlchemy connection"
        return self.sql

    def add(self, workspace_id: str, draft: Draft) -> None:
        self.drafts[workspace_id].append(draft)


class Transactions:
    """The database, the write transaction and the reads of claims, for the job queue's operations."""

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
        # For each claim read in flight, the marks taken off meanwhile (see `_take_pending`).
        self._unmarked: dict[int, set[str]] = {}
        self._reads = itertools.count()

    @property
    def db(self) -> Database:
        return self._db

    @asynccontextmanager
    async def _write(self, *, direct: bool = False) -> AsyncIterator[Tx]:
        """A write transaction. ``direct``: past SQLAlchemy, on a driver connection (an asyncpg
        connection with no transaction open, whose one write statement is fenced; or the SQLite
        write connection under the write lock); the body reads through ``tx.direct`` or
        ``tx.lite``, if at all."""
        if direct and self._db.is_sqlite:
            began: Tx | None = None
            try:
                async with self._db.direct_sqlite() as lite:
                    tx = began = Tx(sql=None, lite=lite, now=self._clock())
                    yield tx
                    published = await self._flush_sqlite(tx, lite)
            finally:
                if began is not None:
                    self._ended(began)
            _committed(tx)
        elif direct:
            flushing = False
            try:
                async with self._db.direct() as raw:
                    tx = Tx(sql=None, direct=raw, now=self._clock())
                    try:
                        yield tx
                        lazy = tx.early and self._settings.early_dispatch
                        published = await self._flush_postgres(tx, raw, lazy=lazy)
                    finally:
                        self._ended(tx)
                    # The statement was its own transaction: committed. Before the connection
                    # goes back to its pool (a few turns of the event loop), as is what follows.
                    _committed(tx)
                    if lazy and (tx.inserts or tx.saves or tx.drafts):
                        # The assignments `_committed` queued are written first; then, on the
                        # connection at hand, the wait for the disk (see `pg_direct.flush`).
                        flushing = True
                        await asyncio.sleep(0)
                        await pg_direct.flush(raw)
                    flushing = False
                    # On disk: told before the connection goes back to its pool.
                    self._told(tx, published)
            except Exception as exc:
                if not flushing or isinstance(exc, Unavailable):
                    raise
                log.warning("could not make sure a commit reached the disk: %s", exc)
                raise Unavailable(f"the commit was not confirmed on disk: {exc}") from exc
            return
        else:
            began = None
            try:
                async with self._db.write() as conn:
                    tx = began = Tx(sql=conn, now=self._clock())
                    yield tx
                    published = await (
                        self._flush_sqlite(tx) if self._db.is_sqlite else self._flush_postgres(tx)
                    )
            finally:
                if began is not None:
                    self._ended(began)  # after the commit, or the rollback
            _committed(tx)
        self._told(tx, published)

    def _told(self, tx: Tx, published: list[Event]) -> None:
        """The transaction is durable: its callers are answered, its events go to live
        subscribers and its hints to the dispatcher."""
        for callback in tx.on_durable:
            callback()
        self._hub.publish(published, tx.committed_at)
        for workspace_id in tx.available:
            self._on_available(workspace_id)

    async def _flush_sqlite(self, tx: Tx, lite: sqlite3.Connection | None = None) -> list[Event]:
        last = sqlite_direct.write(
            lite or await driver_sqlite(tx.conn),
            inserts=tx.inserts,
            saves=tx.saves,
            drafts=tx.drafts,
            now=tx.now,
        )
        return _numbered(tx, last)

    async def _flush_postgres(
        self, tx: Tx, raw: asyncpg.Connection | None = None, *, lazy: bool = False
    ) -> list[Event]:
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
            lazy=lazy,
        )
        return _numbered(tx, last)

    def _ended(self, tx: Tx) -> None:
        """A transaction ended, committed or not."""
        self._claiming.difference_update(tx.claiming)
        for unmarked in self._unmarked.values():
            unmarked.update(tx.claiming)
        if tx.quiet and self.peers is not None:
            self.peers.quiet_done({*tx.drafts, *tx.available})

    def _assign(self, tx: Tx, job: Job, who: Assignee) -> Job:
        """``job`` leased to ``who`` as of this transaction, with its event (the caller saves it)."""
        running = jobs_domain.assign(
            job, worker_id=who.worker_id, session_id=who.session_id, now=tx.now, ttl=self._settings.lease_ttl
        )
        tx.add(job.workspace_id, Draft(EventKind.JOB_ASSIGNED, job=running))
        return running

    async def _notify(self, tx: Tx, channel: str, payload: str) -> None:
        await self._notify_all(tx, channel, [payload])

    async def _notify_all(self, tx: Tx, channel: str, payloads: Sequence[str]) -> None:
        if payloads and not self._db.is_sqlite:
            await tx.conn.execute(
                text("SELECT count(pg_notify(:c, p)) FROM unnest(CAST(:ps AS text[])) AS p"),
                {"c": channel, "ps": list(payloads)},
            )

    async def _named_and_pending(
        self, tx: Tx, *, job_ids: Sequence[str], claims: Sequence[Claim]
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

    async def _claimable(self, tx: Tx, claims: Sequence[Claim]) -> list[list[Job]]:
        """Under row locks, skipping rows other transactions hold: the pending jobs each claim takes."""

        async def read(wider: Sequence[Claim]) -> list[list[Job]]:
            return [
                await jobs_store.claimable(tx.conn, workspace_id=ws, types=types, repo_ids=repos, limit=n)
                for ws, types, repos, n in wider
            ]

        return await self._take_pending(tx, claims, read)

    async def _take_pending(
        self, tx: Tx, claims: Sequence[Claim], read: Callable[[Sequence[Claim]], Awaitable[list[list[Job]]]]
    ) -> list[list[Job]]:
        """For each claim, the first pending jobs that no other transaction of this replica is
        claiming (and no earlier claim of this one), marked as this transaction's until it ends.

        The dispatcher's claims and the refills of outcome batches run side by side and read
        without locks. Without the marks both would pick the same first pending job, and one of
        the two fenced writes would fail and be redone under row locks: at full load a fifth to a
        third of the outcome batches did. A read asks for as many more jobs as are marked and as
        its claims want together. Reads in flight together cannot see each other's marks; when
        the marks hid so many jobs that a read may have missed some, it is made again (bounded).
        A mark taken off while a read is in flight still holds for that read: its snapshot may
        predate the commit that took the job.
        """
        demand = sum(n for *_, n in claims)  # claims of one read may want the same jobs
        for attempt in range(CLAIM_READS):
            extra = len(self._claiming) + demand
            wider = [(ws, types, repos, extra) for ws, types, repos, _ in claims]
            unmarked: set[str] = set()
            self._unmarked[token := next(self._reads)] = unmarked
            try:
                found = await read(wider)
            finally:
                del self._unmarked[token]
            taken: list[list[Job]] = []
            ids: set[str] = set()
            short = False
            hidden = self._claiming | unmarked if unmarked else self._claiming
            for jobs, (*_, n), (*_, asked) in zip(found, claims, wider, strict=True):
                free = [job for job in jobs if job.id not in hidden and job.id not in ids][:n]
                short = short or (len(free) < n and len(jobs) == asked)
                ids.update(job.id for job in free)
                taken.append(free)
            if not short:
                break
            log.debug("claim read %d found its jobs taken by other claims; reading again", attempt + 1)
        self._claiming.update(ids)
        tx.claiming += ids
        return taken

    async def _requeue(self, tx: Tx, job: Job, reason: str) -> int:
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

    async def refresh_statistics(self) -> None:
        """PostgreSQL: analyze the jobs table if it grew enough since (see `store.statistics`)."""
        if self._db.is_sqlite or not self._statistics.due:
            return
        async with self._db.direct() as raw:
            await self._statistics.refresh(raw)


def _committed(tx: Tx) -> None:
    tx.committed_at = time.time()
    for callback in tx.on_commit:
        callback(tx.committed_at)


def _numbered(tx: Tx, last: dict[str, int]) -> list[Event]:
    """The transaction's drafts as the events they became, given each workspace's last number."""
    published: list[Event] = []
    for workspace_id in sorted(tx.drafts):
        if workspace_id not in last:
            raise NotFound(f"workspace {workspace_id} not found")
        published += events_store.numbered(
            workspace_id, tx.drafts[workspace_id], last=last[workspace_id], now=tx.now
        )
    return published
