"""Load the original `final_finetuned_model.pkl` (docs/spec.md §2) safely, with numpy only, and check it.

The file is unpickled by `convert.safe_pickle` (an allowlist: nothing in the file is imported or run),
then checked against its own `model_config` (whose types and ranges are checked first): every parameter
path and shape, finite weights, and a 19-dimension label scaler; `finetuning_results` (optional) is
reduced to JSON-safe values. Every problem is a CheckpointError whose one-line message says what is wrong,
showing untrusted values only through a bounded repr.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convert.config import ModelConfig
from convert.errors import CheckpointError, brief
from convert.safe_pickle import ScalerStats, safe_loads
from runtime.constants import NUM_DIMENSIONS

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("params", "model_config", "label_scaler", "training_complete")
OPTIONAL_KEYS = ("finetuning_results",)  # None or absent in demo checkpoints
_MAX_LISTED = 30  # mismatch lines (or keys) shown in one error
# finetuning_results goes into the ONNX metadata as JSON: numbers, strings, bools, None, lists and dicts
_MAX_RESULT_ITEMS = 10_000  # values, containers and array elements together
_MAX_RESULT_CHARS = 100_000  # all strings and keys together
_MAX_RESULT_DEPTH = 16


@dataclass
class Checkpoint:
    """A loaded, validated checkpoint. Weights are float32 numpy arrays (read-only views of the file)."""

    path: Path
    sha256: str
    config: ModelConfig
    params: dict  # the Flax params tree: ckpt["params"]["params"]
    scaler_mean: np.ndarray  # (19,) float64: label = z * scaler_scale + scaler_mean
    scaler_scale: np.ndarray  # (19,) float64
    finetuning_results: dict | None  # JSON-safe; None when the checkpoint has none
    training_complete: bool

    def variables(self) -> dict:
        """The Flax variables dict for `model.apply`."""
        return {"params": self.params}

    @property
    def untrained(self) -> bool:
        """Never trained to the end: training_complete is false or it has no fine-tuning results (a demo stand-in).

        Its scores mean nothing; an export of it is marked `source.demo` (convert.metadata.describe).
        """
        return not self.training_complete or self.finetuning_results is None

    @property
    def num_params(self) -> int:
        """Total number of weights."""
        return sum(math.prod(shape) for shape in expected_param_shapes(self.config).values())  # as validated


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
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not the checkpoint dict of docs/spec.md §2")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks the keys {missing}; it has {_some(ckpt)}")
    extra = [k for k in ckpt if k not in REQUIRED_KEYS + OPTIONAL_KEYS]
    if extra:
        log.warning("ignoring unknown checkpoint keys %s", _some(extra))
    config = _config(ckpt["model_config"], path)
    params = _params(ckpt["params"], config, path)
    mean, scale = _scaler(ckpt["label_scaler"], path)
    checkpoint = Checkpoint(
        path=path,
        sha256=sha256,
        config=config,
        params=params,
        scaler_mean=mean,
        scaler_scale=scale,
        finetuning_results=_results(ckpt.get("finetuning_results"), path),
        training_complete=_flag(ckpt["training_complete"], path),
    )
    if checkpoint.untrained:
        log.warning("%s was never trained to the end (training_complete %s, finetuning_results %s): its exports are "
                    "marked demo models", path, checkpoint.training_complete,
                    "none" if checkpoint.finetuning_results is None else "present")
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
    except MemoryError:
        raise CheckpointError(f"not enough memory to read {path} ({size / 1e9:.1f} GB)") from None
    if not data:
        raise CheckpointError(f"{path} is empty (0 bytes); re-download or re-create the checkpoint")
    return data


def _some(keys) -> str:
    """At most _MAX_LISTED keys, each briefly."""
    keys = list(keys)
    shown = ", ".join(brief(k) for k in keys[:_MAX_LISTED])
    return f"[{shown}{', ...' if len(keys) > _MAX_LISTED else ''}]"


def _config(model_config: Any, path: Path) -> ModelConfig:
    if not isinstance(model_config, dict):
        raise CheckpointError(f"model_config in {path} is a {type(model_config).__name__}, not a dict")
    try:
        return ModelConfig.from_checkpoint(model_config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"bad model_config {brief(model_config)} in {path}: {e}") from None


class _TooManyEntries(Exception):
    """A params tree with more entries than its config could explain."""


def _flatten(tree: dict, budget: int) -> tuple[dict[str, Any], list[str]]:
    """{'a/b/kernel': leaf} for a nested dict, plus problems found on the way; _TooManyEntries past `budget`.

    The bound makes a shared subtree (a DAG) cost no more than `budget` paths (nesting is bounded by the unpickler).
    """
    flat: dict[str, Any] = {}
    problems: list[str] = []
    visits = 0

    def walk(node: dict, prefix: str) -> None:
        nonlocal visits
        for key, value in node.items():
            visits += 1
            if visits > budget:
                raise _TooManyEntries
            if not isinstance(key, str):
                problems.append(f"! {prefix}{brief(key)}: key is not a string")
            elif isinstance(value, dict):
                walk(value, f"{prefix}{key}/")
            else:
                flat[prefix + key] = value

    walk(tree, "")
    return flat, problems


def _params(variables: Any, config: ModelConfig, path: Path) -> dict:
    """The params tree, checked against `expected_param_shapes(config)`, as float32 arrays."""
    if isinstance(variables, dict) and set(variables) == {"params"} and isinstance(variables["params"], dict):
        tree = variables["params"]
    elif isinstance(variables, dict) and "patch_embedding" in variables:
        log.info("ckpt['params'] is the bare params tree rather than {'params': tree}; accepting it")
        tree = variables
    else:
        got = _some(variables) if isinstance(variables, dict) else type(variables).__name__
        raise CheckpointError(
            f"ckpt['params'] in {path} should be the Flax variables dict {{'params': {{...}}}}; got {got}"
        )
    expected = expected_param_shapes(config)  # the config's ranges are checked: at most ~1,000 entries
    budget = 2 * len(expected) + _MAX_LISTED  # leaves and the dicts above them, with room to list extras
    try:
        flat, problems = _flatten(tree, budget)
    except _TooManyEntries:
        raise CheckpointError(
            f"params in {path} hold more than {budget} entries; its model_config {config.checkpoint_dict()} "
            f"has {len(expected)} parameters"
        ) from None
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
        value, enabled = scaler.get(attr), _plain(scaler.get(flag, True))
        if not isinstance(enabled, bool):
            raise CheckpointError(f"label_scaler.{flag} in {path} is {brief(enabled)}, not a bool")
        if not enabled:
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
            f"label_scaler in {path} has non-finite or non-positive statistics: "
            f"mean {mean.tolist()}, scale {scale.tolist()}"
        )
    return mean, scale


def _results(value: Any, path: Path) -> dict | None:
    """finetuning_results as JSON-safe values, or None when it is None or absent.

    numpy scalars become Python numbers, numeric arrays lists, tuples lists, non-finite floats None (JSON
    has no NaN); bytes, complex numbers and anything else are refused, as is more than _MAX_RESULT_ITEMS
    values, _MAX_RESULT_CHARS characters or _MAX_RESULT_DEPTH levels. Other values are kept as they are.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CheckpointError(f"finetuning_results in {path} is a {type(value).__name__}, not a dict (or None)")
    budget = {"items": _MAX_RESULT_ITEMS, "chars": _MAX_RESULT_CHARS}
    return _json_safe(value, "finetuning_results", 0, budget, path)


