"""FLOPs per chunk from the model config, and this machine's float32 GEMM rate to set them against.

`python -m benchmarks.roofline --cpus 0,1` measures the GEMM rate in a fresh process pinned like the
variants (numpy's BLAS sizes its thread pool when numpy is imported, so it cannot be re-pinned in place)
and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from convert.config import ModelConfig


def flops_per_chunk(config: ModelConfig) -> dict[str, int]:
    """Multiply-add FLOPs (2 per MAC) of one (128, 128) window, by part.

    Only matrix products are counted: LayerNorm, softmax, GELU and the residual adds are under 1 %
    of the total at every preset and are memory-bound anyway.
    """
    n, d, m = config.num_patches, config.embed_dim, config.mlp_dim
    patch = config.patch_size**2
    per_layer = {
        "qkv_projection": 2 * n * d * 3 * d,
        "attention_scores": 2 * n * n * d,  # q @ k^T over all heads
        "attention_values": 2 * n * n * d,  # weights @ v over all heads
        "attention_output": 2 * n * d * d,
        "mlp": 2 * 2 * n * d * m,
    }
    parts = {"patch_embedding": 2 * n * patch * d}
    parts |= {name: config.num_layers * value for name, value in per_layer.items()}
    parts["head"] = 2 * d * config.regression_hidden + 2 * config.regression_hidden * config.num_outputs
    parts["total"] = sum(parts.values())
    return parts


def gemm_rate(size: int = 2048, repeats: int = 7) -> dict:
    """Median seconds and GFLOP/s of a float32 (size x size) @ (size x size) numpy matmul."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty_like(a)
    np.matmul(a, b, out=out)  # warm-up: thread pool start, page faults
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    return {"size": size, "repeats": repeats, "median_s": median, "min_s": float(min(times)),
            "gflops": 2 * size**3 / median / 1e9, "library": "numpy.matmul (BLAS)"}


def best_gemm(measurements: list[dict]) -> dict:
    """The GEMM rate set against the variants: the higher of the medians measured before and after them.

    A median is robust to a stray slow run; taking the better of two sittings keeps a burst of load from
    the rest of the machine during one of them from lowering the reference.
    """
    best = max(measurements, key=lambda m: m["gflops"])
    return best | {"sittings": [{k: m[k] for k in ("median_s", "min_s", "gflops")} for m in measurements]}


def achieved(flops: int, chunks_per_s: float, gemm_gflops: float | None) -> dict:
    """GFLOP/s reached at a throughput, and its share of the measured GEMM rate."""
    gflops = flops * chunks_per_s / 1e9
    share = gflops / gemm_gflops if gemm_gflops else None
    return {"gflops": gflops, "gemm_share": share}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description="float32 GEMM rate")
    parser.add_argument("--cpus", required=True, help="comma-separated CPU ids to pin to")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    from benchmarks.environment import pin

    pin([int(c) for c in args.cpus.split(",")])
    print(json.dumps(gemm_rate(args.size, args.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
