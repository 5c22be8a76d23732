"""Write a stand-in for `final_finetuned_model.pkl` in exactly its format (docs/spec.md §2), from a random init.

For tests, benchmarks and demos where the real weights are not at hand: the same pickled dict, real
`jax.Array` leaves and a real fitted scikit-learn StandardScaler. It was never trained, and its own fields
say so: `training_complete` is False and `finetuning_results` None rather than invented figures, so that any
export of it is marked a demo model (convert.checkpoint.Checkpoint.untrained). Needs the `convert` extra.
"""

from __future__ import annotations

import functools
import logging
import pickle
from pathlib import Path

import numpy as np

from convert.config import PRESETS, ModelConfig
from convert.files import write_atomic
from runtime.constants import NUM_DIMENSIONS

log = logging.getLogger(__name__)

PICKLE_PROTOCOL = 4  # pickle.dump's default on the Pythons (3.8-3.13) the original was written with
_N_LABELS = 1200  # about the number of PercePiano training segments


def synthetic_labels(seed: int, n: int = _N_LABELS) -> np.ndarray:
    """(n, 19) plausible PercePiano labels: per-dimension mean 0.4-0.7, std 0.05-0.15, within [1/7, 1]."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(0.4, 0.7, NUM_DIMENSIONS)
    stds = rng.uniform(0.05, 0.15, NUM_DIMENSIONS)
    labels = means + stds * rng.standard_normal((n, NUM_DIMENSIONS))
    return np.clip(labels, 1 / 7, 1.0)


def make_demo_checkpoint(path: str | Path, preset: str = "production", seed: int = 0) -> Path:
    """Write a checkpoint of `preset` with random weights from `seed`; same seed, same bytes."""
    import jax
    import jax.numpy as jnp
    from sklearn.preprocessing import StandardScaler

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[preset]
    path = Path(path)
    log.info("initialising the %s model (seed %d)", preset, seed)
    x = jnp.zeros((1, config.n_frames, config.n_mels), jnp.float32)
    variables = _jitted_init(config)(jax.random.PRNGKey(seed), x)
    variables = {"params": dict(variables["params"])}  # a plain dict, as the original was written
    scaler = StandardScaler().fit(synthetic_labels(seed))
    ckpt = {
        "params": variables,
        "model_config": config.checkpoint_dict(),
        "finetuning_results": None,  # never fine-tuned: no results to report, and none invented
        "label_scaler": scaler,
        "training_complete": False,  # never trained, and it says so: its exports are marked demo
    }
    write_atomic(path, lambda fh: pickle.dump(ckpt, fh, protocol=PICKLE_PROTOCOL))
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


@functools.cache
def _jitted_init(config: ModelConfig):
    """model.init under jit, one per config: one compilation rather than one per op (2x faster on CPU)."""
    import jax

    from convert.model import ProductionASTForRegression

    return jax.jit(ProductionASTForRegression(config).init)
