"""The committed generated code is exactly what scripts/gen-proto makes from the .proto files."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    env_path = str(Path(sys.executable).parent)
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-proto"), str(tmp_path)],
        check=True,
        cwd=ROOT,
        env={"PATH": f"{env_path}:/usr/bin:/bin"},
        capture_output=True,
    )
    committed = sorted(p.name for p in (ROOT / "proto/ias/v1").iterdir() if p.name.endswith(GENERATED))
    fresh = sorted(p.name for p in (tmp_path / "ias/v1").iterdir() if p.name.endswith(GENERATED))
    assert committed == fresh
    _, mismatch, errors = filecmp.cmpfiles(
        ROOT / "proto/ias/v1", tmp_path / "ias/v1", committed, shallow=False
    )
    assert mismatch == [] and errors == [], f"regenerate with scripts/gen-proto: {mismatch or errors}"


def test_every_package_imports_without_the_control_plane() -> None:
    """The worker plane never imports the control plane (DESIGN: dependency direction)."""
    code = "import sys, worker.cli, worker.daemon, worker.jobs_cli; sys.exit('control_plane' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{ROOT / 'proto'}:{ROOT}"},
    )
    assert result.returncode == 0, result.stderr or "worker imported control_plane"
