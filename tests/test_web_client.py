"""The on-device page's plain functions (clients/web/pipeline.js), run by Node against the Python runtime: the
windows (docs/spec.md §3), the mono mix, mean-then-clip and the result's shape, and the model metadata read from
the bytes."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from conftest import REPO

from runtime.analyze import build_analysis
from runtime.constants import API_KEYS
from runtime.features import chunk_audio
from runtime.protowire import header_metadata

pytestmark = pytest.mark.node  # the page's functions run by Node.js

WEB = REPO / "clients" / "web"


@pytest.fixture(scope="module")
def node() -> str:
    exe = shutil.which("node")
    if exe is None:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail("node is not on PATH: the web client's functions cannot be checked")
        pytest.skip("node is not on PATH")
    return exe


def run_js(node: str, body: str, payload) -> dict:
    """Runs `body` as an ES module beside pipeline.js with `input` (JSON from stdin) in scope; its JSON output."""
    script = ("import * as p from './pipeline.js';\nimport fs from 'node:fs';\n"
              "const input = JSON.parse(fs.readFileSync(0, 'utf8'));\n" + body)
    out = subprocess.run([node, "--input-type=module", "-e", script], cwd=WEB, input=json.dumps(payload),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def floats(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), "<f4")


def signal(n: int) -> np.ndarray:
    """The same deterministic samples in both languages: ((i * 7919) % 2003) / 2003 - 0.5, in float32."""
    return (((np.arange(n) * 7919) % 2003) / 2003 - 0.5).astype(np.float32)


@pytest.mark.parametrize("n", [0, 1, 44099, 44100, 66149, 66150, 66151, 110249, 110250, 110251, 661500, 662000])
def test_windows_are_the_runtime_s(node, n):
    got = run_js(node, """
        const y = Float32Array.from({length: input.n}, (_, i) => ((i * 7919) % 2003) / 2003 - 0.5);
        const {chunks, count} = p.chunkAudio(y);
        console.log(JSON.stringify({count, chunks: Buffer.from(chunks.buffer).toString('base64')}));
    """, {"n": n})
    expected = chunk_audio(signal(n))
    assert got["count"] == len(expected)
    np.testing.assert_array_equal(floats(got["chunks"]).reshape(expected.shape), expected)


def test_mono_mix_is_the_mean_of_the_channels(node):
    rng = np.random.default_rng(3)
    channels = rng.uniform(-1, 1, (3, 1000)).astype(np.float32)
    got = run_js(node, """
        const chans = input.map((c) => new Float32Array(Uint8Array.from(Buffer.from(c, 'base64')).buffer));
        console.log(JSON.stringify(Buffer.from(p.mixToMono(chans).buffer).toString('base64')));
    """, [base64.b64encode(c.tobytes()).decode() for c in channels])
    np.testing.assert_allclose(floats(got), channels.astype(np.float64).mean(axis=0), rtol=0, atol=1e-7)


def test_result_is_the_runtime_s_mean_then_clip(node):
    rng = np.random.default_rng(5)
    windows = rng.uniform(-0.3, 1.3, (6, 19)).astype(np.float32)  # beyond [0, 1]: the clip must act
    got = run_js(node, """
        const rows = input.rows.map((r) => Float32Array.from(r));
        console.log(JSON.stringify(p.analysisOf('x.flac', input.samples, rows, input.keys)));
    """, {"rows": windows.tolist(), "samples": 290_000, "keys": list(API_KEYS)})
    expected = build_analysis(windows, 290_000 / 22050).to_dict()
    assert got == {"file": "x.flac", **expected, "error": None}


def test_metadata_is_read_from_the_model_bytes(node, tiny_audio_model, tiny_model):
    got = run_js(node, """
        const bytes = new Uint8Array(fs.readFileSync(input.audio));
        const info = p.modelInfo(bytes);
        let refused = null;
        try { p.modelInfo(new Uint8Array(fs.readFileSync(input.mel))); } catch (e) { refused = e.message; }
        console.log(JSON.stringify({props: p.metadataProps(bytes), version: info.version, refused,
            check: p.selfCheckWindows(info).count}));
    """, {"audio": str(tiny_audio_model), "mel": str(tiny_model)})
    props = header_metadata(tiny_audio_model)
    assert got["props"] == props
    doc = json.loads(props["percepiano"])
    assert got["version"] == f"percepiano-ast-{doc['source']['sha256'][:12]}-{doc['precision']}"
    assert got["check"] == doc["self_check"]["inputs"]["shape"][0]
    assert "waveform-in" in got["refused"]  # a mel-input model is refused with the way out


def test_the_variants_metadata_says_which_run_on_which_web_backend():
    """WebGPU has no integer MatMul kernels (fused or not): int8 is meant for WASM; a failed gate is not picked."""
    from convert.variants import web_section

    builds = {"fp32": {"nodes": {"MatMul": 75}}, "fp16": {"nodes": {"MatMul": 75, "Cast": 4}},
              "int8": {"nodes": {"com.microsoft:MatMulIntegerToFloat": 72, "DynamicQuantizeLinear": 72}}}
    unfused = {"nodes": {"MatMulInteger": 72, "DynamicQuantizeLinear": 72, "Cast": 72}}
    passed = {p: {"passed": True} for p in builds}
    web = web_section("int8", builds, passed)
    assert web["backends"] == ["wasm"] and web["variants"]["fp32"] == ["webgpu", "wasm"]
    assert web["variants"]["fp16"] == ["webgpu"] and web["recommended"] == {"wasm": "int8", "webgpu": "fp16"}
    assert web_section("int8", {**builds, "int8": unfused}, passed)["backends"] == ["wasm"]
    failed = {**passed, "int8": {"passed": False}, "fp16": {"passed": False}}
    assert web_section("fp32", builds, failed)["recommended"] == {"wasm": "fp32", "webgpu": "fp32"}
