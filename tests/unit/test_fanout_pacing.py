"""Pacer: while the event loop's turns are long, subscribers keep a gap between responses, so
gRPC's core gets its calls taken; with short turns there is no gap, and nobody watching costs no
timer. The gap grows past a few milliseconds only while calls come about as fast as grpc.aio can
take them. A paced subscriber gets what arrived during its gap in one batch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

from control_plane.domain.workers import Event, EventKind
from control_plane.events import pacing
from control_plane.events.hub import EventHub, Subscription
from control_plane.events.pacing import Pacer

T0 = datetime(2026, 1, 1, tzinfo=UTC)
BOUND_S = 5.0  # how long any condition below may take to come true


def event(seq: int) -> Event:
    return Event(seq=seq, workspace_id="w1", kind=EventKind.JOB_SUBMITTED, occurred_at=T0)


async def _until(condition: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(BOUND_S):
            while not condition():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"not within {BOUND_S} s: {what}") from None


class LongTurns:
    """Keeps every turn of the loop at least ``turn_s`` long, as a crowd of ready tasks would, and
    counts ``calls_per_turn`` calls taken in each."""

    def __init__(self, turn_s: float, *, calls_per_turn: int = 0) -> None:
        self.turn_s = turn_s
        self.calls_per_turn = calls_per_turn
        self.calls = 0
        self.running = True

    def start(self) -> None:
        asyncio.get_running_loop().call_soon(self._turn)

    def _turn(self) -> None:
        if self.running:
            time.sleep(self.turn_s)
            self.calls += self.calls_per_turn
            asyncio.get_running_loop().call_soon(self._turn)


async def test_long_turns_with_calls_coming_fast_open_the_full_gap_and_short_ones_close_it() -> None:
    load = LongTurns(4 * pacing.TARGET_S, calls_per_turn=1)  # 500 calls a second: saturated
    pacer = Pacer(calls_taken=lambda: load.calls)
    pacer.acquire()
    try:
        load.start()
        await _until(lambda: pacer.gap >= pacing.CEILING_S, "the gap reaches its ceiling")
        assert pacer.gap == pacing.CEILING_S
        assert pacer.intake_load >= pacing.SATURATED
        load.running = False
        await _until(lambda: pacer.gap == 0.0, "the gap closes")
        assert pacer.turn_s < pacing.TARGET_S
    finally:
        load.running = False
        pacer.release()


async def test_long_turns_with_calls_taken_as_they_come_keep_the_gap_under_the_soft_ceiling() -> None:
    load = LongTurns(4 * pacing.TARGET_S)  # a busy machine, but no call waits
    pacer = Pacer(calls_taken=lambda: load.calls)
    pacer.acquire()
    try:
        load.start()
        await _until(lambda: pacer.gap >= pacing.SOFT_CEILING_S, "the gap reaches the soft ceiling")
        await asyncio.sleep(40 * pacing.SAMPLE_PERIOD_S)  # more than the way to the full ceiling
        assert pacer.gap == pacing.SOFT_CEILING_S
        assert pacer.turn_s > pacing.TARGET_S and pacer.intake_load < pacing.SATURATED
    finally:
        load.running = False
        pacer.release()


async def test_a_wide_gap_narrows_to_the_soft_ceiling_once_calls_slow_down() -> None:
    load = LongTurns(4 * pacing.TARGET_S, calls_per_turn=1)
    pacer = Pacer(calls_taken=lambda: load.calls)
    pacer.acquire()
    try:
        load.start()
        await _until(lambda: pacer.gap >= pacing.CEILING_S, "the gap reaches its ceiling")
        load.calls_per_turn = 0  # the turns stay long
        await _until(lambda: pacer.gap <= pacing.SOFT_CEILING_S, "the gap narrows")
        await asyncio.sleep(10 * pacing.SAMPLE_PERIOD_S)
        assert 0.0 < pacer.gap <= pacing.SOFT_CEILING_S
    finally:
        load.running = False
        pacer.release()


async def test_short_turns_leave_no_gap() -> None:
    pacer = Pacer()
    pacer.acquire()
    try:
        await asyncio.sleep(20 * pacing.SAMPLE_PERIOD_S)
        assert pacer.gap == 0.0
    finally:
        pacer.release()


async def test_sampling_runs_only_while_someone_watches() -> None:
    hub = EventHub(read_since=_no_events, last_seq=_zero)
    pacer = hub._pacer
    assert pacer._timer is None
    async with hub.subscribe("w1"), hub.subscribe("w1"):
        assert pacer._timer is not None
    assert pacer._timer is None
    load = LongTurns(4 * pacing.TARGET_S)
    load.start()
    try:
        await asyncio.sleep(10 * pacing.SAMPLE_PERIOD_S)
        assert pacer.gap == 0.0 and pacer.turn_s == 0.0  # nobody watches: nothing sampled
    finally:
        load.running = False


async def test_a_paced_subscriber_takes_what_arrived_during_its_gap_in_one_batch() -> None:
    pacer = Pacer()  # not acquired: its gap is set by hand
    pacer.gap = 0.05
    sub = Subscription(limit=100, pacer=pacer)
    sub.offer([event(1)])
    assert [e.seq for e in await sub.batch(10)] == [1]
    took_first = time.monotonic()
    taking = asyncio.create_task(sub.batch(10))
    for seq in (2, 3, 4):
        sub.offer([event(seq)])
        await asyncio.sleep(0.005)
    assert not taking.done()
    assert [e.seq for e in await taking] == [2, 3, 4]
    assert time.monotonic() - took_first >= pacer.gap


async def test_without_a_gap_an_event_goes_out_at_once_and_a_closed_subscription_does_not_wait() -> None:
    pacer = Pacer()
    sub = Subscription(limit=100, pacer=pacer)
    sub.offer([event(1)])
    assert [e.seq for e in await sub.batch(10)] == [1]
    sub.offer([event(2)])
    assert [e.seq for e in await asyncio.wait_for(sub.batch(10), 0.5)] == [2]
    pacer.gap = 10.0
    sub.close()
    assert await asyncio.wait_for(sub.batch(10), 0.5) == []


async def _no_events(workspace_id: str, seq: int) -> list[Event]:
    return []


async def _zero(workspace_id: str) -> int:
    return 0
