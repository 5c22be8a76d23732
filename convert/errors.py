"""Errors of the converter; the CLI prints their message as one line and exits non-zero."""

from __future__ import annotations

import reprlib
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint that is unreadable, unsafe, or does not match its config."""


class ExportError(RuntimeError):
    """The JAX -> ONNX export itself failed."""


class ParityError(RuntimeError):
    """An exported model that does not match JAX within tolerance; carries the report."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


class _Brief(reprlib.Repr):
    """reprlib's bounded repr, bytes included (reprlib would repr them whole before cutting)."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 3, 60, 60
        self.maxtuple = self.maxlist = self.maxdict = self.maxset = self.maxfrozenset = 6

    def repr_bytes(self, obj: bytes, level: int) -> str:
        return repr(obj[: self.maxstring]) + ("..." if len(obj) > self.maxstring else "")

    repr_bytearray = repr_bytes


_BRIEF = _Brief()


def brief(obj: Any) -> str:
    """A short one-line repr of an untrusted object: never builds the whole repr of a big or shared one."""
    return _BRIEF.repr(obj)
