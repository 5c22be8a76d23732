"""Staged models: each graph goes to a scratch file once, is gated from that file, then published from it.

Only one large model is in memory at a time: a proto is written (without a serialized copy, see
convert.files.write_model) and dropped; the gate's session loads the file; the published file is the staged
graph with its final metadata. With `preoptimize`, the staged graph is what onnxruntime makes of it at that
level for the CPU (portable: standard ONNX and onnxruntime contrib ops, no CPU-specific layouts), marked in
the metadata's `graph` section so the runtime loads it without optimising it again (runtime.model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from convert.files import write_model
from convert.metadata import set_metadata
from convert.options import DEFAULT_PREOPTIMIZE
from convert.process_memory import release_memory

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Staged:
    """A staged graph: the file the gate loads (and publishing copies), the raw traced file, the `graph` section."""

    path: Path
    raw: Path
    graph: dict


def graph_section(preoptimize: str) -> dict:
    """The metadata's record of how the graph was saved."""
    import onnxruntime as ort

    if preoptimize == "none":
        return {"optimized": "none"}
    return {"optimized": preoptimize, "by": f"onnxruntime {ort.__version__}", "provider": "CPUExecutionProvider",
            "load_with": "none on the CPU (runtime.model.load_optimization)"}


def write_stage(proto, sections: dict, path: Path, preoptimize: str = DEFAULT_PREOPTIMIZE) -> Path:
    """Write `proto` with `sections` (and the `graph` record) to `path`; the caller then drops the proto."""
    set_metadata(proto, {**sections, "graph": graph_section(preoptimize)})
    return write_model(path, proto)


def finish_stage(path: Path, preoptimize: str = DEFAULT_PREOPTIMIZE, keep_raw: bool = True) -> Staged:
    """The staged file, optimised by onnxruntime at `preoptimize` beside `path` unless that is none."""
    from runtime.model import save_optimized

    release_memory()
    graph = graph_section(preoptimize)
    if preoptimize == "none":
        return Staged(path, path, graph)
    optimized = path.with_name(f"{path.stem}.{preoptimize}{path.suffix}")
    log.info("optimising the %s graph with onnxruntime (%s, CPU)", path.stem, preoptimize)
    save_optimized(path, optimized, preoptimize)
    release_memory()
    if not keep_raw:
        path.unlink()
    return Staged(optimized, path if keep_raw else optimized, graph)


def publish(staged: Path, out: Path, sections: dict) -> Path:
    """The staged graph with its final metadata, atomically at `out`."""
    import onnx

    proto = onnx.load(str(staged))
    set_metadata(proto, sections)
    write_model(out, proto)
    del proto
    release_memory()
    return out
