"""Jobs: partial indexes, so a finished job leaves every index but the primary key

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 04:40:00.000000

A job is written three times (submitted, leased, finished), and each write of a changed status
added an entry to every index of the table: fifteen index entries per job, and a claim index that
grew with every job ever run. Now the claim index holds only pending jobs, the lease and holder
indexes only running ones, and the idempotency index only jobs submitted with a key: six entries
per job, and indexes as small as the live queue.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _where(condition: str) -> dict[str, object]:
    return {"postgresql_where": sa.text(condition), "sqlite_where": sa.text(condition)}


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_claim")
        batch_op.drop_index("ix_jobs_lease")
        batch_op.drop_index("ix_jobs_session_id")
        batch_op.drop_constraint("uq_jobs_workspace_id", type_="unique")
    op.create_index(
        "ix_jobs_pending", "jobs", ["workspace_id", "priority", "id"], **_where("status = 'pending'")
    )
    op.create_index("ix_jobs_running", "jobs", ["worker_id", "session_id"], **_where("status = 'running'"))
    op.create_index("ix_jobs_lease", "jobs", ["lease_expires_at"], **_where("status = 'running'"))
    op.create_index(
        "uq_jobs_idempotency_key",
        "jobs",
        ["workspace_id", "idempotency_key"],
        unique=True,
        **_where("idempotency_key IS NOT NULL"),
    )


def downgrade() -> None:
    for name in ("uq_jobs_idempotency_key", "ix_jobs_lease", "ix_jobs_running", "ix_jobs_pending"):
        op.drop_index(name, table_name="jobs")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_unique_constraint("uq_jobs_workspace_id", ["workspace_id", "idempotency_key"])
        batch_op.create_index("ix_jobs_claim", ["workspace_id", "status", "priority", "id"], unique=False)
        batch_op.create_index("ix_jobs_lease", ["status", "lease_expires_at"], unique=False)
        batch_op.create_index("ix_jobs_session_id", ["session_id"], unique=False)
