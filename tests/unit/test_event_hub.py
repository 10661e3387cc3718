"""EventHub: subscribers take everything queued at once, in seq order; gaps wait briefly for their
writers, then come from the log; a subscriber that falls behind is cut off, never slowing writers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from control_plane.domain.workers import Event, EventKind
from control_plane.events import hub as hub_module
from control_plane.events.hub import EventHub, Subscription, _Feed

WS = "w1"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def event(seq: int, workspace_id: str = WS) -> Event:
    return Event(seq=seq, workspace_id=workspace_id, kind=EventKind.JOB_SUBMITTED, occurred_at=T0)


def events(first: int, last: int) -> list[Event]:
    return [event(seq) for seq in range(first, last + 1)]


class Log:
    """The committed event log as the hub reads it, counting the reads."""

    def __init__(self, last: int = 0) -> None:
        self.committed = events(1, last)
        self.reads = 0

    async def read_since(self, workspace_id: str, seq: int) -> list[Event]:
        self.reads += 1
        return [e for e in self.committed if e.workspace_id == workspace_id and e.seq > seq][:1000]

    async def last_seq(self, workspace_id: str) -> int:
        return max((e.seq for e in self.committed if e.workspace_id == workspace_id), default=0)

    def commit(self, first: int, last: int) -> list[Event]:
        new = events(first, last)
        self.committed += new
        return new


def seqs(taken: list[Event]) -> list[int]:
    return [e.seq for e in taken]


async def test_a_batch_is_everything_queued_in_order_up_to_the_limit() -> None:
    sub = Subscription(limit=100)
    sub.offer(events(1, 3))
    sub.offer(events(4, 5))
    assert seqs(await sub.batch(4)) == [1, 2, 3, 4]
    assert seqs(await sub.batch(4)) == [5]
    waiting = asyncio.create_task(sub.batch(10))
    await asyncio.sleep(0)
    assert not waiting.done()
    sub.offer(events(6, 7))
    async with asyncio.timeout(1):
        assert seqs(await waiting) == [6, 7]


async def test_a_subscriber_past_its_limit_is_cut_off_and_its_backlog_dropped() -> None:
    sub = Subscription(limit=3)
    sub.offer(events(1, 2))
    sub.offer(events(3, 4))
    assert sub.overflowed
    assert await sub.batch(10) == []
    sub.offer(events(5, 5))
    assert await sub.batch(10) == []


async def test_closing_wakes_a_waiting_subscriber_with_the_end() -> None:
    sub = Subscription(limit=10)
    waiting = asyncio.create_task(sub.batch(10))
    await asyncio.sleep(0)
    sub.close()
    async with asyncio.timeout(1):
        assert await waiting == []


async def test_events_published_out_of_order_are_delivered_in_order_without_reading_the_log() -> None:
    log = Log()
    hub = EventHub(read_since=log.read_since, last_seq=log.last_seq)
    async with hub.subscribe(WS) as sub:
        first, second = log.commit(1, 2), log.commit(3, 5)
        hub.publish(second)  # the later transaction's writer got there first
        hub.publish(first)
        async with asyncio.timeout(1):
            assert seqs(await sub.batch(100)) == [1, 2, 3, 4, 5]
        await asyncio.sleep(hub_module.GAP_GRACE_S * 3)
    assert log.reads == 0


async def test_a_notify_before_its_writer_publishes_costs_no_read() -> None:
    log = Log()
    hub = EventHub(read_since=log.read_since, last_seq=log.last_seq)
    async with hub.subscribe(WS) as sub:
        committed = log.commit(1, 2)
        hub.hint(WS, 2)
        hub.publish(committed)
        async with asyncio.timeout(1):
            assert seqs(await sub.batch(100)) == [1, 2]
        await asyncio.sleep(hub_module.GAP_GRACE_S * 3)
    assert log.reads == 0


async def test_a_gap_nobody_fills_is_read_from_the_log_after_the_grace() -> None:
    log = Log()
    hub = EventHub(read_since=log.read_since, last_seq=log.last_seq)
    async with hub.subscribe(WS) as sub:
        log.commit(1, 2)  # by another replica: no publish here
        hub.publish(log.commit(3, 3))
        async with asyncio.timeout(1):
            assert seqs(await sub.batch(100)) == [1, 2, 3]
    assert log.reads == 1


async def test_another_replicas_commits_arrive_through_the_log() -> None:
    log = Log(last=4)
    hub = EventHub(read_since=log.read_since, last_seq=log.last_seq)
    async with hub.subscribe(WS) as sub:
        log.commit(5, 1504)
        hub.hint(WS, 1504)
        got: list[int] = []
        async with asyncio.timeout(5):
            while len(got) < 1500:
                got += seqs(await sub.batch(1000))
        assert got == list(range(5, 1505))
    assert log.reads == 2  # one full page, then the rest


async def test_every_subscriber_gets_every_event_once_and_other_workspaces_are_ignored() -> None:
    log = Log()
    hub = EventHub(read_since=log.read_since, last_seq=log.last_seq)
    async with hub.subscribe(WS) as a, hub.subscribe(WS) as b:
        hub.publish([*log.commit(1, 3), event(1, workspace_id="other")])
        hub.publish(log.commit(1, 3))  # a duplicate hand-over changes nothing
        hub.publish(log.commit(4, 4))
        async with asyncio.timeout(1):
            assert seqs(await a.batch(100)) == [1, 2, 3, 4]
            assert seqs(await b.batch(100)) == [1, 2, 3, 4]


async def test_a_slow_subscriber_is_cut_off_while_the_others_continue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hub_module, "SUBSCRIBER_QUEUE_SIZE", 4)
    log = Log()
    hub = EventHub(read_since=log.read_since, last_seq=log.last_seq)
    async with hub.subscribe(WS) as slow, hub.subscribe(WS) as fast:
        hub.publish(log.commit(1, 3))
        assert seqs(await fast.batch(100)) == [1, 2, 3]
        hub.publish(log.commit(4, 6))
        assert slow.overflowed and not fast.overflowed
        assert await slow.batch(100) == []
        assert seqs(await fast.batch(100)) == [4, 5, 6]


async def test_an_event_held_past_a_gap_and_then_read_from_the_log_is_not_kept() -> None:
    feed = _Feed(WS, 0)
    feed.take([event(3)])  # held: 1 and 2 are missing
    feed.take([event(1), event(2), event(3), event(4)])  # the log has them all
    assert feed.last_seq == 4 and feed.ahead == {}
