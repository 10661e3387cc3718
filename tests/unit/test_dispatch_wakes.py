"""The dispatcher skips groups known to be empty until their workspace may have a new job; the
verified-token cache; the sender in ``ias_jobs`` notifications."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from control_plane.auth.tokens import Role, TokenAuthority
from control_plane.dispatch.dispatcher import Dispatcher
from control_plane.dispatch.sessions import Eligibility, Session, SessionRegistry
from control_plane.errors import Unauthenticated
from control_plane.queue import Assignee, JobQueue
from control_plane.store.jobs import available_payload, parse_available

NOOP = Eligibility(workspace_id="default", types=frozenset({"noop"}), repo_ids=frozenset())


class EmptyQueue:
    """A queue with no pending job; a claim can be held open to race it against a wake."""

    def __init__(self) -> None:
        self.claims = 0
        self.gate: asyncio.Event | None = None

    async def claim(
        self,
        *,
        workspace_id: str,
        types: Sequence[str],
        repo_ids: Sequence[str],
        assignees: Sequence[Assignee],
    ) -> list[object]:
        self.claims += 1
        if self.gate is not None:
            await self.gate.wait()
        return []


def dispatcher_with_one_free_session() -> tuple[Dispatcher, EmptyQueue]:
    queue = EmptyQueue()
    sessions = SessionRegistry()
    sessions.add(Session(id="ses_1", worker_id="wrk_1", worker_name="w1", eligibility=NOOP, slots=1))
    fake: JobQueue = queue  # type: ignore[assignment]
    return Dispatcher(queue=fake, sessions=sessions), queue


async def test_an_empty_group_is_skipped_until_its_workspace_is_woken() -> None:
    dispatcher, queue = dispatcher_with_one_free_session()
    await dispatcher.dispatch_round()
    assert queue.claims == 1
    dispatcher.slot_freed(NOOP)
    assert not dispatcher._wake.is_set()  # a freed slot does not create a job
    await dispatcher.dispatch_round()
    assert queue.claims == 1
    dispatcher.wake("elsewhere")
    await dispatcher.dispatch_round()
    assert queue.claims == 1
    dispatcher.wake("default")  # a submit, requeue or release in the workspace
    await dispatcher.dispatch_round()
    assert queue.claims == 2
    dispatcher.wake()  # the poll, a listener reconnect, a new session
    await dispatcher.dispatch_round()
    assert queue.claims == 3


async def test_a_wake_during_an_empty_claim_is_not_lost() -> None:
    dispatcher, queue = dispatcher_with_one_free_session()
    queue.gate = asyncio.Event()
    claim = asyncio.create_task(dispatcher.dispatch_round())
    await asyncio.sleep(0)
    dispatcher.wake("default")  # a job committed after the claim's snapshot was taken
    queue.gate.set()
    await claim
    queue.gate = None
    dispatcher.slot_freed(NOOP)
    assert dispatcher._wake.is_set()
    await dispatcher.dispatch_round()
    assert queue.claims == 2


def test_a_verified_token_is_cached_until_it_expires() -> None:
    authority = TokenAuthority(keys={"k1": "s" * 48}, current_key_id="k1")
    now = datetime.now(UTC)
    token = authority.mint(workspace_id="ws", role=Role.WORKER, subject="w", now=now, ttl=timedelta(hours=1))
    first = authority.verify(token)
    assert authority.verify(token) is first
    short = authority.mint(
        workspace_id="ws", role=Role.WORKER, subject="w", now=now, ttl=timedelta(seconds=1)
    )
    assert authority.verify(short).subject == "w"
    time.sleep(max(int(now.timestamp()) + 1 - time.time(), 0) + 0.05)
    with pytest.raises(Unauthenticated, match="expired"):
        authority.verify(short)
    with pytest.raises(Unauthenticated):
        authority.verify(token[:-2] + ("AA" if not token.endswith("AA") else "BB"))


def test_jobs_notifications_name_their_sender() -> None:
    assert parse_available(available_payload("rep_1", "default")) == ("rep_1", "default")
    assert parse_available(available_payload("rep_1", "team:a")) == ("rep_1", "team:a")
    assert parse_available("default") == ("", "default")  # from a replica of an older version
