"""The on-device page (clients/web at /on-device/), driven in headless Chromium: the browser decodes, windows and
scores the recording itself with onnxruntime-web, and its result must be the Python runtime's.

Needs what tests/test_page.py needs (Debian's chromium, playwright) and clients/web's node_modules (`npm ci
--prefix clients/web`, which scripts/test.sh runs); a missing one skips here and fails under CI=true.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import test_page
from conftest import REPO
from test_page import Server, shown

from runtime.constants import API_KEYS, FEATURES
from runtime.model import METADATA_KEY
from runtime.protowire import header_metadata

pytestmark = pytest.mark.browser  # Chromium, and onnxruntime-web from clients/web (scripts/test.sh)

browser = test_page.browser  # the page tests' headless Chromium fixture
WEB = REPO / "clients" / "web"
SHIPPED = sorted((REPO / "convert" / "clips").glob("*.flac"))  # 22,050 Hz mono: no resampling involved
FP32_ATOL = 1e-4  # the bound for fp32: the browser's float32 kernels against the runtime's
RESAMPLER_BOUND = 0.005  # docs/spec.md §4: an error a user cannot see


@pytest.fixture(scope="module", autouse=True)
def web_client():
    if not (WEB / "node_modules" / "onnxruntime-web" / "dist" / "ort.wasm.min.mjs").is_file():
        problem = f"onnxruntime-web is not installed in {WEB} (npm ci --prefix clients/web; scripts/test.sh does)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.fixture(scope="module")
def tiny_audio_int8(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny checkpoint's waveform-in int8 variant (MatMulIntegerToFloat), gated by the export."""
    from convert import cli

    out = tmp_path_factory.mktemp("onnx-audio-int8") / "tiny-audio-int8.onnx"
    assert cli.main(["-q", "export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--input", "audio",
                     "--quantize", "int8"]) == 0
    return out


def runtime_analyze(model: Path, files: list[Path]) -> dict:
    """`python -m runtime analyze --json` on the files: the reference the page must meet."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "runtime", "analyze", "--model", str(model), "--device", "cpu",
                          "--json", *map(str, files)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def max_abs(a: dict, b: dict) -> float:
    """Largest difference of the scores and of every timeline window's scores; the shapes must agree."""
    assert set(a) == set(b) and a["duration_seconds"] == pytest.approx(b["duration_seconds"], abs=1e-6)
    assert [w["start_seconds"] for w in a["timeline"]] == [w["start_seconds"] for w in b["timeline"]]
    diffs = [abs(a["scores"][k] - b["scores"][k]) for k in API_KEYS]
    diffs += [abs(x["scores"][k] - y["scores"][k]) for x, y in zip(a["timeline"], b["timeline"], strict=True)
              for k in API_KEYS]
    return max(diffs)


class Visit:
    """A browser context on the page; every request it makes is recorded, and one to another origin is refused."""

    def __init__(self, browser, origin: str):
        self.origin, self.requests, self.errors = origin, [], []
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def _route(self, route):
        request = route.request
        self.requests.append((request.method, request.url))
        parts = urlsplit(request.url)
        if f"{parts.scheme}://{parts.netloc}" == self.origin or parts.scheme in ("blob", "data"):
            route.continue_()
        else:
            route.abort()

    def open(self, query: str = "?threads=2") -> str:
        self.page.goto(f"{self.origin}/on-device/{query}")
        self.page.wait_for_selector("body[data-ready]", state="attached", timeout=120_000)
        assert self.page.get_attribute("body", "data-ready") == "true", self.page.text_content("#notice")
        return self.page.text_content("#model")

    def score(self, clip: Path) -> dict:
        self.page.set_input_files("#take-a input.file", str(clip))
        self.page.wait_for_selector(f'.status-text.done:has-text("{clip.name}"), .take-error:not([hidden])',
                                    timeout=300_000)
        assert self.page.is_hidden(".take-error"), self.page.text_content(".take-error")
        return json.loads(self.page.get_attribute("body", "data-result"))

    def foreign(self) -> list[tuple[str, str]]:
        return [(m, u) for m, u in self.requests if not (u.startswith(self.origin + "/") or u.startswith("blob:"))]

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"JavaScript errors on the page: {self.errors}"


