"""What a run measures (the plan) and running it against one backend's control plane."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc

from bench import postgres
from bench.fanout import FanoutParams, run_fanout
from bench.idle import IdleParams, run_idle
from bench.recovery import RecoveryParams, run_recovery
from bench.report import BackendResult
from bench.scenarios import LatencyParams, ScenarioFailed, ThroughputParams, run_latency, run_throughput
from bench.server import RunningServer, ServerFailed, control_plane, tail

log = logging.getLogger(__name__)

BACKENDS: Final = ("sqlite", "postgres")
SCENARIOS: Final = ("fanout", "latency", "throughput", "idle", "recovery")
LOG_TAIL_LINES: Final = 40  # of the control plane's log, kept with a failed backend's error


@dataclass(frozen=True, slots=True)
class Plan:
    scenarios: tuple[str, ...]
    latency: tuple[LatencyParams, ...]  # one per offered rate
    throughput: tuple[ThroughputParams, ...]  # one per worker count and number of submitters
    idle: IdleParams
    recovery: RecoveryParams
    fanout: FanoutParams

    @property
    def rates(self) -> list[float]:
        return [p.rate for p in self.latency]

    @property
    def workers(self) -> list[int]:
        return list(dict.fromkeys(p.workers for p in self.throughput))

    @property
    def submitters(self) -> list[int]:
        return list(dict.fromkeys(p.submitters for p in self.throughput))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        warmup = max(min(args.latency_jobs // 10, 20), 1)
        return cls(
            scenarios=tuple(args.scenarios),
            latency=tuple(
                LatencyParams(jobs=args.latency_jobs, rate=r, workers=args.latency_workers, warmup=warmup)
                for r in args.rates
            ),
            throughput=tuple(
                ThroughputParams(jobs=args.throughput_jobs, workers=w, submitters=n)
                for w in args.workers
                for n in args.submitters
            ),
            idle=IdleParams(workers=args.idle_workers, seconds=args.idle_seconds),
            recovery=RecoveryParams(workers=args.recovery_workers),
            fanout=FanoutParams(
                subscribers=args.watchers, events_per_s=args.fanout_events, seconds=args.fanout_seconds
            ),
        )

    def describe(self) -> dict[str, str]:
        lat, tput = self.latency[0], self.throughput[0]
        return {
            "scenarios": ", ".join(self.scenarios),
            "latency jobs per rate (measured)": str(lat.jobs),
            "latency warm-up jobs (not measured)": str(lat.warmup),
            "offered rates (jobs/s, open loop)": ", ".join(f"{r:g}" for r in self.rates),
            "idle workers (latency)": str(lat.workers),
            "throughput jobs": str(tput.jobs),
            "workers (throughput, noop, 1 slot each)": ", ".join(str(w) for w in self.workers),
            "concurrent submitters (throughput; as many enqueuers for each peer)": ", ".join(
                str(n) for n in self.submitters
            ),
            "idle scenario": (
                f"{self.idle.workers} connected workers on a fresh server,"
                f" measured for {self.idle.seconds:g} s"
            ),
            "fan-out scenario": (
                f"{self.fanout.subscribers} Console watchers, {self.fanout.events_per_s:g} events/s offered "
                f"for {self.fanout.seconds:g} s, one watcher dropped and resumed halfway"
            ),
            "recovery scenario": f"restart under {self.recovery.workers} workers; kill -9 of a real worker",
            "control plane": "`ias server start` in its own process, default settings, INFO log to a file",
        }


async def run_backend(backend: str, admin_url: str, plan: Plan) -> BackendResult:
    result = BackendResult(backend=backend)
    try:
        async with _server(backend, admin_url) as server:
            try:
                await _run_scenarios(server, plan, result, admin_url)
            except (ScenarioFailed, TimeoutError, grpc.aio.AioRpcError) as exc:
                # The backend's figures so far stay in the report, with what its control plane
                # logged last, and the other backends still run.
                _failed(result, exc)
                result.log_tail = tail(server.log_path, LOG_TAIL_LINES)
    except postgres.PostgresUnavailable as exc:
        result.skipped = f"PostgreSQL at {admin_url} is unreachable ({exc})"
        _shout(result.skipped)
    except (ServerFailed, TimeoutError) as exc:
        _failed(result, exc)
    return result


def _failed(result: BackendResult, exc: Exception) -> None:
    if isinstance(exc, grpc.aio.AioRpcError):  # a call a scenario made (a deadline, say)
        result.error = f"a call failed: {exc.code().name}: {exc.details()}"
    else:
        result.error = f"{type(exc).__name__}: {exc}"
    log.error("%s: %s", result.backend, result.error)


async def _run_scenarios(server: RunningServer, plan: Plan, result: BackendResult, admin_url: str) -> None:
    if "fanout" in plan.scenarios:  # first: the watchers replay the whole log when they subscribe
        log.info("%s: fan-out scenario with %d watchers", result.backend, plan.fanout.subscribers)
        result.extra.update((await run_fanout(server, plan.fanout)).rows())
    if "latency" in plan.scenarios:
        for lat in plan.latency:
            log.info("%s: latency scenario at %g jobs/s", result.backend, lat.rate)
            result.latency[lat.rate] = await run_latency(server, lat)
    if "throughput" in plan.scenarios:
        for tput in plan.throughput:
            log.info(
                "%s: throughput scenario with %d workers and %d submitters",
                result.backend,
                tput.workers,
                tput.submitters,
            )
            result.throughput[tput.workers, tput.submitters] = await run_throughput(server, tput)
    if "idle" in plan.scenarios:
        log.info("%s: idle scenario with %d workers", result.backend, plan.idle.workers)
        # On a server of its own: one that ran the other scenarios gives the idle sessions memory
        # those freed, and its RSS per worker would flatter (46-48 KiB there, 53 KiB fresh).
        async with _server(result.backend, admin_url) as fresh:
            result.extra.update((await run_idle(fresh, plan.idle)).rows())
    if "recovery" in plan.scenarios:
        log.info("%s: recovery scenario with %d workers", result.backend, plan.recovery.workers)
        result.extra.update((await run_recovery(server, plan.recovery)).rows())


@asynccontextmanager
async def _server(backend: str, admin_url: str) -> AsyncIterator[RunningServer]:
    with tempfile.TemporaryDirectory(prefix=f"ias-bench-{backend}-") as tmp:
        if backend == "sqlite":
            async with control_plane(Path(tmp)) as server:
                yield server
        else:
            async with postgres.scratch_database(admin_url) as url, control_plane(Path(tmp), url) as server:
                yield server


def _shout(message: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n!! {message}\n!! PostgreSQL figures are SKIPPED.\n{bar}\n", file=sys.stderr)
