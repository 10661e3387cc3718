"""JobService: submit, read, cancel and follow jobs."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any, Final

import grpc
from ias.v1 import job_service_pb2 as jpb
from ias.v1 import job_service_pb2_grpc as jpb_grpc
from ias.v1 import worker_service_pb2 as wpb

from control_plane.api import convert
from control_plane.api.status import code_for, streaming, unary
from control_plane.auth.tokens import current_principal
from control_plane.dispatch.sessions import SessionRegistry
from control_plane.domain.jobs import Job, JobStatus
from control_plane.errors import IasError
from control_plane.events.hub import EventHub
from control_plane.queue import JobQueue, NewJob

Ctx = grpc.aio.ServicerContext[Any, Any]
log = logging.getLogger(__name__)

# Submissions of one SubmitJobs stream under way at once; past that the handler stops reading, so
# a client that sends faster than jobs commit is held back by gRPC's flow control.
SUBMIT_WINDOW: Final = 256
SUBMIT_DRAIN_S: Final = 30.0
# Results go together in one response up to this size, or a quarter of the largest message the
# server sends if that is less (a job may carry 256 KiB of payload).
RESPONSE_BYTES: Final = 1024 * 1024


class JobServicer(jpb_grpc.JobServiceServicer):
    """Thin adapter from JobService to the job queue."""

    def __init__(
        self,
        *,
        queue: JobQueue,
        hub: EventHub,
        sessions: SessionRegistry,
        response_bytes: int = RESPONSE_BYTES,
    ) -> None:
        self._queue = queue
        self._hub = hub
        self._sessions = sessions
        self._response_bytes = response_bytes

    @unary
    async def SubmitJob(self, request: jpb.SubmitJobRequest, context: Ctx) -> jpb.SubmitJobResponse:
        return await self._submit(current_principal.get().workspace_id, request)

    async def _submit(self, workspace_id: str, request: jpb.SubmitJobRequest) -> jpb.SubmitJobResponse:
        job, existing = await self._queue.submit(workspace_id=workspace_id, new=_new_job(request))
        return _submitted(job, existing)

    async def SubmitJobs(self, request_iterator: Any, context: Ctx) -> None:  # type: ignore[override]
        # The handler writes; a task reads and starts one submission per job, each of which adds
        # its result for the writer. Results that are ready together go in one response.
        workspace_id = current_principal.get().workspace_id
        results = _Results(self._response_bytes)
        reader = asyncio.create_task(self._read_submissions(workspace_id, context, results))
        reader.add_done_callback(lambda _: results.close())
        try:
            while batch := await results.take():
                await context.write(jpb.SubmitJobsResponse(results=batch))
        finally:
            reader.cancel()
        await reader  # a read that failed ends the call with its error

    async def _read_submissions(self, workspace_id: str, context: Ctx, results: _Results) -> None:
        serving: set[asyncio.Future[Any]] = set()
        try:
            while True:
                while len(serving) >= SUBMIT_WINDOW:
                    await asyncio.wait(serving, return_when=asyncio.FIRST_COMPLETED)
                request = await context.read()
                if request is grpc.aio.EOF:
                    return
                if not isinstance(request, jpb.SubmitJobsRequest):  # no seq to answer it by
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "request: not a valid SubmitJobsRequest"
                    )
                for submission in request.submissions:
                    under_way = self._start(workspace_id, submission, results)
                    if under_way is not None:
                        serving.add(under_way)
                        under_way.add_done_callback(serving.discard)
        finally:
            # Once the client is done sending, what it sent is answered before the call ends; if
            # the call broke, submissions under way still finish (they may already be committed).
            if serving:
                await asyncio.wait(serving, timeout=SUBMIT_DRAIN_S)

    def _start(
        self, workspace_id: str, submission: jpb.Submission, results: _Results
    ) -> asyncio.Future[Any] | None:
        """Start one submission; what is under way until its result is added (None: added now).

        A job without an idempotency key goes to the next group commit as a future, with no task
        of its own, and its result is added the moment it commits; one with a key runs its own
        transaction.
        """
        seq = submission.seq
        if not submission.HasField("job"):
            results.add(_refused(seq, grpc.StatusCode.INVALID_ARGUMENT, "job: required"))
            return None
        if submission.job.idempotency_key:
            return asyncio.create_task(self._submit_one(workspace_id, submission, results))
        try:
            return self._queue.submit_soon(
                workspace_id=workspace_id,
                new=_new_job(submission.job),
                # Added the moment it commits, a turn sooner than the future's own callbacks run.
                then=functools.partial(_add_committed, seq, results),
            )
        except IasError as exc:
            results.add(_refused(seq, code_for(exc), exc.message))
            return None

    async def _submit_one(self, workspace_id: str, submission: jpb.Submission, results: _Results) -> None:
        seq = submission.seq
        try:
            result = jpb.SubmissionResult(seq=seq, submitted=await self._submit(workspace_id, submission.job))
        except Exception as exc:
            result = _failed(seq, exc)
        results.add(result)

    @unary
    async def GetJob(self, request: jpb.GetJobRequest, context: Ctx) -> jpb.GetJobResponse:
        job = await self._queue.get(workspace_id=current_principal.get().workspace_id, job_id=request.job_id)
        return jpb.GetJobResponse(job=convert.job_to_pb(job))

    @unary
    async def ListJobs(self, request: jpb.ListJobsRequest, context: Ctx) -> jpb.ListJobsResponse:
        jobs = await self._queue.list_jobs(
            workspace_id=current_principal.get().workspace_id,
            status=convert.status_from_pb(request.status, field="status", allow_unspecified=True),
            job_type=request.type,
            limit=request.limit,
            before_id=request.before_id,
        )
        return jpb.ListJobsResponse(jobs=[convert.job_to_pb(j) for j in jobs])

    @unary
    async def CancelJob(self, request: jpb.CancelJobRequest, context: Ctx) -> jpb.CancelJobResponse:
        before, after = await self._queue.cancel(
            workspace_id=current_principal.get().workspace_id,
            job_id=request.job_id,
            reason=request.reason or "cancelled",
        )
        if before.status is JobStatus.RUNNING:
            tell_holder(self._sessions, before.id, before.lease_epoch)
        return jpb.CancelJobResponse(job=convert.job_to_pb(after))

    @streaming
    async def WatchJob(
        self, request: jpb.WatchJobRequest, context: Ctx
    ) -> AsyncIterator[jpb.WatchJobResponse]:
        workspace_id = current_principal.get().workspace_id
        async with self._hub.subscribe(workspace_id) as live:
            job = await self._queue.get(workspace_id=workspace_id, job_id=request.job_id)
            payload = job.payload_json
            yield jpb.WatchJobResponse(job=convert.job_to_pb(job))
            if job.terminal:
                return
            last = job.updated_at
            async for event in live:
                if event.job is None or event.job.id != job.id or event.job.updated_at < last:
                    continue
                last = event.job.updated_at
                pb = convert.job_to_pb(event.job)
                pb.payload_json = payload
                yield jpb.WatchJobResponse(job=pb)
                if event.job.terminal:
                    return
        # The subscription overflowed: finish with the stored state rather than a gap.
        job = await self._queue.get(workspace_id=workspace_id, job_id=request.job_id)
        yield jpb.WatchJobResponse(job=convert.job_to_pb(job))


def _new_job(request: jpb.SubmitJobRequest) -> NewJob:
    return NewJob(
        type=request.type,
        repo_id=request.repo_id,
        payload_json=request.payload_json,
        priority=request.priority,
        max_attempts=request.max_attempts,
        idempotency_key=request.idempotency_key,
        run_id=request.run_id,
    )


def _submitted(job: Job, existing: bool) -> jpb.SubmitJobResponse:
    return jpb.SubmitJobResponse(job=convert.job_to_pb(job), existing=existing)


def _add_committed(seq: int, results: _Results, committed: asyncio.Future[Job]) -> None:
    if committed.cancelled():
        result = _refused(seq, grpc.StatusCode.UNAVAILABLE, "the control plane is stopping")
    elif (exc := committed.exception()) is not None:
        result = _failed(seq, exc)
    else:
        result = jpb.SubmissionResult(seq=seq, submitted=_submitted(committed.result(), existing=False))
    results.add(result)


def _failed(seq: int, exc: BaseException) -> jpb.SubmissionResult:
    if isinstance(exc, IasError):
        return _refused(seq, code_for(exc), exc.message)
    log.error("submission %d of a SubmitJobs stream failed", seq, exc_info=exc)
    return _refused(seq, grpc.StatusCode.INTERNAL, "internal error; see the server log")


def _refused(seq: int, code: grpc.StatusCode, message: str) -> jpb.SubmissionResult:
    return jpb.SubmissionResult(seq=seq, error=jpb.SubmitError(code=code.name, message=message))


class _Results:
    """Results of one SubmitJobs stream waiting for its writer, taken together."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._ready: list[jpb.SubmissionResult] = []
        self._closed = False
        self._wake = asyncio.Event()

    def add(self, result: jpb.SubmissionResult) -> None:
        self._ready.append(result)
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def take(self) -> list[jpb.SubmissionResult]:
        """What is ready, at most about ``max_bytes`` of it (at least one); empty once closed."""
        while not self._ready:
            if self._closed:
                return []
            self._wake.clear()
            await self._wake.wait()
        size = 0
        count = 0
        for result in self._ready:
            size += result.ByteSize()
            if count and size > self._max_bytes:
                break
            count += 1
        batch = self._ready[:count]
        del self._ready[:count]
        return batch


def tell_holder(sessions: SessionRegistry, job_id: str, epoch: int) -> None:
    """If a session on this replica runs the job, ask it to stop."""
    holder = sessions.holder(job_id)
    if holder is not None and holder.held.get(job_id) == epoch:
        holder.send(
            wpb.ConnectResponse(cancel=wpb.Cancel(job_id=job_id, lease_epoch=epoch, reason="cancelled"))
        )
        holder.drop(job_id)
