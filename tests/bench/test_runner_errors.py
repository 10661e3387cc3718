"""A scenario whose call fails is reported as that backend's failure; the run goes on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from bench import runner
from bench.report import markdown


async def test_a_failed_call_fails_the_backend_not_the_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    log_path = tmp_path / "server.log"
    log_path.write_text("".join(f"line {i}\n" for i in range(100)))

    @asynccontextmanager
    async def no_server(backend: str, admin_url: str) -> AsyncIterator[object]:
        yield SimpleNamespace(log_path=log_path)

    async def scenarios(server: object, plan: Any, result: runner.BackendResult, admin_url: str) -> None:
        result.extra["measured before the failure"] = "1.0"
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details="Deadline Exceeded",
        )

    monkeypatch.setattr(runner, "_server", no_server)
    monkeypatch.setattr(runner, "_run_scenarios", scenarios)
    result = await runner.run_backend("sqlite", "", plan=None)  # type: ignore[arg-type]
    assert result.error == "a call failed: DEADLINE_EXCEEDED: Deadline Exceeded"
    assert result.extra == {"measured before the failure": "1.0"}
    assert result.log_tail.splitlines() == [f"line {i}" for i in range(100 - runner.LOG_TAIL_LINES, 100)]
    report = markdown([result], machine_info={}, params={}, rates=[], workers=[], submitters=[])
    assert "SQLite: FAILED: a call failed: DEADLINE_EXCEEDED" in report
    assert "The SQLite control plane's last log lines:\n\n    line 60\n" in report, report
