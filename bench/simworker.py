"""Simulated ``noop`` workers that speak the real Connect protocol over real gRPC.

Each worker has its own channel (its own TCP connection), says hello, answers every assignment
with an immediate DONE outcome and, like the daemon, heartbeats at the welcome's interval only
while it has something to vouch for (here: outcomes not yet acknowledged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Final

import grpc
from ias.v1 import job_pb2
from ias.v1 import worker_service_pb2 as wpb
from ias.v1 import worker_service_pb2_grpc as wpb_grpc

from worker.client import bearer, open_channel, reconnect_delay

log = logging.getLogger(__name__)

WELCOME_TIMEOUT_S: Final = 15.0
CLOSE_TIMEOUT_S: Final = 10.0
MAX_FRAMES: Final = 10_000_000  # per session; far more than any run sends
MAX_BEATS: Final = 100_000
MAX_SESSIONS: Final = 100

Call = grpc.aio.StreamStreamCall[wpb.ConnectRequest, wpb.ConnectResponse]


@dataclass(eq=False)
class Tally:
    """What a fleet observed; shared by its workers, read by the scenario."""

    received_at: dict[str, float] = field(default_factory=dict)  # job id → time.time() of the frame
    created_at: dict[str, float] = field(default_factory=dict)  # job id → the job's created_at
    claimed_at: dict[str, float] = field(default_factory=dict)  # job id → updated_at, set by the claim
    committed_at: dict[str, float] = field(default_factory=dict)  # job id → the lease's commit
    acks: Counter[str] = field(default_factory=Counter)
    ack_log: list[str] = field(default_factory=list)  # job ids in the order their acks arrived
    duplicate_acks: int = 0
    welcomes: list[tuple[str, float]] = field(default_factory=list)  # (worker, time.time())
    problems: list[str] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def assigned(self, assignment: wpb.Assignment, received: float) -> None:
        job = assignment.job
        if job.id in self.received_at:
            self.problem(f"job {job.id} was assigned twice")
        self.received_at[job.id] = received
        self.created_at[job.id] = job.created_at.ToNanoseconds() / 1e9
        self.claimed_at[job.id] = job.updated_at.ToNanoseconds() / 1e9
        self.committed_at[job.id] = assignment.committed_at.ToNanoseconds() / 1e9
        self._changed.set()

    def acked(self, ack: wpb.OutcomeAck) -> None:
        self.acks[ack.job_id] += 1
        self.ack_log.append(ack.job_id)
        self.duplicate_acks += ack.duplicate
        self._changed.set()

    def problem(self, text: str) -> None:
        log.warning("%s", text)
        self.problems.append(text)

    async def wait_acked(self, ids: Iterable[str], within_s: float) -> set[str]:
        """Wait until every job of ``ids`` had its outcome acknowledged; returns those that did not
        within ``within_s`` seconds (empty on success)."""
        pending = {i for i in ids if i not in self.acks}
        seen = len(self.ack_log)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                while pending:
                    self._changed.clear()
                    await self._changed.wait()
                    # Only the acks that arrived since the last look: linear in the run's size.
                    pending.difference_update(self.ack_log[seen:])
                    seen = len(self.ack_log)
        return pending


class SimWorker:
    """One worker session with one slot; with ``reconnect``, a new session whenever one ends, with
    the real daemon's backoff (`worker.client.reconnect_delay`)."""

    def __init__(self, *, target: str, token: str, name: str, tally: Tally, reconnect: bool = False) -> None:
        self.name = name
        self._target = target
        self._token = token
        self._tally = tally
        self._reconnect = reconnect
        self._drained = False  # the last session ended with a drain for a server restart
        self._stopping = False
        self._outbox: asyncio.Queue[wpb.ConnectRequest | None] = asyncio.Queue()
        self._reporting: dict[str, int] = {}  # job id → epoch of outcomes awaiting their ack
        self._channel: grpc.aio.Channel | None = None
        self._sessions: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the stream and return once the welcome arrived."""
        call, interval = await self._open()
        self._sessions = asyncio.create_task(self._serve_all(call, interval), name=f"{self.name} sessions")

    async def stop(self) -> None:
        """Half-close the stream, wait for the server to end it, and close the channel."""
        self._stopping = True
        self._outbox.put_nowait(None)
        if self._sessions is not None:
            with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
                await asyncio.wait_for(asyncio.shield(self._sessions), CLOSE_TIMEOUT_S)
            self._sessions.cancel()
            await asyncio.gather(self._sessions, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close(grace=None)

    async def _open(self) -> tuple[Call, float]:
        if self._channel is not None:
            await self._channel.close(grace=None)
        self._outbox = asyncio.Queue()  # frames of an ended session are not replayed
        self._reporting = {}
        self._channel = open_channel(self._target)
        call: Call = wpb_grpc.WorkerServiceStub(self._channel).Connect(metadata=bearer(self._token))
        hello = wpb.Hello(
            worker_name=self.name,
            capabilities=["noop"],
            slots=1,
            version="bench",
            reads_assignment_acks=True,
        )
        await call.write(wpb.ConnectRequest(hello=hello))
        first = await asyncio.wait_for(call.read(), WELCOME_TIMEOUT_S)
        if not isinstance(first, wpb.ConnectResponse) or first.WhichOneof("frame") != "welcome":
            raise RuntimeError(f"{self.name}: expected a welcome, got {first!r}")
        self._tally.welcomes.append((self.name, time.time()))
        self._drained = False
        return call, first.welcome.heartbeat_interval.ToTimedelta().total_seconds()

    async def _serve_all(self, call: Call, interval: float) -> None:
        for _ in range(MAX_SESSIONS):
            await self._serve(call, interval)
            if self._stopping or not self._reconnect:
                return
            call, interval = await self._reopen()

    async def _reopen(self) -> tuple[Call, float]:
        for attempt in range(MAX_SESSIONS):
            await asyncio.sleep(reconnect_delay(attempt, after_restart=self._drained))
            try:
                return await self._open()
            except (grpc.aio.AioRpcError, TimeoutError, RuntimeError):
                continue
        raise RuntimeError(f"{self.name}: could not reconnect")

    async def _serve(self, call: Call, interval: float) -> None:
        others = [
            asyncio.create_task(self._write_loop(call), name=f"{self.name} writer"),
            asyncio.create_task(self._heartbeat_loop(interval), name=f"{self.name} heartbeat"),
        ]
        try:
            await self._read_loop(call)
        except grpc.aio.AioRpcError as exc:
            if not self._reconnect:
                raise
            log.debug("%s: session ended: %s", self.name, exc.code().name)
        finally:
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

    async def _read_loop(self, call: Call) -> None:
        for _ in range(MAX_FRAMES):
            frame = await call.read()
            received = time.time()
            if not isinstance(frame, wpb.ConnectResponse):
                return  # the server ended the stream
            self._handle(frame, received)

    def _handle(self, frame: wpb.ConnectResponse, received: float) -> None:
        kind = frame.WhichOneof("frame")
        if kind == "assignment":
            if frame.assignment.HasField("outcome_ack"):
                self._on_ack(frame.assignment.outcome_ack)
            self._on_assignment(frame.assignment, received)
        elif kind == "outcome_ack":
            self._on_ack(frame.outcome_ack)
        elif kind == "rejected":
            rejected = frame.rejected
            self._tally.problem(
                f"{self.name}: {rejected.frame} rejected ({rejected.code}): {rejected.message}"
            )
        elif kind == "drain" and self._reconnect:
            self._drained = frame.drain.reason == "server_shutdown"
            self._outbox.put_nowait(None)  # like the daemon: end this session, then reconnect
        elif kind in ("cancel", "lease_revoked", "drain"):
            self._tally.problem(f"{self.name}: unexpected {kind}: {getattr(frame, kind)}")

    def _on_ack(self, ack: wpb.OutcomeAck) -> None:
        self._reporting.pop(ack.job_id, None)
        self._tally.acked(ack)

    def _on_assignment(self, assignment: wpb.Assignment, received: float) -> None:
        job, epoch = assignment.job, assignment.lease_epoch
        self._tally.assigned(assignment, received)
        # Like the daemon: a job taken is not confirmed; its outcome follows.
        outcome = wpb.Outcome(
            job_id=job.id,
            lease_epoch=epoch,
            status=job_pb2.JOB_STATUS_DONE,
            result=job_pb2.JobResult(summary="bench noop"),
        )
        self._reporting[job.id] = epoch
        self._outbox.put_nowait(wpb.ConnectRequest(outcome=outcome))

    async def _write_loop(self, call: Call) -> None:
        outbox = self._outbox
        for _ in range(MAX_FRAMES):
            frame = await outbox.get()
            if frame is None:
                await call.done_writing()
                return
            await call.write(frame)

    async def _heartbeat_loop(self, interval: float) -> None:
        outbox = self._outbox
        for _ in range(MAX_BEATS):
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))
            # Like the daemon: an idle worker sends nothing (the transport's keepalive keeps the
            # session). Ours finish a job the moment it is assigned, so the only jobs to name are
            # those whose outcome awaits its acknowledgement.
            if self._reporting:
                reporting = [wpb.HeldJob(job_id=j, lease_epoch=e) for j, e in self._reporting.items()]
                outbox.put_nowait(wpb.ConnectRequest(heartbeat=wpb.Heartbeat(reporting=reporting)))


@contextlib.asynccontextmanager
async def fleet(*, target: str, token: str, prefix: str, size: int, tally: Tally) -> AsyncIterator[None]:
    """``size`` connected workers named ``<prefix>-NN``; all are stopped on exit."""
    workers = [
        SimWorker(target=target, token=token, name=f"{prefix}-{i:02d}", tally=tally) for i in range(size)
    ]
    try:
        async with asyncio.timeout(WELCOME_TIMEOUT_S):
            await asyncio.gather(*(w.start() for w in workers))
        log.info("%d %s workers connected", size, prefix)
        yield
    finally:
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
