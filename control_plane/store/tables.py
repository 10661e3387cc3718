"""SQLModel tables. Runtime annotations on purpose: SQLModel reads them to build columns."""

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Column, Index, MetaData, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel

from control_plane.domain.jobs import JobStatus

# Stable constraint names so Alembic migrations are identical on SQLite and PostgreSQL.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata: MetaData = SQLModel.metadata


class WorkspaceRow(SQLModel, table=True):
    """A tenant. ``event_seq`` is the last sequence number handed out in its event log."""

    __tablename__ = "workspaces"

    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(default="", max_length=200)
    event_seq: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    created_at: datetime


class WorkerRow(SQLModel, table=True):
    """A worker daemon, one row per (workspace, name); the live session lives in memory."""

    __tablename__ = "workers"
    __table_args__ = (UniqueConstraint("workspace_id", "name"),)

    id: str = Field(primary_key=True, max_length=64)
    workspace_id: str = Field(max_length=64)
    name: str = Field(max_length=200)
    status: str = Field(max_length=16)
    capabilities: str = Field(default="[]", sa_column=Column(Text, nullable=False, default="[]"))
    repo_ids: str = Field(default="[]", sa_column=Column(Text, nullable=False, default="[]"))
    slots: int = 1
    version: str = Field(default="", max_length=64)
    session_id: str = Field(default="", max_length=64, index=True)
    replica_id: str = Field(default="", max_length=64)
    connected_at: datetime | None = None
    disconnected_at: datetime | None = None


def _where(condition: str) -> dict[str, Any]:
    return {"postgresql_where": text(condition), "sqlite_where": text(condition)}


_PENDING = f"status = '{JobStatus.PENDING.value}'"
_RUNNING = f"status = '{JobStatus.RUNNING.value}'"


class JobRow(SQLModel, table=True):
    """A job and its current lease. ``lease_epoch`` is the fencing token."""

    __tablename__ = "jobs"
    # Partial indexes: a job is in each only while it is in the state the index serves, so a
    # finished job is left with its primary key alone and the claim's index stays as small as the
    # queue. Queries name the status as a literal (`store.jobs`) for the planner to match them.
    __table_args__ = (
        # The claim: pending jobs of a workspace in priority order.
        Index("ix_jobs_pending", "workspace_id", "priority", "id", **_where(_PENDING)),
        # Running jobs by holder (sessions, sweeps of lost workers) and by lease expiry.
        Index("ix_jobs_running", "worker_id", "session_id", **_where(_RUNNING)),
        Index("ix_jobs_lease", "lease_expires_at", **_where(_RUNNING)),
        Index(
            "uq_jobs_idempotency_key",
            "workspace_id",
            "idempotency_key",
            unique=True,
            **_where("idempotency_key IS NOT NULL"),
        ),
    )

    id: str = Field(primary_key=True, max_length=64)
    workspace_id: str = Field(max_length=64)
    type: str = Field(max_length=64)
    repo_id: str = Field(default="", max_length=128)
    payload_json: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))
    status: str = Field(max_length=16)
    priority: int = 50
    attempt: int = 1
    max_attempts: int = 3
    lease_epoch: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    worker_id: str = Field(default="", max_length=64)
    session_id: str = Field(default="", max_length=64)
    lease_expires_at: datetime | None = None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    progress: str = Field(default="", max_length=500)
    result_json: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    run_id: str = Field(default="", max_length=64)
    idempotency_key: str | None = Field(default=None, max_length=200)


class EventRow(SQLModel, table=True):
    """One entry of a workspace's append-only event log."""

    __tablename__ = "events"

    workspace_id: str = Field(primary_key=True, max_length=64)
    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    kind: str = Field(max_length=32)
    job_id: str = Field(default="", max_length=64)
    worker_id: str = Field(default="", max_length=64)
    reason: str = Field(default="", max_length=200)
    data: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))
    occurred_at: datetime


class ReplicaRow(SQLModel, table=True):
    """A running control-plane replica; a replica not seen for the reconnect grace is dead."""

    __tablename__ = "replicas"

    id: str = Field(primary_key=True, max_length=64)
    started_at: datetime
    last_seen_at: datetime


class SigningKeyRow(SQLModel, table=True):
    """A token-signing key; kept in the database so every replica verifies every token."""

    __tablename__ = "signing_keys"

    id: str = Field(primary_key=True, max_length=64)
    secret: str = Field(max_length=200)
    created_at: datetime
