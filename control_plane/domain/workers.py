"""Workers and the events of a workspace's log, as plain values."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from control_plane.domain.jobs import Job


class WorkerStatus(StrEnum):
    """A worker's liveness as the control plane sees it."""

    ONLINE = "online"
    DRAINING = "draining"
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class Worker:
    """A daemon known to the control plane."""

    id: str
    workspace_id: str
    name: str
    status: WorkerStatus
    capabilities: tuple[str, ...] = ()
    repo_ids: tuple[str, ...] = ()
    slots: int = 1
    running: int = 0
    version: str = ""
    session_id: str = ""
    connected_at: datetime | None = None
    disconnected_at: datetime | None = None


class EventKind(StrEnum):
    """What an event says changed."""

    JOB_SUBMITTED = "job_submitted"
    JOB_ASSIGNED = "job_assigned"
    JOB_PROGRESS = "job_progress"
    JOB_FINISHED = "job_finished"
    JOB_REQUEUED = "job_requeued"
    JOB_CANCELLED = "job_cancelled"
    WORKER_CONNECTED = "worker_connected"
    WORKER_DISCONNECTED = "worker_disconnected"


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a workspace's append-only log; ``seq`` has no gaps."""

    seq: int
    workspace_id: str
    kind: EventKind
    occurred_at: datetime
    job: Job | None = None
    worker: Worker | None = None
    reason: str = ""
    # When this replica knew the event's transaction had committed (`time.time()`); 0.0 for an
    # event read from the log. Only the live fan-out sets it (`EventHub.publish`).
    committed_at: float = 0.0
