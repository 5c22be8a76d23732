"""Load the original `final_finetuned_model.pkl` (SPEC §2) safely, with numpy only, and check it.

The file is unpickled by `convert.safe_pickle` (an allowlist: nothing in the file is imported or run),
then checked against its own `model_config`: every parameter path and shape, finite weights, and a
19-dimension label scaler. Every problem is a CheckpointError whose message says what is wrong.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convert.config import ModelConfig
from convert.errors import CheckpointError
from convert.safe_pickle import ScalerStats, safe_loads
from runtime.constants import NUM_DIMENSIONS

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("params", "model_config", "finetuning_results", "label_scaler", "training_complete")
_MAX_LISTED = 30  # mismatch lines shown in one error


@dataclass
class Checkpoint:
    """A loaded, validated checkpoint. Weights are float32 numpy arrays (read-only views of the file)."""

    path: Path
    sha256: str
    config: ModelConfig
    params: dict  # the Flax params tree: ckpt["params"]["params"]
    scaler_mean: np.ndarray  # (19,) float64: label = z * scaler_scale + scaler_mean
    scaler_scale: np.ndarray  # (19,) float64
    finetuning_results: dict
    training_complete: bool

    def variables(self) -> dict:
        """The Flax variables dict for `model.apply`."""
        return {"params": self.params}

    @property
    def num_params(self) -> int:
        """Total number of weights."""
        return sum(a.size for a in _flatten(self.params, "")[0].values())


def expected_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter path of ProductionASTForRegression(config) and its shape (pure Python)."""
    d, h, hd, m = config.embed_dim, config.num_heads, config.head_dim, config.mlp_dim
    r, p = config.regression_hidden, config.patch_size

    def dense(name: str, n_in: int, n_out: int) -> dict[str, tuple[int, ...]]:
        return {f"{name}/kernel": (n_in, n_out), f"{name}/bias": (n_out,)}

    def norm(name: str) -> dict[str, tuple[int, ...]]:
        return {f"{name}/scale": (d,), f"{name}/bias": (d,)}

    shapes = dense("patch_embedding", p * p, d)
    shapes["pos_embedding"] = (1, config.num_patches, d)
    for i in range(config.num_layers):
        shapes |= norm(f"norm1_layer{i}")
        for proj in ("query", "key", "value"):
            shapes[f"attention_layer{i}/{proj}/kernel"] = (d, h, hd)
            shapes[f"attention_layer{i}/{proj}/bias"] = (h, hd)
        shapes[f"attention_layer{i}/out/kernel"] = (h, hd, d)
        shapes[f"attention_layer{i}/out/bias"] = (d,)
        shapes |= norm(f"norm2_layer{i}")
        shapes |= dense(f"mlp_dense1_layer{i}", d, m)
        shapes |= dense(f"mlp_dense2_layer{i}", m, d)
    shapes |= norm("final_norm")
    shapes |= dense("regression_hidden", d, r)
    shapes |= dense("regression_output", r, config.num_outputs)
    return shapes


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read, hash, safely unpickle and validate a checkpoint; raises CheckpointError on any problem."""
    path, start = Path(path), time.perf_counter()
    data = _read(path)
    sha256 = hashlib.sha256(data).hexdigest()
    log.info("sha256 %s; unpickling with the allowlist", sha256)
    ckpt = safe_loads(data, source=str(path))
    del data
    log.info("read, hashed and unpickled in %.2f s; validating", time.perf_counter() - start)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not the checkpoint dict of SPEC §2")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks the keys {missing}; it has {sorted(map(str, ckpt))}")
    extra = sorted(map(str, set(ckpt) - set(REQUIRED_KEYS)))
    if extra:
        log.warning("ignoring unknown checkpoint keys %s", extra)
    config = _config(ckpt["model_config"], path)
    params = _params(ckpt["params"], config, path)
    mean, scale = _scaler(ckpt["label_scaler"], path)
    results = ckpt["finetuning_results"]
    if results is not None and not isinstance(results, dict):
        raise CheckpointError(f"finetuning_results in {path} is a {type(results).__name__}, not a dict")
    checkpoint = Checkpoint(
        path=path,
        sha256=sha256,
        config=config,
        params=params,
        scaler_mean=mean,
        scaler_scale=scale,
        finetuning_results=None if results is None else {str(k): _plain(v) for k, v in results.items()},
        training_complete=_flag(ckpt["training_complete"], path),
    )
    if not checkpoint.training_complete:
        log.warning("%s says training_complete=False", path)
    log.info("loaded %s: %s params in %.2f s", path.name, f"{checkpoint.num_params:,}", time.perf_counter() - start)
    return checkpoint


def _read(path: Path) -> bytes:
    """The whole file, once (it is hashed and unpickled from the same bytes)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the checkpoint .pkl file itself")
    try:
        size = path.stat().st_size
        log.info("reading %s (%.1f MB)", path, size / 1e6)
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if not data:
        raise CheckpointError(f"{path} is empty (0 bytes); re-download or re-create the checkpoint")
    return data


