"""The Flax model: MatMul attention equals Flax's MHA, shapes and parameter count match docs/spec.md §1."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.config import PRESETS, ModelConfig
from convert.model import MatMulSelfAttention, ProductionASTForRegression, patchify


@pytest.mark.slow  # compiles Flax's attention
def test_matmul_attention_equals_flax_mha_on_same_params():
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 64, 48))
    ours = MatMulSelfAttention(num_heads=4)
    params = ours.init(jax.random.PRNGKey(2), x)
    # random non-zero biases, so that bias layout mistakes show
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(3), p.shape), params)
    flax_mha = nn.MultiHeadDotProductAttention(num_heads=4)
    ref_shapes = jax.tree_util.tree_map(lambda a: a.shape, flax_mha.init(jax.random.PRNGKey(0), x, x))
    assert jax.tree_util.tree_map(lambda a: a.shape, params) == ref_shapes
    want = flax_mha.apply(params, x, x)
    got = ours.apply(params, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)


def test_patchify_is_time_major_and_flattens_t_then_f():
    x = jnp.arange(2 * 32 * 48, dtype=jnp.float32).reshape(2, 32, 48)
    p = patchify(x, 16)
    assert p.shape == (2, 2 * 3, 256)
    # patch 1 is time block 0, frequency block 1; its element (t=2, f=5) sits at 2*16+5
    assert p[0, 1, 2 * 16 + 5] == x[0, 2, 16 + 5]
    # patch 3 is time block 1, frequency block 0
    assert p[1, 3, 0] == x[1, 16, 0]


def test_patchify_pads_with_minus_80():
    p = patchify(jnp.zeros((1, 20, 16)), 16)
    assert p.shape == (1, 2, 256)
    assert float(p[0, 1, -1]) == -80.0 and float(p[0, 1, 0]) == 0.0


@pytest.mark.parametrize("preset", ["tiny", "production"])
def test_param_tree_names_and_count(preset):
    cfg = PRESETS[preset]
    shapes = jax.eval_shape(ProductionASTForRegression(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 128, 128)))
    tree = shapes["params"]
    assert {"patch_embedding", "pos_embedding", "final_norm", "regression_hidden", "regression_output"} <= set(tree)
    assert set(tree["attention_layer0"]) == {"query", "key", "value", "out"}
    assert tree["attention_layer0"]["query"]["kernel"].shape == (cfg.embed_dim, cfg.num_heads, cfg.head_dim)
    assert tree["attention_layer0"]["out"]["kernel"].shape == (cfg.num_heads, cfg.head_dim, cfg.embed_dim)
    n = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))
    if preset == "production":
        assert n == 85_706_003
    assert ModelConfig.from_checkpoint(cfg.checkpoint_dict()) == cfg

