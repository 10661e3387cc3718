"""PgQueuer: asyncpg enqueue into a fresh database; the worker is ``pgqueuer.run(factory)``.

``pgq run`` crashes in its logging setup in 1.6, so the worker process runs this module, which
starts the same supervisor through ``pgqueuer.run``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import asyncpg
import pgqueuer
from pgqueuer import AsyncpgDriver, AsyncpgPoolDriver, Job, PgQueuer, Queries

from bench import postgres
from bench.peers.common import ENV_OUT, ENV_URL, record

ENTRYPOINT = "bench_noop"


@asynccontextmanager
async def create_pgqueuer() -> AsyncIterator[PgQueuer]:
    """The worker factory (runs in the worker process), default settings."""
    conn = await asyncpg.connect(os.environ[ENV_URL])
    pgq = PgQueuer(AsyncpgDriver(conn))

    @pgq.entrypoint(ENTRYPOINT)
    async def noop(job: Job) -> None:
        body = json.loads(job.payload or b"{}")
        record(int(body["i"]), float(body["sent"]))

    try:
        yield pgq
    finally:
        await conn.close()


@dataclass(eq=False)
class PgQueuerSession:
    pool: asyncpg.Pool
    url: str
    out: str
    queries: Queries = field(init=False)

    def __post_init__(self) -> None:
        self.queries = Queries(AsyncpgPoolDriver(self.pool))

    @property
    def worker_argv(self) -> list[str]:
        return [sys.executable, "-m", "bench.peers.pgqueuer_peer"]

    @property
    def worker_env(self) -> dict[str, str]:
        return {ENV_URL: self.url, ENV_OUT: self.out}

    async def enqueue(self, index: int) -> None:
        sent = time.time()
        payload = json.dumps({"i": index, "sent": sent}).encode()
        await self.queries.enqueue(ENTRYPOINT, payload)

    async def pending(self, enqueued: int) -> int:
        # A finished job leaves the queue table (its trace goes to pgqueuer_log).
        return int(await self.pool.fetchval("SELECT count(*) FROM pgqueuer"))


@asynccontextmanager
async def session(admin_url: str, out: str, *, connections: int) -> AsyncIterator[PgQueuerSession]:
    async with postgres.scratch_database(admin_url) as url:
        conn = await asyncpg.connect(url)
        try:
            await Queries(AsyncpgDriver(conn)).install()
        finally:
            await conn.close()
        pool = await asyncpg.create_pool(url, min_size=connections, max_size=connections)
        try:
            yield PgQueuerSession(pool=pool, url=url, out=out)
        finally:
            await pool.close()


if __name__ == "__main__":
    asyncio.run(pgqueuer.run(create_pgqueuer))
