"""Is a file shorter than its own header says? Cheap structural checks made before any decoding.

libsndfile reads whatever audio a cut-off WAV, AIFF, Ogg or MP3 still holds without an error (it only notes
the mismatch in its log), so an interrupted upload would be scored as the fragment that remains. Each check
reads a few header or tail bytes and returns the reason the file is truncated, or None. Formats that declare
no length (a raw MP3 without a Xing/Info header, a WAV streamed with an unknown size) cannot be checked here;
runtime.audio decodes such an MP3 with PyAV to the stream's end (`mp3_length_stated`).
"""

from __future__ import annotations

import io
import struct
from typing import BinaryIO

_MAX_CHUNKS = 4096  # RIFF/AIFF chunks walked before giving up (each step reads 8 bytes)
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # data sizes written by streaming encoders (and RF64) that mean "to the end"
_OGG_MAX_PAGE = 27 + 255 + 255 * 255  # header + lacing table + the largest payload
_OGG_EOS = 0x04


def truncation(fmt: str, f: BinaryIO, size: int) -> str | None:
    """Why the file (libsndfile major format ``fmt``) is truncated, or None if its header agrees with its size."""
    check = {"WAV": _riff, "WAVEX": _riff, "AIFF": _aiff, "OGG": _ogg, "MP3": _mp3}.get(fmt)
    return check(f, size) if check else None


def _read_at(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


def _walk_chunks(f: BinaryIO, size: int, start: int, order: str, wanted: bytes) -> str | None:
    """Follow (id, size) chunks from ``start``; report the ``wanted`` chunk if it runs past the end of the file."""
    offset = start
    for _ in range(_MAX_CHUNKS):
        head = _read_at(f, offset, 8)
        if len(head) < 8:
            return None
        chunk_id, chunk_size = head[:4], struct.unpack(order + "I", head[4:])[0]
        if chunk_id == wanted:
            if chunk_size in _UNKNOWN_SIZES:
                return None
            held = size - offset - 8
            if chunk_size > held:
                return (f"truncated: the header declares {chunk_size} bytes of audio data but the file holds "
                        f"only {max(held, 0)}")
            return None
        offset += 8 + chunk_size + (chunk_size & 1)
    return None


def _riff(f: BinaryIO, size: int) -> str | None:
    magic = _read_at(f, 0, 12)
    if magic[:4] not in (b"RIFF", b"RIFX") or magic[8:12] != b"WAVE":
        return None  # RF64, W64 and friends: not checked
    return _walk_chunks(f, size, 12, "<" if magic[:4] == b"RIFF" else ">", b"data")


def _aiff(f: BinaryIO, size: int) -> str | None:
    magic = _read_at(f, 0, 12)
    if magic[:4] != b"FORM" or magic[8:12] not in (b"AIFF", b"AIFC"):
        return None
    return _walk_chunks(f, size, 12, ">", b"SSND")


def _ogg(f: BinaryIO, size: int) -> str | None:
    """The last Ogg page must end exactly at the end of the file and carry the end-of-stream flag."""
    start = max(0, size - _OGG_MAX_PAGE)
    tail = _read_at(f, start, size - start)
    at = len(tail)
    while (at := tail.rfind(b"OggS", 0, at)) >= 0:
        if at + 27 <= len(tail):
            n_segments = tail[at + 26]
            lacing = tail[at + 27 : at + 27 + n_segments]
            if len(lacing) == n_segments and at + 27 + n_segments + sum(lacing) == len(tail):
                if tail[at + 5] & _OGG_EOS:
                    return None
                return "truncated: the last Ogg page has no end-of-stream flag (the file was cut short)"
    return "truncated: the file ends inside an Ogg page"


def _xing(f: BinaryIO) -> bytes | None:
    """The flags and fields of the first MPEG frame's Xing/Info header (past any ID3v2 tag), or None."""
    head = _read_at(f, 0, 10)
    offset = 0
    if head[:3] == b"ID3" and len(head) == 10:
        offset = 10 + (head[6] & 0x7F) * 2**21 + (head[7] & 0x7F) * 2**14 + (head[8] & 0x7F) * 2**7 + (head[9] & 0x7F)
        offset += 10 if head[5] & 0x10 else 0  # footer
    frame = _read_at(f, offset, 200)
    if len(frame) < 4 or frame[0] != 0xFF or frame[1] & 0xE0 != 0xE0:
        return None
    tag = max(frame.find(b"Xing", 4), frame.find(b"Info", 4))
    fields = frame[tag + 4 : tag + 16] if tag > 0 else b""
    return fields if len(fields) >= 8 else None


def mp3_length_stated(f: BinaryIO) -> bool:
    """Does the MP3 state its frame count (a Xing/Info header)? Without one, a decoder's length is a guess from
    the first frame's bitrate: libsndfile stops there (a VBR file read as a few seconds of its whole)."""
    fields = _xing(f)
    return fields is not None and bool(struct.unpack(">I", fields[:4])[0] & 0x1)


def _mp3(f: BinaryIO, size: int) -> str | None:
    """A Xing/Info header (LAME and most encoders write one) states the stream's size in bytes."""
    fields = _xing(f)
    if fields is None or len(fields) < 12:
        return None
    flags, first = struct.unpack(">II", fields[:8])
    if not flags & 0x2:
        return None
    declared = struct.unpack(">I", fields[8:12])[0] if flags & 0x1 else first
    held = size  # encoders differ on whether the count includes an ID3v2 tag: compare with the whole file
    if declared > held:
        return f"truncated: the Xing/Info header declares {declared} bytes of MPEG audio but the file holds only {held}"
    return None


def opened(source: str | bytes) -> tuple[BinaryIO, int]:
    """A seekable binary file over a path or bytes, and its size."""
    if isinstance(source, bytes):
        return io.BytesIO(source), len(source)
    f = open(source, "rb")  # noqa: SIM115 - the caller closes it
    f.seek(0, io.SEEK_END)
    return f, f.tell()
