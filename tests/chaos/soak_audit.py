"""The soak's audit: what the database and the event log say after the chaos, and the summary table."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from chaos_support import assert_gap_free, finished_per_job
from ias.v1 import event_pb2
from sqlalchemy import func, select

from control_plane.store.db import Database
from control_plane.store.tables import JobRow, WorkerRow, WorkspaceRow

JOBS = JobRow.__table__
WORKERS = WorkerRow.__table__
WORKSPACES = WorkspaceRow.__table__
TERMINAL = ("done", "failed", "blocked", "cancelled")
KNOWN_BUG = "stream broke mid-write: see test_broken_stream.py"


@dataclass
class SoakReport:
    """Everything the soak measured; ``problems()`` lists what breaks a reliability rule."""

    db: str
    seed: int
    planned: Counter[str]
    seconds: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    stored_jobs: int = 0
    requeues: int = 0
    requeue_reasons: Counter[str] = field(default_factory=Counter)
    duplicate_executions: int = 0
    max_attempt: int = 0
    rejected_stale: int = 0
    lost: list[str] = field(default_factory=list)
    double_completions: dict[str, int] = field(default_factory=dict)
    unfinished_events: list[str] = field(default_factory=list)
    failed_out_of_attempts: list[str] = field(default_factory=list)
    failed_otherwise: list[str] = field(default_factory=list)
    stale_running: list[str] = field(default_factory=list)
    seq_problem: str = ""
    events: int = 0
    anomalies: list[str] = field(default_factory=list)
    known_crashes: list[str] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        found = [
            f"{len(self.lost)} lost job(s): {self.lost[:5]}" if self.lost else "",
            f"double completions: {dict(list(self.double_completions.items())[:5])}"
            if self.double_completions
            else "",
            f"terminal without job_finished: {self.unfinished_events[:5]}" if self.unfinished_events else "",
            f"failed before running out of attempts: {self.failed_otherwise[:5]}"
            if self.failed_otherwise
            else "",
            f"stale running jobs: {self.stale_running[:5]}" if self.stale_running else "",
            self.seq_problem,
            f"{self.stored_jobs} jobs stored, {self.planned.total()} planned"
            if self.stored_jobs != self.planned.total()
            else "",
            *self.anomalies,
        ]
        return [p for p in found if p]


async def job_statuses(db: Database) -> Counter[str]:
    async with db.read() as conn:
        rows = (await conn.execute(select(JOBS.c.status, func.count()).group_by(JOBS.c.status))).all()
    return Counter({str(status): int(count) for status, count in rows})


def _aware(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


async def stale_running(db: Database, *, grace: timedelta, slack: timedelta, settled: bool) -> list[str]:
    """Running jobs without a lease, or (once replicas have settled) whose worker is gone or lease lapsed.

    ``settled`` means every replica has been up long enough to have swept; before that a dead
    replica's workers legitimately still look online or keep their jobs.
    """
    query = (
        select(
            JOBS.c.id,
            JOBS.c.worker_id,
            JOBS.c.lease_epoch,
            JOBS.c.lease_expires_at,
            WORKERS.c.id.label("known"),
            WORKERS.c.status.label("worker_status"),
            WORKERS.c.disconnected_at,
        )
        .select_from(JOBS.outerjoin(WORKERS, WORKERS.c.id == JOBS.c.worker_id))
        .where(JOBS.c.status == "running")
    )
    async with db.read() as conn:
        rows = (await conn.execute(query)).mappings().all()
    now, found = datetime.now(UTC), []
    for row in rows:
        expires, gone = _aware(row["lease_expires_at"]), _aware(row["disconnected_at"])
        if not row["worker_id"] or row["lease_epoch"] <= 0 or expires is None or row["known"] is None:
            found.append(f"{row['id']}: running without a lease")
        elif settled and row["worker_status"] == "offline" and gone and now - gone > grace + slack:
            found.append(f"{row['id']}: worker offline for {(now - gone).total_seconds():.1f} s")
        elif settled and now - expires > slack:
            found.append(f"{row['id']}: lease expired {(now - expires).total_seconds():.1f} s ago")
    return found


async def audit_jobs(db: Database, report: SoakReport) -> set[str]:
    """Fill the per-job figures; returns the ids of the terminal jobs."""
    query = select(JOBS.c.id, JOBS.c.status, JOBS.c.attempt, JOBS.c.max_attempts, JOBS.c.result_json)
    async with db.read() as conn:
        rows = (await conn.execute(query)).mappings().all()
    report.stored_jobs = len(rows)
    report.statuses = Counter(r["status"] for r in rows)
    report.duplicate_executions = sum(r["attempt"] > 1 for r in rows)
    report.max_attempt = max((r["attempt"] for r in rows), default=0)
    report.lost = [r["id"] for r in rows if r["status"] not in TERMINAL]
    for r in rows:
        if r["status"] in ("failed", "blocked", "cancelled"):
            error = json.loads(r["result_json"] or "{}").get("error_code", "")
            label = f"{r['id']} {r['status']} at attempt {r['attempt']}/{r['max_attempts']} {error}"
            exhausted = r["status"] == "failed" and r["attempt"] >= r["max_attempts"]
            (report.failed_out_of_attempts if exhausted else report.failed_otherwise).append(label)
    return {r["id"] for r in rows if r["status"] in TERMINAL}


async def audit_events(db: Database, events: list, terminal: set[str], report: SoakReport) -> None:
    report.events = len(events)
    requeued = [e for e in events if e.kind == event_pb2.EVENT_KIND_JOB_REQUEUED]
    report.requeues = len(requeued)
    report.requeue_reasons = Counter(e.reason for e in requeued)
    finished = finished_per_job(events)
    report.double_completions = {job: n for job, n in finished.items() if n > 1}
    report.unfinished_events = sorted(terminal - set(finished))
    try:
        assert_gap_free(events)
    except AssertionError as exc:
        report.seq_problem = str(exc)
    async with db.read() as conn:
        last = (await conn.execute(select(func.max(WORKSPACES.c.event_seq)))).scalar_one()
    if not report.seq_problem and last != len(events):
        report.seq_problem = f"Watch replayed {len(events)} events, the workspace's event_seq is {last}"


def summary_table(report: SoakReport) -> str:
    """The table the soak prints: one metric per line, the ones that must be zero flagged."""
    planned = ", ".join(f"{n} {kind}" for kind, n in sorted(report.planned.items()))
    rows: list[tuple[str, object, str]] = [
        ("jobs planned", report.planned.total(), planned),
        ("jobs stored", report.stored_jobs, ""),
        *((f"  {status}", n, "") for status, n in sorted(report.statuses.items())),
        ("faults injected", report.faults.total(), ""),
        *((f"  {kind}", n, "") for kind, n in sorted(report.faults.items())),
        ("requeues (job_requeued events)", report.requeues, _reasons(report.requeue_reasons)),
        (
            "duplicate executions (attempt > 1)",
            report.duplicate_executions,
            f"max attempt {report.max_attempt}",
        ),
        ("rejected stale reports (worker logs)", report.rejected_stale, ""),
        ("failed, out of attempts", len(report.failed_out_of_attempts), "should be 0"),
        ("failed otherwise / blocked / cancelled", len(report.failed_otherwise), "must be 0"),
        ("lost jobs (not terminal)", len(report.lost), "must be 0"),
        ("double completions (>1 job_finished)", len(report.double_completions), "must be 0"),
        ("terminal without job_finished", len(report.unfinished_events), "must be 0"),
        ("stale running jobs (db check)", len(report.stale_running), "must be 0"),
        ("events, seq gap-free per workspace", report.events, report.seq_problem or "gap-free"),
        ("unexpected process exits", len(report.anomalies), "must be 0"),
        ("worker crashes, known bug (restarted)", len(report.known_crashes), KNOWN_BUG),
    ]
    width = max(len(name) for name, _, _ in rows) + 2
    head = f"IAS chaos soak: db={report.db} seed={report.seed} in {report.seconds:.1f} s"
    lines = [head, f"{'metric':<{width}}{'value':>8}  note", "-" * (width + 40)]
    lines += [f"{name:<{width}}{value!s:>8}  {note}".rstrip() for name, value, note in rows]
    verdict = report.problems()
    lines.append("RESULT: " + ("PASS" if not verdict else "FAIL: " + "; ".join(verdict)))
    return "\n".join(lines)


def _reasons(reasons: Counter[str]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in reasons.most_common())
