"""The outcome journal: a result finished while the control plane was down survives a worker
crash and is recorded exactly once after both come back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import wait_until
from processes import Server, Worker, ias, ias_env, show, submit

pytestmark = pytest.mark.slow


def test_an_outcome_journaled_while_offline_is_replayed_once_after_a_crash(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    server = Server(tmp_path, grace_s=60.0).start()
    admin, worker_token = server.token("admin"), server.token("worker")
    journal = home / "journal" / "j"
    first = Worker(server.address, worker_token, "j", home=home)
    again = Server(tmp_path, grace_s=60.0, listen=server.address)
    second = None
    try:
        job = submit(server.address, admin, "--type", "noop", "--payload", '{"seconds": 1.5}')
        wait_until(lambda: show(server.address, admin, job["id"])["status"] == "running", what="job running")
        server.stop()  # the control plane goes away while the job runs
        wait_until(lambda: (journal / f"{job['id']}.frame").exists(), timeout=15, what="outcome journaled")
        first.kill()  # and the worker crashes before it could report
        again.start()
        second = Worker(again.address, worker_token, "j", home=home)
        wait_until(
            lambda: show(again.address, admin, job["id"])["status"] == "done",
            timeout=30,
            what="journaled outcome recorded",
        )
        final = show(again.address, admin, job["id"])
        assert (final["attempt"], final["lease_epoch"]) == (1, 1)
        wait_until(lambda: not list(journal.glob("*.frame")), timeout=10, what="journal emptied")
        shown = ias("worker", "status", "--json", env=ias_env(IAS_HOME=str(home)))
        [status] = json.loads(shown.stdout)
        assert (status["name"], status["control_plane"]) == ("j", again.address)
    finally:
        first.kill()
        if second is not None:
            assert second.stop() == 0
        again.stop()
        server.stop()
