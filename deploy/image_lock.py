"""The Modal GPU image's lock: onnxruntime-gpu and the NVIDIA wheels it resolves to, pinned so they cannot float.

    python -m deploy.image_lock            # resolve and print the lock (pip, for the image's platform and Python)
    python -m deploy.image_lock --write    # ... and write deploy/requirements-gpu.txt

The image (deploy/modal_app.py) installs this file first, then the project's `gpu` and `serve` extras, whose
onnxruntime-gpu floor the pin already meets. What it declares (CUDA 13, cuDNN 9, driver 580.65.06+) is
runtime.cuda's; tests/test_image_lock.py resolves the file again and checks both against each other.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from runtime.cuda import CUDA_MAJOR, CUDNN_MAJOR, DRIVER_FLOOR

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "deploy" / "requirements-gpu.txt"
PYTHON = "3.11"  # the image's (modal.Image.debian_slim(python_version=...))
# debian_slim is glibc 2.36: wheels tagged for any manylinux up to 2_28 install there; pip does not widen
# --platform by itself, so every tag the NVIDIA and onnxruntime wheels use is listed.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_12_x86_64", "manylinux2010_x86_64")
ONNXRUNTIME_GPU = "1.31.1"  # the version locked (PyPI's newest onnxruntime-gpu; the gate ran on 1.32.0, CPU)
ROOT = f"onnxruntime-gpu[cuda,cudnn]=={ONNXRUNTIME_GPU}"
_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;#]+)")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve(requirements: list[str], timeout: float = 600) -> dict[str, str]:
    """{name: version} pip would install for the image's platform and Python (a dry run, nothing installed)."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", "--ignore-installed",
           "--only-binary=:all:", "--python-version", PYTHON, *[a for p in PLATFORMS for a in ("--platform", p)],
           *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"pip could not resolve {requirements}: {proc.stderr.strip()[-2000:]}")
    report = json.loads(proc.stdout)
    return {normalize(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}


def locked(path: Path = LOCK) -> dict[str, str]:
    """{name: version} of the lock file's `name==version` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        match = _PIN.match(line.strip())
        if match:
            pins[normalize(match.group(1))] = match.group(3)
    return pins


def cuda_major(resolved: dict[str, str]) -> int | None:
    """The CUDA major of a resolved set: its CUDA runtime wheel's version (nvidia-cuda-runtime[-cuNN])."""
    for name, version in resolved.items():
        if name.startswith("nvidia-cuda-runtime"):
            return int(version.split(".")[0])
    return None


def cudnn_major(resolved: dict[str, str]) -> int | None:
    for name, version in resolved.items():
        if name.startswith("nvidia-cudnn"):
            return int(version.split(".")[0])
    return None


def lock_text(resolved: dict[str, str]) -> str:
    """The lock file: the root pin and every NVIDIA wheel at the version resolved."""
    header = (f"# The Modal GPU image's onnxruntime-gpu and the NVIDIA wheels it resolves to: CUDA {CUDA_MAJOR}, "
              f"cuDNN {CUDNN_MAJOR}, NVIDIA driver {DRIVER_FLOOR} or newer.\n"
              f"# Resolved for Python {PYTHON} on {PLATFORMS[0]}; regenerate with `python -m deploy.image_lock "
              "--write` (tests/test_image_lock.py checks it).\n")
    nvidia = sorted(n for n in resolved if n.startswith("nvidia-"))
    return header + ROOT + "\n" + "".join(f"{n}=={resolved[n]}\n" for n in nvidia)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.image_lock", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {LOCK.relative_to(REPO)}")
    args = parser.parse_args(argv)
    resolved = resolve([ROOT])
    if cuda_major(resolved) != CUDA_MAJOR:
        print(f"error: {ROOT} resolves to CUDA {cuda_major(resolved)}, the project declares {CUDA_MAJOR} "
              "(runtime/cuda.py)", file=sys.stderr)
        return 1
    text = lock_text(resolved)
    print(text, end="")
    if args.write:
        LOCK.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
