"""One server interceptor authenticates every RPC and checks the caller's role.

grpc.aio interceptors cannot hand values to servicers directly, so the interceptor wraps each
method handler: the wrapper runs in the RPC's own task, verifies the bearer token and sets
`current_principal` for the servicer to read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Final

import grpc
from google.protobuf.message import DecodeError

from control_plane.auth.tokens import Principal, Role, TokenAuthority, current_principal
from control_plane.errors import IasError, PermissionDenied, Unauthenticated

# Services anyone on the network may call: liveness and schema discovery carry no data.
_PUBLIC: Final = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# Roles allowed per service; a missing service means admin only.
_ROLES: Final[Mapping[str, frozenset[Role]]] = {
    "ias.v1.WorkerService": frozenset({Role.WORKER, Role.ADMIN}),
    "ias.v1.JobService": frozenset({Role.ADMIN}),
    "ias.v1.ConsoleService": frozenset({Role.ADMIN}),
}


def _authenticate(authority: TokenAuthority, method: str, metadata: Any) -> Principal:
    header = ""
    for key, value in metadata or ():
        if key == "authorization":
            header = value if isinstance(value, str) else value.decode()
    if not header.startswith("Bearer "):
        raise Unauthenticated("missing bearer token (authorization: Bearer ias_...)")
    principal = authority.verify(header[len("Bearer ") :].strip())
    service = method.lstrip("/").split("/", 1)[0]
    if principal.role not in _ROLES.get(service, frozenset({Role.ADMIN})):
        raise PermissionDenied(f"a {principal.role} token cannot call {service}")
    return principal


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Verifies ``authorization: Bearer ias_...`` on every non-public RPC.

    It sees every call the server takes from gRPC's core, public ones too, and counts them
    (`calls_taken`): the fan-out's pacing reads the count.
    """

    def __init__(self, authority: TokenAuthority) -> None:
        self._authority = authority
        self.calls_taken = 0
        # method → (the servicer's handler, its wrapper): one wrapper per method, not per call.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        self.calls_taken += 1
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_PUBLIC):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapper = _wrap(handler, self._authority, method)
        self._wrapped[method] = (handler, wrapper)
        return wrapper


async def _check(authority: TokenAuthority, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    try:
        current_principal.set(_authenticate(authority, method, context.invocation_metadata()))
    except Unauthenticated as exc:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)
    except IasError as exc:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, exc.message)


class Undecodable:
    """Stands in for request bytes that are not a valid message, so the RPC can answer
    INVALID_ARGUMENT instead of gRPC's default UNKNOWN."""


UNDECODABLE: Final = Undecodable()


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return UNDECODABLE

    return parse


async def _check_request(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    if request is UNDECODABLE:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: not a valid protobuf message")


def _wrap(handler: Any, authority: TokenAuthority, method: str) -> Any:
    parse = _tolerant(handler.request_deserializer)
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await _check(authority, method, context)
            await _check_request(request, context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, parse, handler.response_serializer)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            await _check(authority, method, context)
            await _check_request(request, context)
            async for item in inner_us(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, parse, handler.response_serializer)
    if handler.stream_stream is not None:
        inner_ss = handler.stream_stream

        # Streamed requests may be UNDECODABLE too; the servicer checks each one it reads.
        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await _check(authority, method, context)
            return await inner_ss(requests, context)

        return grpc.stream_stream_rpc_method_handler(stream_stream, parse, handler.response_serializer)
    return handler
