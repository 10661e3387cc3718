"""Claims running side by side in one replica (the dispatcher's, an outcome batch's refill) take
different pending jobs, without a fenced write failing and being redone under row locks."""

from __future__ import annotations

import asyncio
import logging

import pytest

from control_plane.domain.jobs import JobResult, JobStatus
from control_plane.queue import JobQueue, NewJob, Refill
from control_plane.store import jobs as jobs_store
from control_plane.transactions import Assignee

WS = "default"


def _to(worker: str) -> Assignee:
    return Assignee(worker_id=worker, session_id=f"{worker}-session")


async def _claim(queue: JobQueue, worker: str, slots: int = 1) -> list[str]:
    claimed = await queue.claim(
        workspace_id=WS, types=["noop"], repo_ids=[], slots=slots, pick=lambda n: [_to(worker)] * n
    )
    return [job.id for job, _ in claimed]


async def test_claims_side_by_side_take_different_jobs_at_once(
    queue: JobQueue, caplog: pytest.LogCaptureFixture
) -> None:
    submitted = [(await queue.submit(workspace_id=WS, new=NewJob(type="noop")))[0].id for _ in range(5)]
    with caplog.at_level(logging.INFO, logger="control_plane.queue"):
        first, second, third = await asyncio.gather(
            _claim(queue, "w1"), _claim(queue, "w2"), _claim(queue, "w3", slots=2)
        )
    assert not [r.message for r in caplog.records if "raced" in r.message], "no claim was redone under locks"
    assert len(first) == len(second) == 1 and len(third) == 2
    taken = first + second + third
    assert sorted(taken) == sorted(submitted[:4]), "the four oldest, each once"
    # The marks end with their transactions: the last job is still there to take.
    assert await _claim(queue, "w4", slots=3) == [submitted[4]]


async def test_a_refill_and_a_claim_side_by_side_take_different_jobs(
    queue: JobQueue, caplog: pytest.LogCaptureFixture
) -> None:
    (held, _), *_ = [await queue.submit(workspace_id=WS, new=NewJob(type="noop")) for _ in range(1)]
    [running] = await _claim(queue, "w1")
    assert running == held.id
    waiting = [(await queue.submit(workspace_id=WS, new=NewJob(type="noop")))[0].id for _ in range(2)]
    with caplog.at_level(logging.INFO, logger="control_plane.queue"):
        (done, duplicate, following, _), claimed = await asyncio.gather(
            queue.record_outcome(
                workspace_id=WS,
                worker_id="w1",
                job_id=held.id,
                epoch=1,
                status=JobStatus.DONE,
                result=JobResult(summary="ok"),
                refill=Refill(types=("noop",), repo_ids=(), assignee=_to("w1")),
            ),
            _claim(queue, "w2"),
        )
    assert not [r.message for r in caplog.records if "raced" in r.message]
    assert done.status is JobStatus.DONE and not duplicate
    assert following is not None
    assert sorted([following.id, *claimed]) == sorted(waiting)
    async with queue.db.read() as conn:
        stored = {job_id: await jobs_store.get(conn, workspace_id=WS, job_id=job_id) for job_id in waiting}
    assert stored[following.id] is not None and stored[following.id].worker_id == "w1"  # type: ignore[union-attr]
    assert stored[claimed[0]] is not None and stored[claimed[0]].worker_id == "w2"  # type: ignore[union-attr]
