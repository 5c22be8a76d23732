"""ProductionASTForRegression: the Audio Spectrogram Transformer regressor of docs/spec.md §1, in Flax linen."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from convert.config import ModelConfig
from runtime.constants import FEATURES


def _fused_lecun_normal(n_in_axes: int):
    """lecun_normal over the kernel flattened to 2-D, as nn.DenseGeneral initialises it."""

    def init(key, shape, dtype=jnp.float32):
        fan_in = math.prod(shape[:n_in_axes])
        flat = nn.initializers.lecun_normal()(key, (fan_in, math.prod(shape[n_in_axes:])), dtype)
        return flat.reshape(shape)

    return init


class _HeadsProjection(nn.Module):
    """q/k/v projection with nn.MultiHeadDotProductAttention's layout: kernel (D, H, hd), bias (H, hd)."""

    num_heads: int
    head_dim: int

    @nn.compact
    def __call__(self, x):  # (B, N, D) -> (B, H, N, hd)
        d = x.shape[-1]
        kernel = self.param("kernel", _fused_lecun_normal(1), (d, self.num_heads, self.head_dim))
        bias = self.param("bias", nn.initializers.zeros, (self.num_heads, self.head_dim))
        b, n = x.shape[0], x.shape[1]
        # 2-D product so that the export is one MatMul/Gemm (a 3-D one exports as Einsum, slower in ORT)
        y = x.reshape(b * n, d) @ kernel.reshape(d, -1) + bias.reshape(-1)  # (B*N, H*hd)
        return y.reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)


class _HeadsOutput(nn.Module):
    """Output projection with MHA's layout: kernel (H, hd, D), bias (D,)."""

    features: int

    @nn.compact
    def __call__(self, x):  # (B, H, N, hd) -> (B, N, D)
        b, h, n, hd = x.shape
        kernel = self.param("kernel", _fused_lecun_normal(2), (h, hd, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x = x.transpose(0, 2, 1, 3).reshape(b * n, h * hd)
        y = x @ kernel.reshape(h * hd, self.features) + bias  # (B*N, D)
        return y.reshape(b, n, self.features)


class MatMulSelfAttention(nn.Module):
    """Self-attention numerically equal to nn.MultiHeadDotProductAttention (same params), written as MatMuls."""

    num_heads: int

    @nn.compact
    def __call__(self, x):  # (B, N, D)
        d = x.shape[-1]
        hd = d // self.num_heads
        q = _HeadsProjection(self.num_heads, hd, name="query")(x)  # (B, H, N, hd)
        k = _HeadsProjection(self.num_heads, hd, name="key")(x)
        v = _HeadsProjection(self.num_heads, hd, name="value")(x)
        q = q / jnp.sqrt(hd).astype(q.dtype)  # Flax scales the query before the product
        weights = nn.softmax(q @ k.transpose(0, 1, 3, 2), axis=-1)  # (B, H, N, N)
        return _HeadsOutput(d, name="out")(weights @ v)


def patchify(x, patch_size: int):
    """(B, T, F) log-mel -> (B, T/p * F/p, p*p) patches, time-major, each flattened as (t, f)."""
    b, t, f = x.shape
    pad_t, pad_f = -t % patch_size, -f % patch_size
    if pad_t or pad_f:
        x = jnp.pad(x, ((0, 0), (0, pad_t), (0, pad_f)), constant_values=FEATURES.pad_db)
        t, f = t + pad_t, f + pad_f
    p = patch_size
    x = x.reshape(b, t // p, p, f // p, p).transpose(0, 1, 3, 2, 4)
    return x.reshape(b, (t // p) * (f // p), p * p)


class ProductionASTForRegression(nn.Module):
    """AST regressor: patches -> pre-LN transformer -> mean pool -> MLP head -> 19 label z-scores."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):  # (B, T, F) log-mel in dB
        cfg = self.config
        x = patchify(x, cfg.patch_size)  # (B, 64, 256)
        x = nn.Dense(cfg.embed_dim, name="patch_embedding")(x)  # (B, 64, D)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], cfg.embed_dim))
        x = x + pos
        for i in range(cfg.num_layers):
            h = nn.LayerNorm(epsilon=1e-6, name=f"norm1_layer{i}")(x)
            x = x + MatMulSelfAttention(cfg.num_heads, name=f"attention_layer{i}")(h)
            h = nn.LayerNorm(epsilon=1e-6, name=f"norm2_layer{i}")(x)
            h = nn.Dense(cfg.mlp_dim, name=f"mlp_dense1_layer{i}")(h)
            h = nn.Dense(cfg.embed_dim, name=f"mlp_dense2_layer{i}")(nn.gelu(h))  # tanh-approximate GELU
            x = x + h
        x = nn.LayerNorm(epsilon=1e-6, name="final_norm")(x).mean(axis=1)  # (B, D)
        x = nn.gelu(nn.Dense(cfg.regression_hidden, name="regression_hidden")(x))  # (B, 512)
        return nn.Dense(cfg.num_outputs, name="regression_output")(x)  # (B, 19) z-scores
