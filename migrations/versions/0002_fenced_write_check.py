"""PostgreSQL: ias_fence, which aborts a statement whose fenced writes did not all land

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 16:05:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQL has no way to abort a statement; a function can. The error is a serialization failure
# (SQLSTATE 40001): the rows changed between the read and the fenced write, so decide again.
_CREATE = """
CREATE OR REPLACE FUNCTION ias_fence(expected bigint, written bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    IF written <> expected THEN
        RAISE EXCEPTION 'ias: % of % fenced writes found their row changed', expected - written, expected
            USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN written;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_CREATE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS ias_fence(bigint, bigint)")
