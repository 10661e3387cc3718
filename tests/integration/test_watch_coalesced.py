"""ConsoleService.Watch with ``coalesce``: several events per response, still every event once, in
order, across replays, resumes and resyncs; callers that do not ask still get one per response."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from harness import JobsClient, Watcher, running_plane, settings_for

from control_plane.events import hub as hub_module
from control_plane.queue import NewJob


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    return "" if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))


async def _submit(jobs: JobsClient, count: int) -> None:
    """``count`` jobs, submitted concurrently so that they share transactions."""
    await asyncio.gather(*(jobs.submit("noop") for _ in range(count)))


async def test_the_replay_comes_in_few_responses_with_every_event_in_order(tmp_path: Path) -> None:
    async with running_plane(settings_for(tmp_path)) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        for _ in range(12):
            await _submit(jobs, 50)
        watcher = Watcher(jobs.channel, cp.admin)
        got = await watcher.read(600)
        assert [e.seq for e in got] == list(range(1, 601))
        assert [len(r.events) for r in watcher.responses] == [500, 100]
        assert not any(r.HasField("event") for r in watcher.responses)
        watcher.close()
        await jobs.close()


async def test_live_events_arrive_in_order_in_either_form(tmp_path: Path, db_url: str) -> None:
    async with running_plane(settings_for(tmp_path, db_url=db_url)) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        await jobs.submit("noop")
        coalesced = Watcher(jobs.channel, cp.admin)
        one_by_one = Watcher(jobs.channel, cp.admin, coalesce=False)
        assert [e.seq for e in await coalesced.read(1)] == [1]
        assert [e.seq for e in await one_by_one.read(1)] == [1]
        for _ in range(4):
            await _submit(jobs, 20)
        assert [e.seq for e in await coalesced.read(80)] == list(range(2, 82))
        assert [e.seq for e in await one_by_one.read(80)] == list(range(2, 82))
        assert all(r.HasField("event") and not r.events for r in one_by_one.responses)
        assert all(len(r.events) != 1 for r in coalesced.responses), "one event goes in `event`"
        coalesced.close()
        one_by_one.close()
        await jobs.close()


async def test_live_events_carry_their_commit_time_and_replayed_ones_none(
    tmp_path: Path, db_url: str
) -> None:
    async with running_plane(settings_for(tmp_path, db_url=db_url)) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        await jobs.submit("noop")
        watcher = Watcher(jobs.channel, cp.admin)
        (replayed,) = await watcher.read(1)
        assert not replayed.HasField("committed_at"), "an event read from the log has no commit time"
        await _submit(jobs, 5)
        live = await watcher.read(5)
        for event in live:
            assert event.HasField("committed_at")
            assert event.committed_at.ToNanoseconds() >= event.occurred_at.ToNanoseconds()
        watcher.close()
        await jobs.close()


async def test_a_dropped_stream_resumes_with_no_gap_and_no_duplicate(tmp_path: Path, db_url: str) -> None:
    async with running_plane(settings_for(tmp_path, db_url=db_url)) as cp:
        jobs = JobsClient(cp.address, cp.admin)
        await _submit(jobs, 30)
        first = Watcher(jobs.channel, cp.admin)
        submitting = asyncio.create_task(_submit(jobs, 60))
        seen = await first.read(10)
        first.close()
        # Resume after the last event seen, while events are still being committed.
        resumed = Watcher(jobs.channel, cp.admin, since=seen[-1].seq)
        seen += await resumed.read(90 - len(seen))
        await submitting
        assert [e.seq for e in seen] == list(range(1, 91))
        resumed.close()
        await jobs.close()


async def test_a_watcher_cut_off_for_falling_behind_resyncs_from_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "SUBSCRIBER_QUEUE_SIZE", 1)  # any batch of two cuts off
    async with running_plane(settings_for(tmp_path)) as cp:
        reads_of_the_log = 0
        events_since = cp.plane.queue.events_since

        async def counting(workspace_id: str, after_seq: int) -> list:
            nonlocal reads_of_the_log
            reads_of_the_log += 1
            return await events_since(workspace_id, after_seq)

        monkeypatch.setattr(cp.plane.queue, "events_since", counting)
        jobs = JobsClient(cp.address, cp.admin)
        watcher = Watcher(jobs.channel, cp.admin)
        await jobs.submit("noop")
        assert [e.seq for e in await watcher.read(1)] == [1]
        before = reads_of_the_log
        for _ in range(3):
            # Queued in one turn of the loop, so that they share one transaction.
            await asyncio.gather(
                *(cp.plane.queue.submit(workspace_id="default", new=NewJob(type="noop")) for _ in range(40))
            )
        assert [e.seq for e in await watcher.read(120)] == list(range(2, 122))
        assert reads_of_the_log > before, "a transaction of several events should have cut it off"
        watcher.close()
        await jobs.close()


@pytest.mark.postgres
async def test_a_watch_on_one_replica_follows_commits_of_another(tmp_path: Path, pg_url: str) -> None:
    async with (
        running_plane(settings_for(tmp_path / "a", db_url=pg_url)) as a,
        running_plane(settings_for(tmp_path / "b", db_url=pg_url)) as b,
    ):
        on_a = JobsClient(a.address, a.admin)
        on_b = JobsClient(b.address, b.admin)
        await on_a.submit("noop")
        watcher = Watcher(on_b.channel, b.admin)
        assert [e.seq for e in await watcher.read(1)] == [1]
        # Interleave both replicas' commits: B learns of A's only through NOTIFY and the log.
        for _ in range(3):
            await asyncio.gather(_submit(on_a, 20), _submit(on_b, 20))
        assert [e.seq for e in await watcher.read(120)] == list(range(2, 122))
        watcher.close()
        await on_a.close()
        await on_b.close()
