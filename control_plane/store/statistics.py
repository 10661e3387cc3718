"""PostgreSQL's planner statistics for the jobs table, kept current while the table grows.

The statements every job takes are prepared once per connection, and after a few executions
PostgreSQL keeps a generic plan for each, built from the table's statistics at that moment. On a
new database the jobs table has none and a few pages, so those plans scan it whole: the fenced
update of `store.pg_direct` hashes every row of ``jobs`` to find the one or two it updates, the
read of named jobs filters every row. The plans stay cached until the table is analyzed again,
which autovacuum does only once the table changed by a tenth and its next round comes (a minute
apart by default). Until then each statement reads more rows than the last: in a throughput run of
20,000 jobs, 2,500 rows per scan on average; analyzing the table mid-run cut PostgreSQL's CPU by a
third. The direct connections keep one generic plan per statement (see store.db), so the
analysis is also what replaces those plans as the table grows.

So a replica counts the jobs it stores and analyzes the table itself each time that count
reaches the table's size at its last analysis (at least `MIN_GROWTH` rows): a handful of times
while a table grows from empty to millions, and never for a table that grows slowly, which
autovacuum keeps current. An analysis replaces the cached plans; each takes a few milliseconds
(PostgreSQL samples at most 30,000 rows).
"""

from __future__ import annotations

import logging
from typing import Final

import asyncpg

log = logging.getLogger(__name__)

MIN_GROWTH: Final = 500  # rows; below this a scan costs less than the analysis
TABLE: Final = "jobs"
LOCK_TIMEOUT_MS: Final = 200


class Statistics:
    """Counts the jobs this replica stores; `refresh` analyzes the table when they are due."""

    def __init__(self) -> None:
        self._added = 0
        self._known: float | None = None  # rows at the last analysis; None: not read yet

    def added(self, rows: int) -> None:
        self._added += rows

    @property
    def due(self) -> bool:
        return self._added >= max(MIN_GROWTH, self._known or 0)

    async def refresh(self, conn: asyncpg.Connection) -> bool:
        """Analyze the table if this replica added as many rows as it held; True if it did."""
        if not self.due:
            return False
        try:
            if self._known is None:
                # Once, when the first rows are due: a replica that starts on a large table
                # leaves it to autovacuum until it has added as many rows itself.
                self._known = await _rows(conn)
                if not self.due:
                    return False
            added, self._added = self._added, 0  # whatever happens next: count again from here
            async with conn.transaction():
                # Autovacuum may be analyzing it now; then that analysis will do.
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_MS}ms'; ANALYZE {TABLE}")
            self._known = await _rows(conn)
        except asyncpg.LockNotAvailableError:
            log.debug("%s is being analyzed or vacuumed already; not analyzing it again", TABLE)
            return False
        except asyncpg.PostgresError as exc:
            log.warning("could not analyze %s (planner statistics stay as they are): %s", TABLE, exc)
            self._added = 0
            return False
        log.debug(
            "analyzed %s: %d rows added since the last analysis, %.0f rows now", TABLE, added, self._known
        )
        return True


async def _rows(conn: asyncpg.Connection) -> float:
    """The planner's row count of the table (reltuples is -1 for a table never analyzed)."""
    return max(float(await conn.fetchval(_ROWS, TABLE)), 0.0)


_ROWS: Final = "SELECT reltuples FROM pg_class WHERE oid = $1::regclass"
