"""Process memory during an export: weights and JAX dropped once the graph holds them, freed pages handed back.

An export keeps one large model in memory at a time (convert.staging); these helpers make "dropped" mean
"returned to the system" rather than kept in a heap that does not shrink.
"""

from __future__ import annotations

import gc

from runtime.memory import LARGE, return_large_buffers_to_the_os


def release_weights(ckpt) -> None:
    """Drop the checkpoint's weights (numpy views of the file's bytes) once JAX holds its own copy."""
    ckpt.params = {}
    release_memory()


def release_jax() -> None:
    """Drop JAX's compiled functions and traces once the ONNX graph holds the weights.

    What an export needs afterwards is the checkpoint's config, scaler and provenance, the graph, and the JAX
    scores already computed for the gate (convert.parity clip and random references).
    """
    import jax

    jax.clear_caches()
    release_memory()


MMAP_THRESHOLD = LARGE


def low_memory_malloc() -> bool:
    """Serve allocations of 1 MiB and more from mmap, at a fixed threshold, so freeing a model returns its memory.

    glibc otherwise raises the threshold after the first large free, and the next models' buffers come from a
    heap that does not shrink: each freed proto or session would stay in the process's resident set. False
    where there is no glibc.
    """
    return return_large_buffers_to_the_os(MMAP_THRESHOLD)


def release_memory() -> None:
    """Collect cycles and hand free heap pages back to the system (malloc_trim, where glibc has it)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
