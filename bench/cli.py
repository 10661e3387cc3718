"""``python -m bench``: run both scenarios on each backend, print the table, write the report."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from bench import postgres
from bench.report import BackendResult, machine, markdown, parameters, problems, table
from bench.scenarios import LatencyParams, ScenarioFailed, ThroughputParams, run_latency, run_throughput
from bench.server import RunningServer, ServerFailed, control_plane

log = logging.getLogger("bench")

BACKENDS = ("sqlite", "postgres")
DEFAULT_REPORT = Path(__file__).parent / "results" / "latest.md"
SUBMITTERS = 8


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--backends", default="sqlite,postgres", help="comma-separated: sqlite,postgres")
    parser.add_argument("--latency-jobs", type=int, default=1000, help="measured dispatch-latency jobs")
    parser.add_argument("--rate", type=float, default=100.0, help="offered rate of the latency run (jobs/s)")
    parser.add_argument("--throughput-jobs", type=int, default=2000, help="jobs of the throughput run")
    parser.add_argument("--workers", type=int, default=20, help="simulated workers (1 slot each)")
    parser.add_argument(
        "--report", type=Path, default=DEFAULT_REPORT, help="where to write the Markdown report"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for a quick check")
    parser.add_argument("--require-postgres", action="store_true", help="fail if PostgreSQL is unreachable")
    parser.add_argument(
        "--postgres-admin-url",
        default=postgres.ADMIN_DSN,
        help="where to create the scratch database (a superuser connection to an existing database)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(args.backends) - set(BACKENDS)
    if unknown or not args.backends:
        parser.error(
            f"--backends takes {' and/or '.join(BACKENDS)}, not {','.join(sorted(unknown)) or 'nothing'}"
        )
    if args.smoke:
        args.latency_jobs, args.rate, args.throughput_jobs, args.workers = 30, 50.0, 100, 4
    if min(args.latency_jobs, args.throughput_jobs, args.workers) < 1 or args.rate <= 0:
        parser.error("sizes and --rate must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    latency = LatencyParams(
        jobs=args.latency_jobs,
        rate=args.rate,
        workers=args.workers,
        warmup=max(min(args.latency_jobs // 10, 20), 1),
    )
    throughput = ThroughputParams(jobs=args.throughput_jobs, workers=args.workers, submitters=SUBMITTERS)
    load = os.getloadavg()
    pg_version = "not used"
    results: list[BackendResult] = []
    for backend in args.backends:
        if backend == "postgres":
            pg_version = await _postgres_version(args.postgres_admin_url)
        results.append(await _run_backend(backend, args.postgres_admin_url, latency, throughput))
    _print_results(results)
    report = markdown(results, machine_info=machine(pg_version, load), params=parameters(latency, throughput))
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report)
    print(f"\nreport written to {args.report}")
    return _exit_code(results, require_postgres=args.require_postgres)


async def _postgres_version(admin_url: str) -> str:
    try:
        return await postgres.server_version(admin_url)
    except postgres.PostgresUnavailable as exc:
        return f"unreachable ({exc})"


async def _run_backend(
    backend: str, admin_url: str, latency: LatencyParams, throughput: ThroughputParams
) -> BackendResult:
    result = BackendResult(backend=backend)
    try:
        async with _server(backend, admin_url) as server:
            log.info("%s: latency scenario", backend)
            result.latency = await run_latency(server, latency)
            log.info("%s: throughput scenario", backend)
            result.throughput = await run_throughput(server, throughput)
    except postgres.PostgresUnavailable as exc:
        result.skipped = f"PostgreSQL at {admin_url} is unreachable ({exc})"
        _shout(result.skipped)
    except (ServerFailed, ScenarioFailed, TimeoutError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        log.error("%s: %s", backend, result.error)
    return result


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


def _print_results(results: Sequence[BackendResult]) -> None:
    print(table(results))
    for line in problems(results):
        print(line)


def _exit_code(results: Sequence[BackendResult], *, require_postgres: bool) -> int:
    if any(r.error for r in results):
        return 1
    if require_postgres and any(r.skipped for r in results):
        return 1
    return 0
