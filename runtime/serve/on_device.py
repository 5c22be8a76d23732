"""The on-device page (clients/web) at /on-device/: the browser scores the recording itself, nothing is uploaded.

Served from a checkout that has run `npm ci --prefix clients/web`: the page's own files, the chart module and
style sheet it shares with the page at / (runtime/serve/static), the onnxruntime-web files it loads (from
clients/web/node_modules, never copied into the repository) and the served model file as model.onnx when that
model takes audio (a waveform-in export). Every response carries the cross-origin isolation headers
(COOP/COEP) that multi-threaded WebAssembly needs. Without clients/web or its node_modules nothing is added.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from runtime.constants import AUDIO_INPUT_NAME
from runtime.model import METADATA_KEY
from runtime.protowire import header_metadata

log = logging.getLogger(__name__)

WEB_CLIENT = Path(__file__).resolve().parents[2] / "clients" / "web"
PAGE_FILES = ("index.html", "on-device.js", "pipeline.js", "model-store.js")
SHARED_FILES = ("charts.js", "take.js", "style.css")  # runtime/serve/static: the same files the page at / loads
# onnxruntime-web's WebAssembly build and its WebGPU build (each a loader, its worker module and its .wasm)
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm",
             "ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm")
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
             "Cross-Origin-Resource-Policy": "same-origin"}
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript",
               ".css": "text/css", ".wasm": "application/wasm", ".onnx": "application/octet-stream"}


def is_audio_model(path: str | os.PathLike) -> bool:
    """Whether an ONNX file is a waveform-in PercePiano export (read from its metadata, without loading it)."""
    import json

    raw = header_metadata(path).get(METADATA_KEY)
    try:
        return bool(raw) and json.loads(raw).get("io", {}).get("input") == AUDIO_INPUT_NAME
    except (ValueError, AttributeError):
        return False


def page_files(static: Path, model_file: str | os.PathLike | None, web: Path = WEB_CLIENT) -> dict[str, Path]:
    """URL name under /on-device/ -> file; {} when the web client or its onnxruntime-web install is missing."""
    ort = web / "node_modules" / "onnxruntime-web" / "dist"
    files = {name: web / name for name in PAGE_FILES} | {name: static / name for name in SHARED_FILES}
    files |= {f"ort/{name}": ort / name for name in ORT_FILES}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        log.info("the on-device page is not served (/on-device): %s missing (npm ci --prefix clients/web)",
                 missing[0])
        return {}
    if model_file is not None and is_audio_model(model_file):
        files["model.onnx"] = Path(model_file)
    return files


def add_on_device_routes(app, static: Path, model_file: str | os.PathLike | None, web: Path = WEB_CLIENT) -> bool:
    """GET/HEAD /on-device/ and its files, with the isolation headers; False (nothing added) without the client."""
    from starlette.responses import FileResponse, JSONResponse, RedirectResponse

    files = page_files(static, model_file, web)
    if not files:
        return False
    model_note = "" if "model.onnx" in files else (
        "this server's model takes log-mel windows; the on-device page needs a waveform-in export "
        "(python -m convert export --input audio)")

    async def page_file(request):
        name = request.path_params.get("name") or "index.html"
        path = files.get(name)
        if path is None:
            message = model_note if name == "model.onnx" and model_note else f"no such file: /on-device/{name}"
            return JSONResponse({"status": "error", "error": message, "error_type": "not_found"}, 404,
                                headers=ISOLATION)
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
                            headers={**ISOLATION, "Cache-Control": "no-cache"})

    app.add_route("/on-device", lambda request: RedirectResponse("/on-device/"), methods=["GET", "HEAD"],
                  include_in_schema=False)
    app.add_route("/on-device/{name:path}", page_file, methods=["GET", "HEAD"], include_in_schema=False)
    return True
