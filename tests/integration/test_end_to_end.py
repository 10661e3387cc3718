"""The real processes: `ias server start`, `ias worker start`, `ias jobs`, `ias dev`, kill -9 and restarts."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_until
from processes import Server, Worker, ias, ias_env, show, submit

pytestmark = pytest.mark.slow


def test_submit_wait_runs_a_job_through_real_processes(tmp_path: Path) -> None:
    server = Server(tmp_path).start()
    admin, worker_token = server.token("admin"), server.token("worker")
    worker = Worker(server.address, worker_token, "w1")
    try:
        job = submit(server.address, admin, "--type", "noop", "--payload", '{"seconds": 0.1}', "--wait")
        assert {"id", "type", "status", "attempt"} <= set(job)
        assert (job["type"], job["status"], job["attempt"]) == ("noop", "done", 1)
        assert show(server.address, admin, job["id"])["status"] == "done"
        listed = ias("jobs", "list", "--json", env=ias_env(IAS_CONTROL_PLANE=server.address, IAS_TOKEN=admin))
        assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [job["id"]]
    finally:
        assert worker.stop() == 0
        server.stop()


def test_a_killed_worker_s_job_runs_elsewhere_exactly_once(tmp_path: Path) -> None:
    server = Server(tmp_path, grace_s=1.0).start()
    admin, worker_token = server.token("admin"), server.token("worker")
    first = Worker(server.address, worker_token, "first")
    env = ias_env(IAS_CONTROL_PLANE=server.address, IAS_TOKEN=admin)
    try:
        job = submit(server.address, admin, "--type", "noop", "--payload", '{"seconds": 3}')
        wait_until(lambda: show(server.address, admin, job["id"])["status"] == "running", what="job running")
        first.kill()  # kill -9: no goodbye, no outcome
        second = Worker(server.address, worker_token, "second")
        watched = ias("jobs", "watch", job["id"], "--json", env=env, timeout=60)
        assert watched.returncode == 0, watched.stderr
        final = show(server.address, admin, job["id"])
        assert (final["status"], final["attempt"], final["lease_epoch"]) == ("done", 2, 2)
        finished = [
            json.loads(line) for line in watched.stdout.splitlines() if json.loads(line)["status"] == "done"
        ]
        assert len(finished) == 1
        assert second.stop() == 0
    finally:
        first.kill()
        server.stop()


def test_workers_reconnect_after_a_server_restart_and_keep_their_job(tmp_path: Path) -> None:
    server = Server(tmp_path, grace_s=10.0).start()
    admin, worker_token = server.token("admin"), server.token("worker")
    port_pinned = Server(tmp_path, grace_s=10.0, listen=server.address)
    worker = Worker(server.address, worker_token, "steady")
    try:
        job = submit(server.address, admin, "--type", "noop", "--payload", '{"seconds": 4}')
        wait_until(lambda: show(server.address, admin, job["id"])["status"] == "running", what="job running")
        server.stop()  # graceful: workers are told to drain and reconnect
        port_pinned.start()
        final = submit(
            port_pinned.address, admin, "--type", "noop", "--payload", "{}", "--wait", "--timeout-s", "30"
        )
        assert final["status"] == "done"
        wait_until(
            lambda: show(port_pinned.address, admin, job["id"])["status"] == "done",
            timeout=30,
            what="the long job finished after the restart",
        )
        kept = show(port_pinned.address, admin, job["id"])
        assert (kept["attempt"], kept["lease_epoch"]) == (1, 1), "the job kept its lease across the restart"
    finally:
        assert worker.stop() == 0
        port_pinned.stop()
        server.stop()


@pytest.mark.postgres
def test_two_replicas_on_one_postgres_serve_any_worker(tmp_path: Path, pg_url: str) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Server(tmp_path / "a", db=pg_url).start()
    b = Server(tmp_path / "b", db=pg_url).start()
    admin, worker_token = a.token("admin"), b.token("worker")
    worker = Worker(b.address, worker_token, "on-b")
    try:
        job = submit(
            a.address, admin, "--type", "noop", "--payload", '{"seconds": 0}', "--wait", "--timeout-s", "30"
        )
        assert job["status"] == "done"
        assert show(b.address, admin, job["id"])["status"] == "done"
        # Watch on replica B sees the job finish that A's submitter cannot see locally.
        second = submit(b.address, admin, "--type", "noop", "--payload", '{"seconds": 1}')
        watched = ias(
            "jobs",
            "watch",
            second["id"],
            "--json",
            env=ias_env(IAS_CONTROL_PLANE=a.address, IAS_TOKEN=admin),
            timeout=60,
        )
        assert watched.returncode == 0, watched.stderr
        assert json.loads(watched.stdout.splitlines()[-1])["status"] == "done"
    finally:
        assert worker.stop() == 0
        a.stop()
        b.stop()


def test_cli_errors_are_one_line_with_no_traceback(tmp_path: Path) -> None:
    cases = [
        (["jobs", "list"], {}, "no token"),
        (
            ["jobs", "submit", "--type", "noop", "--payload", "{bad"],
            {"IAS_TOKEN": "ias_x"},
            "--payload is not valid JSON",
        ),
        (["jobs", "list"], {"IAS_TOKEN": "ias_x", "IAS_CONTROL_PLANE": "127.0.0.1:9"}, "unavailable"),
        (["worker", "start"], {}, "no token"),
        (
            ["server", "start", "--data-dir", str(tmp_path), "--listen", "0.0.0.0:0"],
            {},
            "not a loopback address",
        ),
        (["server", "start", "--data-dir", str(tmp_path), "--db", "mysql://x/y"], {}, "unsupported database"),
    ]
    for args, env, expected in cases:
        out = ias(*args, env=ias_env(**env), timeout=30)
        assert out.returncode == 2, (args, out.stderr)
        assert expected in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_taken_port_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args in (
            ["server", "start", "--data-dir", str(tmp_path / "s"), "--listen", f"127.0.0.1:{port}"],
            ["dev", "--data-dir", str(tmp_path / "d"), "--grpc-port", str(port)],
        ):
            out = ias(*args, env=ias_env(), timeout=60)
            assert out.returncode == 2, (args, out.stderr)
            assert f"could not listen on 127.0.0.1:{port}" in out.stderr, out.stderr
            assert "Traceback" not in out.stderr, out.stderr


def test_dev_starts_everything_and_runs_a_job(tmp_path: Path) -> None:
    data_dir = tmp_path / "dev"
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "dev", "--data-dir", str(data_dir), "--grpc-port", "0"],
        env=ias_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until((data_dir / "dev.json").exists, timeout=30, what="dev.json")
        info = json.loads((data_dir / "dev.json").read_text())
        assert {"control_plane", "console_url", "token", "workspace"} <= set(info)
        job = submit(
            info["control_plane"],
            info["token"],
            "--type",
            "noop",
            "--payload",
            '{"seconds": 0}',
            "--wait",
            "--timeout-s",
            "30",
        )
        assert job["status"] == "done"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "IAS is running" in out
