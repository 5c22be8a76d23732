"""A file's result when it has no scores: the error, named by the file, and whether the next run tries again."""

from __future__ import annotations


def named_error(name: str, message: str) -> str:
    """The message, starting with the file's name (errors about bytes only say '<N bytes of audio>')."""
    return message if message.startswith(name) else f"{name}: {message}"


def failure(name: str, error: str, *, retry: bool = False) -> dict:
    """The result of a file that has no scores."""
    return {"file": name, "duration_seconds": None, "scores": None, "timeline": None, "error": error,
            **({"retry": True} if retry else {})}
