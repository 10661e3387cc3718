"""Log lines with their structured fields: ``log.info("started job", extra={"job_id": ...})``
prints ``... started job job_id=job_1 attempt=1``."""

from __future__ import annotations

import logging
from typing import Final

# What every LogRecord has; anything else on a record came from ``extra``.
_STANDARD: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
}


class FieldsFormatter(logging.Formatter):
    """The usual format, then each ``extra`` field as ``key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
        ]
        if not fields:
            return line
        head, newline, trace = line.partition("\n")  # a traceback stays below the fields
        return f"{head} {' '.join(fields)}{newline}{trace}"
