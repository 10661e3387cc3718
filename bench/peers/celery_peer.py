"""Celery with Redis: ``send_task`` from a thread per enqueuer, a prefork worker with 2 processes.

Each run gets its own Redis database number (one that is empty) and flushes it afterwards.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import redis
from celery import Celery

from bench.peers.common import ENV_OUT, ENV_URL, PeerFailed, record

REDIS_URL: Final = "redis://127.0.0.1:6379"
QUEUE: Final = "bench"
TASK: Final = "bench_noop"
DB_NUMBERS: Final = range(1, 16)


def make_app(url: str, *, connections: int = 10) -> Any:
    app = Celery("bench_peer", broker=url)
    # No result backend: the no-op returns nothing, and the same holds for the other peers.
    app.conf.update(
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        broker_connection_retry=False,
        broker_pool_limit=connections,  # the producers' connections (10 by default)
    )

    @app.task(name=TASK)
    def noop(i: int, sent: float) -> None:
        record(i, sent)

    return app


# The worker process imports this module as `-A bench.peers.celery_peer:app`.
app = make_app(os.environ.get(ENV_URL, f"{REDIS_URL}/0"))


@dataclass(eq=False)
class CelerySession:
    app: Any
    url: str
    out: str
    # Celery's client blocks; a thread for each concurrent enqueuer, and a Redis connection for
    # each (asyncio's default executor would cap them at the cores + 4).
    threads: ThreadPoolExecutor

    @property
    def worker_argv(self) -> list[str]:
        return [
            *(sys.executable, "-m", "celery", "-A", "bench.peers.celery_peer:app", "worker"),
            *("--pool", "prefork", "--concurrency", "2", "-Q", QUEUE, "--loglevel", "WARNING"),
            *("--without-gossip", "--without-mingle", "--without-heartbeat"),
        ]

    @property
    def worker_env(self) -> dict[str, str]:
        return {ENV_URL: self.url, ENV_OUT: self.out}

    async def enqueue(self, index: int) -> None:
        await asyncio.get_running_loop().run_in_executor(self.threads, self._send, index)

    def _send(self, index: int) -> None:
        sent = time.time()
        self.app.send_task(TASK, kwargs={"i": index, "sent": sent}, queue=QUEUE)

    async def pending(self, enqueued: int) -> int:
        # With no result backend the body's own record is the only trace of a finished job.
        return enqueued - await asyncio.to_thread(_lines, Path(self.out))


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def _free_db() -> int:
    for number in DB_NUMBERS:
        if redis.Redis.from_url(f"{REDIS_URL}/{number}").dbsize() == 0:
            return number
    raise PeerFailed(f"no empty Redis database among {DB_NUMBERS.start}..{DB_NUMBERS.stop - 1}")


@asynccontextmanager
async def session(admin_url: str, out: str, *, connections: int) -> AsyncIterator[CelerySession]:
    del admin_url  # Celery uses Redis, not PostgreSQL
    number = await asyncio.to_thread(_free_db)
    url = f"{REDIS_URL}/{number}"
    try:
        async with on_redis(url, out, connections=connections) as celery:
            yield celery
    finally:
        await asyncio.to_thread(redis.Redis.from_url(url).flushdb)


@asynccontextmanager
async def on_redis(url: str, out: str, *, connections: int) -> AsyncIterator[CelerySession]:
    """The client side on the Redis at ``url``: the app and a thread for each enqueuer."""
    client = make_app(url, connections=connections)
    threads = ThreadPoolExecutor(max_workers=connections, thread_name_prefix="celery-enqueue")
    try:
        yield CelerySession(app=client, url=url, out=out, threads=threads)
    finally:
        threads.shutdown()
        client.close()
