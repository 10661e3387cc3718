"""A session's outbox: frames in order, bounded, and a writer that waits wakes for the next one."""

from __future__ import annotations

import asyncio

import pytest
from ias.v1 import worker_service_pb2 as wpb

from control_plane.dispatch.sessions import Outbox


def _frame(reason: str) -> wpb.ConnectResponse:
    return wpb.ConnectResponse(drain=wpb.Drain(reason=reason))


async def test_frames_leave_in_order_and_a_waiting_writer_wakes() -> None:
    outbox = Outbox(limit=3)
    writer = asyncio.create_task(outbox.get())
    await asyncio.sleep(0)
    assert not writer.done(), "nothing to write yet"
    outbox.put_nowait(_frame("a"))
    outbox.put_nowait(_frame("b"))
    async with asyncio.timeout(5):
        first = await writer
    assert first is not None and first.drain.reason == "a"
    second = await outbox.get()
    assert second is not None and second.drain.reason == "b"
    outbox.put_nowait(None)
    assert await outbox.get() is None
    with pytest.raises(asyncio.QueueEmpty):
        outbox.get_nowait()


async def test_a_full_outbox_refuses_and_an_empty_one_has_nothing() -> None:
    outbox = Outbox(limit=2)
    outbox.put_nowait(_frame("a"))
    outbox.put_nowait(_frame("b"))
    with pytest.raises(asyncio.QueueFull):
        outbox.put_nowait(_frame("c"))
    assert outbox.get_nowait() is not None
    assert outbox.get_nowait() is not None
    with pytest.raises(asyncio.QueueEmpty):
        outbox.get_nowait()


async def test_a_cancelled_writer_leaves_the_outbox_usable() -> None:
    outbox = Outbox()
    writer = asyncio.create_task(outbox.get())
    await asyncio.sleep(0)
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    outbox.put_nowait(_frame("after"))
    async with asyncio.timeout(5):
        frame = await outbox.get()
    assert frame is not None and frame.drain.reason == "after"


def test_an_outbox_emptied_keeps_no_buffer() -> None:
    outbox = Outbox()
    assert outbox._frames is None, "an idle session's outbox holds no deque"
    outbox.put_nowait(_frame("a"))
    outbox.put_nowait(_frame("b"))
    outbox.get_nowait()
    assert outbox._frames is not None
    outbox.get_nowait()
    assert outbox._frames is None
