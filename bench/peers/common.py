"""What every peer shares: the task body's record, the worker subprocess, and the two measurements.

Each peer's task body appends one line ``<index> <sent> <started>`` to the file named by
``BENCH_PEER_OUT``: ``sent`` is ``time.time()`` just before the enqueue call (so the insert and its
commit are included, as IAS's ``created_at`` is), ``started`` is taken first thing in the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from bench.stats import Summary, summarise

log = logging.getLogger(__name__)

ENV_OUT: Final = "BENCH_PEER_OUT"
ENV_URL: Final = "BENCH_PEER_URL"
POLL_S: Final = 0.02
STOP_TIMEOUT_S: Final = 15.0
WARMUP_TIMEOUT_S: Final = 60.0
DRAIN_TIMEOUT_S: Final = 120.0


class PeerFailed(Exception):
    """A peer did not start, or its jobs did not run exactly once."""


def record(index: int, sent: float) -> None:
    """The peer task body: note when it started. One short O_APPEND write is atomic across processes."""
    started = time.time()
    with open(os.environ[ENV_OUT], "a") as out:
        out.write(f"{index} {sent:.6f} {started:.6f}\n")


class PeerSession(Protocol):
    """One peer with a fresh store, its schema installed, ready for a worker process."""

    worker_argv: Sequence[str]
    worker_env: dict[str, str]

    async def enqueue(self, index: int) -> None:
        """Enqueue one no-op job; take ``sent = time.time()`` just before the library call."""

    async def pending(self, enqueued: int) -> int:
        """Jobs not yet finished in the peer's own bookkeeping, out of ``enqueued`` so far."""


@dataclass(frozen=True, slots=True)
class PeerParams:
    latency_jobs: int
    rate: float
    warmup: int
    throughput_jobs: int
    submitters: tuple[int, ...]  # concurrent enqueuers of each throughput run, as IAS's submitters


@dataclass(frozen=True, slots=True)
class PeerFigures:
    latency_ms: Summary
    jobs_per_s: dict[int, float]  # by concurrent enqueuers
    verified: int  # warm-up, latency and throughput jobs that ran exactly once
    jobs: int


def observed(out: Path) -> dict[int, tuple[float, float]]:
    """index → (sent, started); raises if a job ran twice."""
    rows: dict[int, tuple[float, float]] = {}
    runs: Counter[int] = Counter()
    text = out.read_text() if out.exists() else ""
    for line in text.splitlines():
        index, sent, started = line.split()
        runs[int(index)] += 1
        rows[int(index)] = (float(sent), float(started))
    twice = [i for i, n in runs.items() if n > 1]
    if twice:
        raise PeerFailed(f"{len(twice)} job(s) ran more than once (e.g. index {twice[0]})")
    return rows


@contextlib.asynccontextmanager
async def worker_process(argv: Sequence[str], env: dict[str, str], log_path: Path) -> AsyncIterator[int]:
    """The peer's worker in its own session (process group), stopped with SIGTERM, then SIGKILL."""
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *argv, env={**os.environ, **env}, stdout=log_file, stderr=log_file, start_new_session=True
        )
        try:
            yield proc.pid
        finally:
            await _stop(proc)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.error("peer worker %d ignored SIGTERM; killing its process group", proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # prefork children must not outlive the run
    if proc.returncode is None:
        await proc.wait()


async def measure(session: PeerSession, params: PeerParams, out: Path, log_path: Path) -> PeerFigures:
    """Warm up (also waits for the worker to come up), then the latency run, then the throughput run."""
    async with worker_process(session.worker_argv, session.worker_env, log_path) as pid:
        warm = range(params.warmup)
        await paced(session.enqueue, warm, params.rate)
        await _wait_observed(out, warm, WARMUP_TIMEOUT_S, pid)
        lat = range(params.warmup, params.warmup + params.latency_jobs)
        await paced(session.enqueue, lat, params.rate)
        await _wait_observed(out, lat, DRAIN_TIMEOUT_S, pid)
        rows = observed(out)
        latency = summarise([(rows[i][1] - rows[i][0]) * 1000 for i in lat])
        jobs_per_s: dict[int, float] = {}
        end = lat.stop
        for submitters in params.submitters:
            tput = range(end, end + params.throughput_jobs)
            began = time.perf_counter()
            await flood(session.enqueue, tput, submitters)
            await _wait_finished(session, tput.stop, pid)
            jobs_per_s[submitters] = len(tput) / (time.perf_counter() - began)
            end = tput.stop
    verified = _verify(observed(out), range(end))
    return PeerFigures(latency_ms=latency, jobs_per_s=jobs_per_s, verified=verified, jobs=end)


async def paced(enqueue: Callable[[int], Coroutine[None, None, None]], indices: range, rate: float) -> None:
    """Open loop: each enqueue starts on its own schedule, whether or not the previous one returned."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: list[asyncio.Task[None]] = []
    for n, index in enumerate(indices):
        await asyncio.sleep(max(start + n / rate - loop.time(), 0.0))
        tasks.append(asyncio.create_task(enqueue(index)))
    await asyncio.gather(*tasks)


async def flood(
    enqueue: Callable[[int], Coroutine[None, None, None]], indices: range, submitters: int
) -> None:
    """``submitters`` concurrent enqueuers, each enqueuing the next job once its previous returned."""
    todo = iter(indices)

    async def submitter() -> None:
        for index in todo:
            await enqueue(index)

    async with asyncio.timeout(DRAIN_TIMEOUT_S):
        await asyncio.gather(*(submitter() for _ in range(submitters)))


async def _wait_observed(out: Path, indices: range, within_s: float, pid: int) -> None:
    for _ in range(int(within_s / POLL_S)):
        _alive(pid)
        rows = observed(out)
        if all(i in rows for i in indices):
            return
        await asyncio.sleep(POLL_S)
    raise PeerFailed(f"jobs {indices.start}..{indices.stop - 1} did not all run within {within_s:.0f} s")


async def _wait_finished(session: PeerSession, enqueued: int, pid: int) -> None:
    for _ in range(int(DRAIN_TIMEOUT_S / POLL_S)):
        _alive(pid)
        if await session.pending(enqueued) == 0:
            return
        await asyncio.sleep(POLL_S)
    raise PeerFailed(f"the throughput jobs did not all finish within {DRAIN_TIMEOUT_S:.0f} s")


def _alive(pid: int) -> None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise PeerFailed("the peer's worker process exited") from None


def _verify(rows: dict[int, tuple[float, float]], indices: range) -> int:
    missing = [i for i in indices if i not in rows]
    if missing:
        raise PeerFailed(f"{len(missing)} of {len(indices)} jobs never ran (e.g. index {missing[0]})")
    return len(indices)
