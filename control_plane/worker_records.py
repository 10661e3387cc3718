"""The job queue's records of workers and replicas: hellos (recorded in batches), sessions going
offline or draining, a replica's proof of life and its departure, and workspaces."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property, partial

from control_plane.dispatch.peers import REPLICAS_CHANNEL
from control_plane.domain.jobs import Job
from control_plane.domain.workers import EventKind, Worker, WorkerStatus
from control_plane.errors import NotFound
from control_plane.group_commit import GroupCommit
from control_plane.ids import new_id
from control_plane.store import events as events_store
from control_plane.store import jobs as jobs_store
from control_plane.store import pg_direct
from control_plane.store import workers as workers_store
from control_plane.store.events import Draft
from control_plane.transactions import Transactions, Tx

log = logging.getLogger(__name__)

SESSIONS_CHANNEL = "ias_sessions"


@dataclass(frozen=True, slots=True)
class HeldLease:
    """A (job, epoch) a worker says it holds."""

    job_id: str
    lease_epoch: int


@dataclass(frozen=True, slots=True)
class _StatusChange:
    """A session going offline or draining, waiting for its group commit."""

    worker_id: str
    session_id: str
    status: WorkerStatus
    reason: str


@dataclass(frozen=True, slots=True)
class _Connect:
    """A worker's hello, waiting for its group commit."""

    start: workers_store.SessionStart
    held: tuple[HeldLease, ...]