def _json_safe(value: Any, where: str, depth: int, budget: dict[str, int], path: Path) -> Any:
    """One value of finetuning_results, converted (see _results); `budget` is spent as the walk goes."""
    value = _plain(value)
    keys = list(value) if isinstance(value, dict) else []
    budget["items"] -= 1
    budget["chars"] -= len(value) if isinstance(value, str) else sum(len(k) for k in keys if isinstance(k, str))
    if budget["items"] < 0 or budget["chars"] < 0 or depth > _MAX_RESULT_DEPTH:
        raise CheckpointError(
            f"finetuning_results in {path} is too big for metadata (more than {_MAX_RESULT_ITEMS:,} values, "
            f"{_MAX_RESULT_CHARS:,} characters or {_MAX_RESULT_DEPTH} levels, at {where})"
        )
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            log.warning("%s in %s is %s; kept as null (JSON has no NaN or infinity)", where, path.name, value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf" and value.size <= budget["items"]:
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [_json_safe(v, f"{where}[{i}]", depth + 1, budget, path) for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in keys):
        return {k: _json_safe(v, f"{where}/{k}", depth + 1, budget, path) for k, v in value.items()}
    kind = f"{value.dtype} array of {value.size} values" if isinstance(value, np.ndarray) else type(value).__name__
    raise CheckpointError(
        f"{where} in {path} is a {kind}; metadata holds only numbers, strings, bools, None, "
        "lists and dicts with string keys (and numeric arrays within the size bound)"
    )


def _plain(value: Any) -> Any:
    """numpy scalars and 0-d arrays as Python numbers."""
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return value.item()
    return value


def _flag(value: Any, path: Path) -> bool:
    value = _plain(value)
    if not isinstance(value, bool | int) or value not in (0, 1):
        raise CheckpointError(f"training_complete in {path} is {brief(value)}, not a bool")
    return bool(value)


__all__ = ["Checkpoint", "CheckpointError", "expected_param_shapes", "load_checkpoint"]
