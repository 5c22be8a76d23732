"""Process memory: freed large buffers go back to the system (glibc's mmap threshold, fixed)."""

from __future__ import annotations

import ctypes
import sys

LARGE = 1 << 20  # bytes: allocations this size or larger come from mmap


def return_large_buffers_to_the_os(threshold: int = LARGE) -> bool:
    """glibc only: serve every allocation of `threshold` bytes or more from mmap, so freeing it gives its pages back.

    glibc otherwise raises that threshold to the largest block freed so far (up to 32 MB) and keeps such blocks in
    its heaps, so a process's peak depends on the order of its first allocations: when onnxruntime parsed the
    whole 343 MB fp32 model (it copies the weights into its tensors and frees the parse), loading it peaked
    anywhere between 560 and 700 MB from one run to the next, and at 502 MB in every run with the threshold
    fixed. The loader now reads a file's weights in place (runtime.model.create_session): 476 MB, unfixed.
    Used by the server (request bodies, decoded signals) and the exporter. Not set by the CLI: parsing a model
    took about 0.14 s longer with it (every large buffer a fresh mapping), measured in `benchmarks.run` runs and
    interleaved fresh processes. False where there is no glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-3, threshold) == 1  # M_MMAP_THRESHOLD (fixed: no dynamic raise)
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