class WorkerRecords(Transactions):
    """Workers, their sessions and the replicas, as the job queue records them."""

    # A fleet reconnecting after a restart, or a replica stopping, changes many workers at once.
    @cached_property
    def _connects(self) -> GroupCommit[_Connect, tuple[Worker, list[Job]]]:
        return GroupCommit(self._connect_workers)

    @cached_property
    def _statuses(self) -> GroupCommit[_StatusChange, None]:
        return GroupCommit(self._set_statuses, max_batch=256)

    async def connect_worker(
        self,
        *,
        workspace_id: str,
        name: str,
        capabilities: Sequence[str],
        repo_ids: Sequence[str],
        slots: int,
        version: str,
        held: Sequence[HeldLease],
        session_id: str,
    ) -> tuple[Worker, list[Job]]:
        """Start a session: adopt the jobs the worker still runs, requeue the ones it lost.

        Hellos arriving together (a fleet reconnecting after a restart) share one transaction.
        """
        return await self._connects(
            _Connect(
                start=workers_store.SessionStart(
                    workspace_id=workspace_id,
                    name=name,
                    capabilities=tuple(capabilities),
                    repo_ids=tuple(repo_ids),
                    slots=slots,
                    version=version,
                    session_id=session_id,
                ),
                held=tuple(held),
            )
        )

    async def _connect_workers(
        self, hellos: Sequence[_Connect]
    ) -> list[tuple[Worker, list[Job]] | Exception]:
        """Record a batch of hellos in one transaction, a few statements for the whole batch.

        A worker named twice in the batch (a reconnect racing its own earlier hello) is recorded
        once per round, in arrival order, so the later session is the one that stays.
        """
        answers: list[tuple[Worker, list[Job]] | Exception] = []
        async with self._write() as tx:
            rounds: list[list[int]] = []
            seen: dict[tuple[str, str], int] = {}
            for i, hello in enumerate(hellos):
                key = (hello.start.workspace_id, hello.start.name)
                turn = seen[key] = seen.get(key, -1) + 1
                if turn == len(rounds):
                    rounds.append([])
                rounds[turn].append(i)
            connected: dict[int, tuple[Worker, list[Job]]] = {}
            for indices in rounds:
                batch = [hellos[i] for i in indices]
                workers = await workers_store.connect(
                    tx.conn,
                    starts=[h.start for h in batch],
                    new_id=lambda: new_id("wrk"),
                    replica_id=self._settings.replica_id,
                    now=tx.now,
                )
                held = await jobs_store.held_by_workers(tx.conn, worker_ids=[w.id for w in workers])
                for i, hello, worker in zip(indices, batch, workers, strict=True):
                    adopted = await self._adopt(tx, hello, held.get(worker.id, []))
                    tx.add(hello.start.workspace_id, Draft(EventKind.WORKER_CONNECTED, worker=worker))
                    connected[i] = (worker, adopted)
            answers.extend(connected[i] for i in range(len(hellos)))
            await self._notify_all(
                tx,
                SESSIONS_CHANNEL,
                [f"{worker.id}:{hellos[i].start.session_id}" for i, (worker, _) in connected.items()],
            )
        return answers

    async def _adopt(self, tx: Tx, hello: _Connect, held: Sequence[Job]) -> list[Job]:
        """The jobs a reconnecting worker still runs, with its new session; the rest requeued."""
        held_epochs = {h.job_id: h.lease_epoch for h in hello.held}
        adopted = []
        for job in held:
            if held_epochs.get(job.id) == job.lease_epoch:
                kept = replace(
                    job,
                    session_id=hello.start.session_id,
                    lease_expires_at=tx.now + self._settings.lease_ttl,
                    updated_at=tx.now,
                )
                await jobs_store.save(
                    tx.conn, job=kept, expect_status=job.status, expect_epoch=job.lease_epoch
                )
                adopted.append(kept)
            else:
                await self._requeue(tx, job, "worker_restarted")
        return adopted

    async def set_worker_status(
        self, *, worker_id: str, session_id: str, status: WorkerStatus, reason: str = ""
    ) -> None:
        """Record that a session went offline or started draining (no-op if it was replaced).

        Changes arriving together (a replica stopping, a network partition) share one transaction.
        """
        await self._statuses(
            _StatusChange(worker_id=worker_id, session_id=session_id, status=status, reason=reason)
        )

    async def _set_statuses(self, changes: Sequence[_StatusChange]) -> list[Exception | None]:
        async with self._write() as tx:
            workers = await workers_store.set_statuses(
                tx.conn, changes=[(c.worker_id, c.session_id, c.status) for c in changes], now=tx.now
            )
            for change, worker in zip(changes, workers, strict=True):
                if worker is not None:
                    kind = (
                        EventKind.WORKER_DISCONNECTED
                        if change.status is WorkerStatus.OFFLINE
                        else EventKind.WORKER_CONNECTED
                    )
                    tx.add(worker.workspace_id, Draft(kind, worker=worker, reason=change.reason))
        return [None] * len(changes)

    async def touch_replica(self, *, live: dict[str, tuple[str, bool]] | None = None) -> None:
        """Prove this replica alive and, if another replica took it for dead meanwhile (it was cut
        off from the database longer than the grace), mark its live sessions' workers online again.

        ``live`` maps worker id to (session id, draining) for the sessions open on this replica.
        A row stored anew is announced to the other replicas, and `peers` learns how many others
        are live.
        """
        replica_id = self._settings.replica_id
        async with self._write() as tx:
            if await workers_store.touch_replica(tx.conn, replica_id=replica_id, now=tx.now):
                await self._notify(tx, REPLICAS_CHANNEL, replica_id)
            await self._reclaim_stranded(tx, live)
        if self.peers is not None:
            await self.peers.look()

    async def leave(self) -> None:
        """This replica stops: its row goes (its sessions have recorded themselves offline)."""
        async with self._write() as tx:
            await workers_store.remove_replica(tx.conn, replica_id=self._settings.replica_id)

    async def count_other_replicas(self) -> int:
        since = self._clock() - self._settings.reconnect_grace
        return await self._db.reading(
            partial(workers_store.other_replicas, replica_id=self._settings.replica_id, since=since)
        )

    async def hint_peers(self, workspaces: list[str]) -> None:
        """After quiet writes: where other replicas should look (see `dispatch.peers`)."""
        async with self._db.direct() as raw:
            await pg_direct.hint(raw, workspaces=workspaces, replica_id=self._settings.replica_id)

    async def _reclaim_stranded(self, tx: Tx, live: dict[str, tuple[str, bool]] | None) -> None:
        if not live:
            return
        for worker in await workers_store.reclaim_stranded(
            tx.conn,
            replica_id=self._settings.replica_id,
            live=live,
            now=tx.now,
            grace=self._settings.reconnect_grace,
        ):
            log.warning("worker %s was taken for stranded while its session lived; online again", worker.name)
            tx.add(
                worker.workspace_id, Draft(EventKind.WORKER_CONNECTED, worker=worker, reason="replica_back")
            )

    async def ensure_workspace(self, workspace_id: str) -> None:
        async with self._write() as tx:
            await events_store.ensure_workspace(tx.conn, workspace_id=workspace_id, now=tx.now)

    async def require_workspace(self, workspace_id: str) -> None:
        if not await self._db.reading(partial(events_store.workspace_exists, workspace_id=workspace_id)):
            raise NotFound(f"workspace {workspace_id} not found")
