"""Fan-out of committed events to live subscribers, in ``seq`` order with no gap and no duplicate.

Writers on this replica hand their events over right after commit (`EventHub.publish`); events
committed by other replicas arrive as a hint from PostgreSQL ``NOTIFY`` (`EventHub.hint`). Either
way a feed delivers only the next ``seq``. Events past a gap wait (bounded) for the gap to fill;
if it is still open after `GAP_GRACE_S`, the feed reads the log from the database instead, which
is always complete because ``seq`` is allocated under a row lock.

Each subscriber has a bounded backlog. One that falls too far behind is cut off, and its reader
resubscribes and replays from the log, so a slow Console never slows writers or grows memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace

from control_plane.domain.workers import Event
from control_plane.events.pacing import Pacer

log = logging.getLogger(__name__)

ReadSince = Callable[[str, int], Awaitable[list[Event]]]
LastSeq = Callable[[str], Awaitable[int]]

SUBSCRIBER_QUEUE_SIZE = 10_000
GAP_GRACE_S = 0.01  # how long a gap may wait for this replica's own writers before the log is read
LOG_PAGE = 1000  # what one read of the log returns at most
MAX_ROUNDS = 1 << 40  # a bound on reading one subscription that no real stream reaches


class Subscription:
    """A subscriber's bounded backlog; it is cut off (``overflowed``) rather than slowing writers.

    Offering an event is an append, and wakes the subscriber only if it is waiting: a subscriber
    that is busy sending finds everything that arrived meanwhile in one `batch`. While the event
    loop is saturated, a `Pacer` spaces the batches out (see `control_plane.events.pacing`).
    """

    def __init__(self, *, limit: int, pacer: Pacer | None = None) -> None:
        self._limit = limit
        self._pacer = pacer
        self._last_take = 0.0
        self._backlog: deque[Event] = deque()
        self._waiting: asyncio.Future[None] | None = None
        self._ended = False
        self.overflowed = False

    def offer(self, events: Sequence[Event]) -> None:
        """Queue consecutive events, or cut the subscriber off if that would pass the limit."""
        if self._ended:
            return
        if len(self._backlog) + len(events) > self._limit:
            self.close()  # the subscriber resyncs from the log instead
            return
        self._backlog.extend(events)
        self._wake()

    def close(self) -> None:
        """End the subscription; anything not yet taken is dropped, so the reader resyncs from the log."""
        self.overflowed = True
        self._ended = True
        self._backlog.clear()
        self._wake()

    async def batch(self, limit: int) -> list[Event]:
        """Wait for events, then take everything queued, oldest first, at most ``limit``.

        An empty list means the subscription ended (closed or overflowed).
        """
        loop = asyncio.get_running_loop()
        if not self._backlog and not self._ended:
            self._waiting = loop.create_future()
            try:
                await self._waiting
            finally:
                self._waiting = None
        if self._pacer is not None and not self._ended:
            wait = self._last_take + self._pacer.gap - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last_take = loop.time()
        backlog = self._backlog
        return [backlog.popleft() for _ in range(min(limit, len(backlog)))]

    async def __aiter__(self) -> AsyncIterator[Event]:
        for _ in range(MAX_ROUNDS):
            events = await self.batch(self._limit)
            if not events:
                return
            for event in events:
                yield event

    def _wake(self) -> None:
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)


class _Feed:
    """One workspace's live events, handed to its subscribers strictly in ``seq`` order."""

    def __init__(self, workspace_id: str, last_seq: int) -> None:
        self.workspace_id = workspace_id
        self.last_seq = last_seq  # delivered to every subscriber
        self.known_seq = last_seq  # committed, as far as this replica has heard
        self.ahead: dict[int, Event] = {}  # published past a gap, waiting for it to fill
        self.subscribers: set[Subscription] = set()
        self.catching_up: asyncio.Task[None] | None = None

    @property
    def behind(self) -> bool:
        return self.known_seq > self.last_seq

    def take(self, events: Sequence[Event]) -> None:
        """Deliver whatever continues the log; keep what lies past a gap (bounded) for later."""
        ready: list[Event] = []
        for event in events:
            if event.seq <= self.last_seq:
                continue
            self.known_seq = max(self.known_seq, event.seq)
            if event.seq == self.last_seq + 1:
                ready.append(event)
                self.last_seq = event.seq
                self._continue_from_ahead(ready)
            elif len(self.ahead) < SUBSCRIBER_QUEUE_SIZE:  # past that, the log has the rest
                self.ahead[event.seq] = event
        if ready:
            for sub in self.subscribers:
                sub.offer(ready)

    def _continue_from_ahead(self, ready: list[Event]) -> None:
        for _ in range(len(self.ahead)):
            event = self.ahead.pop(self.last_seq + 1, None)
            if event is None:
                return
            ready.append(event)
            self.last_seq = event.seq


