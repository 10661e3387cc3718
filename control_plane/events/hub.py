"""Fan-out of committed events to live subscribers, in ``seq`` order with no gap and no duplicate.

Writers on this replica hand their events over right after commit (`EventHub.publish`); events
committed by other replicas arrive as a hint from PostgreSQL ``NOTIFY`` (`EventHub.hint`). Either
way a feed delivers only the next ``seq``: anything out of order makes it read the log from the
database instead, which is always complete because ``seq`` is allocated under a row lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

from control_plane.domain.workers import Event

log = logging.getLogger(__name__)

ReadSince = Callable[[str, int], Awaitable[list[Event]]]
LastSeq = Callable[[str], Awaitable[int]]

SUBSCRIBER_QUEUE_SIZE = 10_000


class Subscription:
    """A subscriber's bounded queue; it is cut off (``overflowed``) rather than slowing writers."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(SUBSCRIBER_QUEUE_SIZE)
        self.overflowed = False

    def offer(self, event: Event) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            self.queue = asyncio.Queue(1)
            self.queue.put_nowait(None)

    def close(self) -> None:
        self.overflowed = True
        self.queue = asyncio.Queue(1)
        self.queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self.queue.get()
            if event is None:
                return
            yield event


class _Feed:
    def __init__(self, workspace_id: str, last_seq: int) -> None:
        self.workspace_id = workspace_id
        self.last_seq = last_seq
        self.subscribers: set[Subscription] = set()
        self.catching_up: asyncio.Task[None] | None = None
        self.again = False

    def deliver(self, event: Event) -> None:
        self.last_seq = event.seq
        for sub in self.subscribers:
            sub.offer(event)


class EventHub:
    """One feed per watched workspace; workspaces nobody watches cost nothing."""

    def __init__(self, *, read_since: ReadSince, last_seq: LastSeq) -> None:
        self._read_since = read_since
        self._last_seq = last_seq
        self._feeds: dict[str, _Feed] = {}

    @asynccontextmanager
    async def subscribe(self, workspace_id: str) -> AsyncIterator[Subscription]:
        """Receive every event committed after the subscription starts (replay is the caller's)."""
        feed = self._feeds.get(workspace_id)
        if feed is None:
            last = await self._last_seq(workspace_id)
            feed = self._feeds.setdefault(workspace_id, _Feed(workspace_id, last))
        sub = Subscription()
        feed.subscribers.add(sub)
        try:
            yield sub
        finally:
            feed.subscribers.discard(sub)
            if not feed.subscribers and self._feeds.get(workspace_id) is feed:
                del self._feeds[workspace_id]
                if feed.catching_up is not None:
                    feed.catching_up.cancel()

    def publish(self, events: Sequence[Event]) -> None:
        """Hand over events this replica just committed."""
        for event in events:
            feed = self._feeds.get(event.workspace_id)
            if feed is None or event.seq <= feed.last_seq:
                continue
            if event.seq == feed.last_seq + 1 and feed.catching_up is None:
                feed.deliver(event)
            else:
                self._catch_up(feed)

    def hint(self, workspace_id: str, seq: int) -> None:
        """Another replica committed events up to ``seq``."""
        feed = self._feeds.get(workspace_id)
        if feed is not None and seq > feed.last_seq:
            self._catch_up(feed)

    def close(self) -> None:
        for feed in self._feeds.values():
            for sub in feed.subscribers:
                sub.close()

    def _catch_up(self, feed: _Feed) -> None:
        feed.again = True
        if feed.catching_up is None:
            feed.catching_up = asyncio.create_task(self._read_log(feed), name=f"catch-up {feed.workspace_id}")

    async def _read_log(self, feed: _Feed) -> None:
        try:
            for _ in range(100_000):  # bounded: each round delivers up to a page of events
                feed.again = False
                events = await self._read_since(feed.workspace_id, feed.last_seq)
                for event in events:
                    if event.seq == feed.last_seq + 1:
                        feed.deliver(event)
                if not events and not feed.again:
                    return
        except Exception:
            log.exception("reading the event log failed; subscribers of %s resync", feed.workspace_id)
            for sub in feed.subscribers:
                sub.close()
        finally:
            feed.catching_up = None
