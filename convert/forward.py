"""The function that is exported and gated: log-mel windows -> scores in label units, run by JAX."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from convert.checkpoint import Checkpoint

Forward = Callable[[np.ndarray], np.ndarray]  # (B, 128, 128) log-mel -> (B, 19) label-unit scores


def build_forward(ckpt: Checkpoint) -> Forward:
    """The JAX function that is exported: log-mel (B, 128, 128) -> scores in label units (B, 19)."""
    import jax
    import jax.numpy as jnp

    from convert.model import ProductionASTForRegression

    model = ProductionASTForRegression(ckpt.config)
    variables = jax.tree_util.tree_map(jnp.asarray, ckpt.variables())
    mean = jnp.asarray(ckpt.scaler_mean, jnp.float32)
    scale = jnp.asarray(ckpt.scaler_scale, jnp.float32)

    @jax.jit
    def apply(variables, mean, scale, mel):
        return model.apply(variables, mel) * scale + mean  # StandardScaler.inverse_transform, in the graph

    def forward(mel):
        # The weights are arguments of the jitted function, not closed-over constants: XLA would otherwise
        # copy all 343 MB into every executable it compiles (one per batch size the parity gate uses).
        # jax2onnx, tracing `forward`, still sees them as concrete arrays and writes them as initializers.
        return apply(variables, mean, scale, mel)

    return forward