class EventHub:
    """One feed per watched workspace; workspaces nobody watches cost nothing."""

    def __init__(
        self, *, read_since: ReadSince, last_seq: LastSeq, calls_taken: Callable[[], int] | None = None
    ) -> None:
        """``calls_taken``: how many calls the server has taken so far, for the pacing."""
        self._read_since = read_since
        self._last_seq = last_seq
        self._feeds: dict[str, _Feed] = {}
        self._pacer = Pacer(calls_taken=calls_taken)

    @asynccontextmanager
    async def subscribe(self, workspace_id: str) -> AsyncIterator[Subscription]:
        """Receive every event committed after the subscription starts (replay is the caller's)."""
        feed = self._feeds.get(workspace_id)
        if feed is None:
            last = await self._last_seq(workspace_id)
            feed = self._feeds.setdefault(workspace_id, _Feed(workspace_id, last))
        sub = Subscription(limit=SUBSCRIBER_QUEUE_SIZE, pacer=self._pacer)
        feed.subscribers.add(sub)
        self._pacer.acquire()
        try:
            yield sub
        finally:
            self._pacer.release()
            feed.subscribers.discard(sub)
            if not feed.subscribers and self._feeds.get(workspace_id) is feed:
                del self._feeds[workspace_id]
                if feed.catching_up is not None:
                    feed.catching_up.cancel()

    def publish(self, events: Sequence[Event], committed_at: float = 0.0) -> None:
        """Hand over events this replica just committed, at ``committed_at`` (`time.time()`; 0.0:
        not known), which the events subscribers receive carry."""
        by_workspace: dict[str, list[Event]] = {}
        for event in events:
            if event.workspace_id in self._feeds:
                if committed_at:
                    event = replace(event, committed_at=committed_at)
                by_workspace.setdefault(event.workspace_id, []).append(event)
        for workspace_id, mine in by_workspace.items():
            feed = self._feeds[workspace_id]
            feed.take(mine)
            if feed.behind:
                self._catch_up(feed)

    def hint(self, workspace_id: str, seq: int) -> None:
        """Events up to ``seq`` were committed, by this replica or another."""
        feed = self._feeds.get(workspace_id)
        if feed is not None and seq > feed.known_seq:
            feed.known_seq = seq
            self._catch_up(feed)

    def resync(self) -> None:
        """Look at the log of every watched workspace: hints may have been missed (our LISTEN
        connection was down)."""
        for feed in self._feeds.values():
            feed.known_seq = max(feed.known_seq, feed.last_seq + 1)
            self._catch_up(feed)

    def close(self) -> None:
        for feed in self._feeds.values():
            for sub in feed.subscribers:
                sub.close()

    def _catch_up(self, feed: _Feed) -> None:
        if feed.catching_up is None:
            feed.catching_up = asyncio.create_task(self._read_log(feed), name=f"catch-up {feed.workspace_id}")

    async def _read_log(self, feed: _Feed) -> None:
        """Fill a gap from the log, unless the events arrive by `publish` first.

        Concurrent transactions of this replica may finish in another order than they committed
        (on PostgreSQL), and a commit's ``NOTIFY`` may arrive before its writer publishes; both
        leave a gap that the writers fill within moments, so the log is read only after
        `GAP_GRACE_S`. Events committed by other replicas arrive that much later.
        """
        try:
            full_page = False
            for _ in range(100_000):  # bounded: each round delivers up to a page of events
                if not full_page:
                    await asyncio.sleep(GAP_GRACE_S)
                if not feed.behind:
                    return
                events = await self._read_since(feed.workspace_id, feed.last_seq)
                if not events:  # the log is the authority on what was committed
                    feed.known_seq = feed.last_seq
                    return
                feed.take(events)
                full_page = len(events) >= LOG_PAGE
        except Exception:
            log.exception("reading the event log failed; subscribers of %s resync", feed.workspace_id)
            for sub in feed.subscribers:
                sub.close()
        finally:
            feed.catching_up = None
