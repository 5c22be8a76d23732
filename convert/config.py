"""Model configuration and size presets (pure Python: no JAX needed to read a checkpoint)."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields

from convert.errors import brief
from runtime.constants import FEATURES, NUM_DIMENSIONS

# What a checkpoint's model_config may say, checked before any shape is computed: (low, high) per key.
# The bounds are generous for this model family (ViT-Huge is 1280 wide and 32 deep) and small enough
# that the expected-shape table stays a few thousand entries and no size overflows.
CONFIG_RANGES: dict[str, tuple[int, int]] = {
    "embed_dim": (1, 8192),
    "num_layers": (1, 64),
    "num_heads": (1, 8192),  # and it must divide embed_dim
    "patch_size": (1, 128),  # the input is 128 x 128; a size that does not divide it is padded (docs/spec.md §1)
    "num_outputs": (NUM_DIMENSIONS, NUM_DIMENSIONS),
    "mlp_ratio": (1, 16),
    "regression_hidden": (1, 8192),
    "n_frames": (FEATURES.n_frames, FEATURES.n_frames),  # what the runtime feeds the model
    "n_mels": (FEATURES.n_mels, FEATURES.n_mels),
}


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of ProductionASTForRegression (docs/spec.md §1)."""

    embed_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    patch_size: int = 16
    num_outputs: int = NUM_DIMENSIONS
    mlp_ratio: int = 4
    regression_hidden: int = 512
    n_frames: int = FEATURES.n_frames
    n_mels: int = FEATURES.n_mels

    @property
    def mlp_dim(self) -> int:
        return self.mlp_ratio * self.embed_dim

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_patches(self) -> int:
        p = self.patch_size
        return -(-self.n_frames // p) * -(-self.n_mels // p)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, model_config: dict) -> ModelConfig:
        """Build from a checkpoint's `model_config` dict: known keys, integers (not bools or floats), in range."""
        known = [f.name for f in fields(cls)]
        unknown = [brief(k) for k in model_config if k not in known]
        if unknown:
            raise ValueError(f"unknown model_config keys {unknown[:10]}; expected a subset of {sorted(known)}")
        values = {}
        for key, value in model_config.items():
            low, high = CONFIG_RANGES[key]
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{key} is {brief(value)} (a {type(value).__name__}); expected an integer")
            if not low <= value <= high:
                allowed = str(low) if low == high else f"{low}..{high}"
                raise ValueError(f"{key} is {brief(value)}; expected {allowed}")
            values[key] = int(value)
        cfg = cls(**values)
        if cfg.num_heads > cfg.embed_dim or cfg.embed_dim % cfg.num_heads:
            raise ValueError(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
        return cfg

    def checkpoint_dict(self) -> dict:
        """The `model_config` entry as the original checkpoints write it."""
        keys = ("embed_dim", "num_layers", "num_heads", "patch_size", "num_outputs")
        return {k: getattr(self, k) for k in keys}


PRESETS: dict[str, ModelConfig] = {
    "production": ModelConfig(embed_dim=768, num_layers=12, num_heads=12),  # 85,706,003 params
    "tiny": ModelConfig(embed_dim=64, num_layers=2, num_heads=4),  # for tests
}
