"""The results table (stdout and Markdown) and the machine description of a run."""

from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc

from bench.scenarios import LatencyParams, LatencyResult, ThroughputParams, ThroughputResult
from bench.stats import CpuUsage

BACKEND_TITLES = {"sqlite": "SQLite", "postgres": "PostgreSQL"}


@dataclass(slots=True)
class BackendResult:
    """Everything measured (or why nothing was) for one database backend."""

    backend: str
    latency: LatencyResult | None = None
    throughput: ThroughputResult | None = None
    error: str = ""
    skipped: str = ""


@dataclass(frozen=True, slots=True)
class Row:
    """One metric: how to read it from a result, and the target it is held to (if any)."""

    label: str
    target: str
    value: Callable[[BackendResult], str | None]
    meets: Callable[[BackendResult], bool | None] = lambda _r: None


def _cpu(cpu: CpuUsage) -> str:
    return f"{cpu.server_pct:.0f}% / {cpu.bench_pct:.0f}% / {cpu.machine_pct:.0f}%"


def _per_job(latency: LatencyResult | None, throughput: ThroughputResult | None) -> str | None:
    values = [x.db_writes_per_job for x in (latency, throughput) if x is not None]
    if not values or None in values:
        return None
    return " / ".join(f"{v:.2f}" for v in values if v is not None)


def _ms(pick: Callable[[LatencyResult], float]) -> Callable[[BackendResult], str | None]:
    return lambda r: None if r.latency is None else f"{pick(r.latency):.2f}"


def _under(pick: Callable[[LatencyResult], float], limit: float) -> Callable[[BackendResult], bool | None]:
    return lambda r: None if r.latency is None else pick(r.latency) <= limit


def _throughput_met(r: BackendResult) -> bool | None:
    if r.throughput is None or r.backend != "postgres":
        return None
    return r.throughput.jobs_per_s >= 500


ROWS: Sequence[Row] = (
    Row("dispatch p50 (ms)", "≤ 5", _ms(lambda x: x.dispatch_ms.p50), _under(lambda x: x.dispatch_ms.p50, 5)),
    Row(
        "dispatch p99 (ms)", "≤ 25", _ms(lambda x: x.dispatch_ms.p99), _under(lambda x: x.dispatch_ms.p99, 25)
    ),
    Row("dispatch max (ms)", "", _ms(lambda x: x.dispatch_ms.max)),
    Row("dispatch mean (ms)", "", _ms(lambda x: x.dispatch_ms.mean)),
    Row(
        "dispatch p50 split: created → claim begins / → worker reads (ms)",
        "",
        lambda r: (
            None
            if r.latency is None
            else f"{r.latency.to_claim_ms.p50:.2f} / {r.latency.claim_to_worker_ms.p50:.2f}"
        ),
    ),
    Row("submit round trip p50 (ms)", "", _ms(lambda x: x.submit_rtt_ms.p50)),
    Row("submit round trip p99 (ms)", "", _ms(lambda x: x.submit_rtt_ms.p99)),
    Row(
        "throughput (jobs/s)",
        "≥ 500 on PostgreSQL",
        lambda r: None if r.throughput is None else f"{r.throughput.jobs_per_s:.1f}",
        _throughput_met,
    ),
    Row(
        "throughput wall time (s)",
        "",
        lambda r: None if r.throughput is None else f"{r.throughput.elapsed_s:.2f}",
    ),
    Row(
        "jobs done exactly once",
        "all",
        lambda r: None if r.throughput is None else f"{r.throughput.verified}/{r.throughput.jobs}",
    ),
    Row(
        "CPU in latency run: server / bench / machine",
        "",
        lambda r: None if r.latency is None else _cpu(r.latency.cpu),
    ),
    Row(
        "CPU in throughput run: server / bench / machine",
        "",
        lambda r: None if r.throughput is None else _cpu(r.throughput.cpu),
    ),
    Row(
        "PostgreSQL write transactions per job: latency / throughput run",
        "",
        lambda r: _per_job(r.latency, r.throughput),
    ),
)


