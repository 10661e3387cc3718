"""Shared helpers for the chaos tests: the integration harness, the event log, health and row dumps."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from pathlib import Path

# pytest puts only this folder (and tests/, for conftest) on sys.path; the harness lives next door.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import JobsClient, RawWorker, events_of, running_daemon, running_plane, settings_for
from ias.v1 import console_service_pb2 as cpb
from ias.v1 import console_service_pb2_grpc as cpb_grpc
from ias.v1 import event_pb2
from sqlalchemy import text

from control_plane.app import ControlPlane
from worker.client import bearer, open_channel

__all__ = [
    "JobsClient",
    "RawWorker",
    "assert_gap_free",
    "dump",
    "event_log",
    "finished_per_job",
    "is_serving",
    "running_daemon",
    "running_plane",
    "settings_for",
]

TABLES = ("jobs", "events", "workspaces")


async def dump(plane: ControlPlane) -> dict[str, list[tuple[object, ...]]]:
    """Every stored row that rejected input must leave unchanged."""
    async with plane.db.read() as conn:
        return {
            t: [tuple(r) for r in (await conn.execute(text(f"SELECT * FROM {t} ORDER BY 1"))).all()]
            for t in TABLES
        }


async def event_log(address: str, token: str, *, idle_s: float = 1.5, timeout: float = 20) -> list:
    """The workspace's events from seq 1 via ConsoleService.Watch, until the stream goes quiet."""
    channel = open_channel(address)
    events: list[event_pb2.Event] = []
    try:
        stream = cpb_grpc.ConsoleServiceStub(channel).Watch(
            cpb.WatchRequest(since_seq=0, coalesce=True), metadata=bearer(token)
        )
        async with asyncio.timeout(timeout):
            while True:
                try:
                    async with asyncio.timeout(idle_s):
                        reply = await stream.read()
                except TimeoutError:
                    break
                assert reply is not grpc.aio.EOF, "Watch ended early"
                events += events_of(reply)
        stream.cancel()
    finally:
        await channel.close()
    return events


def finished_per_job(events: list) -> Counter[str]:
    """How many job_finished events each job has."""
    return Counter(e.job.id for e in events if e.kind == event_pb2.EVENT_KIND_JOB_FINISHED)


def assert_gap_free(events: list) -> None:
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), f"seq not gap-free: {seqs[:20]}…"


async def is_serving(address: str) -> bool:
    channel = open_channel(address)
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    finally:
        await channel.close()
