"""Daemon log lines carry their structured fields."""

from __future__ import annotations

import logging
import sys

from worker.log_format import FieldsFormatter


def _record(msg: str, extra: dict[str, object] | None = None, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            info = sys.exc_info()
    record = logging.getLogger("worker.daemon").makeRecord(
        "worker.daemon", logging.INFO, __file__, 1, msg, None, info, extra=extra
    )
    return record


def test_extra_fields_follow_the_message_as_key_value() -> None:
    formatter = FieldsFormatter("%(levelname)s %(name)s: %(message)s")
    line = formatter.format(_record("started job", {"job_id": "job_1", "attempt": 1, "dispatch_ms": 0.42}))
    assert line == "INFO worker.daemon: started job job_id=job_1 attempt=1 dispatch_ms=0.42"
    assert formatter.format(_record("connected")) == "INFO worker.daemon: connected"


def test_a_traceback_stays_below_the_fields() -> None:
    line = FieldsFormatter("%(message)s").format(_record("failed", {"job_id": "job_2"}, exc=True))
    head, _, trace = line.partition("\n")
    assert head == "failed job_id=job_2"
    assert trace.startswith("Traceback") and "ValueError: boom" in trace
