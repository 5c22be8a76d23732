"""scripts/demo.sh run once per test session (a production-size export: a few minutes), for the tests of the
script itself and of the production preset against the spec reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def demo_script_steps() -> list[str]:
    """scripts/demo.sh's own command lines, without its `source _venv.sh` (which makes .venv and pip-installs the
    project into it: scripts/test.sh has already made that venv, with the dev extras that contain demo.sh's, and
    the tests run in it; here the commands run under the tests' interpreter)."""
    lines = [line.strip() for line in (REPO / "scripts" / "demo.sh").read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    assert commands[0] == "EXTRAS=convert,runtime" and commands[1].startswith("source ") and "_venv.sh" in commands[1]
    steps = commands[2:]
    assert steps and all(step.startswith("python -m ") for step in steps), steps
    return steps


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> dict:
    """demo.sh's steps, run by bash in a scratch folder (its artifacts/ lands there, not in the checkout), with
    `python` the tests' interpreter and this checkout importable; `convert/clips` is the checkout's."""
    work = tmp_path_factory.mktemp("demo")
    (work / "convert").mkdir()
    (work / "convert" / "clips").symlink_to(REPO / "convert" / "clips")
    bin_dir = work / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a link would lose the venv
    (bin_dir / "python").chmod(0o755)
    script = "set -euo pipefail\n" + "\n".join(demo_script_steps()) + "\n"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return {"folder": work, "model": work / "artifacts" / "model.onnx", "stdout": proc.stdout, "stderr": proc.stderr}
