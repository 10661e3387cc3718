"""The worker daemon: one Connect stream at a time, jobs that outlive reconnects, self-fencing.

Loops, each a named task:

- the session (per connection): reader, writer and heartbeat tasks in one TaskGroup;
- the fence watchdog (for the daemon's life): aborts any job whose lease can no longer be
  proven valid, so a job never runs on two machines at once;
- one task per running job.

Reconnects use tenacity with jittered exponential backoff (brisk, fully jittered retries for a
minute after the control plane announced a restart; see `worker.client.reconnect_delay`).
`_session` returns once a session that was established ends, so the backoff starts afresh after
every healthy session; errors in `FATAL` are never retried.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Final

import grpc
from ias.v1 import job_pb2
from ias.v1 import worker_service_pb2 as wpb
from ias.v1 import worker_service_pb2_grpc as wpb_grpc
from tenacity import AsyncRetrying, retry_if_exception

from worker import __version__
from worker.client import bearer, open_channel, reconnect_delay
from worker.handlers import HandlerRegistry, HandlerResult, JobContext, JobFailed, missing_checkout
from worker.journal import Journal
from worker.reports import crashed_pb, failed_pb, frame_epoch, frame_job, result_pb
from worker.status_file import StatusFile
from worker.worktrees import prune_worktrees

log = logging.getLogger(__name__)

# Never retried: the credential is wrong, and trying again cannot fix it.
FATAL: Final = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
# INTERNAL, UNAVAILABLE, CANCELLED and DEADLINE_EXCEEDED are retried on purpose: restarts and
# connection resets produce them.

PROGRESS_MIN_INTERVAL_S: Final = 1.0
WATCHDOG_TICK_S: Final = 0.1
RESEND_AFTER_S: Final = 1.0  # pause before an outcome refused as unavailable is sent again


class WorkerFatal(Exception):
    """The daemon must stop: retrying cannot help (bad credential, replaced by another worker)."""


class _SessionLost(Exception):
    """A stream ended before it was established."""


class CancelReason(StrEnum):
    """Why a running job was stopped, in words a person reads in the log."""

    CANCELLED = "the job was cancelled"
    LEASE_REVOKED = "the control plane revoked the lease"
    LEASE_UNPROVEN = "no heartbeat acknowledgement within the reconnect grace"
    WORKER_STOPPING = "the worker is stopping"


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """Settings of one worker daemon; each has a flag and an ``IAS_*`` twin."""

    control_plane: str
    token: str
    name: str = field(default_factory=socket.gethostname)
    slots: int = 1
    repo_ids: tuple[str, ...] = ()
    tls_ca: Path | None = None
    shutdown_grace: timedelta = timedelta(seconds=30)
    status_file: Path | None = None
    journal_dir: Path | None = None  # where unacknowledged outcomes survive a crash
    repo_paths: Mapping[str, Path] = field(default_factory=dict)  # repo id → local checkout


@dataclass(eq=False, slots=True)
class _RunningJob:
    job: job_pb2.Job
    epoch: int
    ctx: JobContext
    task: asyncio.Task[None] | None = None
    lease_deadline: float = 0.0  # monotonic; past it the lease cannot be proven
    last_progress: float = 0.0

    def log_fields(self) -> dict[str, object]:
        """The job's fields on the daemon's log lines about it."""
        return {"job_id": self.job.id, "attempt": self.job.attempt, "lease_epoch": self.epoch}


class WorkerDaemon:
    """Runs jobs pushed by the control plane until stopped."""

    def __init__(self, *, settings: WorkerSettings, registry: HandlerRegistry) -> None:
        self._settings = settings
        self._registry = registry
        self._jobs: dict[str, _RunningJob] = {}
        self._journal = Journal(settings.journal_dir) if settings.journal_dir is not None else None
        # Outcomes and releases not yet acknowledged, replayed on every new session.
        self._unacked: dict[str, wpb.ConnectRequest] = self._journal.load() if self._journal else {}
        self._outbox: asyncio.Queue[wpb.ConnectRequest] | None = None
        self._stopping = asyncio.Event()
        self._hard_stop = asyncio.Event()
        self._jobs_changed = asyncio.Event()  # set whenever a job ends, to wake a graceful stop
        self._last_ack = time.monotonic()
        self._grace = timedelta(seconds=15)
        self._heartbeat_interval = timedelta(seconds=5)
        self.session_id = ""
        self.worker_id = ""
        self.status = "starting"
        self._status_file = StatusFile(settings.status_file) if settings.status_file is not None else None
        self._restarting = False  # the control plane drained us to restart: reconnect briskly
        self.completed = 0

    # -- public surface ------------------------------------------------------------------

    def stop(self, *, graceful: bool = True) -> None:
        """Begin a stop: graceful finishes (or hands back) jobs; a second call stops hard."""
        if self._stopping.is_set() or not graceful:
            self._hard_stop.set()
            self._jobs_changed.set()
        elif not self._stopping.is_set():
            # A graceful stop is bounded too: past the grace and a little more, stop hard.
            delay = self._settings.shutdown_grace.total_seconds() + 10
            asyncio.get_running_loop().call_later(delay, self._hard_stop.set)
        self._stopping.set()

    @property
    def running_jobs(self) -> list[str]:
        return list(self._jobs)

    async def run(self) -> None:
        """Connect, reconnect and serve until stopped; raises `WorkerFatal` on a fatal error."""
        watchdog = asyncio.create_task(self._fence_watchdog(), name="fence-watchdog")
        status = asyncio.create_task(self._status_writer(), name="status-file")
        sweep = asyncio.create_task(self._sweep_worktrees(), name="worktree-sweep")
        try:
            while not self._done():
                try:
                    async for attempt in AsyncRetrying(
                        retry=retry_if_exception(self._should_retry),
                        wait=lambda state: reconnect_delay(
                            state.attempt_number - 1, after_restart=self._restarting
                        ),
                        reraise=True,
                    ):
                        with attempt:
                            await self._session()
                except (grpc.aio.AioRpcError, _SessionLost, _Drained, OSError) as exc:
                    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in FATAL:
                        raise WorkerFatal(
                            f"control plane refused the worker: {exc.code().name}: {exc.details()}"
                        ) from exc
                    if not self._stopping.is_set():
                        raise
                    if self._unacked:
                        log.warning(
                            "stopping with %d outcome(s) unreported: the control plane is "
                            "unreachable; their jobs will run again",
                            len(self._unacked),
                        )
                    break
        finally:
            for task in (watchdog, status, sweep):
                task.cancel()
            for running in list(self._jobs.values()):
                self._abort(running, CancelReason.WORKER_STOPPING)
            await asyncio.gather(
                watchdog,
                status,
                sweep,
                *(j.task for j in self._jobs.values() if j.task),
                return_exceptions=True,
            )
            self.status = "stopped"
            self._write_status()

    def _should_retry(self, exc: BaseException) -> bool:
        # A stopping worker with nothing running does not wait for an unreachable control plane.
        if self._stopping.is_set() and not self._jobs:
            return False
        return _retryable(exc)

    def _done(self) -> bool:
        if self._hard_stop.is_set():
            return True
        return self._stopping.is_set() and not self._jobs and not self._unacked

    # -- one session ---------------------------------------------------------------------

    async def _session(self) -> None:
        self.status = f"connecting to {self._settings.control_plane}"
        channel = open_channel(self._settings.control_plane, tls_ca=self._settings.tls_ca)
        try:
            stub = wpb_grpc.WorkerServiceStub(channel)
            call = stub.Connect(metadata=bearer(self._settings.token))
            await call.write(self._hello())
            first = await call.read()
            if not isinstance(first, wpb.ConnectResponse) or first.WhichOneof("frame") != "welcome":
                await _raise_status(call)
                raise _SessionLost("the stream ended before the welcome")
            self._on_welcome(first.welcome)
            self._outbox = asyncio.Queue()
            for frame in self._unacked.values():
                self._outbox.put_nowait(frame)
            if self._stopping.is_set():
                self._outbox.put_nowait(wpb.ConnectRequest(draining=wpb.Draining(reason="stopping")))
            try:
                async with asyncio.TaskGroup() as group:
                    reader = group.create_task(self._read_loop(call), name="session-reader")
                    writer = group.create_task(self._write_loop(call), name="session-writer")
                    beat = group.create_task(self._heartbeat_loop(), name="session-heartbeat")
                    stop = group.create_task(self._stop_watch(), name="session-stop")
                    await asyncio.wait({reader, writer, beat, stop}, return_when=asyncio.FIRST_COMPLETED)
                    for task in (reader, writer, beat, stop):
                        task.cancel()
            except BaseExceptionGroup as group:
                _end_session(group)
            finally:
                self._outbox = None
                self.status = "disconnected"
        finally:
            await channel.close(grace=None)

    def _running(self) -> list[wpb.HeldJob]:
        """The jobs being executed now."""
        return [wpb.HeldJob(job_id=j.job.id, lease_epoch=j.epoch) for j in self._jobs.values()]

    def _reporting(self) -> list[wpb.HeldJob]:
        """The jobs no longer executed whose report (outcome or release) awaits acknowledgement."""
        return [
            wpb.HeldJob(job_id=frame_job(f), lease_epoch=frame_epoch(f))
            for f in self._unacked.values()
            if frame_job(f) not in self._jobs
        ]

    def _hello(self) -> wpb.ConnectRequest:
        held = self._running() + self._reporting()
        return wpb.ConnectRequest(
            hello=wpb.Hello(
                worker_name=self._settings.name,
                capabilities=self._registry.names(),
                slots=self._settings.slots,
                repo_ids=list(self._settings.repo_ids),
                version=__version__,
                held_jobs=held,
                reads_assignment_acks=True,
            )
        )

    def _on_welcome(self, welcome: wpb.Welcome) -> None:
        self.session_id = welcome.session_id
        self.worker_id = welcome.worker_id
        self._restarting = False
        self._grace = welcome.reconnect_grace.ToTimedelta()
        self._heartbeat_interval = welcome.heartbeat_interval.ToTimedelta()
        now = time.monotonic()
        self._last_ack = now
        ttl = welcome.lease_ttl.ToTimedelta().total_seconds()
        for held in welcome.adopted_jobs:
            if held.job_id in self._jobs:
                self._jobs[held.job_id].lease_deadline = now + ttl
        self.status = f"connected (session {welcome.session_id})"
        log.info(
            "connected to %s as %s (session %s)",
            self._settings.control_plane,
            self._settings.name,
            welcome.session_id,
        )

    async def _read_loop(
        self, call: grpc.aio.StreamStreamCall[wpb.ConnectRequest, wpb.ConnectResponse]
    ) -> None:
        while True:
            frame = await call.read()
            if not isinstance(frame, wpb.ConnectResponse):
                await _raise_status(call)
                return
            self._handle(frame)

    async def _write_loop(
        self, call: grpc.aio.StreamStreamCall[wpb.ConnectRequest, wpb.ConnectResponse]
    ) -> None:
        assert self._outbox is not None
        while True:
            await call.write(await self._outbox.get())

    async def _heartbeat_loop(self) -> None:
        while True:
            base = self._heartbeat_interval.total_seconds()
            await asyncio.sleep(base * random.uniform(0.9, 1.1))  # jitter: a restarted fleet drifts apart
            held, reporting = self._running(), self._reporting()
            if not held and not reporting:
                # Nothing to vouch for: the transport's keepalive pings keep an idle session (and
                # find a dead peer) without a frame for either side's event loop to handle.
                continue
            beat = wpb.Heartbeat(held_jobs=held, free_slots=self._free(), reporting=reporting)
            self._send(wpb.ConnectRequest(heartbeat=beat))

    async def _stop_watch(self) -> None:
        await self._stopping.wait()
        self._send(wpb.ConnectRequest(draining=wpb.Draining(reason="stopping")))
        try:
            async with asyncio.timeout(self._settings.shutdown_grace.total_seconds()):
                await self._jobs_finished()
        except TimeoutError:
            for running in list(self._jobs.values()):
                self._release(running, CancelReason.WORKER_STOPPING)
        # Give the control plane a moment to acknowledge what we sent, then end the session.
        for _ in range(50):
            if not self._unacked or self._hard_stop.is_set():
                break
            await asyncio.sleep(0.1)

    async def _jobs_finished(self) -> None:
        while self._jobs and not self._hard_stop.is_set():
            self._jobs_changed.clear()
            await self._jobs_changed.wait()

    def _send(self, frame: wpb.ConnectRequest) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(frame)

    def _free(self) -> int:
        return 0 if self._stopping.is_set() else max(self._settings.slots - len(self._jobs), 0)

    # -- frames from the control plane ---------------------------------------------------

    def _handle(self, frame: wpb.ConnectResponse) -> None:
        kind = frame.WhichOneof("frame")
        # Any frame proves the session alive (an idle worker's heartbeats are not acknowledged).
        now = self._last_ack = time.monotonic()
        if kind == "heartbeat_ack":
            for standing in frame.heartbeat_ack.leases:
                running = self._jobs.get(standing.job_id)
                if running is not None and running.epoch == standing.lease_epoch:
                    running.lease_deadline = now + standing.remaining.ToTimedelta().total_seconds()
        elif kind == "assignment":
            if frame.assignment.HasField("outcome_ack"):
                self._forget(frame.assignment.outcome_ack.job_id)
            self._on_assignment(frame.assignment)
        elif kind == "outcome_ack":
            self._forget(frame.outcome_ack.job_id)
        elif kind in ("cancel", "lease_revoked"):
            msg = frame.cancel if kind == "cancel" else frame.lease_revoked
            self._forget(msg.job_id)
            running = self._jobs.get(msg.job_id)
            if running is not None and running.epoch == msg.lease_epoch:
                reason = CancelReason.CANCELLED if kind == "cancel" else CancelReason.LEASE_REVOKED
                self._abort(running, reason)
        elif kind == "drain":
            if frame.drain.reason == "session_replaced":
                raise WorkerFatal(
                    f"another worker connected with the name {self._settings.name!r}; give each worker "
                    "its own --name"
                )
            log.info("control plane asked to drain (%s); reconnecting", frame.drain.reason)
            self._restarting = frame.drain.reason == "server_shutdown"
            raise _Drained
        elif kind == "rejected":
            self._on_rejected(frame.rejected)

    def _on_rejected(self, rejected: wpb.FrameRejected) -> None:
        code = grpc.StatusCode.UNKNOWN
        for candidate in grpc.StatusCode:
            if candidate.value[0] == rejected.code:
                code = candidate
        log.warning(
            "control plane rejected a %s frame for %s: %s %s",
            rejected.frame,
            rejected.job_id or "-",
            code.name,
            rejected.message,
        )
        if rejected.frame not in ("outcome", "release"):
            return
        # A stale or unknown outcome can never be accepted: forget it. Anything else (the
        # database was unavailable) is sent again on this session after a pause.
        if code in (
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.INVALID_ARGUMENT,
        ):
            self._forget(rejected.job_id)
        elif rejected.job_id in self._unacked:
            delay = random.uniform(0.5, 1.5) * RESEND_AFTER_S
            asyncio.get_running_loop().call_later(delay, self._resend, rejected.job_id)

    def _on_assignment(self, assignment: wpb.Assignment) -> None:
        job = assignment.job
        handler = self._registry.get(job.type)
        reason = ""
        if handler is None:
            reason = f"no handler for {job.type}"
        elif self._stopping.is_set():
            reason = "worker is stopping"
        elif len(self._jobs) >= self._settings.slots:
            reason = "no free slot"
        if reason or handler is None:
            # Only a refusal is sent: a job taken is proven by its heartbeats and its outcome.
            decline = wpb.Accept(job_id=job.id, lease_epoch=assignment.lease_epoch, reason=reason)
            self._send(wpb.ConnectRequest(accept=decline))
            return
        try:
            payload = json.loads(job.payload_json or "{}")
        except ValueError:
            payload = {}
        running = _RunningJob(
            job=job,
            epoch=assignment.lease_epoch,
            ctx=JobContext(
                job_id=job.id,
                job_type=job.type,
                attempt=job.attempt,
                lease_epoch=assignment.lease_epoch,
                payload=payload if isinstance(payload, dict) else {},
                repo_id=job.repo_id,
                repo_path=self._settings.repo_paths.get(job.repo_id),
            ),
        )
        running.lease_deadline = time.monotonic() + assignment.lease_ttl.ToTimedelta().total_seconds()
        running.ctx._progress = lambda message: self._progress(running, message)
        self._jobs[job.id] = running
        running.task = asyncio.create_task(self._execute(running, handler), name=f"job {job.id}")
        started = running.log_fields()
        if assignment.HasField("committed_at"):
            # By the control plane's clock: meaningful where the two clocks agree (one machine, NTP).
            started["dispatch_ms"] = round(
                (time.time() - assignment.committed_at.ToNanoseconds() / 1e9) * 1000, 2
            )
        log.info("started job", extra=started)

    # -- jobs ------------------------------------------------------------------------------

    async def _execute(self, running: _RunningJob, handler: Callable[[JobContext], object]) -> None:
        started = time.monotonic()
        result = job_pb2.JobResult()
        status = job_pb2.JOB_STATUS_DONE
        try:
            outcome = await handler(running.ctx)  # type: ignore[misc]
            assert isinstance(outcome, HandlerResult)
            result = result_pb(outcome)
            if outcome.blocked:
                status = job_pb2.JOB_STATUS_BLOCKED
        except JobFailed as exc:
            status = job_pb2.JOB_STATUS_FAILED
            result = failed_pb(missing_checkout(running.ctx) or exc)
        except asyncio.CancelledError:
            return  # aborted: the lease is gone or handed back; report nothing
        except Exception as exc:  # a handler bug must not kill the daemon
            status = job_pb2.JOB_STATUS_FAILED
            result = crashed_pb(running.ctx, exc)
        finally:
            if self._jobs.get(running.job.id) is running:
                del self._jobs[running.job.id]
            self._jobs_changed.set()
        if running.ctx.should_abort():
            return  # aborted while finishing: another attempt may own the job now
        result.duration_ms = int((time.monotonic() - started) * 1000)
        frame = wpb.ConnectRequest(
            outcome=wpb.Outcome(
                job_id=running.job.id, lease_epoch=running.epoch, status=status, result=result
            )
        )
        self._remember(running.job.id, frame)
        self._send(frame)
        self.completed += 1
        log.info(
            "finished job",
            extra=running.log_fields(),
        )

    def _progress(self, running: _RunningJob, message: str) -> None:
        now = time.monotonic()
        if now - running.last_progress < PROGRESS_MIN_INTERVAL_S:
            return
        running.last_progress = now
        self._send(
            wpb.ConnectRequest(
                progress=wpb.Progress(job_id=running.job.id, lease_epoch=running.epoch, message=message[:500])
            )
        )

    def _abort(self, running: _RunningJob, reason: CancelReason) -> None:
        log.warning(
            "stopping job: %s",
            reason.value,
            extra=running.log_fields(),
        )
        running.ctx._abort.set()
        if running.task is not None:
            running.task.cancel()
        self._jobs.pop(running.job.id, None)
        self._jobs_changed.set()

    def _release(self, running: _RunningJob, reason: CancelReason) -> None:
        self._abort(running, reason)
        frame = wpb.ConnectRequest(
            release=wpb.Release(job_id=running.job.id, lease_epoch=running.epoch, reason=reason.name.lower())
        )
        self._remember(running.job.id, frame)
        self._send(frame)

    def _resend(self, job_id: str) -> None:
        frame = self._unacked.get(job_id)
        if frame is not None:
            self._send(frame)

    def _remember(self, job_id: str, frame: wpb.ConnectRequest) -> None:
        self._unacked[job_id] = frame
        if self._journal is not None:
            self._journal.record(job_id, frame)

    def _forget(self, job_id: str) -> None:
        if self._unacked.pop(job_id, None) is not None and self._journal is not None:
            self._journal.forget(job_id)

    async def _fence_watchdog(self) -> None:
        """Abort jobs whose lease cannot be proven: the control plane may have given them away."""
        while True:
            await asyncio.sleep(WATCHDOG_TICK_S)
            now = time.monotonic()
            grace = self._grace.total_seconds()
            margin = max(grace * 0.2, 0.3)
            silent = now - self._last_ack > grace - margin
            for running in list(self._jobs.values()):
                if silent or now > running.lease_deadline - margin:
                    # Say so, too: if the lease does still stand, the job is requeued at once.
                    self._release(running, CancelReason.LEASE_UNPROVEN)

    async def _sweep_worktrees(self) -> None:
        """Once at start: remove the job worktrees a killed earlier run left in the linked checkouts."""
        for path in self._settings.repo_paths.values():
            removed = await asyncio.to_thread(prune_worktrees, path)
            if removed:
                log.info("removed %d job worktree(s) a stopped run left in %s", removed, path)

    async def _status_writer(self) -> None:
        while self._status_file is not None:
            self._write_status()
            await asyncio.sleep(1)

    def _write_status(self) -> None:
        if self._status_file is None:
            return
        self._status_file.write(
            {
                "name": self._settings.name,
                "status": self.status,
                "control_plane": self._settings.control_plane,
                "session_id": self.session_id,
                "worker_id": self.worker_id,
                "slots": self._settings.slots,
                "running": [
                    {"job_id": j.job.id, "type": j.job.type, "attempt": j.job.attempt}
                    for j in self._jobs.values()
                ],
                "completed": self.completed,
                "seconds_since_ack": round(time.monotonic() - self._last_ack, 1),
                "updated_at": time.time(),
            }
        )


class _Drained(Exception):
    """The control plane asked this session to end (it is shutting down)."""


def _end_session(group: BaseExceptionGroup[BaseException]) -> None:
    """Decide how an established session ended: stop for good, or return to reconnect afresh."""
    fatal = group.subgroup(WorkerFatal)
    if fatal is not None:
        raise fatal.exceptions[0] from None
    if group.subgroup(_Drained) is not None:
        return
    rpc, rest = group.split(grpc.aio.AioRpcError)
    if rest is not None:
        # Writing to a stream that just broke raises InvalidStateError beside the reader's status.
        _, other = rest.split(asyncio.InvalidStateError)
        if other is not None:
            raise group
    if rpc is None:
        log.warning("session ended: the stream broke during a write")
        return
    exc = rpc.exceptions[0]
    assert isinstance(exc, grpc.aio.AioRpcError)
    if exc.code() in FATAL:
        raise exc from None
    log.warning("session ended: %s %s", exc.code().name, exc.details())


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() not in FATAL
    return isinstance(exc, _SessionLost | _Drained | OSError)


async def _raise_status(call: grpc.aio.StreamStreamCall[wpb.ConnectRequest, wpb.ConnectResponse]) -> None:
    code = await call.code()
    if code is not grpc.StatusCode.OK:
        raise grpc.aio.AioRpcError(
            code, await call.initial_metadata(), await call.trailing_metadata(), details=await call.details()
        )
