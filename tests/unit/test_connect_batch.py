"""Hellos arriving together are recorded in one transaction with a few statements for the whole
batch; a worker named twice in a batch ends with its later session, and each hello adopts the
jobs it still runs."""

from __future__ import annotations

import asyncio

from control_plane.domain.jobs import Job, JobStatus
from control_plane.domain.workers import EventKind, Worker, WorkerStatus
from control_plane.queue import JobQueue, NewJob
from control_plane.store import jobs as jobs_store
from control_plane.store import workers as workers_store
from control_plane.transactions import Assignee
from control_plane.worker_records import HeldLease

WS = "default"


async def _hello(
    queue: JobQueue, name: str, session: str, held: tuple[HeldLease, ...] = ()
) -> tuple[Worker, list[Job]]:
    return await queue.connect_worker(
        workspace_id=WS,
        name=name,
        capabilities=["noop"],
        repo_ids=["r1"] if name.endswith("1") else [],
        slots=2,
        version="t",
        held=held,
        session_id=session,
    )


async def test_a_batch_of_hellos_records_every_worker_once_in_order(queue: JobQueue) -> None:
    first = await asyncio.gather(*(_hello(queue, f"w{i}", f"s{i}") for i in range(30)))
    assert [w.name for w, _ in first] == [f"w{i}" for i in range(30)]
    assert len({w.id for w, _ in first}) == 30
    assert first[1][0].repo_ids == ("r1",)
    assert first[2][0].capabilities == ("noop",)

    # A fleet reconnecting, with one worker's hello twice in the same batch (the later wins).
    again = await asyncio.gather(
        *(_hello(queue, f"w{i}", f"t{i}") for i in range(30)), _hello(queue, "w3", "t3-later")
    )
    assert [w.id for w, _ in again[:30]] == [w.id for w, _ in first], "the same rows, not new workers"
    assert again[3][0].session_id == "t3"
    assert again[30][0].session_id == "t3-later"
    async with queue.db.read() as conn:
        stored = await workers_store.list_workers(conn, workspace_id=WS, include_offline=True)
    assert len(stored) == 30
    by_name = {w.name: w for w in stored}
    assert by_name["w3"].session_id == "t3-later"
    assert all(w.status is WorkerStatus.ONLINE for w in stored)
    events = await queue.events_since(WS, 0)
    assert sum(e.kind is EventKind.WORKER_CONNECTED for e in events) == 61


async def test_a_reconnecting_worker_adopts_what_it_still_runs_and_loses_the_rest(queue: JobQueue) -> None:
    worker, _ = await _hello(queue, "w0", "s0")
    await _hello(queue, "w9", "s9")
    jobs = [await queue.submit(workspace_id=WS, new=NewJob(type="noop")) for _ in range(2)]
    claimed = await queue.claim(
        workspace_id=WS,
        types=["noop"],
        repo_ids=[],
        slots=2,
        pick=lambda n: [Assignee(worker_id=worker.id, session_id="s0")] * n,
    )
    assert len(claimed) == 2
    kept_job, lost_job = (job for job, _ in claimed)
    # w0 comes back knowing only one of its jobs, in a batch with another worker's hello.
    (back, adopted), _ = await asyncio.gather(
        _hello(queue, "w0", "s0b", held=(HeldLease(job_id=kept_job.id, lease_epoch=kept_job.lease_epoch),)),
        _hello(queue, "w9", "s9b"),
    )
    assert back.id == worker.id
    assert [j.id for j in adopted] == [kept_job.id]
    assert adopted[0].session_id == "s0b"
    async with queue.db.read() as conn:
        lost = await jobs_store.get(conn, workspace_id=WS, job_id=lost_job.id)
    assert lost is not None and lost.status is JobStatus.PENDING
    assert {j.id for j, _ in jobs} == {kept_job.id, lost_job.id}
