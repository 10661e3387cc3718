"""The engine, transactions and migrations, with every dialect difference kept here.

SQLite is the embedded default: one process owns the file, writers are serialised by an asyncio
lock and every write transaction is ``BEGIN IMMEDIATE``, so a claim never races and never waits on
SQLite's sleeping busy handler. PostgreSQL is the engine for teams: claims use ``FOR UPDATE SKIP
LOCKED`` and replicas wake each other with ``LISTEN/NOTIFY`` (see ``store.notify``).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import asyncpg
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from control_plane.errors import InvalidArgument, Unavailable
from control_plane.store import sqlite_inline

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

# The newest migration in migrations/versions (a test keeps the two in step). A database already
# there starts without Alembic: importing it and reading its scripts took a third of a replica's
# start-up (0.25 s of 0.8 here), time every restart adds to its workers' reconnect.
SCHEMA_HEAD: Final = "0003"

T = TypeVar("T")

CHECKPOINT_EVERY_S: Final = 1.0


def normalise_url(url: str) -> str:
    """Accept ``postgresql://`` and ``sqlite:///`` URLs and pick the async drivers."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    if backend == "sqlite":
        return parsed.set(drivername=f"sqlite+{sqlite_inline.DRIVER}").render_as_string(hide_password=False)
    raise InvalidArgument("db", f"unsupported database {backend!r}; use sqlite:/// or postgresql://")


def sqlite_url(data_dir: Path) -> str:
    """The default database: ``ias.db`` in the data directory."""
    return f"sqlite+{sqlite_inline.DRIVER}:///{data_dir / 'ias.db'}"


