"""The outcome journal keeps frames across restarts and sets unreadable entries aside."""

from __future__ import annotations

from pathlib import Path

import pytest
from ias.v1 import job_pb2
from ias.v1 import worker_service_pb2 as wpb

from worker.journal import Journal


def outcome(job_id: str) -> wpb.ConnectRequest:
    return wpb.ConnectRequest(
        outcome=wpb.Outcome(job_id=job_id, lease_epoch=3, status=job_pb2.JOB_STATUS_DONE)
    )


def test_frames_survive_a_restart_until_forgotten(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    assert journal.record("job_a", outcome("job_a"))
    assert journal.record("job_b", outcome("job_b"))
    journal.forget("job_a")
    reloaded = Journal(tmp_path / "j").load()
    assert list(reloaded) == ["job_b"]
    assert reloaded["job_b"].outcome.lease_epoch == 3


def test_an_unreadable_entry_is_moved_aside(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    (tmp_path / "job_x.frame").write_bytes(b"\xff\xfe not a frame")
    assert journal.load() == {}
    assert (tmp_path / "job_x.corrupt").exists()


@pytest.mark.parametrize("job_id", ["", "../evil", ".hidden", "a/b"])
def test_unsafe_job_ids_are_refused(tmp_path: Path, job_id: str) -> None:
    with pytest.raises(ValueError):
        Journal(tmp_path).record(job_id, outcome("x"))
