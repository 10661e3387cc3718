"""WorkerService.Connect: one bidirectional stream per worker session.

The reader answers heartbeats and progress at once, from memory; frames that need the database
(outcomes, releases, declined assignments, draining) each run as a task of their own, so a slow
database never holds up a heartbeat acknowledgement: the worker would take its leases for lost and
stop jobs the control plane still holds. The stream's handler drains the session's outbox, so the
dispatcher and the maintenance loops can push frames without touching the stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

import grpc
from ias.v1 import worker_service_pb2 as wpb
from ias.v1 import worker_service_pb2_grpc as wpb_grpc

from control_plane.api import convert
from control_plane.api.status import code_for
from control_plane.auth.tokens import current_principal
from control_plane.config import ServerSettings
from control_plane.dispatch.dispatcher import Dispatcher
from control_plane.dispatch.maintenance import Maintenance, revoke
from control_plane.dispatch.sessions import Eligibility, Session, SessionRegistry
from control_plane.domain.jobs import OUTCOME_STATUSES, Job, JobStatus
from control_plane.domain.workers import WorkerStatus
from control_plane.errors import FailedPrecondition, IasError, InvalidArgument, NotFound
from control_plane.ids import new_id
from control_plane.queue import JobQueue
from control_plane.transactions import utcnow
from control_plane.worker_records import HeldLease

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S: Final = 10.0
CLOSE_TIMEOUT_S: Final = 5.0
MAX_SLOTS: Final = 256
# Frames answered from memory, in the reader itself; every other kind needs the database.
INLINE_FRAMES: Final = frozenset({"heartbeat", "progress", "hello", "decision_request", None})
Ctx = grpc.aio.ServicerContext[wpb.ConnectRequest, wpb.ConnectResponse]


class WorkerServicer(wpb_grpc.WorkerServiceServicer):
    """Serves worker sessions on this replica."""

    def __init__(
        self,
        *,
        queue: JobQueue,
        sessions: SessionRegistry,
        dispatcher: Dispatcher,
        maintenance: Maintenance,
        settings: ServerSettings,
    ) -> None:
        self._queue = queue
        self._sessions = sessions
        self._dispatcher = dispatcher
        self._maintenance = maintenance
        self._settings = settings
        self.shutting_down = False
        self.active: set[asyncio.Task[object]] = set()  # Connect handlers, awaited before the DB closes

    async def Connect(self, request_iterator: Any, context: Ctx) -> None:  # type: ignore[override]
        if self.shutting_down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the control plane is shutting down")
        try:
            async with asyncio.timeout(HELLO_TIMEOUT_S):
                first: object = await context.read()
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no hello within 10 s")
        if first is grpc.aio.EOF:
            return
        if not isinstance(first, wpb.ConnectRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "frame: not a valid ConnectRequest")
        if first.WhichOneof("frame") != "hello":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the first frame must be a hello, got {first.WhichOneof('frame') or 'an empty frame'}",
            )
        try:
            session = await self._open(first.hello)
        except IasError as exc:
            await context.abort(code_for(exc), exc.message)
        handler = asyncio.current_task()
        assert handler is not None
        self.active.add(handler)
        handler.add_done_callback(self.active.discard)
        # The handler itself writes; the reader is a task whose end closes the session, which
        # ends the writer. (One task per session, not two: thousands of sessions sit idle.)
        reader = asyncio.create_task(self._read_loop(session, context), name=f"reader {session.id}")
        reader.add_done_callback(lambda _: _closing(session, handler))
        try:
            await self._write_loop(session, context)
        except Exception as exc:  # the stream broke under a write
            log.debug("writing to %s failed: %r", session.worker_name, exc)
        finally:
            session.close()
            reader.cancel()
            # Shielded: gRPC cancels this handler when the stream ends, and may do so again while
            # it winds down; the session must still leave the registry and be recorded offline,
            # or its jobs would wait for their leases to expire instead of the reconnect grace.
            closing = asyncio.create_task(self._wind_down(session, reader), name=f"close {session.id}")
            self.active.add(closing)
            closing.add_done_callback(self.active.discard)
            await asyncio.shield(closing)

    async def _wind_down(self, session: Session, reader: asyncio.Task[None]) -> None:
        # Bounded: a read stuck inside gRPC must not keep the session open.
        await asyncio.wait({reader}, timeout=CLOSE_TIMEOUT_S)
        if reader.done() and not reader.cancelled() and reader.exception() is not None:
            log.debug("reading from %s ended: %r", session.worker_name, reader.exception())
        if session.tasks:
            # Reports being recorded finish first (their commits stand either way), so that
            # a shutdown closes the database only after them.
            await asyncio.wait(set(session.tasks), timeout=CLOSE_TIMEOUT_S)
        await self._close(session)

    async def _open(self, hello: wpb.Hello) -> Session:
        _validate_hello(hello)
        principal = current_principal.get()
        session_id = new_id("ses")
        worker, adopted = await self._queue.connect_worker(
            workspace_id=principal.workspace_id,
            name=hello.worker_name,
            capabilities=list(hello.capabilities),
            repo_ids=list(hello.repo_ids),
            slots=hello.slots,
            version=hello.version,
            held=[HeldLease(h.job_id, h.lease_epoch) for h in hello.held_jobs],
            session_id=session_id,
        )
        session = Session(
            id=session_id,
            worker_id=worker.id,
            worker_name=worker.name,
            eligibility=Eligibility(
                workspace_id=worker.workspace_id,
                types=frozenset(worker.capabilities),
                repo_ids=frozenset(worker.repo_ids),
            ),
            slots=worker.slots,
            reads_assignment_acks=hello.reads_assignment_acks,
        )
        for job in adopted:
            assert job.lease_expires_at is not None
            session.hold(job.id, job.lease_epoch, job.lease_expires_at)
        fenced = self._sessions.add(session)
        if fenced is not None:
            fence_out(fenced)
        settings = self._settings
        session.send(
            wpb.ConnectResponse(
                welcome=wpb.Welcome(
                    session_id=session_id,
                    worker_id=worker.id,
                    workspace_id=worker.workspace_id,
                    heartbeat_interval=convert.duration(settings.heartbeat_interval),
                    lease_ttl=convert.duration(settings.lease_ttl),
                    reconnect_grace=convert.duration(settings.reconnect_grace),
                    adopted_jobs=[wpb.HeldJob(job_id=j.id, lease_epoch=j.lease_epoch) for j in adopted],
                )
            )
        )
        kept = {j.id for j in adopted}
        for held in hello.held_jobs:
            if held.job_id not in kept:
                revoke(session, held.job_id, held.lease_epoch, "not_adopted")
        log.info("worker %s connected (session %s, %d job(s) adopted)", worker.name, session_id, len(adopted))
        # New free slots, not new jobs: a claim only if jobs may wait for this kind of session. A
        # fleet reconnecting after a restart would otherwise make every connect a full round.
        self._dispatcher.slot_freed(session)
        return session

    async def _close(self, session: Session) -> None:
        self._sessions.remove(session)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._queue.set_worker_status(
                    worker_id=session.worker_id,
                    session_id=session.id,
                    status=WorkerStatus.OFFLINE,
                    reason="server_shutdown" if self.shutting_down else "stream_closed",
                )
        except (IasError, TimeoutError) as exc:
            log.warning("could not record worker %s offline: %s", session.worker_name, exc)
        if session.held:
            self._maintenance.sweep_soon(self._settings.reconnect_grace + self._settings.sweep_interval / 10)
        log.info("worker %s disconnected (session %s)", session.worker_name, session.id)

    async def _write_loop(self, session: Session, context: Ctx) -> None:
        while True:
            frame = await session.outbox.get()
            if frame is None:
                return
            await context.write(frame)

    async def _read_loop(self, session: Session, context: Ctx) -> None:
        while not session.closed:
            frame: object = await context.read()
            if frame is grpc.aio.EOF:
                return
            if not isinstance(frame, wpb.ConnectRequest):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "frame: not a valid ConnectRequest")
            session.last_heard = time.monotonic()
            kind = frame.WhichOneof("frame")
            if kind in INLINE_FRAMES:
                await self._handle(session, frame)
                continue
            if kind == "draining":
                session.draining = True  # no more assignments from now on, before the write lands
            if len(session.tasks) >= _max_in_flight(session):
                # A worker sends at most a report or two per slot; past that, stop reading.
                await asyncio.wait(set(session.tasks), return_when=asyncio.FIRST_COMPLETED)
            session.spawn(self._handle(session, frame), name=f"{kind} {session.id}")

    async def _handle(self, session: Session, frame: wpb.ConnectRequest) -> None:
        kind = frame.WhichOneof("frame")
        try:
            if kind == "heartbeat":
                self._on_heartbeat(session, frame.heartbeat)
            elif kind == "accept":
                await self._on_accept(session, frame.accept)
            elif kind == "progress":
                _require_held(session, frame.progress.job_id, frame.progress.lease_epoch)
                session.progress[frame.progress.job_id] = (
                    frame.progress.lease_epoch,
                    frame.progress.message[:500],
                )
            elif kind == "outcome":
                await self._on_outcome(session, frame.outcome)
            elif kind == "release":
                await self._on_release(session, frame.release)
            elif kind == "draining":
                session.draining = True
                await self._queue.set_worker_status(
                    worker_id=session.worker_id,
                    session_id=session.id,
                    status=WorkerStatus.DRAINING,
                    reason=frame.draining.reason[:200],
                )
            elif kind == "hello":
                raise FailedPrecondition("hello was already sent on this stream")
            elif kind == "decision_request":
                session.send(
                    _rejected(
                        kind,
                        frame.decision_request.job_id,
                        grpc.StatusCode.UNIMPLEMENTED,
                        "decision requests are not served by this control plane version",
                    )
                )
            else:
                raise InvalidArgument("frame", "empty frame: set exactly one frame kind")
        except IasError as exc:
            job_id = getattr(getattr(frame, kind, None), "job_id", "") if kind else ""
            session.send(_rejected(kind or "", job_id, code_for(exc), exc.message, getattr(exc, "field", "")))
        except Exception:
            # A bug, not the worker's fault: say so on this frame; the session and its other jobs live on.
            log.exception("handling a %s frame of worker %s failed", kind, session.worker_name)
            job_id = getattr(getattr(frame, kind, None), "job_id", "") if kind else ""
            session.send(_rejected(kind or "", job_id, grpc.StatusCode.INTERNAL, "internal error"))

    def _on_heartbeat(self, session: Session, beat: wpb.Heartbeat) -> None:
        if not session.held and not beat.held_jobs:
            return  # nothing held on either side: nothing to check, nothing to answer
        confirmed = {h.job_id: h.lease_epoch for h in beat.reporting}
        confirmed.update((h.job_id, h.lease_epoch) for h in beat.held_jobs)
        grace = self._settings.reconnect_grace.total_seconds()
        for job_id, epoch in session.unconfirmed(confirmed, older_than=grace):
            # The worker had a whole grace of heartbeats to mention the job and did not: it does
            # not have it (a bug, or a report it gave up on). Requeue it now rather than renew its
            # lease forever.
            log.warning(
                "worker %s does not run a job its session holds; requeueing it",
                session.worker_name,
                extra={"job_id": job_id, "lease_epoch": epoch},
            )
            revoke(session, job_id, epoch, "not_running")
            session.spawn(self._requeue_lost(session, job_id, epoch), name=f"requeue {job_id}")
        for held in beat.held_jobs:
            if session.held.get(held.job_id) != held.lease_epoch:
                # The worker runs something this session does not hold: stop it.
                session.send(
                    wpb.ConnectResponse(
                        lease_revoked=wpb.LeaseRevoked(
                            job_id=held.job_id, lease_epoch=held.lease_epoch, reason="not_held"
                        )
                    )
                )
        if not session.held:
            # Nothing to vouch for: an idle worker needs no answer (any frame it later receives,
            # an assignment first of all, proves the session). At 2,000 idle workers this halves
            # the frames the replica handles.
            return
        now = utcnow()
        session.send(
            wpb.ConnectResponse(
                heartbeat_ack=wpb.HeartbeatAck(
                    leases=[
                        wpb.LeaseStanding(
                            job_id=job_id,
                            lease_epoch=epoch,
                            remaining=convert.duration(session.lease_expires[job_id] - now),
                        )
                        for job_id, epoch in session.held.items()
                    ]
                )
            )
        )

    async def _requeue_lost(self, session: Session, job_id: str, epoch: int) -> None:
        try:
            await self._queue.requeue_lost(
                workspace_id=session.workspace_id,
                worker_id=session.worker_id,
                job_id=job_id,
                epoch=epoch,
                reason="not_running",
            )
        except IasError as exc:
            # The lease, no longer renewed, expires and the sweep requeues the job.
            log.warning("could not requeue job %s now: %s", job_id, exc.message)
            return
        self._dispatcher.slot_freed(session)

    async def _on_accept(self, session: Session, accept: wpb.Accept) -> None:
        _require_held(session, accept.job_id, accept.lease_epoch)
        if accept.accepted:
            return
        session.drop(accept.job_id)
        await self._queue.release(
            workspace_id=session.workspace_id,
            worker_id=session.worker_id,
            job_id=accept.job_id,
            epoch=accept.lease_epoch,
            reason=f"declined: {accept.reason}"[:200],
        )

    async def _on_outcome(self, session: Session, outcome: wpb.Outcome) -> None:
        status = convert.status_from_pb(outcome.status, field="outcome.status")
        if status not in OUTCOME_STATUSES:
            raise InvalidArgument("outcome.status", "must be JOB_STATUS_DONE, _FAILED or _BLOCKED")
        if not outcome.job_id:
            raise InvalidArgument("outcome.job_id", "is required")
        result = convert.result_from_pb(outcome.result)
        # The slot this outcome frees is refilled in the same transaction when jobs may wait.
        started = self._dispatcher.generation
        refill = self._dispatcher.refill_for(session, outcome.job_id, outcome.lease_epoch)
        try:
            job, duplicate, following, committed_at = await self._queue.record_outcome(
                workspace_id=session.workspace_id,
                worker_id=session.worker_id,
                job_id=outcome.job_id,
                epoch=outcome.lease_epoch,
                status=status,
                result=result,
                refill=refill,
            )
        except (FailedPrecondition, NotFound):
            _forget_if_lost(session, outcome.job_id, outcome.lease_epoch)
            raise
        session.drop(outcome.job_id)
        ack: wpb.OutcomeAck | None = wpb.OutcomeAck(
            job_id=job.id, lease_epoch=outcome.lease_epoch, duplicate=duplicate
        )
        if refill is not None and not duplicate:
            if following is None or not session.reads_assignment_acks:
                session.send(wpb.ConnectResponse(outcome_ack=ack))
                ack = None
            # With the next job claimed, one frame carries the ack and the assignment.
            self._dispatcher.refilled(session, following, started, committed_at=committed_at, ack=ack)
        else:
            session.send(wpb.ConnectResponse(outcome_ack=ack))
            # A requeue woke the dispatcher already; a freed slot is worth a claim only if jobs wait.
            self._dispatcher.slot_freed(session)
        _log_finished(job, duplicate)

    async def _on_release(self, session: Session, release: wpb.Release) -> None:
        try:
            await self._queue.release(
                workspace_id=session.workspace_id,
                worker_id=session.worker_id,
                job_id=release.job_id,
                epoch=release.lease_epoch,
                reason=release.reason[:200] or "released",
            )
        except (FailedPrecondition, NotFound):
            _forget_if_lost(session, release.job_id, release.lease_epoch)
            raise
        session.drop(release.job_id)
        session.send(
            wpb.ConnectResponse(
                outcome_ack=wpb.OutcomeAck(job_id=release.job_id, lease_epoch=release.lease_epoch)
            )
        )
        # The release put the job back and woke the dispatcher for the workspace.
        self._dispatcher.slot_freed(session)


def _max_in_flight(session: Session) -> int:
    return 2 * session.slots + 8


def _forget_if_lost(session: Session, job_id: str, epoch: int) -> None:
    """A report at the epoch this session holds was refused: that lease is gone, forget it. A
    report at any other epoch (a stale replay) says nothing about the lease the session holds."""
    if session.held.get(job_id) == epoch:
        session.drop(job_id)


def fence_out(session: Session) -> None:
    """End a session replaced by a newer one of the same worker."""
    session.send(wpb.ConnectResponse(drain=wpb.Drain(reason="session_replaced")))
    session.close()


def _require_held(session: Session, job_id: str, epoch: int) -> None:
    if not job_id:
        raise InvalidArgument("job_id", "is required")
    if session.held.get(job_id) != epoch:
        raise FailedPrecondition(f"job {job_id} at lease epoch {epoch} is not held by this session")


def _rejected(
    frame: str, job_id: str, code: grpc.StatusCode, message: str, field: str = ""
) -> wpb.ConnectResponse:
    return wpb.ConnectResponse(
        rejected=wpb.FrameRejected(
            job_id=job_id, code=code.value[0], message=message, field=field, frame=frame
        )
    )


def _closing(session: Session, handler: asyncio.Task[Any]) -> None:
    """The stream's reader ended: close the session. The frames left go out within the close
    timeout, or the handler is cancelled (a peer that stopped reading must not hold the session).
    A session already closed is being ended by its handler, which winds down on its own bounds."""
    if session.closed:
        return
    session.close()
    timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, handler.cancel)
    handler.add_done_callback(lambda _: timer.cancel())


def _validate_hello(hello: wpb.Hello) -> None:
    if not hello.worker_name or len(hello.worker_name) > 200:
        raise InvalidArgument("hello.worker_name", "must be 1-200 characters")
    if not 1 <= hello.slots <= MAX_SLOTS:
        raise InvalidArgument("hello.slots", f"must be between 1 and {MAX_SLOTS}")
    if not hello.capabilities:
        raise InvalidArgument("hello.capabilities", "must name at least one job type")
    if len(hello.capabilities) > 256 or any(not c or len(c) > 64 for c in hello.capabilities):
        raise InvalidArgument("hello.capabilities", "at most 256 job types of 1-64 characters")
    if len(hello.repo_ids) > 10_000 or any(len(r) > 128 for r in hello.repo_ids):
        raise InvalidArgument("hello.repo_ids", "at most 10000 ids of at most 128 characters")
    if len(hello.held_jobs) > MAX_SLOTS * 4:
        raise InvalidArgument("hello.held_jobs", "too many held jobs")


def _log_finished(job: Job, duplicate: bool) -> None:
    # A job that did not end well, or a replay, is worth a line; each success is not (at a thousand
    # jobs a second the line cost 4-5 % of the server's CPU). The event log has every outcome.
    level = logging.DEBUG if job.status is JobStatus.DONE and not duplicate else logging.INFO
    if not log.isEnabledFor(level):
        return
    log.log(
        level,
        "recorded outcome %s%s",
        job.status,
        " (replay)" if duplicate else "",
        extra={"job_id": job.id, "attempt": job.attempt, "lease_epoch": job.lease_epoch},
    )
