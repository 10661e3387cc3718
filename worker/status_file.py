"""The status file `ias worker status` reads: the daemon's state, replaced whole each second."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("worker.daemon")


class StatusFile:
    """Writes a JSON state atomically (a temporary file, then a rename); a failure warns once until
    a write succeeds again, and never stops the worker."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._failing = False

    def write(self, state: dict[str, Any]) -> None:
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(state, indent=2))
            tmp.replace(self.path)
        except OSError as exc:  # a full disk must not stop the worker
            if not self._failing:
                log.warning(
                    "cannot write the status file %s: %s; `ias worker status` is stale", self.path, exc
                )
            self._failing = True
            return
        self._failing = False
