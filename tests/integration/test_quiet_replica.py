"""A replica alone on its PostgreSQL database commits without NOTIFY; one that joins still sees
everything the other commits, including what it committed quietly before it heard of the newcomer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest
from conftest import eventually
from harness import JobsClient, Running, Watcher, running_plane, settings_for

from control_plane.dispatch.listener import asyncpg_dsn
from control_plane.dispatch.peers import Peers
from control_plane.store.events import EVENTS_CHANNEL
from control_plane.store.jobs import JOBS_CHANNEL

pytestmark = pytest.mark.postgres


def _peers(running: Running) -> Peers:
    peers = running.plane.queue.peers
    assert peers is not None
    return peers


async def test_a_replica_alone_commits_without_notifying(tmp_path: Path, pg_url: str) -> None:
    async with running_plane(settings_for(tmp_path, db_url=pg_url)) as a:
        await eventually(lambda: _peers(a).alone, what="the replica to find itself alone")
        heard: list[str] = []
        probe = await asyncpg.connect(asyncpg_dsn(pg_url))
        try:
            for channel in (EVENTS_CHANNEL, JOBS_CHANNEL):
                await probe.add_listener(channel, lambda _c, _p, channel, payload: heard.append(channel))
            jobs = JobsClient(a.address, a.admin)
            watcher = Watcher(jobs.channel, a.admin)
            job = await jobs.submit("noop")  # no worker: it waits, which used to notify ias_jobs too
            (event,) = await watcher.read(1)
            assert event.job.id == job.id, "its own Watch still sees it at once"
            await asyncio.sleep(0.3)
            assert heard == []
            watcher.close()
            await jobs.close()
        finally:
            await probe.close()


async def test_a_joining_replica_sees_what_the_quiet_one_committed_before_it_heard(
    tmp_path: Path, pg_url: str
) -> None:
    async with running_plane(settings_for(tmp_path / "a", db_url=pg_url)) as a:
        peers = _peers(a)
        await eventually(lambda: peers.alone, what="A to find itself alone")
        # A hears of B only a moment after B serves: long enough for A to commit quietly meanwhile.
        heard = peers.company
        loop = asyncio.get_running_loop()
        peers.company = lambda: loop.call_later(0.5, heard)  # type: ignore[method-assign]
        on_a = JobsClient(a.address, a.admin)
        first = await on_a.submit("noop")
        async with running_plane(settings_for(tmp_path / "b", db_url=pg_url)) as b:
            on_b = JobsClient(b.address, b.admin)
            watcher = Watcher(on_b.channel, b.admin)
            assert [e.job.id for e in await watcher.read(1)] == [first.id]  # the replay
            assert peers.alone
            quiet = await on_a.submit("noop")
            assert peers.alone, "the job above was committed without a NOTIFY"
            (event,) = await watcher.read(1, timeout=5)
            assert event.job.id == quiet.id
            assert not peers.alone
            # From here on every commit of A notifies.
            loud = await on_a.submit("noop")
            (event,) = await watcher.read(1, timeout=5)
            assert event.job.id == loud.id
            watcher.close()
            await on_b.close()
        # B removed its row on the way out: A is alone again at its next look.
        await eventually(lambda: peers.alone, what="A to be alone again")
        await on_a.close()
