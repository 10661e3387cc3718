"""ConsoleService: the workspace event stream and the calls behind Console pages."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from ias.v1 import console_service_pb2 as cpb
from ias.v1 import console_service_pb2_grpc as cpb_grpc
from ias.v1 import event_pb2

from control_plane.api import convert
from control_plane.api.status import streaming, unary
from control_plane.auth.tokens import current_principal
from control_plane.domain.workers import Event
from control_plane.errors import InvalidArgument, PermissionDenied
from control_plane.events.hub import EventHub
from control_plane.queue import JobQueue

Ctx = grpc.aio.ServicerContext[Any, Any]
_PAGE = 1000
_CACHED_EVENTS = 8192  # recent events, converted once for every live subscriber
_CACHED_BATCHES = 32  # recent coalesced responses, shared by subscribers that took the same events
_BATCH_EVENTS = 500  # at most this many events in one coalesced response
_BATCH_BYTES = 1 << 20  # and about this many bytes, well below a client's default 4 MiB receive limit
_RESYNCS = 1_000_000  # each one follows a subscriber falling behind
_ROUNDS = 1 << 40  # a bound on one subscription's sends that no real stream reaches


@dataclass(frozen=True, slots=True)
class _Converted:
    """An event converted once: its message, its one-event response and its encoded size."""

    seq: int
    event: event_pb2.Event
    response: cpb.WatchResponse
    size: int


class ConsoleServicer(cpb_grpc.ConsoleServiceServicer):
    """Thin adapter from ConsoleService to the job queue and the event hub."""

    def __init__(self, *, queue: JobQueue, hub: EventHub) -> None:
        self._queue = queue
        self._hub = hub
        self._converted: OrderedDict[tuple[str, int], _Converted] = OrderedDict()
        self._batches: OrderedDict[tuple[str, int, int], cpb.WatchResponse] = OrderedDict()

    @streaming
    async def Watch(self, request: cpb.WatchRequest, context: Ctx) -> AsyncIterator[cpb.WatchResponse]:
        workspace_id = _workspace(request.workspace_id)
        if request.since_seq < 0:
            raise InvalidArgument("since_seq", "must not be negative")
        last = request.since_seq
        for _ in range(_RESYNCS):  # each round ends only if the subscriber fell behind
            # Subscribe first, then replay: nothing committed in between can be missed.
            async with self._hub.subscribe(workspace_id) as live:
                for _ in range(_ROUNDS):
                    page = await self._queue.events_since(workspace_id, last)
                    for response in self._responses(workspace_id, page, coalesce=request.coalesce):
                        yield response
                    last = page[-1].seq if page else last
                    if len(page) < _PAGE:
                        break
                for _ in range(_ROUNDS):
                    # Everything queued meanwhile: for a coalescing caller, one response per round.
                    taken = await live.batch(_BATCH_EVENTS)
                    if not taken:
                        break  # fell behind: subscribe again and read the log from `last`
                    fresh = [event for event in taken if event.seq > last]
                    for response in self._responses(workspace_id, fresh, coalesce=request.coalesce):
                        yield response
                    last = fresh[-1].seq if fresh else last

    def _responses(
        self, workspace_id: str, events: Sequence[Event], *, coalesce: bool
    ) -> Iterator[cpb.WatchResponse]:
        """Consecutive events as responses: one each, or as few as the size limits allow."""
        converted = [self._convert(event) for event in events]
        if not coalesce:
            for one in converted:
                yield one.response
            return
        for chunk in _chunks(converted):
            yield chunk[0].response if len(chunk) == 1 else self._batch(workspace_id, chunk)

    def _convert(self, event: Event) -> _Converted:
        """The event converted once, however many subscribers receive it."""
        key = (event.workspace_id, event.seq)
        converted = self._converted.get(key)
        # An event read back from the log before its live copy came has no commit time: the
        # live one replaces it.
        if converted is None or (event.committed_at and not converted.event.HasField("committed_at")):
            pb = convert.event_to_pb(event)
            response = cpb.WatchResponse(event=pb)
            converted = _Converted(seq=event.seq, event=pb, response=response, size=pb.ByteSize())
            self._converted[key] = converted
            if len(self._converted) > _CACHED_EVENTS:
                self._converted.popitem(last=False)
        return converted

    def _batch(self, workspace_id: str, chunk: Sequence[_Converted]) -> cpb.WatchResponse:
        """One response for consecutive events; subscribers that took the same events share it."""
        key = (workspace_id, chunk[0].seq, chunk[-1].seq)
        response = self._batches.get(key)
        if response is None:
            response = cpb.WatchResponse(events=[one.event for one in chunk])
            self._batches[key] = response
            if len(self._batches) > _CACHED_BATCHES:
                self._batches.popitem(last=False)
        return response

    @unary
    async def ListWorkers(self, request: cpb.ListWorkersRequest, context: Ctx) -> cpb.ListWorkersResponse:
        workers = await self._queue.list_workers(
            workspace_id=current_principal.get().workspace_id, include_offline=request.include_offline
        )
        return cpb.ListWorkersResponse(workers=[convert.worker_to_pb(w) for w in workers])


def _chunks(converted: Sequence[_Converted]) -> Iterator[Sequence[_Converted]]:
    """Split into runs of at most `_BATCH_EVENTS` events and about `_BATCH_BYTES` bytes each."""
    begin, size = 0, 0
    for i, one in enumerate(converted):
        if i > begin and (i - begin >= _BATCH_EVENTS or size + one.size > _BATCH_BYTES):
            yield converted[begin:i]
            begin, size = i, 0
        size += one.size
    if begin < len(converted):
        yield converted[begin:]


def _workspace(requested: str) -> str:
    own = current_principal.get().workspace_id
    if requested and requested != own:
        raise PermissionDenied(f"this credential is scoped to workspace {own}")
    return own
