"""Will this model serve on this target? Checked before a deploy ships (`python -m deploy check`, `modal deploy`).

One line per refusal: a missing or unreadable file, int8 on the GPU (its kernels are CPU kernels), fp16 on the
CPU (onnxruntime's CPU provider has few fp16 kernels), a demo model (random weights) unless explicitly allowed,
a model whose export parity gate did not pass. Reads only the model's metadata (no session, no GPU).
"""

from __future__ import annotations

from pathlib import Path

from runtime.errors import ModelError
from runtime.model import ModelInfo, header_metadata, parse_metadata

TARGETS = ("gpu", "cpu")
ARTIFACTS = Path("artifacts")
ALLOWED = {"gpu": ("fp16", "fp32"), "cpu": ("int8", "fp32")}
# What a target deploys when no model is named, the first that exists. The GPU's recommended artifact is the
# waveform-in model (`export --input audio`: the features run on the GPU, not on the container's CPUs), fp16;
# never the int8 file (model.onnx after `--quantize auto`).
DEFAULTS = {"gpu": ("model-audio.fp16.onnx", "model.fp16.onnx", "model-audio.fp32.onnx", "model.fp32.onnx"),
            "cpu": ("model.onnx",)}
EXPORT_HINT = ("python -m convert export --checkpoint CKPT --quantize auto (the GPU's: add --input audio --out "
               "artifacts/model-audio.onnx)")


def default_model(target: str, artifacts: Path = ARTIFACTS) -> Path:
    """The target's default model file: its first DEFAULTS entry present in `artifacts`, else the first one."""
    names = DEFAULTS[target]
    return next((artifacts / n for n in names if (artifacts / n).is_file()), artifacts / names[0])


def read_info(path: Path) -> ModelInfo:
    try:
        return parse_metadata(header_metadata(str(path)), str(path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable ONNX model ({exc})") from None


def gate_passed(info: ModelInfo) -> bool:
    """The export's parity gate passed for this file: its `parity` report, and its variant's gate when recorded."""
    if not (info.parity or {}).get("passed"):
        return False
    gate = ((info.variants or {}).get("gates") or {}).get(info.precision)
    return gate is None or gate.get("passed") is True


def problems(path: Path, target: str, *, allow_demo: bool = False) -> list[str]:
    """Why `path` must not be deployed on `target` (one line each); [] when it may."""
    if target not in TARGETS:
        return [f"unknown target {target!r}; choose one of {TARGETS}"]
    if not path.is_file():
        return [f"model file not found: {path} (export it: {EXPORT_HINT}; or name one with --model / "
                "PERCEPIANO_MODEL)"]
    try:
        info = read_info(path)
    except ModelError as exc:
        return [str(exc)]
    found = []
    if info.precision not in ALLOWED[target]:
        other = "cpu" if target == "gpu" else "gpu"
        found.append(f"{path} is the {info.precision} model, the variant for {other.upper()}s; the {target} target "
                     f"serves {' or '.join(ALLOWED[target])} (default there: {default_model(target, path.parent)})")
    if info.demo and not allow_demo:
        found.append(f"{path} is a DEMO model (random weights, exported without a real checkpoint): its scores "
                     "mean nothing; pass --allow-demo (PERCEPIANO_DEPLOY_ALLOW_DEMO=1 for modal deploy) to deploy "
                     "it anyway")
    if not gate_passed(info):
        found.append(f"{path}: its export parity gate did not pass (or recorded none): re-export it "
                     f"({EXPORT_HINT}) and deploy only what passed")
    return found


def summary(path: Path) -> str:
    """One line on what passed: precision, input kind, demo or not, version."""
    info = read_info(path)
    return f"{path}: {info.precision}, {info.input_kind} input, {'demo' if info.demo else 'trained'}, {info.version}"


def enforce(path: Path, target: str, *, allow_demo: bool = False) -> None:
    """Raise SystemExit with every refusal (one line each): what `modal deploy` runs on importing the app file."""
    found = problems(path, target, allow_demo=allow_demo)
    if found:
        raise SystemExit(f"deploy check ({target}) refused {path}:\n" + "\n".join(f"  {line}" for line in found))


# --- the same refusals inside a running container, on the model as loaded on its device


def refuse_int8_on_cuda(model) -> None:
    """int8 is the CPU variant (dynamic quantization's kernels are CPU kernels): on CUDA deploy fp16 or fp32."""
    if model.device == "cuda" and model.info.precision == "int8":
        gpu = ((model.info.variants or {}).get("recommended") or {}).get("gpu", "fp16")
        raise ModelError(f"this is the int8 model, the variant for CPUs; on the GPU deploy the {gpu} variant "
                         f"written beside it: PERCEPIANO_MODEL=artifacts/model.{gpu}.onnx modal deploy "
                         "deploy/modal_app.py")


def refuse_fp16_on_cpu(model) -> None:
    """fp16 is the GPU variant (onnxruntime's CPU provider has few fp16 kernels): on the CPU deploy int8 or fp32."""
    if model.device == "cpu" and model.info.precision == "fp16":
        variants = model.info.variants or {}
        cpu = (variants.get("recommended") or {}).get("cpu", "int8")
        name = (variants.get("files") or {}).get(cpu, "model.onnx")
        raise ModelError(f"this is the fp16 model, the variant for GPUs; on the CPU deploy the {cpu} variant "
                         f"written beside it: PERCEPIANO_MODAL_TARGET=cpu PERCEPIANO_MODEL=artifacts/{name} "
                         "modal deploy deploy/modal_app.py")
