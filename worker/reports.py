"""What a worker reports about a job: its result as the wire's `JobResult`, and which job a report
frame (an outcome or a release) is about."""

from __future__ import annotations

import json
import logging

from ias.v1 import job_pb2
from ias.v1 import worker_service_pb2 as wpb

from worker.handlers import HandlerResult, JobContext, JobFailed, missing_checkout

log = logging.getLogger("worker.daemon")  # job lines belong with the daemon's own

SUMMARY_CHARS = 400
CHANGED_PATHS = 500


def result_pb(result: HandlerResult) -> job_pb2.JobResult:
    return job_pb2.JobResult(
        summary=result.summary[:SUMMARY_CHARS],
        commit_sha=result.commit_sha,
        branch=result.branch,
        changed_paths=list(result.changed_paths[:CHANGED_PATHS]),
        changed_paths_truncated=len(result.changed_paths) > CHANGED_PATHS,
        pr_url=result.pr_url,
        counts=dict(result.counts),
        metadata_json=json.dumps(dict(result.metadata)) if result.metadata else "",
    )


def failed_pb(failure: JobFailed) -> job_pb2.JobResult:
    return job_pb2.JobResult(
        summary=failure.message[:SUMMARY_CHARS],
        error_code=failure.code,
        error_message=failure.message,
        retryable=failure.retryable,
    )


def crashed_pb(ctx: JobContext, exc: Exception) -> job_pb2.JobResult:
    """The result of a handler that raised something other than `JobFailed` (call in `except`)."""
    extra = {"job_id": ctx.job_id, "attempt": ctx.attempt, "lease_epoch": ctx.lease_epoch}
    missing = missing_checkout(ctx)
    if missing is not None:
        # The checkout was deleted under the job: the error is a symptom of that, not a handler bug.
        log.warning(
            "%s (the job then failed with %s: %s)", missing.message, type(exc).__name__, exc, extra=extra
        )
        return failed_pb(missing)
    log.exception("job handler crashed", extra=extra)
    return job_pb2.JobResult(
        summary=f"{type(exc).__name__}: {exc}"[:SUMMARY_CHARS],
        error_code="handler_error",
        error_message=f"{type(exc).__name__}: {exc}",
        retryable=True,
    )


def frame_job(frame: wpb.ConnectRequest) -> str:
    return frame.outcome.job_id if frame.HasField("outcome") else frame.release.job_id


def frame_epoch(frame: wpb.ConnectRequest) -> int:
    return frame.outcome.lease_epoch if frame.HasField("outcome") else frame.release.lease_epoch
