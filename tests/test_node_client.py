"""A second language: the Node.js client (clients/node) scores an audio-input model as the Python runtime does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from runtime.analyze import Analyzer
from runtime.audio import load_audio
from runtime.constants import API_KEYS, FEATURES
from runtime.features import chunk_audio

pytestmark = pytest.mark.node

CLIENT = Path(__file__).resolve().parents[1] / "clients" / "node"
ATOL = 1e-5


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary with onnxruntime-node installed; missing is a failure in CI (CI=true), a skip elsewhere."""
    exe = shutil.which("node")
    missing = ("node is not on PATH" if exe is None else
               None if (CLIENT / "node_modules" / "onnxruntime-node").is_dir() else
               f"onnxruntime-node is not installed in {CLIENT} (scripts/test.sh installs it)")
    if missing:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"the Node.js client test cannot run: {missing}")
        pytest.skip(missing)
    return exe


def run_node(node: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([node, *args], cwd=CLIENT, capture_output=True, text=True, timeout=120)


def test_node_client_scores_equal_the_python_runtime(node, tiny_audio_model, piano_clips, tmp_path):
    clip = piano_clips[0]
    y = load_audio(clip)  # decoded and resampled once, by Python: decoding is not what is compared
    samples = tmp_path / "samples.f32"
    y.astype("<f4").tofile(samples)
    result = run_node(node, "score.js", str(tiny_audio_model), str(samples))
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    want = Analyzer.from_path(tiny_audio_model, device="cpu").analyze_audio(y, FEATURES.sample_rate)
    assert got["chunks"] == len(want.timeline) == len(chunk_audio(y))
    np.testing.assert_allclose(got["scores"], [want.scores[k] for k in API_KEYS], atol=ATOL, rtol=0)
    for row, chunk in zip(got["chunk_scores"], want.timeline, strict=True):
        np.testing.assert_allclose(row, [chunk.scores[k] for k in API_KEYS], atol=ATOL, rtol=0)


@pytest.mark.parametrize("seconds", [0.5, 2.0, 3.0, 3.0 + 1 / FEATURES.sample_rate, 5.0, 7.0, 30.0])
def test_node_chunking_is_the_documented_rule(node, seconds, tmp_path):
    y = np.random.default_rng(0).uniform(-1, 1, int(seconds * FEATURES.sample_rate)).astype("<f4")
    samples, chunks = tmp_path / "in.f32", tmp_path / "chunks.f32"
    y.tofile(samples)
    script = ("const fs = require('fs'); const { chunkAudio } = require('./score.js');"
              "const b = fs.readFileSync(process.argv[1]);"
              "const { chunks } = chunkAudio(new Float32Array(b.buffer, b.byteOffset, b.length / 4));"
              "fs.writeFileSync(process.argv[2], Buffer.from(chunks.buffer));")
    result = run_node(node, "-e", script, str(samples), str(chunks))
    assert result.returncode == 0, result.stderr
    got = np.fromfile(chunks, "<f4").reshape(-1, FEATURES.chunk_samples)
    np.testing.assert_array_equal(got, chunk_audio(y))


def test_node_client_errors_are_one_line(node, tiny_audio_model, tiny_model, tmp_path):
    odd = tmp_path / "odd.f32"
    odd.write_bytes(b"\x00\x01\x02")
    result = run_node(node, "score.js", str(tiny_audio_model), str(odd))
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"error: {odd}: expected raw float32 samples, got 3 bytes"]
    samples = tmp_path / "ok.f32"
    np.zeros(FEATURES.sample_rate, "<f4").tofile(samples)
    result = run_node(node, "score.js", str(tiny_model), str(samples))
    assert result.returncode == 1 and "not an audio-input model" in result.stderr
