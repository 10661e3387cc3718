"""Worker sessions held in memory: liveness, leases held, free slots. No database write here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ias.v1 import worker_service_pb2 as wpb

log = logging.getLogger(__name__)

OUTBOX_SIZE = 4096

Frame = wpb.ConnectResponse | None  # None: the writer stops


class Outbox:
    """The frames waiting for a stream's writer: a bounded FIFO with one reader.

    What `asyncio.Queue` does for this, without its four deques (each with a block of 64 slots):
    a server holds one outbox per connected worker, thousands of them idle, and the queue was 3 KiB
    of each idle session's memory.
    """

    __slots__ = ("_frames", "_limit", "_waiter")

    def __init__(self, limit: int = OUTBOX_SIZE) -> None:
        # Made when a frame comes and dropped when the last leaves: an empty deque is 760 bytes.
        self._frames: deque[Frame] | None = None
        self._limit = limit
        self._waiter: asyncio.Future[None] | None = None  # the writer, while it waits

    def put_nowait(self, frame: Frame) -> None:
        frames = self._frames
        if frames is None:
            frames = self._frames = deque()
        elif len(frames) >= self._limit:
            raise asyncio.QueueFull
        frames.append(frame)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def get_nowait(self) -> Frame:
        frames = self._frames
        if not frames:
            raise asyncio.QueueEmpty
        frame = frames.popleft()
        if not frames:
            self._frames = None
        return frame

    async def get(self) -> Frame:
        while not self._frames:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.get_nowait()


@dataclass(frozen=True, slots=True)
class Eligibility:
    """What a session may be offered; sessions with equal eligibility are claimed for together."""

    workspace_id: str
    types: frozenset[str]
    repo_ids: frozenset[str]


@dataclass(eq=False, slots=True)
class Session:
    """One live Connect stream of a worker."""

    id: str
    worker_id: str
    worker_name: str
    eligibility: Eligibility
    slots: int
    reads_assignment_acks: bool = False  # an outcome's ack may ride on the assignment refilling its slot
    outbox: Outbox = field(default_factory=Outbox)
    held: dict[str, int] = field(default_factory=dict)  # job id → lease epoch
    lease_expires: dict[str, datetime] = field(default_factory=dict)
    held_since: dict[str, float] = field(default_factory=dict)  # monotonic time of the assignment
    progress: dict[str, tuple[int, str]] = field(default_factory=dict)  # unflushed, latest wins
    reserved: int = 0  # slots promised to jobs whose direct assignment is being committed
    draining: bool = False
    closed: bool = False
    last_heard: float = field(default_factory=time.monotonic)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # frames being recorded

    @property
    def workspace_id(self) -> str:
        return self.eligibility.workspace_id

    @property
    def free(self) -> int:
        if self.draining or self.closed:
            return 0
        return max(self.slots - len(self.held) - self.reserved, 0)

    def send(self, frame: wpb.ConnectResponse) -> bool:
        """Queue a frame for the stream's writer; a session that cannot keep up is closed."""
        if self.closed:
            return False
        try:
            self.outbox.put_nowait(frame)
            return True
        except asyncio.QueueFull:
            log.warning("worker %s is not reading its stream; closing the session", self.worker_name)
            self.close()
            return False

    def close(self) -> None:
        """End the session: the writer stops and the stream handler finishes."""
        if not self.closed:
            self.closed = True
            try:
                self.outbox.put_nowait(None)
            except asyncio.QueueFull:
                # Make room for the close marker: the frames left would never be read anyway.
                self.outbox.get_nowait()
                self.outbox.put_nowait(None)

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``work`` (recording a frame) as a task the session's end waits for."""
        task = asyncio.create_task(work, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def hold(self, job_id: str, epoch: int, expires: datetime) -> None:
        if not self.held:
            # An idle worker sends no heartbeats: its silence counts from its first lease.
            self.last_heard = time.monotonic()
        self.held[job_id] = epoch
        self.lease_expires[job_id] = expires
        self.held_since[job_id] = time.monotonic()

    def drop(self, job_id: str) -> None:
        self.held.pop(job_id, None)
        self.lease_expires.pop(job_id, None)
        self.held_since.pop(job_id, None)
        self.progress.pop(job_id, None)

    def unconfirmed(self, confirmed: dict[str, int], *, older_than: float) -> list[tuple[str, int]]:
        """The leases held for longer than ``older_than`` seconds that the worker, in a heartbeat
        listing ``confirmed`` (job id → epoch), neither runs nor still has to report on."""
        cutoff = time.monotonic() - older_than
        return [
            (job_id, epoch)
            for job_id, epoch in self.held.items()
            if confirmed.get(job_id) != epoch and self.held_since.get(job_id, cutoff) <= cutoff
        ]


class SessionRegistry:
    """The sessions connected to this replica, by id and by worker."""

    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}
        self._by_worker: dict[str, Session] = {}
        self._groups: dict[Eligibility, dict[Session, None]] = {}  # ordered sets

    def add(self, session: Session) -> Session | None:
        """Register ``session``; returns the session of the same worker it fences out, if any."""
        old = self._by_worker.get(session.worker_id)
        if old is not None:
            self._by_id.pop(old.id, None)
            self._leave_group(old)
        self._by_id[session.id] = session
        self._by_worker[session.worker_id] = session
        members = self._groups.get(session.eligibility)
        if members is None:
            self._groups[session.eligibility] = {session: None}
        else:
            # Equal sessions share one copy of what they may be offered (a fleet is mostly alike).
            session.eligibility = next(iter(members)).eligibility
            members[session] = None
        return old

    def remove(self, session: Session) -> None:
        if self._by_id.pop(session.id, None) is session:
            self._leave_group(session)
        if self._by_worker.get(session.worker_id) is session:
            del self._by_worker[session.worker_id]

    def groups(self) -> list[tuple[Eligibility, list[Session]]]:
        """The sessions by eligibility (a snapshot: the caller may await between groups)."""
        return [(eligibility, list(members)) for eligibility, members in self._groups.items()]

    def _leave_group(self, session: Session) -> None:
        members = self._groups.get(session.eligibility)
        if members is not None:
            members.pop(session, None)
            if not members:
                del self._groups[session.eligibility]

    def get(self, session_id: str) -> Session | None:
        return self._by_id.get(session_id)

    def for_worker(self, worker_id: str) -> Session | None:
        return self._by_worker.get(worker_id)

    def holder(self, job_id: str) -> Session | None:
        for session in self._by_id.values():
            if job_id in session.held:
                return session
        return None

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)
