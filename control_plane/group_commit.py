"""Group commit: requests that arrive while a transaction is in flight share the next one.

There is no timer. The first request of an idle batcher starts a flush at the next turn of the
event loop, so a lone request waits for nothing but that turn; requests arriving meanwhile (from
other worker streams or submitters) queue up and go together in the following transaction. Under
load the cost of a transaction (BEGIN, the workspace's ``event_seq`` row lock, COMMIT) is paid per
batch instead of per request.

Every caller gets its own answer: ``apply`` returns one value or exception per request, so a
stale outcome in a batch is rejected without touching the others. If the transaction itself fails
(any error escaping ``apply`` before `Batch.committed`), nothing of the batch was committed; the
requests are then retried one by one, so one bad request cannot fail its neighbours, unless the
database is unavailable. An error after `Batch.committed` goes to every request of the batch as it is.

An ``apply`` whose transaction has a tail that holds no lock (waiting for its commit to reach the
disk, see `store.pg_direct.flush`) calls `Batch.committed` when its statement has committed: a new
flusher task takes the next batch then, while this one finishes its tail, and the two overlap,
one committing while the other waits for its flush. Statements still run one at a time, in order.
Handing over costs one new task per committed batch, less than running every batch in a task of
its own awaited alongside a "committed" future (bench/RESULTS.md).

An ``apply`` may also answer its callers the moment its transaction is durable (`Batch.answer`),
before the rest of its end: a submitter waiting in step with others sends its next job a few turns
of the event loop sooner, and with 8 submitters that is 7-14 % more jobs a second.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from control_plane.errors import Unavailable

log = logging.getLogger(__name__)

R = TypeVar("R")
T = TypeVar("T")


class Batch(list[R]):
    """The requests of one transaction; `committed` lets the next batch begin before it ends, and
    `answer` lets its callers go before it ends."""

    def __init__(
        self,
        requests: list[R],
        on_committed: Callable[[], None],
        on_answer: Callable[[Sequence[Any]], None],
    ) -> None:
        super().__init__(requests)
        self._on_committed = on_committed
        self._on_answer = on_answer
        self.is_committed = False
        self.is_answered = False

    def answer(self, results: Sequence[Any]) -> None:
        """The transaction is durable: each request gets its result now, one per request as
        ``apply`` returns them, while what is left of the transaction (its events, its
        connection's return) concerns no caller. What ``apply`` returns afterwards is not given
        again; an error of that rest is logged, and nothing is applied again."""
        self.is_answered = True
        self._on_answer(results)

    def committed(self, *_: object) -> None:
        """The statement has committed; what is left of the transaction may overlap the next."""
        if not self.is_committed:
            self.is_committed = True
            self._on_committed()


Apply = Callable[[Batch[R]], Awaitable[list[T | Exception]]]
Then = Callable[[asyncio.Future[T]], None]


class GroupCommit(Generic[R, T]):
    """Runs ``apply`` on batches of at most ``max_batch`` requests, one batch at a time."""

    def __init__(self, apply: Apply[R, T], *, max_batch: int = 64) -> None:
        self._apply = apply
        self._max_batch = max_batch
        self._queue: list[_Waiting[R, T]] = []
        # The task that takes the next batch; a batch that committed hands that role to a new one
        # and finishes its tail (`_tails`) on its own.
        self._flusher: asyncio.Task[None] | None = None
        self._tails: set[asyncio.Task[None]] = set()  # batches committed, not yet answered
        self.batches = 0  # committed or failed transactions, for tests and diagnostics

    async def __call__(self, request: R) -> T:
        """Queue ``request`` and wait for its own result (or exception) after the commit."""
        return await self.enqueue(request)

    def enqueue(self, request: R, then: Then[T] | None = None) -> asyncio.Future[T]:
        """Queue ``request``; its future gets its own result (or exception) after the commit.

        ``then`` is called with the future the moment it is settled, or found given up: in that
        same turn of the event loop, where a callback added to the future runs a turn later.
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(request, future, then))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="group commit")
        return future

    async def _flush(self) -> None:
        me = asyncio.current_task()
        try:
            while self._queue and self._flusher is me:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._run(batch)
        finally:
            if self._flusher is me:
                self._flusher = None
                left, self._queue = self._queue, []
                _settle(left, [Unavailable("the control plane is stopping")] * len(left))

    def _hand_over(self) -> None:
        """The running batch has committed: a new flusher takes what queued up meanwhile, while
        this task finishes the batch's tail."""
        me = asyncio.current_task()
        if me is None or self._flusher is not me:
            return
        self._tails.add(me)
        me.add_done_callback(self._tails.discard)
        self._flusher = asyncio.create_task(self._flush(), name="group commit") if self._queue else None

    async def _run(self, batch: list[_Waiting[R, T]], *, overlap: bool = True) -> None:
        self.batches += 1
        requests = Batch(
            [waiting.request for waiting in batch],
            self._hand_over if overlap else _stay,
            functools.partial(_settle, batch),
        )
        try:
            results = await self._apply(requests)
        except Unavailable as exc:
            _settle(batch, [exc] * len(batch))
        except asyncio.CancelledError:
            _settle(batch, [Unavailable("the control plane is stopping")] * len(batch))
            raise
        except Exception as exc:
            if requests.is_answered:
                # Its callers have their results; no one else would hear of this.
                log.warning("a group commit failed after answering its callers: %r", exc)
                return
            if len(batch) == 1 or requests.is_committed:  # what committed is not applied again
                _settle(batch, [exc] * len(batch))
                return
            log.warning("a group commit of %d failed (%s); retrying one by one", len(batch), exc)
            for one in batch:
                await self._run([one], overlap=False)  # the rest of the batch comes first
        else:
            _settle(batch, results)


def _stay() -> None:
    pass


@dataclass(slots=True)
class _Waiting(Generic[R, T]):
    """A queued request, the future its caller waits on, and what to call once that is settled."""

    request: R
    future: asyncio.Future[T]
    then: Then[T] | None


def _settle(batch: Sequence[_Waiting[Any, T]], results: Sequence[T | Exception]) -> None:
    for waiting, result in zip(batch, results, strict=True):
        future = waiting.future
        if not future.done():  # done: the caller gave up; what was committed stays committed
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
        then, waiting.then = waiting.then, None  # once, though a batch may be settled twice
        if then is not None:
            then(future)
