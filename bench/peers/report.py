"""The peer comparison section: each peer's figures next to IAS's from the same run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.peers import PeerResult


@dataclass(frozen=True, slots=True)
class Line:
    """One system's figures on the peer workload."""

    title: str
    p50: float | None
    p99: float | None
    jobs_per_s: dict[int, float] = field(default_factory=dict)  # by concurrent enqueuers
    exactly_once: str = "—"
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
            lines.append(Line(p.title, None, None, note=note))
        else:
            ran = f"{f.verified}/{f.jobs}"
            lines.append(Line(p.title, f.latency_ms.p50, f.latency_ms.p99, dict(f.jobs_per_s), ran))
    return lines


def section(
    ours: Sequence[Line], peers: Sequence[PeerResult], reference: Line | None, submitters: Sequence[int]
) -> str:
    """Markdown: one row per system, a throughput column for each number of concurrent
    enqueuers; the ratios compare the reference IAS line with each peer."""
    ref = reference.title if reference else "IAS"
    runs = [f"throughput, {n} enqueuers (jobs/s)" for n in submitters]
    ratios = ["p50 ratio", "p99 ratio", *(f"throughput ratio, {n} enqueuers" for n in submitters)]
    rows = [
        "## Peers on the same workload",
        "",
        f"Ratios are {ref} ÷ peer: a latency ratio below 1 and a throughput ratio above 1 favour IAS.",
        "",
        f"| system | latency p50 (ms) | latency p99 (ms) | {' | '.join(runs)} | ran exactly once "
        f"| {' | '.join(ratios)} |",
        "|---|" + "---:|" * (4 + len(runs) + len(ratios) - 1),
    ]
    for line in [*ours, *peer_lines(peers)]:
        cells = ["—"] * len(ratios)
        if reference is not None and line not in ours:
            cells = [
                _ratio(reference.p50, line.p50),
                _ratio(reference.p99, line.p99),
                *(_ratio(reference.jobs_per_s.get(n), line.jobs_per_s.get(n)) for n in submitters),
            ]
        figures = [
            _fmt(line.p50, ".2f"),
            _fmt(line.p99, ".2f"),
            *(_fmt(line.jobs_per_s.get(n), ".1f") for n in submitters),
        ]
        rows.append(f"| {line.title} | {' | '.join(figures)} | {line.exactly_once} | {' | '.join(cells)} |")
    notes = [f"**{line.title}: {line.note}**" for line in peer_lines(peers) if line.note]
    return "\n".join([*rows, "", *notes, "", PEER_METHOD])


PEER_METHOD = """\
Peer method: the same no-op job (enqueue → a worker starts it → done), warm-up jobs first (not
measured), then latency jobs at the first offered rate, one enqueue per job, open loop; then, for
each number of concurrent enqueuers, its own run of throughput jobs, one job per call, each
enqueuer waiting for its call to return before the next (IAS: as many submitters on one
`SubmitJobs` stream, each awaiting its job's commit, as a peer's enqueuers share a pool with a
connection for each; Celery's client blocks, so its enqueuers get a thread and a Redis connection
each). With few enqueuers a system whose enqueue takes longer is bounded by that round trip;
with more, the figure is what its worker side sustains. Latency = the task body's
`time.time()` minus `time.time()` taken just before the enqueue call, so the insert and its commit
are included; IAS's rows here are its latency "from creation", timed the same way. Throughput =
jobs / (first enqueue → the peer's own bookkeeping shows none pending: PgQueuer's queue table
empty, Procrastinate's jobs all `succeeded`; Celery, with no result backend, when every task body
has run). Every job's body must have run exactly once ("ran exactly once" counts the throughput
jobs for IAS, and every job of the run for a peer).
PgQueuer and Procrastinate each get a fresh PostgreSQL database (dropped afterwards) and one worker
process with their default settings (Procrastinate with concurrency 20, as IAS has 20 one-slot
workers); Celery gets an empty Redis database number (flushed afterwards) and a prefork worker with
2 processes. The machine's Redis keeps nothing on disk, so that Celery's enqueue waits for no
flush, where IAS's and the PostgreSQL queues' commits do; "fsync on every write" is the same Celery
on a Redis of its own with `appendfsync always`. Peers and IAS run one after the other on the same
machine in the same run.
"""