def _config(model_config: Any, path: Path) -> ModelConfig:
    if not isinstance(model_config, dict):
        raise CheckpointError(f"model_config in {path} is a {type(model_config).__name__}, not a dict")
    try:
        return ModelConfig.from_checkpoint(model_config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"bad model_config {model_config!r:.200} in {path}: {e}") from None


def _flatten(tree: Any, prefix: str) -> tuple[dict[str, Any], list[str]]:
    """{'a/b/kernel': leaf} for a nested dict, plus problems (non-str keys) found on the way."""
    flat: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in tree.items():
        if not isinstance(key, str):
            problems.append(f"! {prefix}{key!r}: key is not a string")
            continue
        if isinstance(value, dict):
            sub, sub_problems = _flatten(value, f"{prefix}{key}/")
            flat |= sub
            problems += sub_problems
        else:
            flat[prefix + key] = value
    return flat, problems


def _params(variables: Any, config: ModelConfig, path: Path) -> dict:
    """The params tree, checked against `expected_param_shapes(config)`, as float32 arrays."""
    if isinstance(variables, dict) and set(variables) == {"params"} and isinstance(variables["params"], dict):
        tree = variables["params"]
    elif isinstance(variables, dict) and "patch_embedding" in variables:
        log.info("ckpt['params'] is the bare params tree rather than {'params': tree}; accepting it")
        tree = variables
    else:
        got = sorted(map(str, variables)) if isinstance(variables, dict) else type(variables).__name__
        raise CheckpointError(
            f"ckpt['params'] in {path} should be the Flax variables dict {{'params': {{...}}}}; got {got}"
        )
    flat, problems = _flatten(tree, "")
    expected = expected_param_shapes(config)
    for name, shape in expected.items():
        if name not in flat:
            problems.append(f"- {name} {shape}")
    for name, leaf in flat.items():
        if name not in expected:
            shape = getattr(leaf, "shape", type(leaf).__name__)
            problems.append(f"+ {name} {shape}")
        elif not isinstance(leaf, np.ndarray) or leaf.dtype.kind != "f":
            kind = f"{leaf.dtype} array" if isinstance(leaf, np.ndarray) else type(leaf).__name__
            problems.append(f"! {name}: a {kind}, expected a float array")
        elif leaf.shape != expected[name]:
            problems.append(f"~ {name}: got {leaf.shape}, expected {expected[name]}")
    if problems:
        _raise_mismatch(problems, config, path)
    bad = [
        f"{name} ({int(np.size(a) - np.isfinite(a).sum())} NaN/inf values)"
        for name, a in flat.items()
        if not np.isfinite(a).all()
    ]
    if bad:
        raise CheckpointError(f"non-finite weights in {path}: {', '.join(bad)}; the checkpoint is corrupt")
    return _unflatten({name: np.asarray(a, dtype=np.float32) for name, a in flat.items()})


def _raise_mismatch(problems: list[str], config: ModelConfig, path: Path) -> None:
    shown = problems[:_MAX_LISTED]
    if len(problems) > _MAX_LISTED:
        shown.append(f"... and {len(problems) - _MAX_LISTED} more")
    raise CheckpointError(
        f"params in {path} do not match its model_config {config.checkpoint_dict()} "
        f"(- missing, + unexpected, ~ wrong shape, ! wrong kind): " + "; ".join(shown)
    )


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, leaf in flat.items():
        *parents, last = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return tree


def _scaler(scaler: Any, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of the label StandardScaler, each (19,) float64, scale finite and positive."""
    if not isinstance(scaler, ScalerStats):
        raise CheckpointError(
            f"label_scaler in {path} is a {type(scaler).__name__}, not a fitted sklearn StandardScaler"
        )
    stats = []
    for attr, flag, default in (("mean_", "with_mean", 0.0), ("scale_", "with_std", 1.0)):
        value = scaler.get(attr)
        if not scaler.get(flag, True):
            value = np.full(NUM_DIMENSIONS, default)
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
            raise CheckpointError(f"label_scaler.{attr} in {path} is missing or not numeric; is it fitted?")
        if value.shape != (NUM_DIMENSIONS,):
            raise CheckpointError(
                f"label_scaler.{attr} in {path} has shape {value.shape}; expected ({NUM_DIMENSIONS},), "
                "one per PercePiano dimension"
            )
        stats.append(value.astype(np.float64))
    mean, scale = stats
    if not (np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()):
        raise CheckpointError(
            f"label_scaler in {path} has non-finite or non-positive statistics: mean {mean}, scale {scale}"
        )
    return mean, scale


def _plain(value: Any) -> Any:
    """numpy scalars and 0-d arrays as Python numbers (for finetuning_results)."""
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return value.item()
    return value


def _flag(value: Any, path: Path) -> bool:
    value = _plain(value)
    if not isinstance(value, bool | int) or value not in (0, 1):
        raise CheckpointError(f"training_complete in {path} is {value!r:.40}, not a bool")
    return bool(value)


__all__ = ["Checkpoint", "CheckpointError", "expected_param_shapes", "load_checkpoint"]
