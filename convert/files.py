"""Publishing files atomically: a reader sees the old file or the whole new one, never a partial write."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from runtime.protowire import GRAPH_FIELD, INITIALIZER_FIELD, LENGTH_DELIMITED
from runtime.protowire import encode_varint as _varint


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(file)` on a temporary file beside `path`, flush it to disk, then rename it over `path`.

    The file is made with open() rather than mkstemp, so it gets the umask's mode like any new file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _without(message, name: str):
    """A new message of the same type with every field of `message` but `name` (whose contents are not copied)."""
    part = type(message)()
    for desc, value in message.ListFields():
        if desc.name == name:
            continue
        if hasattr(value, "extend"):  # a repeated field
            getattr(part, desc.name).extend(value)
        elif hasattr(value, "ListFields"):  # a singular message
            getattr(part, desc.name).CopyFrom(value)
        else:
            setattr(part, desc.name, value)
    return part


GRAPH_TAG = _varint(GRAPH_FIELD << 3 | LENGTH_DELIMITED)  # ModelProto.graph
INITIALIZER_TAG = _varint(INITIALIZER_FIELD << 3 | LENGTH_DELIMITED)  # GraphProto.initializer


def write_model(path: str | os.PathLike, model) -> Path:
    """Write an onnx ModelProto atomically, one initializer at a time: no serialized copy of the whole model.

    `model.SerializeToString()` would hold a second copy of the weights (343 MB for the production fp32 model)
    while the proto is alive. Here the model without its graph, the graph without its initializers, then each
    initializer are serialized in turn; protobuf allows fields in any order, so onnx and onnxruntime read the
    file as the same model (onnx.load gives back an equal proto).
    """
    graph = model.graph
    head = _without(model, "graph").SerializeToString()
    rest = _without(graph, "initializer").SerializeToString()
    sizes = [tensor.ByteSize() for tensor in graph.initializer]
    graph_size = len(rest) + sum(len(INITIALIZER_TAG) + len(_varint(n)) + n for n in sizes)

    def write(fh: BinaryIO) -> None:
        fh.write(head)
        fh.write(GRAPH_TAG + _varint(graph_size))
        fh.write(rest)
        for tensor, size in zip(graph.initializer, sizes, strict=True):
            fh.write(INITIALIZER_TAG + _varint(size))
            fh.write(tensor.SerializeToString())

    return write_atomic(path, write)
