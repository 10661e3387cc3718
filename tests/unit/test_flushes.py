"""Flushes: one flush at a time, shared by every caller that came while one was under way; a
caller is never answered by a flush that began before it called."""

from __future__ import annotations

import asyncio

import pytest

from control_plane.errors import Unavailable
from control_plane.flushes import Flushes


class Disk:
    """A ``flush`` that records when each one began and waits until the test lets it end."""

    def __init__(self) -> None:
        self.began = 0
        self.gate = asyncio.Event()
        self.fail_with: Exception | None = None

    async def __call__(self) -> None:
        self.began += 1
        await self.gate.wait()
        self.gate.clear()
        if self.fail_with is not None:
            raise self.fail_with


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_callers_during_a_flush_share_the_next_one() -> None:
    disk = Disk()
    flushes = Flushes(disk)
    first = asyncio.create_task(flushes.wait())
    await settle()
    later = [asyncio.create_task(flushes.wait()) for _ in range(5)]
    await settle()
    assert disk.began == 1
    disk.gate.set()  # the first flush ends: it began before the later callers called
    await first
    await settle()
    assert not any(t.done() for t in later)
    assert disk.began == 2
    disk.gate.set()
    await asyncio.gather(*later)
    assert flushes.flushes == 2


async def test_a_lone_caller_gets_its_own_flush_each_time() -> None:
    disk = Disk()
    flushes = Flushes(disk)
    for n in range(1, 4):
        task = asyncio.create_task(flushes.wait())
        await settle()
        disk.gate.set()
        await task
        assert disk.began == n


async def test_a_failed_flush_is_unavailable_to_its_callers_and_the_next_one_runs() -> None:
    disk = Disk()
    flushes = Flushes(disk)
    disk.fail_with = OSError("connection reset")
    failing = asyncio.create_task(flushes.wait())
    await settle()
    disk.gate.set()
    with pytest.raises(Unavailable, match="not confirmed on disk"):
        await failing
    disk.fail_with = None
    task = asyncio.create_task(flushes.wait())
    await settle()
    disk.gate.set()
    await task


async def test_a_caller_that_gives_up_leaves_the_flush_to_the_others() -> None:
    disk = Disk()
    flushes = Flushes(disk)
    first = asyncio.create_task(flushes.wait())
    await settle()
    impatient = asyncio.create_task(flushes.wait())
    patient = asyncio.create_task(flushes.wait())
    await settle()
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    disk.gate.set()
    await first
    await settle()
    disk.gate.set()  # the second flush, for both, runs though one of them left
    await patient
    assert disk.began == 2
