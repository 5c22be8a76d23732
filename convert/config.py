"""Model configuration and size presets (pure Python: no JAX needed to read a checkpoint)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from runtime.constants import FEATURES, NUM_DIMENSIONS


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of ProductionASTForRegression (SPEC §1)."""

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
        """Build from a checkpoint's `model_config` dict; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(model_config) - known
        if unknown:
            raise ValueError(f"unknown model_config keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        values = {k: int(v) for k, v in model_config.items()}
        cfg = cls(**values)
        if cfg.embed_dim % cfg.num_heads:
            raise ValueError(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
        if cfg.num_outputs != NUM_DIMENSIONS:
            raise ValueError(f"num_outputs is {cfg.num_outputs}; the PercePiano model has {NUM_DIMENSIONS}")
        return cfg

    def checkpoint_dict(self) -> dict:
        """The `model_config` entry as the original checkpoints write it."""
        keys = ("embed_dim", "num_layers", "num_heads", "patch_size", "num_outputs")
        return {k: getattr(self, k) for k in keys}


PRESETS: dict[str, ModelConfig] = {
    "production": ModelConfig(embed_dim=768, num_layers=12, num_heads=12),  # 85,706,003 params
    "tiny": ModelConfig(embed_dim=64, num_layers=2, num_heads=4),  # for tests
}
