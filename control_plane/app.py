"""Wiring only: database, queue, sessions, dispatcher, servicers and the grpc.aio server.

`build` is the one factory used by ``ias server start``, ``ias dev`` and the tests.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from ias.v1 import (
    console_service_pb2,
    console_service_pb2_grpc,
    job_service_pb2,
    job_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
)
from ias.v1 import worker_service_pb2 as wpb
from sqlalchemy.exc import IntegrityError

from control_plane.api.console_servicer import ConsoleServicer
from control_plane.api.job_servicer import RESPONSE_BYTES, JobServicer, tell_holder
from control_plane.api.worker_servicer import WorkerServicer, fence_out
from control_plane.auth.interceptor import AuthInterceptor
from control_plane.auth.tokens import Role, TokenAuthority
from control_plane.config import ServerSettings
from control_plane.dispatch.dispatcher import Dispatcher
from control_plane.dispatch.listener import PgListener
from control_plane.dispatch.maintenance import Maintenance
from control_plane.dispatch.peers import REPLICAS_CHANNEL, Peers
from control_plane.dispatch.sessions import SessionRegistry
from control_plane.errors import IasError
from control_plane.events.hub import EventHub
from control_plane.queue import CANCEL_CHANNEL, JobQueue
from control_plane.store import events as events_store
from control_plane.store import workers as workers_store
from control_plane.store.db import Database
from control_plane.store.events import EVENTS_CHANNEL
from control_plane.store.jobs import JOBS_CHANNEL, parse_available
from control_plane.worker_records import SESSIONS_CHANNEL

log = logging.getLogger(__name__)

SERVICES = (
    worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    job_service_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    console_service_pb2.DESCRIPTOR.services_by_name["ConsoleService"].full_name,
)


async def open_database(settings: ServerSettings, *, serving: bool = False) -> Database:
    """Open and migrate the database, and make sure the default workspace exists. A ``serving``
    process checkpoints SQLite's WAL in the background (`ControlPlane.start` runs the loop)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(url=settings.database_url, background_checkpoints=serving)
    try:
        await db.migrate()
    except BaseException:
        await db.close()
        raise
    return db


async def token_authority(db: Database) -> TokenAuthority:
    """The signing keys, creating the first one if this is a new database."""
    now = datetime.now(UTC)
    for _ in range(3):
        try:
            async with db.write() as conn:
                key_id, _secret = await workers_store.signing_key(conn, now=now)
                keys = await workers_store.signing_keys(conn)
            return TokenAuthority(keys=keys, current_key_id=key_id)
        except IntegrityError:
            continue  # another replica created it at the same moment: read theirs
    raise RuntimeError("could not create or read the signing key")


async def mint_token(db: Database, *, workspace_id: str, role: Role, subject: str, ttl: timedelta) -> str:
    """Create a token (and its workspace, if new); used by ``ias server token create`` and ``ias dev``."""
    authority = await token_authority(db)
    now = datetime.now(UTC)
    async with db.write() as conn:
        await events_store.ensure_workspace(conn, workspace_id=workspace_id, now=now)
    return authority.mint(workspace_id=workspace_id, role=role, subject=subject, now=now, ttl=ttl)


