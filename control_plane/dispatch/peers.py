"""Whether this replica's commits must wake other replicas, or may stay quiet.

On PostgreSQL every commit that writes events or leaves jobs waiting sends a ``NOTIFY``, so that
Watch feeds and dispatchers on other replicas learn of it at once. A replica that is the only one
pays for that and gains nothing: PostgreSQL serialises notifying commits, and it wakes this
replica's own listening backend, which sends the notification straight back, at the very moment
the submit's result travels the same way (0.1-0.45 ms of dispatch latency at p50, measured).

So a replica stays quiet while the ``replicas`` table lists no other live replica and its own
LISTEN connection is up to hear a newcomer. A replica announces itself on `REPLICAS_CHANNEL` in the
transaction that stores its row. A quiet replica that hears an announcement, finds another live row
when it proves itself alive, or loses its LISTEN connection notifies again from its next write on;
once the writes it began quietly have ended it sends one hint per workspace they wrote, carrying
that workspace's latest sequence number, so a newcomer's feeds read what they missed from the log.
Nothing is lost either way: the log is complete, and hints only decide how soon other replicas
look at it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable

log = logging.getLogger(__name__)

REPLICAS_CHANNEL = "ias_replicas"  # payload: the id of a replica whose row was just stored
DRAIN_TIMEOUT_S = 30.0  # a quiet write still open after this long is let go unwaited

HintWorkspaces = Callable[[list[str]], Awaitable[None]]
CountOthers = Callable[[], Awaitable[int]]


class Peers:
    """What this replica knows of the others, as far as its notifications are concerned.

    Every write asks `quiet_write` whether it may leave its notifications out and, if it did,
    calls `quiet_done` once its transaction has ended, committed or not.
    """

    def __init__(self, *, hint: HintWorkspaces, count_others: CountOthers) -> None:
        self._hint = hint
        self._count_others = count_others
        self._alone = False  # never assumed: only `observed` concludes it
        self._listening = False  # our LISTEN connection is up, so an announcement would be heard
        self._changes = 0  # signs of company so far; an observation older than the last is stale
        self._open = 0  # quiet writes not yet ended
        self._drained = asyncio.Event()
        self._drained.set()
        self._written: set[str] = set()  # workspaces of quiet writes since company was last noticed
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def alone(self) -> bool:
        return self._alone

    def mark(self) -> int:
        """Taken before counting the other replicas: `observed` trusts the count only if nothing
        hinted at company after this mark."""
        return self._changes

    def observed(self, mark: int, *, others: int) -> None:
        """The replicas table listed ``others`` other live replicas, read after `mark`."""
        if others:
            self.company()
        elif self._listening and mark == self._changes and not self._alone:
            log.info("no other replica is live: commits stop notifying")
            self._alone = True

    def listening(self, connected: bool) -> None:
        """Our LISTEN connection came up or went down: announcements may have gone unheard.
        Once it is up, the replicas table is read at once rather than at the next touch."""
        self._listening = connected
        self.company()
        if connected:
            self._spawn(self.look(), "peer count")

    def company(self) -> None:
        """Another replica may be listening (announced, seen, or our LISTEN was interrupted)."""
        self._changes += 1
        if not self._alone:
            return
        self._alone = False
        log.info("another replica may be live: commits notify again")
        self._spawn(self._hint_when_drained(), "peer hints")

    def quiet_write(self) -> bool:
        """Whether the write about to be sent may leave its notifications out. If so, the caller
        must call `quiet_done` when its transaction has ended."""
        if not self._alone:
            return False
        self._open += 1
        self._drained.clear()
        return True

    def quiet_done(self, workspaces: Iterable[str]) -> None:
        self._written.update(workspaces)
        self._open -= 1
        if self._open == 0:
            self._drained.set()

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    def _spawn(self, coro: Coroutine[None, None, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def look(self) -> None:
        """Count the other live replicas, and conclude from the count (`observed`)."""
        mark = self.mark()
        try:
            others = await self._count_others()
        except Exception as exc:  # the next proof of life looks again
            log.warning("could not count the other replicas: %s", exc)
            return
        self.observed(mark, others=others)

    async def _hint_when_drained(self) -> None:
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                await self._drained.wait()
        except TimeoutError:
            log.warning("quiet writes still open after %.0f s; hinting without them", DRAIN_TIMEOUT_S)
        written, self._written = sorted(self._written), set()
        if not written:
            return
        try:
            await self._hint(written)
        except Exception as exc:  # the next event of each workspace hints again
            log.warning("could not hint %d workspaces to other replicas: %s", len(written), exc)
