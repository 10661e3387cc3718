"""How Watch splits consecutive events into coalesced responses: bounded in count and in bytes."""

from __future__ import annotations

from ias.v1 import console_service_pb2 as cpb
from ias.v1 import event_pb2

from control_plane.api import console_servicer
from control_plane.api.console_servicer import _chunks, _Converted


def converted(seq: int, size: int) -> _Converted:
    pb = event_pb2.Event(seq=seq)
    return _Converted(seq=seq, event=pb, response=cpb.WatchResponse(event=pb), size=size)


def split(sizes: list[int]) -> list[list[int]]:
    runs = _chunks([converted(i + 1, size) for i, size in enumerate(sizes)])
    return [[one.seq for one in run] for run in runs]


def test_small_events_go_in_runs_of_the_count_limit() -> None:
    limit = console_servicer._BATCH_EVENTS
    runs = split([100] * (2 * limit + 3))
    assert [len(run) for run in runs] == [limit, limit, 3]
    assert [seq for run in runs for seq in run] == list(range(1, 2 * limit + 4))


def test_a_run_ends_before_it_would_pass_the_byte_budget() -> None:
    third = console_servicer._BATCH_BYTES // 3
    assert split([third, third, third, third, 10]) == [[1, 2, 3], [4, 5]]


def test_an_event_larger_than_the_budget_goes_alone() -> None:
    huge = console_servicer._BATCH_BYTES * 2
    assert split([10, huge, 10]) == [[1], [2], [3]]


def test_nothing_to_send_makes_no_run() -> None:
    assert split([]) == []
