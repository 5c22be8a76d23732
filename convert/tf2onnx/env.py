"""The legacy venv of the tf2onnx backend: made once from requirements-tf2onnx.txt, cached, reused.

It lives at ${PERCEPIANO_CACHE:-${XDG_CACHE_HOME:-~/.cache}/percepiano}/venv-tf2onnx-<hash of the requirements
file>, so a changed pin set gets a new venv rather than a half-upgraded old one. It is built under a temporary name and
renamed into place once complete (a `.complete` marker is written last), so an interrupted creation is never
reused. PERCEPIANO_TF2ONNX_VENV names an existing venv instead (it must hold the same pins).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from convert.errors import ExportError

log = logging.getLogger(__name__)

REQUIREMENTS = Path(__file__).with_name("requirements-tf2onnx.txt")
MARKER = ".complete"
PYTHON = (3, 11)  # the pins are for CPython 3.11, the main stack's version


def pins(requirements: Path = REQUIREMENTS) -> list[str]:
    """The `name==version` lines of the requirements file."""
    lines = (line.split("#", 1)[0].strip() for line in requirements.read_text().splitlines())
    return [line for line in lines if line]


def cache_root() -> Path:
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("PERCEPIANO_CACHE") or xdg / "percepiano")


def env_dir(requirements: Path = REQUIREMENTS) -> Path:
    override = os.environ.get("PERCEPIANO_TF2ONNX_VENV")
    if override:
        return Path(override)
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:12]
    return cache_root() / f"venv-tf2onnx-{digest}"


def env_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def is_ready(venv: Path) -> bool:
    return (venv / MARKER).is_file() and env_python(venv).exists()


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise ExportError(f"could not create the tf2onnx environment ({what} failed):\n{tail}")


def ensure_env(requirements: Path = REQUIREMENTS, base_python: str | None = None) -> Path:
    """The legacy venv's python, creating the venv first if it is not there (one-time: 0.4 GB download, 1.9 GB)."""
    venv = env_dir(requirements)
    if is_ready(venv):
        return env_python(venv)
    if os.environ.get("PERCEPIANO_TF2ONNX_VENV"):
        raise ExportError(f"PERCEPIANO_TF2ONNX_VENV={venv} is not a complete tf2onnx environment "
                          f"(no {MARKER} marker); unset it to let the converter create one")
    base = base_python or sys.executable
    if sys.version_info[:2] != PYTHON and base_python is None:
        raise ExportError(f"the tf2onnx environment is pinned for Python {PYTHON[0]}.{PYTHON[1]}; "
                          f"this is {sys.version_info[0]}.{sys.version_info[1]}")
    listed = ", ".join(pins(requirements))
    print(f"creating the tf2onnx environment at {venv} (one-time: ~0.4 GB download, 1.9 GB installed, "
          f"a few minutes)\n"
          f"  pins: {listed}", file=sys.stderr, flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    building = venv.with_name(f"{venv.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    try:
        _run([base, "-m", "venv", "--without-pip", str(building)], "python -m venv")
        # pip from the main interpreter installs into the new venv: no network fetch of pip itself
        _run([base, "-m", "pip", "--python", str(env_python(building)), "install", "--no-deps", "--no-input",
              "--disable-pip-version-check", "--quiet", "--only-binary", ":all:", "-r", str(requirements)],
             "pip install")
        (building / MARKER).write_text("\n".join(pins(requirements)) + "\n")
        if not is_ready(venv):  # another process may have finished first: then its venv is kept
            shutil.rmtree(venv, ignore_errors=True)  # a stale, incomplete one
            try:
                os.replace(building, venv)
            except OSError:
                if not is_ready(venv):
                    raise ExportError(f"could not move the new tf2onnx environment into {venv}") from None
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    shutil.rmtree(building, ignore_errors=True)  # left only when another process's venv won
    print(f"created {venv}", file=sys.stderr, flush=True)
    return env_python(venv)


if __name__ == "__main__":  # `python -m convert.tf2onnx.env`: create (or find) the venv, print its python
    try:
        print(ensure_env())
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
