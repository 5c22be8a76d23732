"""The real piano clips the tests use, kept in the repository (tests/data/piano: renders of PercePiano's
MIT-licensed MIDI made for this project; its README.md gives the provenance and labels.json the labels)."""

from __future__ import annotations

import json
from pathlib import Path

PIANO_DIR = Path(__file__).resolve().parent / "data" / "piano"
CLIPS = sorted(PIANO_DIR.glob("*.flac"))
if len(CLIPS) != 16:  # a broken checkout is an error, never a silent skip
    raise RuntimeError(f"expected the 16 real piano clips in {PIANO_DIR}, found {len(CLIPS)}")


def labels() -> dict:
    """``{clip file name: {"segment", "labels" (19 floats), "seconds"}}``."""
    return json.loads((PIANO_DIR / "labels.json").read_text())