class Database:
    """An async engine plus the transaction discipline of its dialect."""

    def __init__(self, *, url: str, pool_size: int = 10, background_checkpoints: bool = False) -> None:
        self.url = normalise_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        # SQLite statements run on the event loop (see store.sqlite_inline); a WAL checkpoint,
        # which copies pages and fsyncs, must not: the server runs `checkpoint_loop` instead.
        self._background_checkpoints = background_checkpoints and self.is_sqlite
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        self.engine: AsyncEngine = (
            self._sqlite_engine() if self.is_sqlite else self._postgres_engine(pool_size)
        )
        self._pool_size = pool_size
        self._direct_pool: asyncpg.Pool | None = None
        self._direct_opening = asyncio.Lock()
        self._direct_sqlite: sqlite3.Connection | None = None

    def _sqlite_engine(self) -> AsyncEngine:
        engine = create_async_engine(self.url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Take transaction control away from the driver so that "begin" below decides.
            dbapi_connection.isolation_level = None
            self._configure(dbapi_connection)

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(conn: Connection) -> None:
            mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine

    def _configure(self, connection: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        if self._background_checkpoints:
            cursor.execute("PRAGMA wal_autocheckpoint=0")
        cursor.close()

    def _postgres_engine(self, pool_size: int) -> AsyncEngine:
        # No pool_pre_ping: it costs a BEGIN/ping/ROLLBACK on every checkout. A connection that died
        # meanwhile fails its first statement instead (reported as Unavailable, so the caller or
        # loop retries), and that disconnect invalidates the whole pool, so it happens once.
        return create_async_engine(self.url, pool_size=pool_size, max_overflow=pool_size)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction: committed on success, rolled back on error.

        On PostgreSQL the transaction begins with its first statement through SQLAlchemy; one that
        goes straight to the driver first (see `driver`) runs on its own, as its own transaction.
        """
        try:
            if self._write_lock is None:
                async with self.engine.begin() as conn:
                    async with _invalidated_on_outage(conn):
                        yield conn
            else:
                async with self._write_lock, self.engine.begin() as conn:
                    yield conn
        except (OperationalError, DBAPIError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if not _is_outage(exc):
                raise
            raise Unavailable(f"database unavailable: {type(exc).__name__}") from exc

    @asynccontextmanager
    async def direct(self) -> AsyncIterator[asyncpg.Connection]:
        """PostgreSQL: an asyncpg connection outside SQLAlchemy, for the statements every job
        takes (see store.pg_direct). No transaction is open: each statement is its own, unless
        the caller opens one. Taking one costs a fraction of an engine checkout and return."""
        try:
            pool = self._direct_pool or await self._open_direct_pool()
            async with pool.acquire() as conn:
                yield conn
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if not _is_outage(exc):
                raise
            if self._direct_pool is not None:
                # Its other connections most likely died too: reconnect each on its next use.
                await self._direct_pool.expire_connections()
            raise Unavailable(f"database unavailable: {type(exc).__name__}") from exc

    @asynccontextmanager
    async def direct_sqlite(self) -> AsyncIterator[sqlite3.Connection]:
        """SQLite: a write transaction (``BEGIN IMMEDIATE``) on a plain sqlite3 connection of its
        own, under the same lock as every other writer (see store.sqlite_direct)."""
        assert self._write_lock is not None
        async with self._write_lock:
            try:
                conn = self._direct_sqlite or self._open_direct_sqlite()
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise Unavailable(f"database unavailable: {exc}") from exc
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise
            try:
                conn.commit()
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.rollback()
                raise Unavailable(f"database unavailable: {exc}") from exc

    def _open_direct_sqlite(self) -> sqlite3.Connection:
        path = make_url(self.url).database
        assert path, "the embedded database is a file"
        conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        self._configure(conn)
        self._direct_sqlite = conn
        return conn

    async def _open_direct_pool(self) -> asyncpg.Pool:
        async with self._direct_opening:
            if self._direct_pool is None:
                dsn = make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)
                self._direct_pool = await asyncpg.create_pool(
                    dsn,
                    min_size=1,
                    max_size=self._pool_size,
                    reset=_rollback_if_open,
                    # Plan each statement once per connection, not at every execution. Left to
                    # choose, PostgreSQL planned store.pg_direct's read of named and pending jobs
                    # anew at every execution once the jobs table had statistics (its plan for the
                    # two ids bound costs less than the generic plan, which assumes ten), and
                    # planning costs more than running it. These statements' best plans do not
                    # depend on the values bound; they follow the table as it grows because
                    # store.statistics analyzes it, which replaces them.
                    server_settings={"plan_cache_mode": "force_generic_plan"},
                )
            return self._direct_pool

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction (deferred on SQLite, so it never blocks writers)."""
        try:
            async with self.engine.connect() as conn:
                if self.is_sqlite:
                    conn = await conn.execution_options(sqlite_begin="DEFERRED")
                async with conn.begin():
                    yield conn
        except (OperationalError, DBAPIError, OSError) as exc:
            # Without pre-ping a pooled connection that died shows up here as a DBAPIError.
            if _is_query_error(exc):
                raise
            raise Unavailable(f"database unavailable: {type(exc).__name__}") from exc

    async def reading(self, query: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """``query`` in a read-only transaction, tried once more on another connection if the
        database seemed out of reach. After a restart or a terminated backend the pool still holds
        dead connections; the first one used fails, and SQLAlchemy then recycles the rest. A read
        has nothing to undo, and a database that is really gone fails the second try as well."""
        try:
            async with self.read() as conn:
                return await query(conn)
        except Unavailable as exc:
            log.info("a read failed (%s); trying once more on another connection", exc.message)
        async with self.read() as conn:
            return await query(conn)

    async def migrate(self) -> None:
        """Upgrade the schema to the newest migration (idempotent)."""
        async with self.engine.begin() as conn:
            if not self.is_sqlite:
                # Replicas starting together must not both create the schema.
                await conn.execute(text("SELECT pg_advisory_xact_lock(7431001)"))
            if await self.schema_revision(conn) != SCHEMA_HEAD:
                await conn.run_sync(_upgrade)

    async def schema_revision(self, conn: AsyncConnection) -> str | None:
        """The migration the database is at (None: none yet), read without Alembic."""
        exists = (
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
            if self.is_sqlite
            else "SELECT to_regclass('alembic_version') IS NOT NULL"
        )
        if not (await conn.execute(text(exists))).scalar():
            return None
        versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()
        return versions[0] if len(versions) == 1 else None  # several heads: let Alembic sort them out

    async def checkpoint_loop(self, every_s: float = CHECKPOINT_EVERY_S) -> None:
        """SQLite: copy the WAL into the database file every ``every_s`` on a thread, so that its
        writes and fsync never stall the event loop. PASSIVE: it never waits for, nor blocks, a
        reader or the writer."""
        path = make_url(self.url).database
        if not self._background_checkpoints or not path:
            return
        # One thread of its own: the connection is used by one call at a time, closed last.
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ias-checkpoint")
        loop = asyncio.get_running_loop()
        conn = await loop.run_in_executor(thread, partial(sqlite3.connect, path, check_same_thread=False))
        try:
            while True:
                await asyncio.sleep(every_s)
                try:
                    await loop.run_in_executor(thread, conn.execute, "PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:
                    log.warning("WAL checkpoint failed, will retry: %s", exc)
        finally:
            thread.submit(conn.close)
            thread.shutdown(wait=False)

    async def close(self) -> None:
        if self._direct_pool is not None:
            await self._direct_pool.close()
        if self._direct_sqlite is not None:
            self._direct_sqlite.close()
        await self.engine.dispose()


async def _rollback_if_open(conn: asyncpg.Connection) -> None:
    """What a direct connection needs before reuse. asyncpg's own reset (UNLISTEN, RESET ALL,
    ...) is a round trip on every release, for state these connections never set."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def driver(conn: AsyncConnection) -> asyncpg.Connection:
    """PostgreSQL: the asyncpg connection under ``conn``, for statements SQLAlchemy cannot batch."""
    raw = await conn.get_raw_connection()
    return raw.driver_connection


async def driver_sqlite(conn: AsyncConnection) -> sqlite3.Connection:
    """SQLite: the sqlite3 connection under ``conn``, inside the same transaction."""
    raw = await conn.get_raw_connection()
    inline = raw.driver_connection
    assert isinstance(inline, sqlite_inline.InlineConnection)
    return inline.sqlite3_connection


@asynccontextmanager
async def _invalidated_on_outage(conn: AsyncConnection) -> AsyncIterator[None]:
    """A connection that failed a statement sent straight through the driver is not returned to
    the pool as if nothing happened: SQLAlchemy never saw the error."""
    try:
        yield
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        if _is_outage(exc):
            await conn.invalidate()
        raise


def _is_query_error(exc: Exception) -> bool:
    """A DBAPIError that is about the statement, not about reaching the database."""
    if isinstance(exc, OperationalError) or not isinstance(exc, DBAPIError):
        return False
    return not _is_outage(exc)


# SQLSTATE classes and codes that mean "the database cannot be reached or is going away", not "this
# statement is wrong": connection exceptions, operator intervention (shutdown, starting up,
# terminated backend), and insufficient resources (too many connections, disk full).
_OUTAGE_SQLSTATE_CLASSES: Final = ("08", "53", "57")
_OUTAGE_WORDS: Final = ("connection", "terminat", "shutdown", "shutting down", "starting up", "closed")


def _is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` (SQLAlchemy's, or the driver's own) means the database is out of reach."""
    if isinstance(exc, OSError | asyncpg.InterfaceError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig  # type: ignore[assignment]
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate[:2] in _OUTAGE_SQLSTATE_CLASSES:
        return True
    text = str(exc).lower()
    return any(s in text for s in _OUTAGE_WORDS)


def alembic_config() -> Config:
    """Alembic's configuration, pointing at the migrations shipped with the package."""
    from alembic.config import Config  # only when migrating: see SCHEMA_HEAD

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("migrations")))
    cfg.attributes["configure_logger"] = False
    return cfg


def _upgrade(sync_conn: Connection) -> None:
    from alembic import command

    cfg = alembic_config()
    cfg.attributes["connection"] = sync_conn
    command.upgrade(cfg, "head")
