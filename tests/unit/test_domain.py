"""The job lifecycle as plain table-driven cases: no fixtures, no I/O."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from control_plane.domain import jobs
from control_plane.domain.jobs import Job, JobResult, JobStatus
from control_plane.errors import InvalidTransition, StaleLease

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TTL = timedelta(minutes=15)
S = JobStatus


def pending(**kw: object) -> Job:
    return replace(
        Job(id="job_1", workspace_id="ws", type="noop", status=S.PENDING, created_at=T0, updated_at=T0), **kw
    )  # type: ignore[arg-type]


def running(epoch: int = 1, attempt: int = 1, max_attempts: int = 3) -> Job:
    job = pending(lease_epoch=epoch - 1, attempt=attempt, max_attempts=max_attempts)
    return jobs.assign(job, worker_id="w", session_id="s", now=T0, ttl=TTL)


@pytest.mark.parametrize(
    ("source", "target", "allowed"),
    [
        (S.PENDING, S.RUNNING, True),
        (S.PENDING, S.CANCELLED, True),
        (S.PENDING, S.DONE, False),
        (S.PENDING, S.BLOCKED, False),
        (S.RUNNING, S.DONE, True),
        (S.RUNNING, S.FAILED, True),
        (S.RUNNING, S.BLOCKED, True),
        (S.RUNNING, S.PENDING, True),
        (S.RUNNING, S.CANCELLED, True),
        (S.BLOCKED, S.PENDING, True),
        (S.BLOCKED, S.CANCELLED, True),
        (S.BLOCKED, S.DONE, False),
        (S.DONE, S.PENDING, False),
        (S.DONE, S.CANCELLED, False),
        (S.FAILED, S.RUNNING, False),
        (S.CANCELLED, S.PENDING, False),
    ],
)
def test_transition_table(source: JobStatus, target: JobStatus, allowed: bool) -> None:
    assert jobs.can_transition(source, target) is allowed


def test_assign_mints_the_next_epoch_and_a_lease() -> None:
    job = running(epoch=4)
    assert (job.status, job.lease_epoch, job.worker_id, job.session_id) == (S.RUNNING, 4, "w", "s")
    assert job.lease_expires_at == T0 + TTL


@pytest.mark.parametrize("status", [S.DONE, S.FAILED, S.BLOCKED])
def test_finish_with_the_current_epoch(status: JobStatus) -> None:
    done = jobs.finish(running(), epoch=1, status=status, result=JobResult(summary="x"), now=T0)
    assert done.status is status
    assert done.lease_expires_at is None
    assert (done.finished_at is None) is (status is S.BLOCKED)


@pytest.mark.parametrize("epoch", [0, 2, 99])
def test_finish_with_a_stale_epoch_is_rejected(epoch: int) -> None:
    with pytest.raises(StaleLease):
        jobs.finish(running(epoch=1), epoch=epoch, status=S.DONE, result=JobResult(), now=T0)


def test_finish_of_a_job_that_is_not_running_is_stale() -> None:
    done = jobs.finish(running(), epoch=1, status=S.DONE, result=JobResult(), now=T0)
    with pytest.raises(StaleLease):
        jobs.finish(done, epoch=1, status=S.FAILED, result=JobResult(), now=T0)
    assert jobs.is_recorded_outcome(done, epoch=1, status=S.DONE)
    assert not jobs.is_recorded_outcome(done, epoch=1, status=S.FAILED)


def test_an_outcome_must_be_done_failed_or_blocked() -> None:
    with pytest.raises(InvalidTransition):
        jobs.finish(running(), epoch=1, status=S.PENDING, result=JobResult(), now=T0)


@pytest.mark.parametrize(
    ("attempt", "max_attempts", "expected_status", "expected_attempt"),
    [(1, 3, S.PENDING, 2), (2, 3, S.PENDING, 3), (3, 3, S.FAILED, 3), (1, 1, S.FAILED, 1)],
)
def test_requeue_bumps_the_attempt_until_none_are_left(
    attempt: int, max_attempts: int, expected_status: JobStatus, expected_attempt: int
) -> None:
    after = jobs.requeue(running(attempt=attempt, max_attempts=max_attempts), now=T0, reason="lease_expired")
    assert (after.status, after.attempt) == (expected_status, expected_attempt)
    assert after.session_id == ""
    if expected_status is S.FAILED:
        assert after.result is not None and after.result.error_code == "lease_expired"


def test_retryable_failure_requeues_while_attempts_remain() -> None:
    failed = JobResult(error_code="x", retryable=True)
    again = jobs.finish(running(attempt=1), epoch=1, status=S.FAILED, result=failed, now=T0)
    assert (again.status, again.attempt) == (S.PENDING, 2)
    final = jobs.finish(running(attempt=3), epoch=1, status=S.FAILED, result=failed, now=T0)
    assert final.status is S.FAILED


def test_release_keeps_the_attempt_and_needs_the_current_epoch() -> None:
    released = jobs.release(running(epoch=2, attempt=2), epoch=2, now=T0)
    assert (released.status, released.attempt, released.lease_epoch) == (S.PENDING, 2, 2)
    with pytest.raises(StaleLease):
        jobs.release(running(epoch=2), epoch=1, now=T0)


@pytest.mark.parametrize("status", [S.DONE, S.FAILED, S.CANCELLED])
def test_terminal_jobs_cannot_be_cancelled(status: JobStatus) -> None:
    with pytest.raises(InvalidTransition):
        jobs.cancel(pending(status=status), now=T0)


def test_reassignment_fences_the_previous_attempt() -> None:
    first = running(epoch=1)
    second = jobs.assign(jobs.requeue(first, now=T0), worker_id="w2", session_id="s2", now=T0, ttl=TTL)
    assert second.lease_epoch == 2
    with pytest.raises(StaleLease):
        jobs.finish(second, epoch=1, status=S.DONE, result=JobResult(), now=T0)
