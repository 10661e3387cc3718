"""Pacing of the Console fan-out while the event loop is saturated.

grpc.aio takes a new call of a method only after a few turns of the event loop, and each turn runs
every task that is ready. With many Watch streams ready at once, each turn grows long, new unary
calls (``SubmitJob``, the Console's actions) queue inside gRPC's core faster than the server takes
them, and past 1,000 queued calls the core drops them at random, answering CANCELLED. Measured on
2 cores with 200 watchers and 667 submissions a second: 60 to 150 calls a second taken, the rest
queued until dropped; 350 to 390 with the pacing below (``bench/RESULTS.md``).

So while the turns are long, each subscriber sends at most one response per `Pacer.gap`: what
arrives meanwhile waits in its backlog and goes out coalesced in the next response. Fewer tasks
are ready in each turn, the turns shorten, and the server takes calls again. The gap grows by a
quarter each sample while turns are longer than `TARGET_S`, and shrinks back to zero once they
are under half of it; while turns are short an event goes out the moment it is published.

How far the gap may grow depends on whether calls are at risk. grpc.aio takes one call of a
method about every `TURNS_PER_CALL` turns (measured: 5.9 to 7.4 at turns of 0.25 to 2 ms), so
the calls taken a second, times that many turns, times a turn's length, is the share of its
intake in use (`Pacer.intake_load`). Below `SATURATED` calls are taken as fast as they come, and
a long turn costs latency but loses nothing: the gap stays under `SOFT_CEILING_S`, a few
milliseconds more on an event. At or above it calls are about to queue in the core, and the gap
may grow to `CEILING_S`. Turn lengths alone cannot tell a loop slowed by a busy machine from one
crowded by watchers; paced by them alone, both got the full ceiling.

The length of a turn is sampled as the delay of a ``call_soon`` callback, taken every
`SAMPLE_PERIOD_S` while anyone watches: a callback queued during one turn runs in the next, after
everything queued before it, so an idle loop runs it within microseconds and a saturated one
after about a turn. The calls taken are the server interceptor's count (``calls_taken``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

SAMPLE_PERIOD_S = 0.005
SMOOTHING = 0.3  # weight of the newest sample in the moving average
TARGET_S = 0.0005  # the turn length pacing works towards: a call taken every ~3 ms or faster
GROWTH = 1.25  # the gap's factor per sample while turns are too long
SHRINK = 0.8  # its factor per sample once they are short again
MIN_GAP_S = 0.001  # the first gap; a shrinking gap below it is zero
SOFT_CEILING_S = 0.005  # the longest gap while calls are taken as fast as they arrive
CEILING_S = 0.05  # the longest gap, whatever the load
TURNS_PER_CALL = 6  # turns between two calls of one method that grpc.aio takes
RATE_SMOOTHING = 0.1  # weight of the newest sample in the calls-taken rate (about 50 ms)
SATURATED = 1.0  # the intake load from which calls are about to queue in gRPC's core


class Pacer:
    """Turns the loop's turn length and the calls it takes into the gap subscribers keep between
    responses.

    Samples only while in use (`acquire` / `release`), so a replica nobody watches pays nothing.
    ``calls_taken`` counts the calls the server has taken so far; without it the gap stays under
    `SOFT_CEILING_S`.
    """

    def __init__(self, *, calls_taken: Callable[[], int] | None = None) -> None:
        self.turn_s = 0.0  # moving average of the sampled turn length
        self.calls_per_s = 0.0  # moving average of the calls taken a second
        self.gap = 0.0  # seconds a subscriber waits after one response before taking the next
        self.calls_taken = calls_taken
        self._counted = (0.0, 0)  # when calls were last counted, and how many there were
        self._users = 0
        self._timer: asyncio.TimerHandle | None = None
        self._chain = 0  # the sampling chain that is current; older ones stop

    def acquire(self) -> None:
        self._users += 1
        if self._users == 1:
            self._chain += 1
            self._schedule(asyncio.get_running_loop(), self._chain)

    def release(self) -> None:
        self._users -= 1
        if self._users == 0:
            self._chain += 1  # a sample under way is dropped
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.turn_s = self.calls_per_s = self.gap = 0.0
            self._counted = (0.0, 0)  # the next user's first sample starts the count afresh

    @property
    def intake_load(self) -> float:
        """The share of grpc.aio's intake of calls in use: 1.0 takes one every `TURNS_PER_CALL` turns."""
        return self.calls_per_s * TURNS_PER_CALL * self.turn_s

    def _schedule(self, loop: asyncio.AbstractEventLoop, chain: int) -> None:
        self._timer = loop.call_later(SAMPLE_PERIOD_S, self._probe, loop, chain)

    def _probe(self, loop: asyncio.AbstractEventLoop, chain: int) -> None:
        loop.call_soon(self._measure, loop, chain, loop.time())

    def _measure(self, loop: asyncio.AbstractEventLoop, chain: int, queued_at: float) -> None:
        if chain != self._chain:
            return
        now = loop.time()
        self.turn_s += SMOOTHING * (now - queued_at - self.turn_s)
        self._count_calls(now)
        ceiling = CEILING_S if self.intake_load >= SATURATED else SOFT_CEILING_S
        if self.turn_s > TARGET_S and self.gap < ceiling:
            self.gap = min(max(self.gap * GROWTH, MIN_GAP_S), ceiling)
        elif self.gap and (self.turn_s < TARGET_S / 2 or self.gap > ceiling):
            self.gap = self.gap * SHRINK if self.gap * SHRINK >= MIN_GAP_S else 0.0
        self._schedule(loop, chain)

    def _count_calls(self, now: float) -> None:
        if self.calls_taken is None:
            return
        taken = self.calls_taken()
        then, before = self._counted
        self._counted = (now, taken)
        if then and now > then:
            self.calls_per_s += RATE_SMOOTHING * ((taken - before) / (now - then) - self.calls_per_s)
