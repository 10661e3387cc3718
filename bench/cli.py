"""``python -m bench``: run the scenarios on each backend, then the peers; print and write the report."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from bench import postgres
from bench.machine import machine
from bench.peers import PEERS, PeerResult, run_peer
from bench.peers.common import PeerParams
from bench.peers.report import Line, section
from bench.report import BackendResult, markdown, problems, table
from bench.runner import BACKENDS, SCENARIOS, Plan, run_backend

log = logging.getLogger("bench")

DEFAULT_REPORT = Path(__file__).parent / "results" / "latest.md"


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip() and x.strip() != "none"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    add = parser.add_argument
    add("--backends", default="sqlite,postgres", help="comma-separated: sqlite,postgres")
    add("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated: {','.join(SCENARIOS)}")
    add(
        "--peers",
        default=None,
        help=f"comma-separated: {','.join(PEERS)}, or none (default: all; none with --smoke)",
    )
    add("--latency-jobs", type=int, default=1000, help="measured jobs per dispatch-latency run")
    add("--rates", default="100,500", help="offered rates of the latency runs (jobs/s); the first is judged")
    add("--latency-workers", type=int, default=20, help="idle simulated workers in the latency runs")
    add("--throughput-jobs", type=int, default=5000, help="jobs per throughput run (IAS and peers)")
    add("--workers", default="20,200", help="simulated workers (1 slot each) of the throughput runs")
    add(
        "--submitters",
        default="8,32",
        help="concurrent submitters of the throughput runs, one run each (the peers get as many enqueuers)",
    )
    add("--idle-workers", type=int, default=2000, help="connected idle workers of the idle scenario")
    add("--idle-seconds", type=float, default=30.0, help="how long the idle scenario measures")
    add("--recovery-workers", type=int, default=1000, help="connected workers during the restart")
    add("--watchers", type=int, default=50, help="Console Watch subscribers of the fan-out scenario")
    add("--fanout-events", type=float, default=500.0, help="events/s the fan-out scenario offers")
    add("--fanout-seconds", type=float, default=10.0, help="how long the fan-out scenario drives jobs")
    add("--report", type=Path, default=DEFAULT_REPORT, help="where to write the Markdown report")
    add("--smoke", action="store_true", help="tiny sizes, for a quick check; no peers unless --peers")
    add("--require-postgres", action="store_true", help="fail if PostgreSQL is unreachable")
    add("--postgres-admin-url", default=postgres.ADMIN_DSN, help="superuser URL for scratch databases")
    add("-v", "--verbose", action="store_true", help="log progress to stderr")
    args = parser.parse_args(argv)
    _check_lists(parser, args)
    if args.smoke:
        args.latency_jobs, args.rates, args.throughput_jobs, args.workers = 30, [50.0], 100, [4]
        args.submitters = [2, 4]
        args.latency_workers, args.idle_workers, args.idle_seconds = 4, 20, 2.0
        args.recovery_workers, args.watchers, args.fanout_events, args.fanout_seconds = 20, 3, 60.0, 2.0
    if (
        min(
            args.latency_jobs,
            args.throughput_jobs,
            args.latency_workers,
            args.idle_workers,
            args.recovery_workers,
            *args.workers,
            *args.submitters,
        )
        < 1
    ):
        parser.error("sizes must be positive")
    if min(args.rates) <= 0 or args.idle_seconds <= 0:
        parser.error("--rates and --idle-seconds must be positive")
    return args


def _check_lists(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.backends, args.scenarios = _csv(args.backends), _csv(args.scenarios)
    args.peers = _csv(args.peers) if args.peers is not None else ([] if args.smoke else list(PEERS))
    for flag, chosen, allowed in (
        ("--backends", args.backends, BACKENDS),
        ("--scenarios", args.scenarios, SCENARIOS),
        ("--peers", args.peers, tuple(PEERS)),
    ):
        unknown = set(chosen) - set(allowed)
        if unknown:
            parser.error(f"{flag} takes {','.join(allowed)}, not {','.join(sorted(unknown))}")
    if not args.backends and not args.peers:
        parser.error("nothing to run: no backends and no peers")
    try:
        args.rates = [float(x) for x in _csv(args.rates)]
        args.workers = [int(x) for x in _csv(args.workers)]
        args.submitters = [int(x) for x in _csv(args.submitters)]
    except ValueError:
        parser.error("--rates, --workers and --submitters take comma-separated numbers")
    if not args.rates or not args.workers or not args.submitters:
        parser.error("--rates, --workers and --submitters need at least one value")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("procrastinate", "celery", "pgqueuer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    plan = Plan.from_args(args)
    load = os.getloadavg()
    pg_version = (
        await _postgres_version(args.postgres_admin_url) if "postgres" in args.backends else "not used"
    )
    results = [await run_backend(backend, args.postgres_admin_url, plan) for backend in args.backends]
    peer_params = PeerParams(
        latency_jobs=args.latency_jobs,
        rate=args.rates[0],
        warmup=plan.latency[0].warmup,
        throughput_jobs=args.throughput_jobs,
        submitters=tuple(plan.submitters),
    )
    peers = [await run_peer(name, args.postgres_admin_url, peer_params) for name in args.peers]
    sections = [_peer_section(results, peers, plan), ""] if peers else []
    rates = plan.rates if "latency" in plan.scenarios else []
    workers = plan.workers if "throughput" in plan.scenarios else []
    print(table(results, rates, workers, plan.submitters))
    for line in problems(results):
        print(line)
    for part in sections:
        print("\n" + part)
    report = markdown(
        results,
        machine_info=machine(pg_version, load),
        params=plan.describe(),
        rates=rates,
        workers=workers,
        submitters=plan.submitters,
        sections=sections,
    )
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report)
    print(f"\nreport written to {args.report}")
    return _exit_code(results, peers, require_postgres=args.require_postgres)


def _peer_section(results: Sequence[BackendResult], peers: Sequence[PeerResult], plan: Plan) -> str:
    ours = [_our_line(r, plan) for r in results]
    measured = [o for o in ours if o.p50 is not None and o.jobs_per_s]
    reference = next((o for o in measured if "PostgreSQL" in o.title), measured[0] if measured else None)
    return section(ours, peers, reference, plan.submitters)


def _our_line(result: BackendResult, plan: Plan) -> Line:
    lat, workers = result.latency.get(plan.rates[0]), plan.workers[0]
    runs = {n: t for n in plan.submitters if (t := result.throughput.get((workers, n))) is not None}
    return Line(
        title=f"IAS ({result.title}, {workers} workers)",
        p50=lat.from_created_ms.p50 if lat else None,
        p99=lat.from_created_ms.p99 if lat else None,
        jobs_per_s={n: t.jobs_per_s for n, t in runs.items()},
        exactly_once=(
            f"{sum(t.verified for t in runs.values())}/{sum(t.jobs for t in runs.values())}" if runs else "—"
        ),
    )


async def _postgres_version(admin_url: str) -> str:
    try:
        return await postgres.server_version(admin_url)
    except postgres.PostgresUnavailable as exc:
        return f"unreachable ({exc})"


def _exit_code(
    results: Sequence[BackendResult], peers: Sequence[PeerResult], *, require_postgres: bool
) -> int:
    if any(r.error for r in results) or any(p.error for p in peers):
        return 1
    if require_postgres and any(r.skipped for r in results):
        return 1
    return 0
