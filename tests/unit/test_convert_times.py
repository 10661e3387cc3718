"""Timestamps and durations on the wire are what protobuf's own conversions give."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from control_plane.api.convert import duration, timestamp, unix_timestamp


def test_timestamps_and_durations_match_protobufs_conversions() -> None:
    rng = random.Random(20261125)
    for _ in range(5000):
        when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=rng.randint(-(10**16), 10**16))
        if rng.random() < 0.3:
            when = when.astimezone(timezone(timedelta(hours=rng.randint(-12, 12))))
        for value in (when, when.replace(tzinfo=None)):  # naive means UTC, as for FromDatetime
            expected = Timestamp()
            expected.FromDatetime(value)
            assert timestamp(value) == expected, value
        span = timedelta(microseconds=rng.randint(-(10**13), 10**13))
        expected_span = Duration()
        expected_span.FromTimedelta(max(span, timedelta(0)))
        assert duration(span) == expected_span, span


def test_a_wall_clock_reading_becomes_a_timestamp() -> None:
    stamp = unix_timestamp(1_795_000_000.5)
    assert (stamp.seconds, stamp.nanos) == (1_795_000_000, 500_000_000)
    assert unix_timestamp(0.0) == Timestamp()