def _cell(row: Row, result: BackendResult) -> str:
    if result.skipped:
        return "skipped"
    value = row.value(result)
    if value is None:
        return "failed" if result.error else "—"
    met = row.meets(result)
    return value if met is None else f"{value} ({'ok' if met else 'MISSED'})"


def table(results: Sequence[BackendResult]) -> str:
    """The results as a Markdown table: one row per metric, one column per backend."""
    titles = [BACKEND_TITLES.get(r.backend, r.backend) for r in results]
    lines = [
        "| metric | target | " + " | ".join(titles) + " |",
        "|---|---|" + "---:|" * len(results),
    ]
    for row in ROWS:
        cells = " | ".join(_cell(row, r) for r in results)
        lines.append(f"| {row.label} | {row.target or '—'} | {cells} |")
    return "\n".join(lines)


def problems(results: Sequence[BackendResult]) -> list[str]:
    """One line per backend that was skipped or failed."""
    lines = []
    for r in results:
        title = BACKEND_TITLES.get(r.backend, r.backend)
        if r.skipped:
            lines.append(f"{title}: SKIPPED: {r.skipped}")
        if r.error:
            lines.append(f"{title}: FAILED: {r.error}")
    return lines


def machine(postgres_version: str, load: tuple[float, float, float]) -> dict[str, str]:
    """The machine and software the figures were measured on; ``load`` as it was before the run."""
    return {
        "CPU": _cpu_model(),
        "cores": str(os.cpu_count() or "?"),
        "RAM": _ram(),
        "load average before the run (1/5/15 min)": " / ".join(f"{x:.2f}" for x in load),
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "grpcio": grpc.__version__,
        "SQLite": sqlite3.sqlite_version,
        "PostgreSQL": postgres_version,
        "code": _revision(),
    }


def _revision() -> str:
    """The git commit measured, marked when the work tree had uncommitted changes."""
    try:
        proc = subprocess.run(
            ["git", "describe", "--always", "--dirty=+uncommitted changes"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip() or "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def parameters(latency: LatencyParams, throughput: ThroughputParams) -> dict[str, str]:
    return {
        "latency jobs (measured)": str(latency.jobs),
        "latency warm-up jobs (not measured)": str(latency.warmup),
        "offered rate (jobs/s, one at a time)": f"{latency.rate:g}",
        "idle workers (latency)": str(latency.workers),
        "throughput jobs": str(throughput.jobs),
        "workers (throughput, noop, 1 slot each)": str(throughput.workers),
        "concurrent submitters": str(throughput.submitters),
        "control plane": "`ias server start` in its own process, default settings, logging at INFO to a file",
    }


def markdown(
    results: Sequence[BackendResult], *, machine_info: dict[str, str], params: dict[str, str]
) -> str:
    """The full report."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "# IAS control-plane benchmark",
        "",
        f"Run {when} with `python -m bench`.",
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in machine_info.items()),
        "",
        "## Parameters",
        "",
        *(f"- {k}: {v}" for k, v in params.items()),
        "",
        "## Results",
        "",
        table(results),
        "",
        *(f"**{line}**\n" for line in problems(results)),
        "Targets for this stage: dispatch p50 ≤ 5 ms and p99 ≤ 25 ms; throughput ≥ 500 jobs/s on PostgreSQL.",
        "",
        "## Method",
        "",
        "- Dispatch latency = the time the worker read the Assignment frame (`time.time()`) minus the",
        "  job's `created_at` from that frame (server and workers share the machine's clock). The server",
        "  takes `created_at` just before the submit transaction begins, so the insert and its commit",
        "  are included. The split uses the assignment's `updated_at`, taken when the claim began.",
        "- Throughput = jobs / (first SubmitJob sent → last OutcomeAck received); every job is then",
        "  checked with ListJobs to be `done` on lease epoch 1 with exactly one non-duplicate ack.",
        "- CPU = percent of one core used by the server process and by the benchmark process (workers",
        "  and submitters); machine = percent of all cores busy (PostgreSQL runs in the rest).",
        "- PostgreSQL write transactions = transaction ids assigned during the measured interval",
        "  (`pg_current_snapshot()` xmax), divided by the jobs; background loops add about one a second.",
        "",
    ]
    return "\n".join(parts)
