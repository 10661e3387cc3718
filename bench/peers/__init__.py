"""Peer job queues run on the same no-op workload as IAS: PgQueuer, Procrastinate, Celery + Redis
(the machine's, which keeps nothing on disk, and one of its own that fsyncs every write).

The peer packages come with the ``bench`` extra; each is imported only when asked for.
"""

from __future__ import annotations

import importlib
import logging
import tempfile
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from bench.peers.common import PeerFailed, PeerFigures, PeerParams, PeerSession, measure

log = logging.getLogger(__name__)

PEERS: Final = {
    "pgqueuer": ("PgQueuer", "bench.peers.pgqueuer_peer"),
    "procrastinate": ("Procrastinate", "bench.peers.procrastinate_peer"),
    "celery": ("Celery + Redis (prefork, 2)", "bench.peers.celery_peer"),
    "celery-aof": ("Celery + Redis, fsync on every write (prefork, 2)", "bench.peers.celery_aof_peer"),
}


class SessionFactory(Protocol):
    """A peer module's ``session``: a fresh store, and a pool with ``connections`` connections."""

    def __call__(
        self, admin_url: str, out: str, *, connections: int
    ) -> AbstractAsyncContextManager[PeerSession]: ...


@dataclass(slots=True)
class PeerResult:
    name: str
    title: str
    figures: PeerFigures | None = None
    error: str = ""
    skipped: str = ""


def importable(name: str) -> str:
    """Empty if the peer's module imports, else why not."""
    try:
        importlib.import_module(PEERS[name][1])
    except ImportError as exc:
        return f"{exc} (install the `bench` extra)"
    return ""


async def run_peer(name: str, admin_url: str, params: PeerParams) -> PeerResult:
    title, module_name = PEERS[name]
    result = PeerResult(name=name, title=title)
    result.skipped = importable(name)
    if result.skipped:
        log.error("%s: SKIPPED: %s", title, result.skipped)
        return result
    factory: SessionFactory = importlib.import_module(module_name).session
    with tempfile.TemporaryDirectory(prefix=f"ias-bench-{name}-") as tmp:
        out, log_path = Path(tmp) / "ran.txt", Path(tmp) / "worker.log"
        try:
            async with factory(admin_url, str(out), connections=max(params.submitters)) as session:
                result.figures = await measure(session, params, out, log_path)
        except (PeerFailed, TimeoutError, OSError) as exc:
            result.error = f"{type(exc).__name__}: {exc}\n{_tail(log_path)}"
            log.error("%s: %s", title, result.error)
    return result


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no worker log)"
