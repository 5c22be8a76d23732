"""The tf2onnx backend, main-process side: checkpoint -> files -> legacy venv worker -> normalised ONNX proto.

The main process never imports TensorFlow: it writes the (already validated) params as npz and the config as
JSON, runs `python -m convert.tf2onnx.worker` in the legacy venv (convert.tf2onnx.env) with this checkout on
PYTHONPATH, so the worker builds the same convert.model, and reads back model.onnx. The graph is then put in
the form the rest of the pipeline expects of jax2onnx's: the runtime's input/output names, weights folded to
initializers, and every dense layer one MatMul with a constant weight (what int8 quantizes).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from convert.checkpoint import Checkpoint
from convert.errors import ExportError
from convert.quantize import linear_layers, prepare, weight_matmuls
from convert.tf2onnx.env import ensure_env
from runtime.constants import INPUT_NAME, OUTPUT_NAME

log = logging.getLogger(__name__)

MAX_OPSET = 18  # the highest opset tf2onnx 1.17 writes
DEFAULT_OPSET = MAX_OPSET
REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 3600


def _flat_params(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat_params(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = np.asarray(value, np.float32)
    return flat


def run_worker(ckpt: Checkpoint, opset: int, workdir: Path) -> dict:
    """Convert in the legacy venv; returns the worker's versions.json (model.onnx is left in `workdir`)."""
    python = ensure_env()
    np.savez(workdir / "params.npz", **_flat_params(ckpt.params))
    spec = {"model_config": ckpt.config.to_dict(), "scaler_mean": ckpt.scaler_mean.tolist(),
            "scaler_scale": ckpt.scaler_scale.tolist(), "opset": opset, "input_name": INPUT_NAME}
    (workdir / "config.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONNOUSERSITE": "1"}
    start = time.perf_counter()
    try:  # the worker's progress lines go straight to our stderr
        proc = subprocess.run([str(python), "-m", "convert.tf2onnx.worker", str(workdir)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=None, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ExportError(f"the tf2onnx worker did not finish within {TIMEOUT_S} s") from None
    if proc.returncode or not (workdir / "model.onnx").is_file():
        raise ExportError(f"the tf2onnx worker failed (exit {proc.returncode}); its error is above")
    log.info("tf2onnx worker finished in %.1f s", time.perf_counter() - start)
    return json.loads((workdir / "versions.json").read_text())


def normalise(proto, config):
    """jax2onnx's conventions on a tf2onnx graph: I/O names, folded weights, dense layers as MatMul, value types."""
    graph = proto.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ExportError(f"tf2onnx wrote {len(graph.input)} inputs and {len(graph.output)} outputs, expected 1 and 1")
    renames = {graph.input[0].name: INPUT_NAME, graph.output[0].name: OUTPUT_NAME}
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    graph.input[0].name, graph.output[0].name = INPUT_NAME, OUTPUT_NAME
    graph.name = "percepiano_ast"
    import onnx

    out = prepare(proto)  # constant folding, then Gemm -> MatMul + Add
    # value types of every tensor, as jax2onnx writes them: the fp16 converter needs them to place its Casts
    out = onnx.shape_inference.infer_shapes(out, strict_mode=True)
    dense = weight_matmuls(out)
    if len(dense) != linear_layers(config):
        raise ExportError(f"the tf2onnx graph has {len(dense)} MatMuls with a constant weight, expected one per "
                          f"dense layer ({linear_layers(config)}): int8 would not cover every layer")
    return out


def to_onnx_tf2onnx(ckpt: Checkpoint, opset: int = DEFAULT_OPSET):
    """(ModelProto, backend metadata) of the checkpoint's forward function, converted by jax2tf + tf2onnx."""
    import onnx

    if opset > MAX_OPSET:
        raise ExportError(f"the tf2onnx backend writes at most opset {MAX_OPSET}; got --opset {opset}")
    with tempfile.TemporaryDirectory(prefix="percepiano-tf2onnx-") as tmp:
        workdir = Path(tmp)
        versions = run_worker(ckpt, opset, workdir)
        proto = onnx.load(str(workdir / "model.onnx"))
    proto = normalise(proto, ckpt.config)
    backend = {"name": "tf2onnx", "path": "jax2tf (graph serialization, enable_xla=False) -> tf2onnx",
               "opset": opset, "versions": versions, "python": sys.version.split()[0]}
    return proto, backend
