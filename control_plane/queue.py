"""The job queue's operations: each one a transaction that applies a domain decision, appends
its events to the log, and hands them to live subscribers after commit."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import cached_property, partial
from typing import NamedTuple

from sqlalchemy.exc import IntegrityError

from control_plane.domain import jobs as jobs_domain
from control_plane.domain.jobs import Job, JobResult, JobStatus
from control_plane.domain.workers import Event, EventKind, Worker
from control_plane.errors import IasError, InvalidArgument, StaleLease
from control_plane.group_commit import Batch, GroupCommit, Then
from control_plane.ids import new_id
from control_plane.store import events as events_store
from control_plane.store import jobs as jobs_store
from control_plane.store import pg_direct
from control_plane.store import workers as workers_store
from control_plane.store.events import Draft
from control_plane.store.pg_direct import Claim
from control_plane.transactions import Assignee, Tx
from control_plane.worker_records import WorkerRecords

log = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 256 * 1024
CANCEL_CHANNEL = "ias_cancel"
_SWEEP_BATCH = 500


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


class Leased(list[tuple[Job, Assignee]]):
    """The jobs one claim leased, each with its assignee, and when the claim committed."""

    committed_at: float = 0.0  # `Tx.committed_at`: where the jobs' dispatch latency starts


class Recorded(NamedTuple):
    """An outcome as recorded."""

    job: Job
    duplicate: bool  # a replay of the outcome already recorded
    following: Job | None  # the job its transaction leased to the reporting session, if any
    committed_at: float  # `Tx.committed_at` of that transaction


_Kind = tuple[str, tuple[str, ...], tuple[str, ...]]  # workspace, job types, repo ids


def _kind(outcome: _Outcome) -> _Kind:
    assert outcome.refill is not None
    return (outcome.workspace_id, outcome.refill.types, outcome.refill.repo_ids)


class JobQueue(WorkerRecords):
    """Every state change of jobs and workers goes through here."""

    @cached_property
    def _submits(self) -> GroupCommit[Job, Job]:
        return GroupCommit(self._insert_jobs)

    @cached_property
    def _outcomes(self) -> GroupCommit[_Outcome, Recorded]:
        return GroupCommit(self._record_outcomes)

    # -- submissions and reads -------------------------------------------------------------

    async def submit(self, *, workspace_id: str, new: NewJob) -> tuple[Job, bool]:
        """Store a new job (or return the one with the same idempotency key)."""
        job = self._new_job(workspace_id, new)
        if not new.idempotency_key:
            return await self._submits(job), False
        return await self._submit_once(job)

    def submit_soon(
        self, *, workspace_id: str, new: NewJob, then: Then[Job] | None = None
    ) -> asyncio.Future[Job]:
        """Queue a submission without an idempotency key for the next group commit; the future
        holds the stored job once committed, and ``then`` is called with it in that same turn
        (see `GroupCommit.enqueue`). Refuses a bad submission at once (`InvalidArgument`).

        For a caller with many submissions under way (a SubmitJobs stream), a future costs less
        than a task per job waiting in `submit`.
        """
        if new.idempotency_key:
            raise ValueError("a submission with an idempotency key goes through submit()")
        return self._submits.enqueue(self._new_job(workspace_id, new), then)

    def _new_job(self, workspace_id: str, new: NewJob) -> Job:
        _validate(new)
        now = self._clock()
        return Job(
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

    async def _submit_once(self, job: Job) -> tuple[Job, bool]:
        workspace_id = job.workspace_id
        try:
            async with self._write() as tx:
                existing = await jobs_store.by_idempotency_key(
                    tx.conn, workspace_id=workspace_id, key=job.idempotency_key
                )
                if existing is not None:
                    return existing, True
                await jobs_store.insert_job(tx.conn, job=job)
                tx.add(workspace_id, Draft(EventKind.JOB_SUBMITTED, job=job))
                tx.available.add(workspace_id)
        except IntegrityError:
            # A concurrent submission with the same key won the race; return its job.
            existing = await self._db.reading(
                partial(jobs_store.by_idempotency_key, workspace_id=workspace_id, key=job.idempotency_key)
            )
            if existing is None:
                raise
            return existing, True
        return job, False

    async def _insert_jobs(self, jobs: Batch[Job]) -> list[Job | Exception]:
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
                    # On their way the moment they are committed, before that is on disk.
                    tx.on_commit.extend(partial(direct.deliver, job) for job in assigned)
                    tx.early = True
                tx.on_commit.append(jobs.committed)  # the next batch may commit meanwhile
                tx.on_durable.append(partial(jobs.answer, stored))
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
    ) -> Leased:
        """Atomically take up to ``slots`` pending jobs in priority order; ``pick(n)`` names the
        sessions for the ``n`` found (so an empty queue costs nothing per free session).

        Like outcomes (see `_record_outcomes`): one unlocked read and one fenced write, straight to
        the driver; if another replica claimed one of the jobs meanwhile, again under row locks.
        """
        claim = (workspace_id, types, repo_ids, slots)
        try:
            async with self._write(direct=True) as tx:
                _, (pending,) = await self._named_and_pending(tx, job_ids=(), claims=[claim])
                claimed = self._claimed(tx, pending, pick)
            claimed.committed_at = tx.committed_at
            return claimed
        except pg_direct.Fenced:
            log.info("a claim raced with another write; claiming again under row locks")
        async with self._write() as tx:
            (locked,) = await self._claimable(tx, [claim])
            claimed = self._claimed(tx, locked, pick)
        claimed.committed_at = tx.committed_at
        return claimed

    def _claimed(self, tx: Tx, pending: Sequence[Job], pick: Callable[[int], Sequence[Assignee]]) -> Leased:
        assignees = pick(len(pending)) if pending else []
        claimed = Leased(
            (self._assign(tx, job, who), who) for job, who in zip(pending, assignees, strict=False)
        )
        tx.saves += [
            (new, old.status, old.lease_epoch) for old, (new, _) in zip(pending, claimed, strict=False)
        ]
        return claimed

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
    ) -> Recorded:
        """Apply a worker's outcome, fenced by ``epoch``; a replay is ``duplicate``. With
        ``refill``, the next pending job for the reporting session, if any, is assigned in the same
        transaction (only when the outcome freed its slot) and returned as ``following``.

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

    async def _record_outcomes(self, outcomes: Sequence[_Outcome]) -> list[Recorded | Exception]:
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
            return _stamped(answers, tx.committed_at)
        except pg_direct.Fenced:
            log.info("outcomes raced with another write; deciding them again under row locks")
        async with self._write() as tx:
            jobs = await jobs_store.get_many(tx.conn, job_ids=ids, lock=True)
            pending = await self._claimable(tx, claims)
            answers = self._decide_outcomes(tx, outcomes, jobs, dict(zip(wanted, pending, strict=True)))
        return _stamped(answers, tx.committed_at)

    def _decide_outcomes(
        self,
        tx: Tx,
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
        tx: Tx,
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


def _stamped(
    answers: Sequence[tuple[Job, bool, Job | None] | Exception], committed_at: float
) -> list[Recorded | Exception]:
    return [a if isinstance(a, Exception) else Recorded(*a, committed_at) for a in answers]


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