@dataclass(eq=False)
class ControlPlane:
    """A built control-plane replica; `start` it, then `stop` it."""

    settings: ServerSettings
    db: Database
    queue: JobQueue
    hub: EventHub
    sessions: SessionRegistry
    dispatcher: Dispatcher
    maintenance: Maintenance
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    workers: WorkerServicer
    port: int
    listener: PgListener | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def address(self) -> str:
        host = self.settings.listen.rpartition(":")[0].strip("[]")
        return f"{host}:{self.port}"

    async def start(self) -> None:
        await self.server.start()
        await self.queue.touch_replica()
        loops = {
            "dispatcher": self.dispatcher.run(),
            "sweep": self.maintenance.sweep_loop(),
            "renew": self.maintenance.renew_loop(),
            "progress": self.maintenance.progress_loop(),
            "liveness": self.maintenance.liveness_loop(),
        }
        if self.listener is not None:
            loops["listener"] = self.listener.run()
        if self.db.is_sqlite:
            loops["checkpoint"] = self.db.checkpoint_loop()
        self._tasks = [asyncio.create_task(coro, name=name) for name, coro in loops.items()]
        for service in ("", *SERVICES):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("control plane listening on %s (replica %s)", self.address, self.settings.replica_id)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting, tell workers to drain, let in-flight RPCs finish, then close."""
        await self.health.enter_graceful_shutdown()
        self.workers.shutting_down = True
        # New calls are refused from here on by gRPC itself, so workers that reconnect at once
        # after the drain cost this process nothing while it winds down.
        stopping = asyncio.create_task(self.server.stop(grace), name="grpc stop")
        for session in self.sessions:
            session.send(wpb.ConnectResponse(drain=wpb.Drain(reason="server_shutdown")))
            session.close()
        # Sessions record themselves offline on the way out: let them, before the database closes.
        if self.workers.active:
            await asyncio.wait(set(self.workers.active), timeout=grace)
        await stopping
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:  # other replicas stop counting on this one at once, not a grace later
            await self.queue.leave()
        except IasError as exc:
            log.warning("could not remove this replica's row: %s", exc.message)
        self.hub.close()
        if self.queue.peers is not None:
            self.queue.peers.close()
        await self.db.close()


async def build(settings: ServerSettings) -> ControlPlane:
    """Build a replica from settings: the same factory for production, ``ias dev`` and tests."""
    settings.validate()
    db = await open_database(settings, serving=True)
    authority = await token_authority(db)
    sessions = SessionRegistry()
    # The hub reads the log through the queue and counts calls through the interceptor, and the
    # queue wakes the dispatcher: closures resolve the names below when first called, after all
    # of them exist.
    hub = EventHub(
        read_since=lambda ws, seq: queue.events_since(ws, seq),
        last_seq=lambda ws: queue.last_seq(ws),
        calls_taken=lambda: interceptor.calls_taken,
    )
    queue = JobQueue(db=db, hub=hub, settings=settings, on_available=lambda ws: dispatcher.wake(ws))
    dispatcher = Dispatcher(queue=queue, sessions=sessions)
    queue.direct = dispatcher
    await queue.ensure_workspace(settings.default_workspace)
    maintenance = Maintenance(queue=queue, sessions=sessions, dispatcher=dispatcher, settings=settings)

    interceptor = AuthInterceptor(authority)
    server = grpc.aio.server(interceptors=[interceptor], options=_server_options(settings))
    workers = WorkerServicer(
        queue=queue, sessions=sessions, dispatcher=dispatcher, maintenance=maintenance, settings=settings
    )
    worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(workers, server)
    job_service_pb2_grpc.add_JobServiceServicer_to_server(
        JobServicer(
            queue=queue,
            hub=hub,
            sessions=sessions,
            response_bytes=min(RESPONSE_BYTES, settings.max_message_bytes // 4),
        ),
        server,
    )
    console_service_pb2_grpc.add_ConsoleServiceServicer_to_server(
        ConsoleServicer(queue=queue, hub=hub), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = _bind(server, settings)

    plane = ControlPlane(
        settings=settings,
        db=db,
        queue=queue,
        hub=hub,
        sessions=sessions,
        dispatcher=dispatcher,
        maintenance=maintenance,
        server=server,
        health=health_servicer,
        workers=workers,
        port=port,
    )
    if not db.is_sqlite:
        queue.peers = Peers(hint=queue.hint_peers, count_others=queue.count_other_replicas)
        plane.listener = _listener(plane)
    return plane


def _listener(plane: ControlPlane) -> PgListener:
    def on_session(payload: str) -> None:
        worker_id, _, session_id = payload.partition(":")
        session = plane.sessions.for_worker(worker_id)
        if session is not None and session.id != session_id:
            plane.sessions.remove(session)
            fence_out(session)

    def on_cancel(payload: str) -> None:
        job_id, _, epoch = payload.partition(":")
        tell_holder(plane.sessions, job_id, int(epoch or 0))

    def on_events(payload: str) -> None:
        workspace_id, _, seq = payload.rpartition(":")
        plane.hub.hint(workspace_id, int(seq or 0))

    def on_available(payload: str) -> None:
        sender, workspace_id = parse_available(payload)
        if sender != plane.settings.replica_id:  # our own submits woke the dispatcher already
            plane.dispatcher.wake(workspace_id)

    def on_replica(payload: str) -> None:
        if payload != plane.settings.replica_id and peers is not None:
            peers.company()

    def on_reconnect() -> None:
        # Notifications sent while we were not listening are lost: look afresh.
        plane.dispatcher.wake()
        plane.hub.resync()
        if peers is not None:
            peers.listening(True)

    def on_lost() -> None:
        if peers is not None:
            peers.listening(False)

    peers = plane.queue.peers
    return PgListener(
        url=plane.db.url,
        handlers={
            JOBS_CHANNEL: on_available,
            EVENTS_CHANNEL: on_events,
            SESSIONS_CHANNEL: on_session,
            CANCEL_CHANNEL: on_cancel,
            REPLICAS_CHANNEL: on_replica,
        },
        on_reconnect=on_reconnect,
        on_lost=on_lost,
    )


def _server_options(settings: ServerSettings) -> list[tuple[str, int]]:
    interval_ms = settings.heartbeat_interval.total_seconds() * 1000
    ping_every_ms, ping_timeout_ms = max(int(interval_ms), 1000), max(int(2 * interval_ms), 1000)
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Detect dead peers while no frame flows (an idle worker sends none): a ping every
        # heartbeat interval, answered within two, in gRPC's own threads.
        ("grpc.keepalive_time_ms", ping_every_ms),
        ("grpc.keepalive_timeout_ms", ping_timeout_ms),
        # Since gRPC 1.5x an unanswered ping is given up on after this (default: a minute).
        ("grpc.http2.ping_timeout_ms", ping_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
    ]


def _bind(server: grpc.aio.Server, settings: ServerSettings) -> int:
    try:
        if settings.tls_cert is not None and settings.tls_key is not None:
            key, cert = settings.tls_key.read_bytes(), settings.tls_cert.read_bytes()
            port = server.add_secure_port(settings.listen, grpc.ssl_server_credentials([(key, cert)]))
        else:
            port = server.add_insecure_port(settings.listen)
    except RuntimeError:  # gRPC's way of saying the bind failed
        port = 0
    if port == 0:
        raise OSError(f"could not listen on {settings.listen}: the address is in use or not this machine's")
    return port
