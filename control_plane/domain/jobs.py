"""Job lifecycle as an explicit transition table, with the lease epoch as the fencing token.

Every function here is pure: it takes the current job and the time, and returns the next job or
raises. The store applies the result with a conditional write, so the decision and the fence are
made in one place and enforced by the database.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final

from control_plane.errors import InvalidTransition, NotFound, StaleLease


class JobStatus(StrEnum):
    """Where a job is in its lifecycle."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    BLOCKED = "blocked"
    CANCELLED = "cancelled"


TERMINAL: Final = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED})
OUTCOME_STATUSES: Final = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.BLOCKED})

_ALLOWED: Final[Mapping[JobStatus, frozenset[JobStatus]]] = {
    JobStatus.PENDING: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.DONE, JobStatus.FAILED, JobStatus.BLOCKED, JobStatus.PENDING, JobStatus.CANCELLED}
    ),
    # A blocked job resumes (back to the queue) once its decision is answered.
    JobStatus.BLOCKED: frozenset({JobStatus.PENDING, JobStatus.CANCELLED}),
    JobStatus.DONE: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}

DEFAULT_PRIORITY: Final = 50
DEFAULT_MAX_ATTEMPTS: Final = 3


def can_transition(source: JobStatus, target: JobStatus) -> bool:
    """Whether the table allows ``source → target``."""
    return target in _ALLOWED[source]


def check_transition(source: JobStatus, target: JobStatus) -> None:
    """Raise `InvalidTransition` unless the table allows ``source → target``."""
    if not can_transition(source, target):
        raise InvalidTransition(f"a {source} job cannot become {target}")


@dataclass(frozen=True, slots=True)
class JobResult:
    """Metadata a worker reports for a finished attempt (never file contents)."""

    summary: str = ""
    commit_sha: str = ""
    branch: str = ""
    changed_paths: tuple[str, ...] = ()
    changed_paths_truncated: bool = False
    pr_url: str = ""
    counts: Mapping[str, int] = field(default_factory=dict)
    error_code: str = ""
    error_message: str = ""
    retryable: bool = False
    duration_ms: int = 0
    metadata_json: str = ""
    decision_request_id: str = ""


@dataclass(frozen=True, slots=True)
class Job:
    """A unit of work and the state of its current lease."""

    id: str
    workspace_id: str
    type: str
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    repo_id: str = ""
    payload_json: str = "{}"
    priority: int = DEFAULT_PRIORITY
    attempt: int = 1
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    lease_epoch: int = 0
    worker_id: str = ""
    session_id: str = ""
    lease_expires_at: datetime | None = None
    finished_at: datetime | None = None
    progress: str = ""
    result: JobResult | None = None
    run_id: str = ""
    idempotency_key: str = ""

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def assign(job: Job, *, worker_id: str, session_id: str, now: datetime, ttl: timedelta) -> Job:
    """Move a pending job to running under a fresh lease; the epoch is the new fencing token."""
    check_transition(job.status, JobStatus.RUNNING)
    return replace(
        job,
        status=JobStatus.RUNNING,
        worker_id=worker_id,
        session_id=session_id,
        lease_epoch=job.lease_epoch + 1,
        lease_expires_at=now + ttl,
        progress="",
        updated_at=now,
    )


def check_lease(job: Job, *, epoch: int) -> None:
    """Raise `StaleLease` unless ``epoch`` is the running job's current lease."""
    if job.status is not JobStatus.RUNNING or job.lease_epoch != epoch:
        raise StaleLease(
            f"job {job.id} is {job.status} at lease epoch {job.lease_epoch}; epoch {epoch} is stale"
        )


def is_recorded_outcome(job: Job, *, epoch: int, status: JobStatus) -> bool:
    """Whether this exact outcome was already recorded (a replay that must change nothing)."""
    return job.lease_epoch == epoch and job.status == status and status in OUTCOME_STATUSES


def finish(job: Job, *, epoch: int, status: JobStatus, result: JobResult, now: datetime) -> Job:
    """Record an attempt's outcome. A retryable failure with attempts left goes back to the queue."""
    check_lease(job, epoch=epoch)
    if status not in OUTCOME_STATUSES:
        raise InvalidTransition(f"{status} is not an outcome; use done, failed or blocked")
    if status is JobStatus.FAILED and result.retryable and job.attempt < job.max_attempts:
        return replace(requeue(job, now=now), result=result)
    check_transition(job.status, status)
    return replace(
        job,
        status=status,
        result=result,
        lease_expires_at=None,
        finished_at=None if status is JobStatus.BLOCKED else now,
        updated_at=now,
    )


def requeue(job: Job, *, now: datetime, reason: str = "requeued") -> Job:
    """Return a running job to the queue as its next attempt, or fail it when none are left."""
    check_transition(job.status, JobStatus.PENDING)
    if job.attempt >= job.max_attempts:
        return replace(
            job,
            status=JobStatus.FAILED,
            lease_expires_at=None,
            session_id="",
            finished_at=now,
            updated_at=now,
            result=JobResult(
                error_code=reason,
                error_message=f"gave up after {job.attempt} attempt(s): {reason}",
            ),
        )
    return replace(
        job,
        status=JobStatus.PENDING,
        attempt=job.attempt + 1,
        lease_expires_at=None,
        session_id="",
        updated_at=now,
    )


def release(job: Job, *, epoch: int, now: datetime) -> Job:
    """Hand a job back without using up an attempt (the worker never ran it, or stopped cleanly)."""
    check_lease(job, epoch=epoch)
    return replace(
        job, status=JobStatus.PENDING, lease_expires_at=None, session_id="", progress="", updated_at=now
    )


def cancel(job: Job, *, now: datetime) -> Job:
    """Cancel a job that has not finished."""
    check_transition(job.status, JobStatus.CANCELLED)
    return replace(job, status=JobStatus.CANCELLED, lease_expires_at=None, finished_at=now, updated_at=now)


def require(job: Job | None, job_id: str) -> Job:
    """Return ``job`` or raise `NotFound`."""
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job
