"""The one place where protobuf fields are copied to and from domain values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from ias.v1 import event_pb2, job_pb2

from control_plane.domain.jobs import Job, JobResult, JobStatus
from control_plane.domain.workers import Event, EventKind, Worker, WorkerStatus
from control_plane.errors import InvalidArgument

MAX_CHANGED_PATHS: Final = 500
MAX_SUMMARY: Final = 400
MAX_TEXT: Final = 4000

_STATUS_TO_PB: Final = {
    JobStatus.PENDING: job_pb2.JOB_STATUS_PENDING,
    JobStatus.RUNNING: job_pb2.JOB_STATUS_RUNNING,
    JobStatus.DONE: job_pb2.JOB_STATUS_DONE,
    JobStatus.FAILED: job_pb2.JOB_STATUS_FAILED,
    JobStatus.BLOCKED: job_pb2.JOB_STATUS_BLOCKED,
    JobStatus.CANCELLED: job_pb2.JOB_STATUS_CANCELLED,
}
_STATUS_FROM_PB: Final = {v: k for k, v in _STATUS_TO_PB.items()}
_WORKER_STATUS_TO_PB: Final = {
    WorkerStatus.ONLINE: job_pb2.WORKER_STATUS_ONLINE,
    WorkerStatus.DRAINING: job_pb2.WORKER_STATUS_DRAINING,
    WorkerStatus.OFFLINE: job_pb2.WORKER_STATUS_OFFLINE,
}
_KIND_TO_PB: Final = {
    EventKind.JOB_SUBMITTED: event_pb2.EVENT_KIND_JOB_SUBMITTED,
    EventKind.JOB_ASSIGNED: event_pb2.EVENT_KIND_JOB_ASSIGNED,
    EventKind.JOB_PROGRESS: event_pb2.EVENT_KIND_JOB_PROGRESS,
    EventKind.JOB_FINISHED: event_pb2.EVENT_KIND_JOB_FINISHED,
    EventKind.JOB_REQUEUED: event_pb2.EVENT_KIND_JOB_REQUEUED,
    EventKind.JOB_CANCELLED: event_pb2.EVENT_KIND_JOB_CANCELLED,
    EventKind.WORKER_CONNECTED: event_pb2.EVENT_KIND_WORKER_CONNECTED,
    EventKind.WORKER_DISCONNECTED: event_pb2.EVENT_KIND_WORKER_DISCONNECTED,
}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime) -> Timestamp:
    """``value`` (naive: UTC) as a Timestamp; what ``Timestamp.FromDatetime`` gives, in a third of
    its time (every job frame carries two to four)."""
    since = (value if value.tzinfo is not None else value.replace(tzinfo=UTC)) - _EPOCH
    return Timestamp(seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000)


def unix_timestamp(seconds: float) -> Timestamp:
    """A ``time.time()`` reading as a Timestamp."""
    whole = int(seconds)
    return Timestamp(seconds=whole, nanos=int((seconds - whole) * 1e9))


def duration(value: timedelta) -> Duration:
    """``value`` (negative: zero) as a Duration."""
    value = max(value, timedelta(0))
    return Duration(seconds=value.days * 86_400 + value.seconds, nanos=value.microseconds * 1000)


def status_to_pb(status: JobStatus) -> job_pb2.JobStatus.ValueType:
    return _STATUS_TO_PB[status]


def status_from_pb(value: int, *, field: str, allow_unspecified: bool = False) -> JobStatus | None:
    if value == job_pb2.JOB_STATUS_UNSPECIFIED and allow_unspecified:
        return None
    try:
        return _STATUS_FROM_PB[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument(field, f"unknown job status {value}") from None


def result_to_pb(result: JobResult) -> job_pb2.JobResult:
    return job_pb2.JobResult(
        summary=result.summary,
        commit_sha=result.commit_sha,
        branch=result.branch,
        changed_paths=list(result.changed_paths),
        changed_paths_truncated=result.changed_paths_truncated,
        pr_url=result.pr_url,
        counts=dict(result.counts),
        error_code=result.error_code,
        error_message=result.error_message,
        retryable=result.retryable,
        duration_ms=result.duration_ms,
        metadata_json=result.metadata_json,
        decision_request_id=result.decision_request_id,
    )


def result_from_pb(pb: job_pb2.JobResult) -> JobResult:
    """Copy a reported result, cutting it to the stored limits."""
    paths = list(pb.changed_paths)
    for name, value in (
        ("commit_sha", pb.commit_sha),
        ("branch", pb.branch),
        ("pr_url", pb.pr_url),
        ("error_code", pb.error_code),
        ("decision_request_id", pb.decision_request_id),
    ):
        if len(value) > 500:
            raise InvalidArgument(f"outcome.result.{name}", "must be at most 500 characters")
    if len(pb.metadata_json) > 64 * 1024:
        raise InvalidArgument("outcome.result.metadata_json", "must be at most 64 KiB")
    return JobResult(
        summary=pb.summary[:MAX_SUMMARY],
        commit_sha=pb.commit_sha,
        branch=pb.branch,
        changed_paths=tuple(p[:1000] for p in paths[:MAX_CHANGED_PATHS]),
        changed_paths_truncated=pb.changed_paths_truncated or len(paths) > MAX_CHANGED_PATHS,
        pr_url=pb.pr_url,
        counts={k[:100]: v for k, v in list(pb.counts.items())[:100]},
        error_code=pb.error_code,
        error_message=pb.error_message[:MAX_TEXT],
        retryable=pb.retryable,
        duration_ms=max(pb.duration_ms, 0),
        metadata_json=pb.metadata_json,
        decision_request_id=pb.decision_request_id,
    )


def job_to_pb(job: Job) -> job_pb2.Job:
    pb = job_pb2.Job(
        id=job.id,
        workspace_id=job.workspace_id,
        type=job.type,
        repo_id=job.repo_id,
        payload_json=job.payload_json,
        status=status_to_pb(job.status),
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        lease_epoch=job.lease_epoch,
        worker_id=job.worker_id,
        created_at=timestamp(job.created_at),
        updated_at=timestamp(job.updated_at),
        priority=job.priority,
        progress=job.progress,
        run_id=job.run_id,
    )
    if job.lease_expires_at is not None:
        pb.lease_expires_at.CopyFrom(timestamp(job.lease_expires_at))
    if job.finished_at is not None:
        pb.finished_at.CopyFrom(timestamp(job.finished_at))
    if job.result is not None:
        pb.result.CopyFrom(result_to_pb(job.result))
    return pb


def worker_to_pb(worker: Worker) -> job_pb2.Worker:
    pb = job_pb2.Worker(
        id=worker.id,
        workspace_id=worker.workspace_id,
        name=worker.name,
        status=_WORKER_STATUS_TO_PB[worker.status],
        capabilities=list(worker.capabilities),
        repo_ids=list(worker.repo_ids),
        slots=worker.slots,
        running=worker.running,
        version=worker.version,
        session_id=worker.session_id,
    )
    if worker.connected_at is not None:
        pb.connected_at.CopyFrom(timestamp(worker.connected_at))
    if worker.disconnected_at is not None:
        pb.disconnected_at.CopyFrom(timestamp(worker.disconnected_at))
    return pb


def event_to_pb(event: Event) -> event_pb2.Event:
    pb = event_pb2.Event(
        seq=event.seq,
        workspace_id=event.workspace_id,
        kind=_KIND_TO_PB[event.kind],
        occurred_at=timestamp(event.occurred_at),
        reason=event.reason,
    )
    if event.committed_at:
        pb.committed_at.CopyFrom(unix_timestamp(event.committed_at))
    if event.job is not None:
        pb.job.CopyFrom(job_to_pb(event.job))
    if event.worker is not None:
        pb.worker.CopyFrom(worker_to_pb(event.worker))
    return pb
