"""Many job submissions over one SubmitJobs stream, shared by any number of tasks.

A unary SubmitJob is a new HTTP/2 stream per job: headers, the call's setup and the auth check on
both sides, each time. A script or an integration that submits jobs by the hundred keeps one
stream open instead, as it would keep a database connection: each `submit` still stores one job
and returns once it is committed, and concurrent submissions share the server's group commits.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import grpc
from ias.v1 import job_service_pb2 as jpb
from ias.v1 import job_service_pb2_grpc as jpb_grpc


class SubmitRefused(Exception):
    """The control plane refused one submission; the stream and the others go on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code.lower()}: {message}")
        self.code = code
        self.message = message


class StreamEnded(Exception):
    """The stream ended before this submission was answered: it may or may not be stored.

    Submit it again with an idempotency key to be sure of exactly one job.
    """


# Submissions queued while a write is under way go together in the next request, up to this size.
REQUEST_BYTES: Final = 1024 * 1024


class Submitter:
    """Submits jobs over one open SubmitJobs call; `submit` may be awaited from many tasks at once."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._seq = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[jpb.SubmissionResult]] = {}
        self._queued: list[jpb.Submission] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._ended: BaseException | None = None
        self._reader = asyncio.create_task(self._read_loop(), name="SubmitJobs reader")
        self._writer = asyncio.create_task(self._write_loop(), name="SubmitJobs writer")

    async def submit(self, request: jpb.SubmitJobRequest) -> jpb.SubmitJobResponse:
        """Store one job; raises `SubmitRefused` for a refused request, `StreamEnded` if the call broke."""
        if self._ended is not None:
            raise StreamEnded(f"the submission stream has ended: {_describe(self._ended)}")
        if self._closing:
            raise StreamEnded("the submission stream is closing")
        seq = next(self._seq)
        answer: asyncio.Future[jpb.SubmissionResult] = asyncio.get_running_loop().create_future()
        self._waiting[seq] = answer
        self._queued.append(jpb.Submission(seq=seq, job=request))
        self._wake.set()
        result = await answer
        if result.HasField("error"):
            raise SubmitRefused(result.error.code, result.error.message)
        return result.submitted

    async def close(self) -> None:
        """Send what is queued, half-close the stream and wait until every submission is answered."""
        self._closing = True
        self._wake.set()
        await asyncio.shield(asyncio.gather(self._writer, self._reader))
        if isinstance(self._ended, grpc.aio.AioRpcError):
            raise StreamEnded(f"the submission stream has ended: {_describe(self._ended)}")

    def cancel(self) -> None:
        self._call.cancel()
        self._writer.cancel()
        self._reader.cancel()

    async def _write_loop(self) -> None:
        # gRPC allows one write in flight per call: what is submitted meanwhile waits, then goes
        # together in one request.
        try:
            while True:
                while not self._queued:
                    if self._ended is not None:
                        return
                    if self._closing:
                        await self._call.done_writing()
                        return
                    self._wake.clear()
                    await self._wake.wait()
                size = 0
                count = 0
                for submission in self._queued:
                    size += submission.ByteSize()
                    if count and size > REQUEST_BYTES:
                        break
                    count += 1
                batch = self._queued[:count]
                del self._queued[:count]
                await self._call.write(jpb.SubmitJobsRequest(submissions=batch))
        except (grpc.RpcError, asyncio.InvalidStateError):
            self._call.cancel()  # the reader records how the call ended and fails the waiting

    async def _read_loop(self) -> None:
        ended: BaseException = StreamEnded("the control plane ended the stream")
        try:
            while True:
                reply = await self._call.read()
                if reply is grpc.aio.EOF:
                    break
                for result in reply.results:
                    answer = self._waiting.pop(result.seq, None)
                    if answer is not None and not answer.done():
                        answer.set_result(result)
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            ended = exc
        finally:
            self._ended = ended
            self._queued.clear()
            self._wake.set()
            waiting, self._waiting = self._waiting, {}
            for answer in waiting.values():
                if not answer.done():
                    answer.set_exception(StreamEnded(f"the submission stream has ended: {_describe(ended)}"))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name.lower()}: {exc.details()}"
    return str(exc) or type(exc).__name__


@asynccontextmanager
async def submitter(
    stub: jpb_grpc.JobServiceAsyncStub, metadata: Sequence[tuple[str, str]]
) -> AsyncIterator[Submitter]:
    """Open a SubmitJobs stream; on leaving, wait for every answer (or cancel on an error)."""
    sub = Submitter(stub.SubmitJobs(metadata=tuple(metadata)))
    try:
        yield sub
    except BaseException:
        sub.cancel()
        raise
    await sub.close()
