"""GroupCommit: batching without a timer, one answer per caller, one-by-one retry of a failed batch."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from control_plane.errors import StaleLease, Unavailable
from control_plane.group_commit import Batch, GroupCommit


class Recorder:
    """An ``apply`` that doubles numbers, rejects negatives, and fails whole batches on demand."""

    def __init__(self, *, fail_batches_with: Exception | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_batches_with = fail_batches_with

    async def __call__(self, requests: Sequence[int]) -> list[int | Exception]:
        self.batches.append(list(requests))
        await asyncio.sleep(0.01)  # a transaction in flight
        if self.fail_batches_with is not None and (len(requests) > 1 or requests[0] == 13):
            raise self.fail_batches_with
        return [StaleLease(f"{r} is stale") if r < 0 else r * 2 for r in requests]


async def test_a_lone_request_is_applied_at_once_and_later_ones_share_a_batch() -> None:
    apply = Recorder()
    batcher: GroupCommit[int, int] = GroupCommit(apply)
    assert await batcher(1) == 2
    results = await asyncio.gather(*(batcher(n) for n in range(2, 7)))
    assert results == [4, 6, 8, 10, 12]
    assert apply.batches == [[1], [2, 3, 4, 5, 6]]


async def test_requests_arriving_during_a_transaction_go_in_the_next_one() -> None:
    apply = Recorder()
    batcher: GroupCommit[int, int] = GroupCommit(apply, max_batch=3)
    first = asyncio.create_task(batcher(1))
    await asyncio.sleep(0.001)  # the first transaction is in flight
    rest = await asyncio.gather(*(batcher(n) for n in range(2, 7)))
    assert (await first, rest) == (2, [4, 6, 8, 10, 12])
    assert apply.batches == [[1], [2, 3, 4], [5, 6]]


async def test_each_caller_gets_its_own_answer() -> None:
    batcher: GroupCommit[int, int] = GroupCommit(Recorder())
    results = await asyncio.gather(batcher(1), batcher(-1), batcher(3), return_exceptions=True)
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], StaleLease)


async def test_a_failed_batch_is_retried_one_by_one() -> None:
    apply = Recorder(fail_batches_with=RuntimeError("deadlock detected"))
    batcher: GroupCommit[int, int] = GroupCommit(apply)
    results = await asyncio.gather(batcher(1), batcher(13), batcher(3), return_exceptions=True)
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], RuntimeError)
    assert apply.batches == [[1, 13, 3], [1], [13], [3]]


async def test_an_unavailable_database_fails_the_batch_without_retries() -> None:
    apply = Recorder(fail_batches_with=Unavailable("database unavailable"))
    batcher: GroupCommit[int, int] = GroupCommit(apply)
    results = await asyncio.gather(batcher(1), batcher(2), return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results)
    assert apply.batches == [[1, 2]]


async def test_a_caller_that_gives_up_does_not_disturb_the_others() -> None:
    apply = Recorder()
    batcher: GroupCommit[int, int] = GroupCommit(apply)
    impatient = asyncio.create_task(batcher(1))
    patient = asyncio.create_task(batcher(2))
    await asyncio.sleep(0.001)
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    assert await patient == 4
    assert apply.batches == [[1, 2]]  # what was sent is still committed


async def test_a_batch_that_has_committed_lets_the_next_begin_while_it_finishes() -> None:
    """Statements run one at a time, in order; the tail after `Batch.committed` overlaps."""
    log: list[str] = []
    tails: list[asyncio.Event] = []

    async def apply(batch: Batch[int]) -> list[int | Exception]:
        log.append(f"statement {list(batch)}")
        await asyncio.sleep(0.005)
        batch.committed()
        tail = asyncio.Event()
        tails.append(tail)
        await tail.wait()  # waiting for the flush
        log.append(f"answered {list(batch)}")
        return [r * 2 for r in batch]

    batcher: GroupCommit[int, int] = GroupCommit(apply)
    first = asyncio.create_task(batcher(1))
    await asyncio.sleep(0.001)
    second = [asyncio.create_task(batcher(n)) for n in (2, 3)]
    for _ in range(200):
        if len(tails) == 2:
            break
        await asyncio.sleep(0.005)
    assert log == ["statement [1]", "statement [2, 3]"]  # the second began before the first ended
    tails[1].set()
    assert await asyncio.gather(*second) == [4, 6]
    assert not first.done()
    tails[0].set()
    assert await first == 2


async def test_a_batch_that_fails_after_its_commit_is_not_applied_again() -> None:
    applied: list[list[int]] = []

    async def apply(batch: Batch[int]) -> list[int | Exception]:
        applied.append(list(batch))
        batch.committed()
        await asyncio.sleep(0)
        raise RuntimeError("the flush failed")

    batcher: GroupCommit[int, int] = GroupCommit(apply)
    results = await asyncio.gather(batcher(1), batcher(2), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert applied == [[1, 2]]  # no retries one by one: both were committed
    with pytest.raises(RuntimeError):
        await batcher(3)  # the batcher goes on with the next request
    assert applied == [[1, 2], [3]]


async def test_a_durable_batch_answers_its_callers_before_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    """`Batch.answer`: the callers go on while the rest of the transaction's end runs; what
    ``apply`` returns or raises afterwards is neither given again nor applied again."""
    applied: list[list[int]] = []
    rest = asyncio.Event()

    async def apply(batch: Batch[int]) -> list[int | Exception]:
        applied.append(list(batch))
        batch.answer([StaleLease("stale") if r < 0 else r * 2 for r in batch])
        await rest.wait()  # the connection's return, say
        if len(applied) == 1:
            raise RuntimeError("the connection broke on its way back")
        return [0 for _ in batch]

    batcher: GroupCommit[int, int] = GroupCommit(apply)
    answered = await asyncio.wait_for(
        asyncio.gather(batcher(1), batcher(-1), batcher(3), return_exceptions=True), 1.0
    )
    assert answered[0] == 2 and answered[2] == 6 and isinstance(answered[1], StaleLease)
    rest.set()
    assert await batcher(4) == 8  # the batcher goes on; the failed rest retried nothing
    assert applied == [[1, -1, 3], [4]]
    assert "failed after answering its callers" in caplog.text


async def test_then_runs_once_in_the_turn_its_future_is_settled() -> None:
    seen: list[tuple[int, object]] = []

    async def apply(batch: Batch[int]) -> list[int | Exception]:
        batch.answer([r * 2 for r in batch])
        # In the same turn as the answer, before any callback the futures scheduled.
        assert seen == [(1, 2), (2, 4)]
        await asyncio.sleep(0)
        return [0 for _ in batch]  # settled again: not given, and ``then`` not called again

    def then(n: int) -> Callable[[asyncio.Future[int]], None]:
        return lambda future: seen.append((n, future.result()))

    batcher: GroupCommit[int, int] = GroupCommit(apply)
    futures = [batcher.enqueue(n, then(n)) for n in (1, 2)]
    assert await asyncio.gather(*futures) == [2, 4]
    await asyncio.sleep(0.01)
    assert seen == [(1, 2), (2, 4)]


async def test_then_is_called_for_a_caller_that_gave_up() -> None:
    seen: list[bool] = []
    batcher: GroupCommit[int, int] = GroupCommit(Recorder())
    future = batcher.enqueue(1, lambda f: seen.append(f.cancelled()))
    future.cancel()
    assert await batcher(2) == 4  # the same batch, committed
    assert seen == [True]
