"""Percentile summaries and CPU-time sampling of processes and of the whole machine."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Summary:
    """Nearest-rank percentiles of a sample, in the sample's unit."""

    count: int
    p50: float
    p99: float
    max: float
    mean: float


@dataclass(frozen=True, slots=True)
class Judged:
    """A figure of the report held to a target."""

    value: str
    target: str
    met: bool

    def __str__(self) -> str:
        return f"{self.value} ({'ok' if self.met else 'MISSED'})"


def summarise(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("cannot summarise an empty sample")
    ordered = sorted(values)
    return Summary(
        count=len(ordered),
        p50=_nearest_rank(ordered, 50),
        p99=_nearest_rank(ordered, 99),
        max=ordered[-1],
        mean=sum(ordered) / len(ordered),
    )


def _nearest_rank(ordered: Sequence[float], percent: float) -> float:
    rank = max(math.ceil(percent / 100 * len(ordered)), 1)
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class CpuUsage:
    """CPU used during a measured interval, in percent of one core (machine: of all cores)."""

    server_pct: float
    loop_pct: float  # the server's main thread, which runs its event loop
    bench_pct: float
    machine_pct: float


@dataclass(frozen=True, slots=True)
class _Sample:
    wall: float
    server: float
    loop: float
    bench: float
    machine_busy: float
    machine_total: float


class CpuMeter:
    """Reads CPU seconds of the server process, this process and the machine from /proc."""

    def __init__(self, server_pid: int) -> None:
        self._server_pid = server_pid
        self._start: _Sample | None = None

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> CpuUsage:
        if self._start is None:
            raise RuntimeError("CpuMeter.stop before start")
        end, begin = self._sample(), self._start
        wall = max(end.wall - begin.wall, 1e-9)
        total = max(end.machine_total - begin.machine_total, 1e-9)
        return CpuUsage(
            server_pct=100 * (end.server - begin.server) / wall,
            loop_pct=100 * (end.loop - begin.loop) / wall,
            bench_pct=100 * (end.bench - begin.bench) / wall,
            machine_pct=100 * (end.machine_busy - begin.machine_busy) / total,
        )

    def _sample(self) -> _Sample:
        busy, total = _machine_ticks()
        times = os.times()
        return _Sample(
            wall=time.monotonic(),
            server=_cpu_s(Path(f"/proc/{self._server_pid}/stat")),
            loop=_cpu_s(Path(f"/proc/{self._server_pid}/task/{self._server_pid}/stat")),
            bench=times.user + times.system,
            machine_busy=busy,
            machine_total=total,
        )


def _cpu_s(stat_path: Path) -> float:
    """CPU seconds of a process (/proc/PID/stat) or of one of its threads (/proc/PID/task/TID/stat)."""
    try:
        stat = stat_path.read_text()
    except OSError:
        return 0.0
    # The command name may contain spaces; the fields after its closing parenthesis do not.
    fields = stat.rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _TICKS_PER_S


def _machine_ticks() -> tuple[float, float]:
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return 0.0, 0.0
    ticks = [float(v) for v in first[1:9]]  # guest time is already counted in user time
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, sum(ticks)
