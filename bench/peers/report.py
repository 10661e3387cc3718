"""The peer comparison section: each peer's figures next to IAS's from the same run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.peers import PeerResult


@dataclass(frozen=True, slots=True)
class Line:
    """One system's figures on the peer workload."""

    title: str
    p50: float | None
    p99: float | None
    jobs_per_s: float | None
    exactly_once: str
    note: str = ""


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _ratio(ours: float | None, theirs: float | None) -> str:
    return "—" if ours is None or not theirs else f"{ours / theirs:.2f}"


def peer_lines(peers: Sequence[PeerResult]) -> list[Line]:
    lines = []
    for p in peers:
        f = p.figures
        if f is None:
            note = f"SKIPPED: {p.skipped}" if p.skipped else f"FAILED: {p.error.splitlines()[0]}"
            lines.append(Line(p.title, None, None, None, "—", note))
        else:
            ran = f"{f.verified}/{f.jobs}"
            lines.append(Line(p.title, f.latency_ms.p50, f.latency_ms.p99, f.jobs_per_s, ran))
    return lines


def section(ours: Sequence[Line], peers: Sequence[PeerResult], reference: Line | None) -> str:
    """Markdown: one row per system; the ratios compare the reference IAS line with each peer."""
    ref = reference.title if reference else "IAS"
    rows = [
        "## Peers on the same workload",
        "",
        f"Ratios are {ref} ÷ peer: a latency ratio below 1 and a throughput ratio above 1 favour IAS.",
        "",
        "| system | latency p50 (ms) | latency p99 (ms) | throughput (jobs/s) | ran exactly once "
        "| p50 ratio | p99 ratio | throughput ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for line in [*ours, *peer_lines(peers)]:
        ratios = ["—", "—", "—"]
        if reference is not None and line not in ours:
            ratios = [
                _ratio(reference.p50, line.p50),
                _ratio(reference.p99, line.p99),
                _ratio(reference.jobs_per_s, line.jobs_per_s),
            ]
        figures = [_fmt(line.p50, ".2f"), _fmt(line.p99, ".2f"), _fmt(line.jobs_per_s, ".1f")]
        rows.append(f"| {line.title} | {' | '.join(figures)} | {line.exactly_once} | {' | '.join(ratios)} |")
    notes = [f"**{line.title}: {line.note}**" for line in peer_lines(peers) if line.note]
    return "\n".join([*rows, "", *notes, "", PEER_METHOD])


PEER_METHOD = """\
Peer method: the same no-op job (enqueue → a worker starts it → done), warm-up jobs first (not
measured), then latency jobs at the first offered rate, one enqueue per job, open loop; then the
throughput jobs enqueued by 8 concurrent enqueuers, one job per call (IAS: 8 submitters on one
`SubmitJobs` stream, each awaiting its job's commit, as a peer's 8 share a pool). Latency = the task body's
`time.time()` minus `time.time()` taken just before the enqueue call, so the insert and its commit
are included; IAS's rows here are its latency "from creation", timed the same way. Throughput =
jobs / (first enqueue → the peer's own bookkeeping shows none pending: PgQueuer's queue table
empty, Procrastinate's jobs all `succeeded`; Celery, with no result backend, when every task body
has run). Every job's body must have run exactly once ("ran exactly once" counts the throughput
jobs for IAS, and every job of the run for a peer).
PgQueuer and Procrastinate each get a fresh PostgreSQL database (dropped afterwards) and one worker
process with their default settings (Procrastinate with concurrency 20, as IAS has 20 one-slot
workers); Celery gets an empty Redis database number (flushed afterwards) and a prefork worker with
2 processes. Peers and IAS run one after the other on the same machine in the same run.
"""
