"""Domain errors to gRPC status codes: one table, applied at the boundary only."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeVar

import grpc

from control_plane import errors

log = logging.getLogger(__name__)

# Most specific first: the first matching class wins.
CODES: Final[tuple[tuple[type[errors.IasError], grpc.StatusCode], ...]] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
)


def code_for(exc: errors.IasError) -> grpc.StatusCode:
    for cls, code in CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Ctx = grpc.aio.ServicerContext[Any, Any]


def unary(fn: Callable[[Any, Req, Ctx], Awaitable[Resp]]) -> Callable[[Any, Req, Ctx], Awaitable[Resp]]:
    """Turn `IasError` raised by a unary servicer method into its gRPC status."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: Ctx) -> Resp:
        try:
            return await fn(self, request, context)
        except errors.IasError as exc:
            await context.abort(code_for(exc), exc.message)

    return wrapper


def streaming(
    fn: Callable[[Any, Req, Ctx], AsyncIterator[Resp]],
) -> Callable[[Any, Req, Ctx], AsyncIterator[Resp]]:
    """`unary` for server-streaming methods."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: Ctx) -> AsyncIterator[Resp]:
        try:
            async for item in fn(self, request, context):
                yield item
        except errors.IasError as exc:
            await context.abort(code_for(exc), exc.message)

    return wrapper
