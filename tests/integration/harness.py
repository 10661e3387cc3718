"""Real control planes on 127.0.0.1:0 and raw protocol clients for integration tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from ias.v1 import console_service_pb2 as cpb
from ias.v1 import console_service_pb2_grpc as cpb_grpc
from ias.v1 import event_pb2
from ias.v1 import job_service_pb2 as jpb
from ias.v1 import job_service_pb2_grpc as jpb_grpc
from ias.v1 import worker_service_pb2 as wpb
from ias.v1 import worker_service_pb2_grpc as wpb_grpc

from control_plane.app import ControlPlane, build, mint_token
from control_plane.auth.tokens import Role
from control_plane.config import ServerSettings
from worker.client import bearer, open_channel
from worker.daemon import WorkerDaemon, WorkerSettings
from worker.handlers import default_registry


@dataclass
class Running:
    """A started replica with an admin and a worker token."""

    plane: ControlPlane
    admin: str
    worker: str

    @property
    def address(self) -> str:
        return self.plane.address


def settings_for(tmp_path: Path, *, db_url: str = "", **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "listen": "127.0.0.1:0",
        "db_url": db_url,
        "lease_ttl": timedelta(seconds=30),
        "reconnect_grace": timedelta(seconds=2),
        "sweep_interval": timedelta(milliseconds=200),
    }
    values.update(overrides)
    return ServerSettings(**values)


@asynccontextmanager
async def running_plane(settings: ServerSettings) -> AsyncIterator[Running]:
    plane = await build(settings)
    await plane.start()
    try:
        admin = await mint_token(
            plane.db, workspace_id="default", role=Role.ADMIN, subject="t", ttl=timedelta(hours=1)
        )
        worker = await mint_token(
            plane.db, workspace_id="default", role=Role.WORKER, subject="w", ttl=timedelta(hours=1)
        )
        yield Running(plane=plane, admin=admin, worker=worker)
    finally:
        await plane.stop(grace=0.5)


@asynccontextmanager
async def running_daemon(
    address: str, token: str, name: str = "d", **settings: Any
) -> AsyncIterator[WorkerDaemon]:
    """A real worker daemon in this event loop, stopped gracefully on exit."""
    daemon = WorkerDaemon(
        settings=WorkerSettings(control_plane=address, token=token, name=name, **settings),
        registry=default_registry(),
    )
    task = asyncio.create_task(daemon.run())
    try:
        yield daemon
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 10)


class JobsClient:
    """JobService over a real channel."""

    def __init__(self, address: str, token: str) -> None:
        self.channel = open_channel(address)
        self.stub = jpb_grpc.JobServiceStub(self.channel)
        self.md = bearer(token)

    async def submit(self, job_type: str = "noop", payload: str = "{}", **kw: Any) -> Any:
        reply = await self.stub.SubmitJob(
            jpb.SubmitJobRequest(type=job_type, payload_json=payload, **kw), metadata=self.md
        )
        return reply.job

    async def get(self, job_id: str) -> Any:
        return (await self.stub.GetJob(jpb.GetJobRequest(job_id=job_id), metadata=self.md)).job

    async def close(self) -> None:
        await self.channel.close()


def events_of(reply: cpb.WatchResponse) -> list[event_pb2.Event]:
    """The events one Watch response carries: several in ``events``, or one in ``event``."""
    return list(reply.events) if reply.events else [reply.event]


class Watcher:
    """One ConsoleService.Watch stream, read event by event whatever the responses' form."""

    def __init__(
        self, channel: grpc.aio.Channel, token: str, *, since: int = 0, coalesce: bool = True
    ) -> None:
        request = cpb.WatchRequest(since_seq=since, coalesce=coalesce)
        self.call = cpb_grpc.ConsoleServiceStub(channel).Watch(request, metadata=bearer(token))
        self.responses: list[cpb.WatchResponse] = []

    async def read(self, count: int, timeout: float = 10.0) -> list[event_pb2.Event]:
        """At least ``count`` more events (a response is never split), in the order received."""
        events: list[event_pb2.Event] = []
        async with asyncio.timeout(timeout):
            for _ in range(count):  # every response carries at least one event
                if len(events) >= count:
                    break
                reply = await self.call.read()
                assert reply is not grpc.aio.EOF, "Watch ended"
                assert isinstance(reply, cpb.WatchResponse)
                self.responses.append(reply)
                events += events_of(reply)
        return events

    def close(self) -> None:
        self.call.cancel()


class RawWorker:
    """A hand-driven worker session: send any frame, read what comes back."""

    def __init__(self, address: str, token: str) -> None:
        self.channel = open_channel(address)
        self.call = wpb_grpc.WorkerServiceStub(self.channel).Connect(metadata=bearer(token))

    async def hello(
        self,
        name: str = "raw",
        capabilities: tuple[str, ...] = ("noop",),
        slots: int = 1,
        repo_ids: tuple[str, ...] = (),
        held: tuple[tuple[str, int], ...] = (),
        reads_assignment_acks: bool = False,
    ) -> wpb.Welcome:
        await self.call.write(
            wpb.ConnectRequest(
                hello=wpb.Hello(
                    worker_name=name,
                    capabilities=list(capabilities),
                    slots=slots,
                    repo_ids=list(repo_ids),
                    held_jobs=[wpb.HeldJob(job_id=j, lease_epoch=e) for j, e in held],
                    reads_assignment_acks=reads_assignment_acks,
                )
            )
        )
        frame = await self.read("welcome")
        return frame.welcome

    async def send(self, **frame: Any) -> None:
        await self.call.write(wpb.ConnectRequest(**frame))

    async def read(self, kind: str | None = None, timeout: float = 10.0) -> wpb.ConnectResponse:
        """The next frame (of ``kind``, skipping heartbeat acks and others)."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.call.read()
                assert frame is not grpc.aio.EOF, "stream ended"
                assert isinstance(frame, wpb.ConnectResponse)
                if kind is None or frame.WhichOneof("frame") == kind:
                    return frame

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()
