"""The tiny preset exported as an audio-input model (front end in the graph), once per test run."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_audio_model(tmp_path_factory, tiny_checkpoint) -> Path:
    """`python -m convert export --input audio` of the tiny checkpoint: the CLI path, parity gate included."""
    from convert import cli

    out = tmp_path_factory.mktemp("onnx-audio") / "tiny-audio.onnx"
    code = cli.main(["-q", "export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--input", "audio"])
    assert code == 0 and out.is_file()
    return out
