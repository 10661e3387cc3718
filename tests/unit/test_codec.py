"""Rows and event snapshots: what is stored reads back as the same job, whatever it holds."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from control_plane.domain.jobs import Job, JobResult, JobStatus
from control_plane.domain.workers import EventKind
from control_plane.store import codec

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def finished() -> Job:
    return Job(
        id="job_1",
        workspace_id="ws",
        type="run_agent",
        status=JobStatus.DONE,
        created_at=T0,
        updated_at=T0 + timedelta(microseconds=123_456),
        repo_id="repo_1",
        payload_json='{"goal": "ship"}',
        attempt=2,
        lease_epoch=3,
        worker_id="wrk_1",
        session_id="ses_1",
        lease_expires_at=None,
        finished_at=T0 + timedelta(seconds=5),
        progress="réécrit ✓",
        result=JobResult(
            summary="fertig — 3 Dateien",
            changed_paths=("a.py", "b/ç.py"),
            counts={"tests": 4},
            duration_ms=812,
        ),
        run_id="run_1",
        idempotency_key="key-1",
    )


def test_a_row_reads_back_as_the_same_job() -> None:
    job = finished()
    assert codec.job_from_row(codec.job_to_row(job)) == job
    running = replace(job, status=JobStatus.RUNNING, finished_at=None, result=None, idempotency_key="")
    assert codec.job_from_row(codec.job_to_row(running)) == running


def test_an_event_snapshot_reads_back_without_the_payload() -> None:
    job = finished()
    data = codec.event_data(job, None)
    stored = json.loads(data)["job"]
    assert "payload_json" not in stored
    # Datetimes are written as `datetime.isoformat` writes them, so older rows read the same.
    assert stored["updated_at"] == job.updated_at.isoformat()
    assert stored["created_at"] == "2026-01-01T00:00:00+00:00"
    assert stored["lease_expires_at"] is None
    row = {
        "seq": 7,
        "workspace_id": "ws",
        "kind": "job_finished",
        "occurred_at": T0,
        "reason": "",
        "data": data,
    }
    event = codec.event_from_row(row)
    assert event.kind is EventKind.JOB_FINISHED
    assert event.job == replace(job, payload_json="")


def test_a_snapshot_written_by_the_standard_encoder_still_reads() -> None:
    job = finished()
    old = json.dumps(
        {"job": json.loads(codec.event_data(job, None))["job"]}, separators=(",", ":"), ensure_ascii=True
    )
    assert "\\u" in old  # escaped, as rows written before orjson were
    row = {
        "seq": 1,
        "workspace_id": "ws",
        "kind": "job_finished",
        "occurred_at": T0,
        "reason": "",
        "data": old,
    }
    assert codec.event_from_row(row).job == replace(job, payload_json="")