@pytest.fixture(scope="module")
def fp32_server(tiny_audio_model, tmp_path_factory):
    srv = Server(tiny_audio_model, tmp_path_factory.mktemp("on-device") / "server.log")
    yield srv
    srv.stop()


def test_fp32_scores_in_the_browser_are_the_runtime_s(browser, fp32_server, tiny_audio_model):
    reference = runtime_analyze(tiny_audio_model, SHIPPED)
    visit = Visit(browser, fp32_server.url)
    try:
        identity = visit.open()
        assert reference["model"]["version"] in identity and "fp32" in identity and "WebAssembly" in identity
        assert "nothing is sent" in visit.page.text_content("#privacy")
        for clip, expected in zip(SHIPPED, reference["results"], strict=True):
            doc = visit.score(clip)
            (got,) = doc["results"]
            assert got["file"] == clip.name and got["error"] is None
            diff = max_abs(got, expected)
            assert diff <= FP32_ATOL, f"{clip.name}: browser vs runtime max abs {diff:.3g}"
            model = doc["model"]
            assert {k: model[k] for k in ("version", "sha256", "precision", "demo")} == \
                {k: reference["model"][k] for k in ("version", "sha256", "precision", "demo")}
            assert model["self_check"]["passed"] is True and model["execution"]["backend"] == "wasm"
            assert model["execution"]["threads"] == 2 and model["execution"]["cross_origin_isolated"] is True
            # what the page shows is that document: the table at 3 decimals, one timeline dot per window
            cells = visit.page.eval_on_selector_all(
                "#score-table tbody tr[data-key]", "(rows) => rows.map((r) => [r.dataset.key, r.cells[2].textContent])")
            assert dict(cells) == {k: shown(got["scores"][k]) for k in API_KEYS}
            assert len(visit.page.query_selector_all("#timeline circle.dot.a")) == len(got["timeline"])
            assert visit.page.get_attribute("#download", "href").startswith("blob:")
        visit.page.set_input_files("#take-a input.file", str(REPO / "pyproject.toml"))  # not audio: said, not thrown
        visit.page.wait_for_selector(".take-error:not([hidden])", timeout=60_000)
        assert "pyproject.toml could not be scored" in visit.page.text_content(".take-error")
        assert visit.foreign() == [] and not [u for m, u in visit.requests if m not in ("GET", "HEAD")]
    finally:
        visit.close()


def test_the_model_is_cached_for_the_next_visit(browser, fp32_server):
    visit = Visit(browser, fp32_server.url)
    try:
        assert "downloaded" in visit.open()
        first = [m for m, u in visit.requests if u.endswith("/model.onnx")]
        visit.requests.clear()
        assert "from this browser's cache" in visit.open()
        again = [m for m, u in visit.requests if u.endswith("/model.onnx")]
        assert first == ["GET"] and again == ["HEAD"], (first, again)  # a HEAD to check it is the same file
    finally:
        visit.close()


def test_a_44khz_stereo_file_is_resampled_within_the_invisible_error(browser, fp32_server, tiny_audio_model,
                                                                     tmp_path):
    import soundfile as sf
    import soxr

    (left, rate), (right, _) = (sf.read(clip, dtype="float32") for clip in SHIPPED[:2])
    assert rate == FEATURES.sample_rate
    n = min(len(left), len(right))  # two different performances, so that a wrong mono mix shows (>0.005)
    stereo = np.stack([soxr.resample(y[:n], rate, 44100, quality="VHQ") for y in (left, right)], axis=1)
    path = tmp_path / "stereo-44k.flac"
    sf.write(path, stereo, 44100, subtype="PCM_24")
    (expected,) = runtime_analyze(tiny_audio_model, [path])["results"]
    visit = Visit(browser, fp32_server.url)
    try:
        visit.open()
        (got,) = visit.score(path)["results"]
    finally:
        visit.close()
    diff = max_abs(got, expected)
    assert diff <= RESAMPLER_BOUND, f"the browser's resampler vs soxr: max abs {diff:.3g}"


