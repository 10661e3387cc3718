"""``python -m bench.watchers ADDRESS TOKEN COUNT DROP_AFTER_S``: ``COUNT`` Console ``Watch`` streams in
this process (kept apart from the driver so that receiving does not compete with submitting).

Prints ``ready`` once every stream is open, runs until a line ``stop`` on stdin and every stream has
caught up with the newest event (at most ``CATCH_UP_LIMIT_S``), then prints one JSON object:
delivery latency (receive time minus the event's ``committed_at``, and minus its ``occurred_at``,
when its transaction began) over the events that occurred after ``ready``, and per stream whether
its sequence numbers had a gap or a duplicate. Stream 0 is dropped after ``DROP_AFTER_S`` seconds
and resumes with ``since_seq`` = the last it saw. The streams ask for coalesced responses, as the
Console does, so one response may carry several events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from ias.v1 import console_service_pb2 as cpb
from ias.v1 import console_service_pb2_grpc as cpb_grpc

from bench.stats import summarise
from worker.client import bearer, open_channel

Call = grpc.aio.UnaryStreamCall[cpb.WatchRequest, cpb.WatchResponse]
MAX_EVENTS: Final = 10_000_000
RUN_LIMIT_S: Final = 600.0
RESUME_PAUSE_S: Final = 0.2
CATCH_UP_LIMIT_S: Final = 60.0


@dataclass(eq=False)
class Stream:
    seqs: list[int] = field(default_factory=list)
    responses: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # from the commit
    from_start_ms: list[float] = field(default_factory=list)  # from the transaction's start
    uncommitted: int = 0  # measured events without a commit time (read back from the log)
    resumed: bool = False
    measured: bool = True  # the dropped stream's catch-up after resuming is not delivery latency

    def faults(self) -> tuple[int, int]:
        """(gaps, duplicates) in the sequence numbers received."""
        gaps = dups = 0
        for before, after in zip(self.seqs, self.seqs[1:], strict=False):
            gaps += after > before + 1
            dups += after <= before
        return gaps, dups


async def watch(
    stub: cpb_grpc.ConsoleServiceAsyncStub, token: str, stream: Stream, since: int, measure_from: list[float]
) -> None:
    call: Call = stub.Watch(cpb.WatchRequest(since_seq=since, coalesce=True), metadata=bearer(token))
    await call.wait_for_connection()
    for _ in range(MAX_EVENTS):
        reply = await call.read()
        now = time.time()
        if not isinstance(reply, cpb.WatchResponse):
            return
        stream.responses += 1
        for event in reply.events or [reply.event]:
            occurred = event.occurred_at.ToNanoseconds() / 1e9
            stream.seqs.append(event.seq)
            if stream.measured and measure_from and occurred >= measure_from[0]:
                stream.from_start_ms.append((now - occurred) * 1000)
                if event.HasField("committed_at"):
                    stream.latencies_ms.append((now - event.committed_at.ToNanoseconds() / 1e9) * 1000)
                else:
                    stream.uncommitted += 1


async def dropped_then_resumed(
    stub: cpb_grpc.ConsoleServiceAsyncStub,
    token: str,
    stream: Stream,
    drop_after_s: float,
    measure_from: list[float],
) -> None:
    first = asyncio.create_task(watch(stub, token, stream, 0, measure_from))
    await asyncio.sleep(drop_after_s)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.sleep(RESUME_PAUSE_S)
    stream.resumed = True
    await watch(stub, token, stream, stream.seqs[-1] if stream.seqs else 0, measure_from)


async def main(address: str, token: str, count: int, drop_after_s: float) -> dict[str, Any]:
    streams = [Stream(measured=i > 0) for i in range(count)]
    channels = [open_channel(address) for _ in range(count)]
    measure_from: list[float] = []
    stubs = [cpb_grpc.ConsoleServiceStub(c) for c in channels]
    tasks = [
        asyncio.create_task(watch(stubs[i], token, streams[i], 0, measure_from)) for i in range(1, count)
    ]
    tasks.append(
        asyncio.create_task(dropped_then_resumed(stubs[0], token, streams[0], drop_after_s, measure_from))
    )
    await asyncio.sleep(1.0)  # the streams' replay of the existing log is not measured
    measure_from.append(time.time())
    print("ready", flush=True)
    cpu = os.times()
    async with asyncio.timeout(RUN_LIMIT_S):
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    busy = sum(os.times()[:2]) - sum(cpu[:2])
    wall = time.time() - measure_from[0]
    catch_up_s = await _caught_up(streams)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close(grace=None)
    return {**_summary(streams, busy / wall * 100), "catch_up_s": catch_up_s}


async def _caught_up(streams: list[Stream]) -> float:
    """Seconds after ``stop`` until every stream has the newest event any stream has (bounded)."""
    began = time.monotonic()
    for _ in range(int(CATCH_UP_LIMIT_S / 0.05)):
        last = [s.seqs[-1] if s.seqs else 0 for s in streams]
        if min(last) == max(last):
            break
        await asyncio.sleep(0.05)
    return time.monotonic() - began


def _summary(streams: list[Stream], cpu_pct: float) -> dict[str, Any]:
    latencies = [ms for s in streams for ms in s.latencies_ms]
    lat = summarise(latencies) if latencies else None
    from_start = [ms for s in streams for ms in s.from_start_ms]
    start = summarise(from_start) if from_start else None
    faults = [s.faults() for s in streams]
    last = [s.seqs[-1] if s.seqs else 0 for s in streams]
    return {
        "p50_ms": lat.p50 if lat else None,
        "p99_ms": lat.p99 if lat else None,
        "max_ms": lat.max if lat else None,
        "start_p50_ms": start.p50 if start else None,
        "start_p99_ms": start.p99 if start else None,
        "start_max_ms": start.max if start else None,
        "deliveries": len(from_start),
        "without_commit_time": sum(s.uncommitted for s in streams),
        "events_per_response": sum(len(s.seqs) for s in streams) / max(sum(s.responses for s in streams), 1),
        "streams_with_faults": sum(1 for g, d in faults if g or d),
        "streams_behind": sum(1 for x in last if x < max(last)),
        "resumed_gaps": faults[0][0],
        "resumed_duplicates": faults[0][1],
        "resumed": streams[0].resumed,
        "cpu_pct": cpu_pct,
    }


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        address, token, count, drop = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
        result = asyncio.run(main(address, token, count, drop))
        print(json.dumps(result), flush=True)
