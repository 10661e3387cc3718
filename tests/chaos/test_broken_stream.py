"""A worker whose stream breaks while it writes a frame ends the session and reconnects."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from chaos_support import RawWorker, running_plane, settings_for
from conftest import eventually
from ias.v1 import worker_service_pb2 as wpb
from tcp_proxy import TcpProxy

from worker.daemon import _end_session


async def _broken_session_errors(tmp_path: Path) -> BaseExceptionGroup[BaseException]:
    """What a daemon session's TaskGroup collects when the stream dies as a frame is queued: the
    reader's UNAVAILABLE and the writer's InvalidStateError, both raised by a real broken stream."""
    async with running_plane(settings_for(tmp_path)) as cp:
        proxy = await TcpProxy(cp.address).start()
        raw = RawWorker(proxy.address, cp.worker)
        try:
            await raw.hello("mid-write")
            proxy.drop()
            await eventually(lambda: raw.call.done(), timeout=15, what="the stream to end")
            try:
                # The daemon's writer and reader, as in WorkerDaemon._session.
                async with asyncio.TaskGroup() as group:
                    group.create_task(raw.call.write(wpb.ConnectRequest(heartbeat=wpb.Heartbeat())))
                    group.create_task(raw.call.read())
            except BaseExceptionGroup as caught:
                return caught
        finally:
            await raw.close()
            await proxy.close()
    raise AssertionError("the broken stream raised nothing")


async def test_a_broken_stream_fails_the_pending_write_and_the_read(tmp_path: Path) -> None:
    group = await _broken_session_errors(tmp_path)
    rpc, rest = group.split(grpc.aio.AioRpcError)
    assert rpc is not None and rest is not None
    assert [e.code() for e in rpc.exceptions] == [grpc.StatusCode.UNAVAILABLE]  # type: ignore[attr-defined]
    assert [type(e) for e in rest.exceptions] == [asyncio.InvalidStateError]
    _end_session(rpc)  # the reader's error alone ends the session for a reconnect


async def test_a_stream_that_breaks_mid_write_ends_the_session_for_a_reconnect(tmp_path: Path) -> None:
    _end_session(await _broken_session_errors(tmp_path))
