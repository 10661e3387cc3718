"""The dispatcher skips groups known to be empty until their workspace may have a new job; the
verified-token cache; the sender in ``ias_jobs`` notifications."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from control_plane.auth.tokens import Role, TokenAuthority
from control_plane.dispatch.dispatcher import Dispatcher, _spread
from control_plane.dispatch.sessions import Eligibility, Session, SessionRegistry
from control_plane.domain import jobs as jobs_domain
from control_plane.domain.jobs import Job, JobStatus
from control_plane.errors import Unauthenticated
from control_plane.queue import JobQueue
from control_plane.store.jobs import available_payload, parse_available
from control_plane.transactions import Assignee

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
        slots: int,
        pick: Callable[[int], Sequence[Assignee]],
    ) -> list[object]:
        self.claims += 1
        if self.gate is not None:
            await self.gate.wait()
        return []


def dispatcher_with_one_free_session(slots: int = 1) -> tuple[Dispatcher, EmptyQueue]:
    queue = EmptyQueue()
    sessions = SessionRegistry()
    sessions.add(Session(id="ses_1", worker_id="wrk_1", worker_name="w1", eligibility=NOOP, slots=slots))
    fake: JobQueue = queue  # type: ignore[assignment]
    return Dispatcher(queue=fake, sessions=sessions), queue


def the_session(dispatcher: Dispatcher) -> Session:
    session = dispatcher._sessions.get("ses_1")
    assert session is not None
    return session


def new_job(job_type: str = "noop", repo_id: str = "", job_id: str = "job_1") -> Job:
    now = datetime.now(UTC)
    return Job(
        id=job_id,
        workspace_id="default",
        type=job_type,
        status=JobStatus.PENDING,
        created_at=now,
        updated_at=now,
        repo_id=repo_id,
    )


async def test_an_empty_group_is_skipped_until_its_workspace_is_woken() -> None:
    dispatcher, queue = dispatcher_with_one_free_session()
    await dispatcher.dispatch_round()
    assert queue.claims == 1
    dispatcher.slot_freed(the_session(dispatcher))
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
    dispatcher.slot_freed(the_session(dispatcher))
    assert dispatcher._wake.is_set()
    await dispatcher.dispatch_round()
    assert queue.claims == 2


async def test_a_submitted_job_is_assigned_directly_only_while_its_group_is_known_empty() -> None:
    dispatcher, _ = dispatcher_with_one_free_session(slots=2)
    assert dispatcher.reserve(new_job()) is None  # nobody has claimed yet: jobs may be pending
    await dispatcher.dispatch_round()
    assert dispatcher.reserve(new_job("other")) is None  # a type the session does not run
    assert dispatcher.reserve(new_job(repo_id="r_unlinked")) is None
    first = dispatcher.reserve(new_job(job_id="job_1"))
    assert first == Assignee(worker_id="wrk_1", session_id="ses_1")
    assert dispatcher.reserve(new_job(job_id="job_2")) == first  # its second slot
    assert dispatcher.reserve(new_job(job_id="job_3")) is None  # no slot left
    dispatcher.unreserve(new_job(job_id="job_2"))  # that submit failed
    dispatcher.wake("default")  # now a job may be pending: it must not be passed
    assert dispatcher.reserve(new_job(job_id="job_4")) is None


async def test_a_delivered_direct_assignment_holds_the_slot_and_reaches_the_stream() -> None:
    dispatcher, _ = dispatcher_with_one_free_session()
    await dispatcher.dispatch_round()
    job = new_job()
    who = dispatcher.reserve(job)
    assert who is not None
    session = the_session(dispatcher)
    assert session.free == 0
    running = jobs_domain.assign(
        job, worker_id=who.worker_id, session_id=who.session_id, now=job.created_at, ttl=timedelta(minutes=1)
    )
    dispatcher.deliver(running, 1_795_000_000.25)
    assert session.held == {"job_1": 1} and session.reserved == 0 and session.free == 0
    frame = session.outbox.get_nowait()
    assert frame is not None and frame.assignment.job.id == "job_1" and frame.assignment.lease_epoch == 1
    stamp = frame.assignment.committed_at
    assert (stamp.seconds, stamp.nanos) == (1_795_000_000, 250_000_000)
    session.drop("job_1")
    dispatcher.slot_freed(session)  # the outcome came back: the session is ready again
    assert dispatcher.reserve(new_job(job_id="job_2")) == who


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


def test_a_claim_spreads_its_jobs_over_the_least_busy_sessions_first() -> None:
    sessions = [
        Session(id=f"ses_{i}", worker_id=f"wrk_{i}", worker_name=f"w{i}", eligibility=NOOP, slots=2)
        for i in range(4)
    ]
    sessions[0].hold("job_a", 1, datetime.now(UTC))  # the busiest: one slot left
    assert [s.id for s in _spread(sessions, 3)] == ["ses_1", "ses_2", "ses_3"]
    assert [s.id for s in _spread(sessions, 5)] == ["ses_1", "ses_2", "ses_3", "ses_0", "ses_1"]
    assert len(_spread(sessions, 7)) == 7 and _spread(sessions, 0) == []
