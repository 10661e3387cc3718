"""The machine and software a run measured on."""

from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
import time
from pathlib import Path

import grpc


def machine(postgres_version: str, load: tuple[float, float, float]) -> dict[str, str]:
    """The machine and software the figures were measured on; ``load`` as it was before the run."""
    return {
        "CPU": _cpu_model(),
        "cores": str(os.cpu_count() or "?"),
        "RAM": _ram(),
        "load average before the run (1/5/15 min)": " / ".join(f"{x:.2f}" for x in load),
        "Python speed before the run (5 million additions in a loop, best of 3)": f"{_loop_seconds():.2f} s",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "grpcio": grpc.__version__,
        "SQLite": sqlite3.sqlite_version,
        "PostgreSQL": postgres_version,
        "code": _revision(),
    }


def _loop_seconds() -> float:
    """How fast this shared machine runs Python right now: figures of runs made when it was slower
    compare only by their ratios, and this says how much slower."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        total = 0
        for i in range(5_000_000):
            total += i
        best = min(best, time.perf_counter() - started)
    return best


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
