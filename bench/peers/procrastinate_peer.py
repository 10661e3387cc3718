"""Procrastinate on PostgreSQL: ``defer_async`` into a fresh database, one worker process."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import procrastinate

from bench import postgres
from bench.peers.common import ENV_OUT, ENV_URL, record

QUEUE: Final = "bench"
TASK: Final = "bench_noop"
CONCURRENCY: Final = 20  # as many slots as the IAS throughput run's workers have


def make_app(url: str, pool_size: int = 4) -> procrastinate.App:
    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=url, min_size=1, max_size=pool_size)
    )

    @app.task(name=TASK, queue=QUEUE)
    async def noop(i: int, sent: float) -> None:
        record(i, sent)

    return app


async def run_worker() -> None:
    """The worker process: default polling and LISTEN/NOTIFY, ``CONCURRENCY`` jobs at a time."""
    app = make_app(os.environ[ENV_URL])
    async with app.open_async():
        await app.run_worker_async(queues=[QUEUE], concurrency=CONCURRENCY, install_signal_handlers=True)


@dataclass(eq=False)
class ProcrastinateSession:
    app: procrastinate.App
    url: str
    out: str

    @property
    def worker_argv(self) -> list[str]:
        return [sys.executable, "-m", "bench.peers.procrastinate_peer"]

    @property
    def worker_env(self) -> dict[str, str]:
        return {ENV_URL: self.url, ENV_OUT: self.out}

    async def enqueue(self, index: int) -> None:
        sent = time.time()
        await self.app.configure_task(TASK).defer_async(i=index, sent=sent)

    async def pending(self, enqueued: int) -> int:
        query = "SELECT count(*) AS n FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
        row = await self.app.connector.execute_query_one_async(query)
        return int(row["n"])


@asynccontextmanager
async def session(admin_url: str, out: str, *, connections: int) -> AsyncIterator[ProcrastinateSession]:
    async with postgres.scratch_database(admin_url) as url:
        app = make_app(url, pool_size=connections)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            yield ProcrastinateSession(app=app, url=url, out=out)


if __name__ == "__main__":
    asyncio.run(run_worker())
