"""The outcome journal: reports the control plane has not acknowledged, kept on disk.

An outcome (or hand-back) is written here before it is sent and removed when the control plane
acknowledges it, so a crash or an unreachable control plane loses no result. Replaying is safe:
the control plane recognises an outcome it already recorded and acknowledges it as a duplicate.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from google.protobuf.message import DecodeError
from ias.v1 import worker_service_pb2 as wpb

log = logging.getLogger(__name__)


class Journal:
    """One file per unacknowledged frame, named by job id, written atomically.

    While the disk refuses writes (full, read-only), frames are kept in memory, one warning says
    so, and each is written as soon as the disk takes a write again.
    """

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._unwritten: dict[str, wpb.ConnectRequest] = {}  # refused by the disk, not yet acknowledged
        self._failing = False  # the last write failed; warned once for this spell
        try:
            self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            self._refused(exc)

    def _path(self, job_id: str) -> Path:
        # Job ids are server-made ("job_<hex>"); refuse anything that could escape the folder.
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise ValueError(f"unsafe job id {job_id!r}")
        return self._dir / f"{job_id}.frame"

    def record(self, job_id: str, frame: wpb.ConnectRequest) -> bool:
        """Persist a frame before it is sent; False if the disk refused it (it is then held in
        memory and written with the next frame the disk takes)."""
        self._path(job_id)  # an unsafe id is refused before anything is held
        self._unwritten[job_id] = frame
        if not self._write(job_id, frame):
            return False
        del self._unwritten[job_id]
        if self._failing:
            self._failing = False
            log.info("the outcome journal %s is writable again", self._dir)
        for held_id, held in list(self._unwritten.items()):
            if self._write(held_id, held):
                del self._unwritten[held_id]
        return True

    def forget(self, job_id: str) -> None:
        """The control plane acknowledged (or rejected for good) the frame."""
        self._unwritten.pop(job_id, None)
        try:
            self._path(job_id).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove journal entry %s: %s", job_id, exc)

    def _write(self, job_id: str, frame: wpb.ConnectRequest) -> bool:
        path = self._path(job_id)
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(frame.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
            return True
        except OSError as exc:
            self._refused(exc)
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # the disk's problem was just reported
            return False

    def _refused(self, exc: OSError) -> None:
        if self._failing:
            log.debug("outcome journal %s still refuses writes: %s", self._dir, exc)
            return
        self._failing = True
        log.warning(
            "cannot write the outcome journal %s: %s; outcomes are still sent, but kept in memory "
            "only until it is writable again (if the worker dies meanwhile, their jobs run again)",
            self._dir,
            exc,
        )

    def load(self) -> dict[str, wpb.ConnectRequest]:
        """Every frame still waiting for an acknowledgement; unreadable entries are set aside."""
        frames: dict[str, wpb.ConnectRequest] = {}
        for path in sorted(self._dir.glob("*.frame")):
            frame = wpb.ConnectRequest()
            try:
                frame.ParseFromString(path.read_bytes())
            except (OSError, DecodeError) as exc:
                log.error("journal entry %s is unreadable (%s); moved aside", path.name, exc)
                path.replace(path.with_suffix(".corrupt"))
                continue
            if frame.WhichOneof("frame") not in ("outcome", "release"):
                log.error("journal entry %s holds no outcome; moved aside", path.name)
                path.replace(path.with_suffix(".corrupt"))
                continue
            frames[path.stem] = frame
        return frames
