"""Each repository job end to end: a real control plane, `ias setup`, `ias repo link`, a real
`ias worker start` subprocess and a real git repository."""

from __future__ import annotations

import json
from pathlib import Path

import pygit2
import pytest
from conftest import wait_until
from processes import Server, Worker, ias, ias_env, make_repo, show, submit

pytestmark = pytest.mark.slow


def checkout_state(repo: pygit2.Repository) -> tuple[object, ...]:
    return (str(repo.head.target), repo.head.shorthand, sorted(repo.status().items()))


def test_the_six_repository_jobs_run_through_a_real_worker(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "widgets")
    (tmp_path / "widgets" / "notes.txt").write_text("uncommitted work in progress\n")
    before = checkout_state(repo)
    home = tmp_path / "home"
    home.mkdir()
    server = Server(tmp_path).start()
    admin, worker_token = server.token("admin"), server.token("worker")
    env = ias_env(IAS_HOME=str(home))
    setup = ias(
        "setup", "--control-plane", server.address, "--token", worker_token, "--name", "laptop", env=env
    )
    assert setup.returncode == 0, setup.stderr
    linked = ias("repo", "link", str(tmp_path / "widgets"), env=env)
    assert linked.returncode == 0, linked.stderr
    [mapping] = json.loads(ias("repo", "list", "--json", env=env).stdout)["repos"]
    repo_id = mapping["repo_id"]
    assert "github" not in repo_id and "widgets" not in repo_id, "the identity is a hash, not the URL"
    worker = Worker(server.address, worker_token, "laptop", home=home)

    def run(job_type: str, payload: dict[str, object]) -> dict[str, object]:
        job = submit(
            server.address,
            admin,
            "--type",
            job_type,
            "--repo",
            repo_id,
            "--payload",
            json.dumps(payload),
            "--wait",
            "--timeout-s",
            "60",
        )
        assert job["status"] == "done", job
        return job

    try:
        installed = run("install_ias", {})
        assert installed["result"]["branch"] == "ias/bootstrap"
        assert "docs/ias/project-context.md" in installed["result"]["changed_paths"]
        sha = installed["result"]["commit_sha"]
        assert repo.revparse_single("ias/bootstrap").id == pygit2.Oid(hex=sha)
        again = run("install_ias", {})
        assert again["result"]["counts"].get("written", 0) == 0
        run_job = run("create_run", {"slug": "add-login", "goal": "Users can log in"})
        run_ref = json.loads(run_job["result"]["metadata_json"])["run_ref"]
        run("context_architect", {})
        decided = run(
            "apply_decision",
            {"decision_id": "dec-1", "title": "Auth provider", "answer": "Use passkeys", "run_ref": run_ref},
        )
        assert decided["result"]["commit_sha"]
        run("update_git_policy", {"branchPrefix": "team/"})
        repaired = run("git_repair", {"dry_run": True})
        assert repaired["result"]["counts"].get("findings", 0) == 0
        # A job for a repository this machine does not map is never offered to it.
        foreign = submit(server.address, admin, "--type", "install_ias", "--repo", "r_unmapped")
        assert show(server.address, admin, foreign["id"])["status"] == "pending"
        # The user's checkout is exactly as it was: same HEAD, same branch, same uncommitted file.
        assert checkout_state(pygit2.Repository(str(tmp_path / "widgets"))) == before
        wait_until(
            lambda: show(server.address, admin, foreign["id"])["status"] == "pending", what="still pending"
        )
    finally:
        assert worker.stop() == 0
        server.stop()


def test_a_bad_payload_fails_the_job_and_the_daemon_keeps_running(tmp_path: Path) -> None:
    make_repo(tmp_path / "widgets")
    home = tmp_path / "home"
    home.mkdir()
    server = Server(tmp_path).start()
    admin, worker_token = server.token("admin"), server.token("worker")
    env = ias_env(IAS_HOME=str(home))
    assert (
        ias(
            "setup", "--control-plane", server.address, "--token", worker_token, "--name", "w", env=env
        ).returncode
        == 0
    )
    assert ias("repo", "link", str(tmp_path / "widgets"), env=env).returncode == 0
    repo_id = json.loads(ias("repo", "list", "--json", env=env).stdout)["repos"][0]["repo_id"]
    worker = Worker(server.address, worker_token, "w", home=home)
    try:
        bad = submit(
            server.address,
            admin,
            "--type",
            "create_run",
            "--repo",
            repo_id,
            "--payload",
            '{"slug": "Bad Slug"}',
            "--wait",
            "--timeout-s",
            "60",
        )
        assert bad["status"] == "failed"
        assert bad["result"]["error_code"] == "invalid_payload"
        good = submit(
            server.address, admin, "--type", "noop", "--payload", "{}", "--wait", "--timeout-s", "60"
        )
        assert good["status"] == "done"
    finally:
        assert worker.stop() == 0
        server.stop()
