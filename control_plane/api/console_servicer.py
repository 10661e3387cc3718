"""ConsoleService: the workspace event stream and the calls behind Console pages."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import grpc
from ias.v1 import console_service_pb2 as cpb
from ias.v1 import console_service_pb2_grpc as cpb_grpc

from control_plane.api import convert
from control_plane.api.status import streaming, unary
from control_plane.auth.tokens import current_principal
from control_plane.domain.workers import Event
from control_plane.errors import InvalidArgument, PermissionDenied
from control_plane.events.hub import EventHub
from control_plane.queue import JobQueue

Ctx = grpc.aio.ServicerContext[Any, Any]
_PAGE = 1000
_CACHED_RESPONSES = 8192  # recent events shared by every live subscriber


class ConsoleServicer(cpb_grpc.ConsoleServiceServicer):
    """Thin adapter from ConsoleService to the job queue and the event hub."""

    def __init__(self, *, queue: JobQueue, hub: EventHub) -> None:
        self._queue = queue
        self._hub = hub
        self._responses: OrderedDict[tuple[str, int], cpb.WatchResponse] = OrderedDict()

    def _response(self, event: Event) -> cpb.WatchResponse:
        """The event as a reply, converted once however many subscribers receive it."""
        key = (event.workspace_id, event.seq)
        response = self._responses.get(key)
        if response is None:
            response = cpb.WatchResponse(event=convert.event_to_pb(event))
            self._responses[key] = response
            if len(self._responses) > _CACHED_RESPONSES:
                self._responses.popitem(last=False)
        return response

    @streaming
    async def Watch(self, request: cpb.WatchRequest, context: Ctx) -> AsyncIterator[cpb.WatchResponse]:
        workspace_id = _workspace(request.workspace_id)
        if request.since_seq < 0:
            raise InvalidArgument("since_seq", "must not be negative")
        last = request.since_seq
        for _ in range(1_000_000):  # each round ends only if the subscriber fell behind
            # Subscribe first, then replay: nothing committed in between can be missed.
            async with self._hub.subscribe(workspace_id) as live:
                while True:
                    page = await self._queue.events_since(workspace_id, last)
                    for event in page:
                        last = event.seq
                        yield self._response(event)
                    if len(page) < _PAGE:
                        break
                async for event in live:
                    if event.seq <= last:
                        continue
                    last = event.seq
                    yield self._response(event)

    @unary
    async def ListWorkers(self, request: cpb.ListWorkersRequest, context: Ctx) -> cpb.ListWorkersResponse:
        workers = await self._queue.list_workers(
            workspace_id=current_principal.get().workspace_id, include_offline=request.include_offline
        )
        return cpb.ListWorkersResponse(workers=[convert.worker_to_pb(w) for w in workers])


def _workspace(requested: str) -> str:
    own = current_principal.get().workspace_id
    if requested and requested != own:
        raise PermissionDenied(f"this credential is scoped to workspace {own}")
    return own
