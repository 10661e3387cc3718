"""The chaos soak in small: 300 noop and 20 repository jobs through kills, restarts and network faults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from soak import FAULTS, SoakConfig, run_soak
from soak_audit import SoakReport, summary_table

pytestmark = pytest.mark.slow

SMALL = {"jobs": 300, "repo_jobs": 20, "minutes": 0.9, "noop_max_s": 1.5}


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "big")


def _check(report: SoakReport) -> None:
    table = summary_table(report)
    print(table)
    assert report.problems() == [], table + "\nfaults:\n  " + "\n  ".join(report.timeline)
    assert set(report.faults) == set(FAULTS), f"not every kind of fault was injected\n{table}"


async def test_a_small_soak_on_sqlite_loses_and_doubles_nothing(tmp_path: Path) -> None:
    _check(await run_soak(SoakConfig(db="sqlite", seed=_seed(), **SMALL), tmp_path))  # type: ignore[arg-type]


@pytest.mark.postgres
async def test_a_small_soak_on_two_postgres_replicas_loses_and_doubles_nothing(
    tmp_path: Path, pg_url: str
) -> None:
    cfg = SoakConfig(db="postgres", db_url=pg_url, seed=_seed(), **SMALL)  # type: ignore[arg-type]
    _check(await run_soak(cfg, tmp_path))
