"""The benchmark runs end to end at smoke size on SQLite and reports its scenarios (never timed)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"^\d+(\.\d+)?\b")


def _cell(report: str, metric: str) -> str:
    """The first backend's column of a metric's row in the report's results table."""
    match = re.search(rf"^\| {re.escape(metric)} \| [^|]* \| ([^|]*) \|", report, re.MULTILINE)
    assert match, f"no {metric!r} row in the report:\n{report}"
    return match.group(1).strip()


def _run(tmp_path: Path, *flags: str) -> str:
    report_path = tmp_path / "r.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--report", str(report_path), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return report_path.read_text()


@pytest.mark.slow
def test_smoke_run_reports_every_scenario(tmp_path: Path) -> None:
    report = _run(tmp_path, "--backends", "sqlite")
    for metric in (
        "dispatch p50 (ms) @ 50 jobs/s",
        "dispatch p99 (ms) @ 50 jobs/s",
        "submit round trip p50 / p99 (ms) @ 50 jobs/s",
        "throughput (jobs/s) @ 4 workers, 2 submitters",
        "throughput (jobs/s) @ 4 workers, 4 submitters",
        "server CPU per job (ms) @ 4 workers, 2 submitters",
        "idle 20 workers: server CPU (% of a core)",
        "idle 20 workers: server RSS per worker (KiB)",
        "restart under 20 workers: all workers back (s)",
        "kill -9 of a worker holding a job: worker shown offline (s)",
        "kill -9 of a worker holding a job: job runs elsewhere (s)",
        "fan-out 3 watchers: commit → received p50 / p99 / max (ms)",
        "fan-out 3 watchers: transaction's start → received p50 / p99 / max (ms)",
    ):
        assert NUMBER.match(_cell(report, metric)), f"{metric} has no figure:\n{report}"
    assert _cell(report, "jobs done exactly once @ 4 workers, 2 submitters") == "100/100"
    assert _cell(report, "jobs done exactly once @ 4 workers, 4 submitters") == "100/100"
    assert _cell(report, "fan-out 3 watchers: dropped stream resumed: gaps / duplicates") == "0 / 0"
    assert "## Peers" not in report, "--smoke must not run the peers unless asked"


def _why_no_peers() -> str:
    missing = [
        m for m in ("pgqueuer", "procrastinate", "celery", "redis") if importlib.util.find_spec(m) is None
    ]
    if missing:
        return f"peer packages not importable: {', '.join(missing)} (install the `bench` extra)"
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (Debian's redis-server package)"
    for service, port in (("PostgreSQL", 5432), ("Redis", 6379)):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return f"{service} is not reachable on 127.0.0.1:{port}"
    return ""


@pytest.mark.slow
def test_smoke_run_compares_the_peers(tmp_path: Path) -> None:
    why = _why_no_peers()
    if why and os.environ.get("IAS_REQUIRE_POSTGRES") == "1":  # set by .ci/run, which starts both
        pytest.fail(f"peer benchmark not tested: {why}")
    if why:
        pytest.skip(f"!!! PEER BENCHMARK NOT TESTED: {why} !!!")
    report = _run(
        tmp_path,
        "--backends",
        "sqlite",
        "--scenarios",
        "latency,throughput",
        "--peers",
        "pgqueuer,procrastinate,celery,celery-aof",
    )
    assert "## Peers on the same workload" in report
    # Latency p50 and p99, then a throughput figure for each number of enqueuers (2 and 4).
    titles = (
        "PgQueuer",
        "Procrastinate",
        "Celery + Redis (prefork, 2)",
        "Celery + Redis, fsync on every write (prefork, 2)",
    )
    for title in titles:
        row = re.search(rf"^\| {re.escape(title)} \|" + r" ([^|]*) \|" * 4, report, re.MULTILINE)
        assert row, f"no {title} row:\n{report}"
        assert all(NUMBER.match(cell.strip()) for cell in row.groups()), f"{title} has no figures:\n{report}"
    assert "throughput, 2 enqueuers (jobs/s) | throughput, 4 enqueuers (jobs/s)" in report
