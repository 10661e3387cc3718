"""Rows to domain values and back; the JSON shapes stored in text columns.

JSON goes through orjson: an event's job snapshot is encoded for every change of every job, and
the standard library's encoder took a tenth of the server's time at full load. orjson writes an
aware datetime as ISO 8601 with its offset, as `datetime.isoformat` does, and UTF-8 where the
standard library would write ``\\u`` escapes; both read back the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from datetime import datetime
from typing import Any

import orjson

from control_plane.domain.jobs import Job, JobResult, JobStatus
from control_plane.domain.workers import Event, EventKind, Worker, WorkerStatus

_RESULT_FIELDS = tuple(f.name for f in fields(JobResult))


def result_to_json(result: JobResult | None) -> str:
    if result is None:
        return ""
    # Field by field, not dataclasses.asdict (a deep copy): this runs twice per job written.
    data: dict[str, Any] = {}
    for name in _RESULT_FIELDS:
        value = getattr(result, name)
        if value:
            data[name] = value
    if result.changed_paths:
        data["changed_paths"] = list(result.changed_paths)
    if result.counts:
        data["counts"] = dict(result.counts)
    return orjson.dumps(data).decode()


def result_from_json(text: str) -> JobResult | None:
    if not text:
        return None
    data = orjson.loads(text)
    data["changed_paths"] = tuple(data.get("changed_paths", ()))
    return JobResult(**data)


def job_from_row(row: Mapping[Any, Any]) -> Job:
    return Job(
        id=row["id"],
        workspace_id=row["workspace_id"],
        type=row["type"],
        status=JobStatus(row["status"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        repo_id=row["repo_id"],
        payload_json=row["payload_json"],
        priority=row["priority"],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        lease_epoch=row["lease_epoch"],
        worker_id=row["worker_id"],
        session_id=row["session_id"],
        lease_expires_at=row["lease_expires_at"],
        finished_at=row["finished_at"],
        progress=row["progress"],
        result=result_from_json(row["result_json"]),
        run_id=row["run_id"],
        idempotency_key=row["idempotency_key"] or "",
    )


def job_to_row(job: Job) -> dict[str, Any]:
    row = _job_snapshot(job)
    row["payload_json"] = job.payload_json
    return row


def worker_from_row(row: Mapping[Any, Any], *, running: int = 0) -> Worker:
    return Worker(
        id=row["id"],
        workspace_id=row["workspace_id"],
        name=row["name"],
        status=WorkerStatus(row["status"]),
        capabilities=tuple(orjson.loads(row["capabilities"])),
        repo_ids=tuple(orjson.loads(row["repo_ids"])),
        slots=row["slots"],
        running=running,
        version=row["version"],
        session_id=row["session_id"],
        connected_at=row["connected_at"],
        disconnected_at=row["disconnected_at"],
    )


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# Event snapshots leave out the payload: a Watch subscriber needs state, not input. The row's
# other columns, with datetimes as they are: orjson writes them as `_iso` would.
def _job_snapshot(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "workspace_id": job.workspace_id,
        "type": job.type,
        "repo_id": job.repo_id,
        "status": job.status.value,
        "priority": job.priority,
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "lease_epoch": job.lease_epoch,
        "worker_id": job.worker_id,
        "session_id": job.session_id,
        "lease_expires_at": job.lease_expires_at,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "finished_at": job.finished_at,
        "progress": job.progress[:500],
        "result_json": result_to_json(job.result),
        "run_id": job.run_id,
        "idempotency_key": job.idempotency_key or None,
    }


def _job_from_snapshot(data: dict[str, Any]) -> Job:
    row = dict(data, payload_json="")
    for key in ("lease_expires_at", "created_at", "updated_at", "finished_at"):
        row[key] = _dt(row[key])
    return job_from_row(row)


def _worker_snapshot(worker: Worker) -> dict[str, Any]:
    data = asdict(worker)
    data["connected_at"] = _iso(worker.connected_at)
    data["disconnected_at"] = _iso(worker.disconnected_at)
    return data


def _worker_from_snapshot(data: dict[str, Any]) -> Worker:
    return Worker(
        **dict(
            data,
            status=WorkerStatus(data["status"]),
            capabilities=tuple(data["capabilities"]),
            repo_ids=tuple(data["repo_ids"]),
            connected_at=_dt(data["connected_at"]),
            disconnected_at=_dt(data["disconnected_at"]),
        )
    )


def event_data(job: Job | None, worker: Worker | None) -> str:
    data: dict[str, Any] = {}
    if job is not None:
        data["job"] = _job_snapshot(job)
    if worker is not None:
        data["worker"] = _worker_snapshot(worker)
    return orjson.dumps(data).decode()


def event_from_row(row: Mapping[Any, Any]) -> Event:
    data = orjson.loads(row["data"])
    return Event(
        seq=row["seq"],
        workspace_id=row["workspace_id"],
        kind=EventKind(row["kind"]),
        occurred_at=row["occurred_at"],
        job=_job_from_snapshot(data["job"]) if "job" in data else None,
        worker=_worker_from_snapshot(data["worker"]) if "worker" in data else None,
        reason=row["reason"],
    )
