"""The outcome journal on a disk that refuses writes (ENOSPC from fsync): one warning, nothing
lost, and journaled again once the disk takes writes. No root needed; test_worker_faults.py
runs the same against a real full filesystem."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
from ias.v1 import job_pb2
from ias.v1 import worker_service_pb2 as wpb

from worker.journal import Journal


def outcome(job_id: str) -> wpb.ConnectRequest:
    return wpb.ConnectRequest(
        outcome=wpb.Outcome(job_id=job_id, lease_epoch=1, status=job_pb2.JOB_STATUS_DONE)
    )


def disk_full(_fd: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_warns_once_and_loses_nothing_once_it_is_freed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="worker.journal")
    folder = tmp_path / "journal"
    journal = Journal(folder)
    with monkeypatch.context() as full:
        full.setattr(os, "fsync", disk_full)
        assert not journal.record("job_a", outcome("job_a"))
        assert not journal.record("job_b", outcome("job_b"))
        assert not journal.record("job_c", outcome("job_c"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(folder) in warnings[0] and os.strerror(errno.ENOSPC) in warnings[0]
    assert list(folder.iterdir()) == []  # no half-written entry stays behind
    journal.forget("job_a")  # acknowledged while it was held in memory only

    assert journal.record("job_d", outcome("job_d"))
    assert "is writable again" in caplog.text
    # What the disk refused before is on disk now too, except what was acknowledged meanwhile.
    assert sorted(Journal(folder).load()) == ["job_b", "job_c", "job_d"]


def test_a_journal_folder_that_cannot_be_made_does_not_stop_the_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("in the way\n")
    journal = Journal(tmp_path / "file" / "journal")
    assert not journal.record("job_a", outcome("job_a"))
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert str(tmp_path / "file" / "journal") in warning
    assert journal.load() == {}
