"""What an idle session keeps: equal sessions share one eligibility, and a method's auth wrapper is
built once, not once per call."""

from __future__ import annotations

from typing import Any

import grpc

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
