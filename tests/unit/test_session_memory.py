"""What a session keeps and how it ends: equal sessions share one eligibility, a method's auth
wrapper is built once, not once per call, and a session whose reader ended does not wait forever
for its last writes."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from control_plane.api import worker_servicer
from control_plane.auth.interceptor import AuthInterceptor
from control_plane.auth.tokens import TokenAuthority
from control_plane.dispatch.sessions import Eligibility, Session, SessionRegistry


def _session(n: int, types: set[str]) -> Session:
    # Each built from its own sets, as `Connect` builds them from each worker's hello.
    eligibility = Eligibility(workspace_id="default", types=frozenset(types), repo_ids=frozenset())
    return Session(id=f"ses_{n}", worker_id=f"wrk_{n}", worker_name=f"w{n}", eligibility=eligibility, slots=1)


def test_equal_sessions_share_one_eligibility_and_keep_their_groups() -> None:
    registry = SessionRegistry()
    first, second, other = _session(1, {"noop"}), _session(2, {"noop"}), _session(3, {"agent"})
    for session in (first, second, other):
        assert registry.add(session) is None
    assert second.eligibility is first.eligibility
    assert other.eligibility is not first.eligibility
    groups = dict(registry.groups())
    assert groups[first.eligibility] == [first, second]
    assert groups[other.eligibility] == [other]

    registry.remove(first)
    third = _session(4, {"noop"})
    registry.add(third)
    assert third.eligibility is second.eligibility
    assert dict(registry.groups())[second.eligibility] == [second, third]


async def test_a_methods_auth_wrapper_is_built_once() -> None:
    async def handle(request: Any, context: Any) -> Any:
        return request

    handler = grpc.unary_unary_rpc_method_handler(handle)
    interceptor = AuthInterceptor(TokenAuthority(keys={"k1": "s" * 48}, current_key_id="k1"))

    async def continuation(details: grpc.HandlerCallDetails) -> Any:
        return handler

    details: Any = type(
        "Details", (), {"method": "/ias.v1.JobService/SubmitJob", "invocation_metadata": ()}
    )()
    wrapped = await interceptor.intercept_service(continuation, details)
    assert wrapped is not handler, "a non-public method is checked"
    assert await interceptor.intercept_service(continuation, details) is wrapped

    public: Any = type("Details", (), {"method": "/grpc.health.v1.Health/Check", "invocation_metadata": ()})()
    assert await interceptor.intercept_service(continuation, public) is handler


async def test_a_handler_still_writing_when_its_reader_ends_is_cancelled_after_the_close_timeout(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(worker_servicer, "CLOSE_TIMEOUT_S", 0.05)
    session = _session(1, {"noop"})
    stuck = asyncio.create_task(asyncio.sleep(30))  # a write the peer never reads
    prompt = asyncio.create_task(asyncio.sleep(0))
    worker_servicer._closing(session, stuck)
    worker_servicer._closing(_session(2, {"noop"}), prompt)
    assert session.closed
    async with asyncio.timeout(5):
        with pytest.raises(asyncio.CancelledError):
            await stuck
        await prompt
    assert not prompt.cancelled(), "a handler that ends in time is left alone"

    # The handler closed the session itself and is winding down: no timer for it.
    ending = _session(3, {"noop"})
    ending.close()
    winding = asyncio.create_task(asyncio.sleep(0.2))
    worker_servicer._closing(ending, winding)
    async with asyncio.timeout(5):
        await winding
    assert not winding.cancelled()
