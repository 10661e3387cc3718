"""The benchmark runs end to end at smoke size on SQLite and reports both scenarios (never timed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cell(report: str, metric: str) -> str:
    """The SQLite column of a metric's row in the report's results table."""
    match = re.search(rf"^\| {re.escape(metric)} \| [^|]* \| ([^|]*) \|", report, re.MULTILINE)
    assert match, f"no {metric!r} row in the report:\n{report}"
    return match.group(1).strip()


@pytest.mark.slow
def test_smoke_run_reports_both_scenarios(tmp_path: Path) -> None:
    report_path = tmp_path / "r.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--backends", "sqlite", "--report", str(report_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    report = report_path.read_text()
    number = re.compile(r"^\d+(\.\d+)?\b")
    for metric in (
        "dispatch p50 (ms)",
        "dispatch p99 (ms)",
        "submit round trip p50 (ms)",
        "throughput (jobs/s)",
    ):
        assert number.match(_cell(report, metric)), f"{metric} has no figure:\n{report}"
    assert _cell(report, "jobs done exactly once") == "100/100"
