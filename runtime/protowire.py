"""An ONNX file read at the protobuf wire level, without parsing it: its metadata, and its graph with the weights
left in the file.

`header_metadata` reads the model's metadata_props before a session exists (the loader picks its options from
them). `external_weights_graph` is the model with each large initializer's bytes replaced by an ONNX external-data
reference to where those bytes already lie in the same file: onnxruntime then reads every weight once, straight
from the file, instead of parsing the whole protobuf (343 MB for fp32), copying each weight into its tensors and
freeing the parse. Measured on the production preset (docs/decisions/2026-12-02-cold-start.md): fp32 session
creation 0.77-0.94 -> 0.40-0.45 s and peak memory 607 -> 400 MB; int8 0.26-0.29 -> 0.11-0.13 s; the scores
bit-identical.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

METADATA_FIELD = 14  # ModelProto.metadata_props
GRAPH_FIELD = 7  # ModelProto.graph
INITIALIZER_FIELD = 5  # GraphProto.initializer
RAW_DATA_FIELD = 9  # TensorProto.raw_data
EXTERNAL_DATA_FIELD = 13  # TensorProto.external_data (StringStringEntryProto: 1 key, 2 value)
DATA_LOCATION_FIELD = 14  # TensorProto.data_location (1: EXTERNAL)
LENGTH_DELIMITED = 2
EXTERNAL_MIN_BYTES = 1024  # smaller initializers stay in the graph


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or malformed varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    """`value` as a protobuf varint."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def fields(buf, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int, int, int]]:
    """The fields of the message in buf[start:end]: (field number, wire type, field start, payload start, end).

    For a length-delimited field the payload is buf[payload start:end]; ValueError for a malformed message.
    """
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        tag, payload = _varint(buf, pos)
        kind = tag & 7
        if kind == 0:
            _, stop = _varint(buf, payload)
        elif kind in (1, 5):
            stop = payload + (8 if kind == 1 else 4)
        elif kind == LENGTH_DELIMITED:
            length, payload = _varint(buf, payload)
            stop = payload + length
        else:
            raise ValueError(f"unsupported wire type {kind}")
        if stop > end:
            raise ValueError("a field runs past the end of its message")
        yield tag >> 3, kind, pos, payload, stop
        pos = stop


def _length_delimited(number: int, payload: bytes) -> bytes:
    return encode_varint(number << 3 | LENGTH_DELIMITED) + encode_varint(len(payload)) + payload


def _string_entry(buf, start: int, end: int) -> tuple[str, str]:
    """A StringStringEntryProto (1: key, 2: value)."""
    out = {1: "", 2: ""}
    for number, kind, _, payload, stop in fields(buf, start, end):
        if kind != LENGTH_DELIMITED:
            raise ValueError("unexpected wire type in a metadata entry")
        out[number] = bytes(buf[payload:stop]).decode()
    return out[1], out[2]


def _mapped(source: str | os.PathLike | bytes):
    """`source`'s bytes: the bytes themselves, or the file mapped read-only (closed by the caller)."""
    if isinstance(source, bytes):
        return memoryview(source)
    with open(source, "rb") as fh:
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)


def header_metadata(source: str | os.PathLike | bytes) -> dict[str, str]:
    """The metadata_props of an ONNX model, read from its top-level protobuf fields without parsing the graph.

    Lets the loader choose session options before it creates the session; {} for anything unreadable (an
    ORT-format file, a foreign file, an empty one): the session's own checks then decide.
    """
    try:
        buf = _mapped(source)
    except (OSError, ValueError):  # unreadable, or empty (mmap refuses a zero-length file)
        return {}
    props: dict[str, str] = {}
    try:
        for number, kind, _, payload, stop in fields(buf):
            if number == METADATA_FIELD and kind == LENGTH_DELIMITED:
                key, value = _string_entry(buf, payload, stop)
                props[key] = value
    except (ValueError, UnicodeDecodeError):
        return {}
    finally:
        buf.release() if isinstance(buf, memoryview) else buf.close()
    return props


def _tensor(buf, start: int, end: int, location: str) -> bytes:
    """An initializer (TensorProto) with its raw_data, if large, as a reference to its place in the file."""
    kept, raw = bytearray(), None
    for number, kind, begin, payload, stop in fields(buf, start, end):
        if number == RAW_DATA_FIELD and kind == LENGTH_DELIMITED:
            raw = (payload, stop)  # the last one, as protobuf reads a repeated singular field
        else:
            kept += buf[begin:stop]
    if raw is None:
        return bytes(kept)
    offset, stop = raw
    if stop - offset < EXTERNAL_MIN_BYTES:
        return bytes(kept) + _length_delimited(RAW_DATA_FIELD, bytes(buf[offset:stop]))
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(stop - offset))):
        kept += _length_delimited(EXTERNAL_DATA_FIELD, _length_delimited(1, key.encode()) +
                                  _length_delimited(2, value.encode()))
    return bytes(kept) + encode_varint(DATA_LOCATION_FIELD << 3) + encode_varint(1)


def external_weights_graph(path: str | os.PathLike) -> bytes:
    """The model at `path` with each initializer of EXTERNAL_MIN_BYTES or more left in the file as external data.

    Load the result with the session config `session.model_external_initializers_file_folder_path` set to the
    file's folder; `path` should be the real path (onnxruntime refuses external data outside that folder).
    ValueError for a file that is not a well-formed ModelProto.
    """
    location = os.path.basename(path)
    buf = _mapped(path)
    try:
        out = bytearray()
        for number, kind, begin, payload, stop in fields(buf):
            if number != GRAPH_FIELD or kind != LENGTH_DELIMITED:
                out += buf[begin:stop]
                continue
            graph = bytearray()
            for g_number, g_kind, g_begin, g_payload, g_stop in fields(buf, payload, stop):
                if g_number == INITIALIZER_FIELD and g_kind == LENGTH_DELIMITED:
                    graph += _length_delimited(INITIALIZER_FIELD, _tensor(buf, g_payload, g_stop, location))
                else:
                    graph += buf[g_begin:g_stop]
            out += _length_delimited(GRAPH_FIELD, bytes(graph))
        return bytes(out)
    finally:
        buf.close()
