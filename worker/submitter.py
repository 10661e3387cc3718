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
from typing import Any

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


class Submitter:
    """Submits jobs over one open SubmitJobs call; `submit` may be awaited from many tasks at once."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._seq = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[jpb.SubmitJobsResponse]] = {}
        self._writing = asyncio.Lock()  # gRPC allows one write in flight per call
        self._ended: BaseException | None = None
        self._reader = asyncio.create_task(self._read_loop(), name="SubmitJobs reader")

    async def submit(self, request: jpb.SubmitJobRequest) -> jpb.SubmitJobResponse:
        """Store one job; raises `SubmitRefused` for a refused request, `StreamEnded` if the call broke."""
        if self._ended is not None:
            raise StreamEnded(f"the submission stream has ended: {_describe(self._ended)}")
        seq = next(self._seq)
        answer: asyncio.Future[jpb.SubmitJobsResponse] = asyncio.get_running_loop().create_future()
        self._waiting[seq] = answer
        try:
            async with self._writing:
                await self._call.write(jpb.SubmitJobsRequest(seq=seq, job=request))
        except BaseException as exc:
            self._waiting.pop(seq, None)
            if isinstance(exc, (grpc.RpcError, asyncio.InvalidStateError)):
                raise StreamEnded(f"the submission stream has ended: {_describe(exc)}") from exc
            raise
        reply = await answer
        if reply.HasField("error"):
            raise SubmitRefused(reply.error.code, reply.error.message)
        return reply.submitted

    async def close(self) -> None:
        """Half-close the stream and wait until every submission sent has been answered."""
        if self._ended is None:
            async with self._writing:
                try:
                    await self._call.done_writing()
                except (grpc.RpcError, asyncio.InvalidStateError):
                    pass  # the reader records how the call ended
        await asyncio.shield(self._reader)
        if isinstance(self._ended, grpc.aio.AioRpcError):
            raise StreamEnded(f"the submission stream has ended: {_describe(self._ended)}")

    def cancel(self) -> None:
        self._call.cancel()
        self._reader.cancel()

    async def _read_loop(self) -> None:
        ended: BaseException = StreamEnded("the control plane ended the stream")
        try:
            while True:
                reply = await self._call.read()
                if reply is grpc.aio.EOF:
                    break
                answer = self._waiting.pop(reply.seq, None)
                if answer is not None and not answer.done():
                    answer.set_result(reply)
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            ended = exc
        finally:
            self._ended = ended
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
