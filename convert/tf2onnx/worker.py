"""Runs INSIDE the legacy tf2onnx environment only (convert.tf2onnx.env): jax2tf -> TensorFlow -> tf2onnx.

    python -m convert.tf2onnx.worker WORKDIR

WORKDIR holds what the main process wrote: `params.npz` (the Flax params, flattened with '/' paths),
`config.json` (model_config, scaler mean/scale, opset, names). The worker builds the project's one model
definition (convert.model), converts `apply(params, mel) * scale + mean` with jax2tf's non-native graph
serialization (enable_xla=False: plain TF ops, no XlaCallModule) and a polymorphic batch, and writes
`model.onnx` and `versions.json` there. The main stack never imports this module.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up banners
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # plain TF kernels wherever TF folds constants
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

LEGACY_PACKAGES = ("jax", "jaxlib", "flax", "tensorflow-cpu", "tf2onnx", "onnx", "numpy", "protobuf")


def progress(message: str) -> None:
    print(f"[tf2onnx worker] {message}", file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in LEGACY_PACKAGES}


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def _as_identity(ctx, node, name, args):
    """tf2onnx has no handler for PreventGradient (jax2tf's with_gradient=False marker): it is an Identity."""
    node.type = "Identity"
    node.attr.pop("message", None)
    return node


# The TF ops jax2tf emits that tf2onnx 1.17 cannot convert, each with a handler (found by converting the model)
MISSING_HANDLERS = {"PreventGradient": (_as_identity, [])}


def convert(workdir: Path) -> None:
    import numpy as np

    spec = json.loads((workdir / "config.json").read_text())
    with np.load(workdir / "params.npz") as npz:
        params = unflatten({name: npz[name] for name in npz.files})

    import jax
    import jax.numpy as jnp
    import tensorflow as tf
    import tf2onnx
    from jax.experimental import jax2tf

    from convert.config import ModelConfig
    from convert.model import ProductionASTForRegression

    config = ModelConfig(**spec["model_config"])
    model = ProductionASTForRegression(config)
    variables = {"params": jax.tree_util.tree_map(jnp.asarray, params)}
    mean = jnp.asarray(spec["scaler_mean"], jnp.float32)
    scale = jnp.asarray(spec["scaler_scale"], jnp.float32)

    def forward(mel):
        return model.apply(variables, mel) * scale + mean  # as convert.forward.build_forward

    # the path this backend exists for: graph serialization with enable_xla=False, deprecated (warned) in jax 0.7.1
    warnings.filterwarnings("ignore", message=".*jax2tf.convert with enable_xla=False", category=DeprecationWarning)
    start = time.perf_counter()
    progress(f"jax2tf: tracing the model ({config.num_layers} layers, width {config.embed_dim}), batch polymorphic")
    tf_forward = jax2tf.convert(forward, polymorphic_shapes=[f"(b, {config.n_frames}, {config.n_mels})"],
                                native_serialization=False, enable_xla=False, with_gradient=False)
    signature = [tf.TensorSpec((None, config.n_frames, config.n_mels), tf.float32, name=spec["input_name"])]
    function = tf.function(tf_forward, input_signature=signature, autograph=False)
    progress(f"tf2onnx: converting at opset {spec['opset']}")
    proto, _ = tf2onnx.convert.from_function(function, input_signature=signature, opset=spec["opset"],
                                             custom_op_handlers=dict(MISSING_HANDLERS))
    unconverted = sorted({n.op_type for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if unconverted:
        raise SystemExit(f"tf2onnx left unconverted TensorFlow ops: {unconverted}")
    (workdir / "model.onnx").write_bytes(proto.SerializeToString())
    (workdir / "versions.json").write_text(json.dumps(versions()))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    progress(f"converted in {time.perf_counter() - start:.1f} s, worker peak RSS {peak_mb:.0f} MB")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    convert(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