def test_the_int8_variant_runs_in_webassembly_within_its_gate(browser, tiny_audio_int8, tmp_path):
    doc = json.loads(header_metadata(tiny_audio_int8)[METADATA_KEY])
    nodes = doc["variants"]["build"]["nodes"]
    assert nodes.get("com.microsoft:MatMulIntegerToFloat", 0) > 0  # the contrib op is what is checked here
    assert doc["variants"]["web"]["backends"] == ["wasm"]
    tolerance = doc["parity"]["tolerance"]["model"]
    reference = runtime_analyze(tiny_audio_int8, SHIPPED)
    srv = Server(tiny_audio_int8, tmp_path / "server.log")
    visit = Visit(browser, srv.url)
    try:
        assert "int8" in visit.open()
        for clip, expected in zip(SHIPPED, reference["results"], strict=True):
            diff = max_abs(visit.score(clip)["results"][0], expected)
            assert diff <= tolerance, f"{clip.name}: int8 in the browser vs the runtime: max abs {diff:.3g}"
        assert visit.foreign() == []
    finally:
        visit.close()
        srv.stop()


def test_the_server_offers_the_page_isolated_and_the_model_only_if_it_takes_audio(fp32_server, tiny_audio_model,
                                                                                   tiny_model):
    from runtime.serve.on_device import page_files

    res = httpx.get(f"{fp32_server.url}/on-device", follow_redirects=False)
    assert res.status_code in (302, 307) and res.headers["location"] == "/on-device/"
    for name in ("", "charts.js", "ort/ort.wasm.min.mjs", "ort/ort-wasm-simd-threaded.wasm"):
        res = httpx.get(f"{fp32_server.url}/on-device/{name}")
        assert res.status_code == 200, name
        assert res.headers["cross-origin-opener-policy"] == "same-origin"
        assert res.headers["cross-origin-embedder-policy"] == "require-corp"
    # one chart module for both pages: /on-device/charts.js is the file the page at / imports
    assert httpx.get(f"{fp32_server.url}/on-device/charts.js").content == \
        (REPO / "runtime" / "serve" / "static" / "charts.js").read_bytes()
    assert httpx.get(f"{fp32_server.url}/on-device/model.onnx").content == tiny_audio_model.read_bytes()
    missing = httpx.get(f"{fp32_server.url}/on-device/package.json")  # only the files the page loads
    assert missing.status_code == 404
    static = REPO / "runtime" / "serve" / "static"
    assert "model.onnx" not in page_files(static, tiny_model)  # a mel-input model: the page cannot run it
    assert page_files(static, tiny_audio_model, web=REPO / "no-such-client") == {}


# Headless Chromium offers no WebGPU adapter here by default; with these flags it offers SwiftShader's (Vulkan on
# the CPU): slow, but the page's WebGPU path and onnxruntime-web's WebGPU kernels run, and are checked.
SWIFTSHADER_WEBGPU = ["--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--enable-features=Vulkan",
                      "--use-vulkan=swiftshader"]


def test_fp32_scores_on_webgpu_are_the_runtime_s(browser, fp32_server, tiny_audio_model):
    (expected,) = runtime_analyze(tiny_audio_model, SHIPPED[:1])["results"]
    chromium = browser.browser_type.launch(executable_path=str(test_page.CHROMIUM), args=SWIFTSHADER_WEBGPU)
    visit = Visit(chromium, fp32_server.url)
    try:
        assert "WebGPU" in visit.open("?backend=webgpu")
        doc = visit.score(SHIPPED[0])
    finally:
        visit.close()
        chromium.close()
    assert doc["model"]["execution"]["backend"] == "webgpu" and doc["model"]["self_check"]["passed"]
    diff = max_abs(doc["results"][0], expected)
    assert diff <= FP32_ATOL, f"WebGPU vs runtime max abs {diff:.3g}"


def test_a_mel_input_model_is_refused_with_the_way_out(browser, tiny_model, tmp_path):
    srv = Server(tiny_model, tmp_path / "server.log")
    visit = Visit(browser, srv.url)
    try:
        visit.page.goto(f"{srv.url}/on-device/")
        visit.page.wait_for_selector("body[data-ready]", state="attached", timeout=60_000)
        assert visit.page.get_attribute("body", "data-ready") == "false"
        assert "waveform-in export" in visit.page.text_content("#notice")
        assert visit.page.is_hidden("#app")
    finally:
        visit.close()
        srv.stop()
