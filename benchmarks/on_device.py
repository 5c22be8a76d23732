"""The on-device page measured in headless Chromium: parity with `python -m runtime analyze`, ms per 3 s window.

    python -m benchmarks.on_device --model M.onnx [--reference R.onnx] [--threads 1 2] [--repeat 3] FILE...

Serves M with `python -m runtime serve` (the page at /on-device/), scores each FILE in the page once per thread
count (the first file `--repeat` times for the timing) and prints one JSON document: per file and thread count,
the largest difference from the runtime's scores (M, and R when given: e.g. the fp32 model for an int8 one) and
the median ms per window; with `--waveform`, the decoded 22,050 Hz mono samples against the runtime's (soxr).
`--chromium-arg` passes flags (e.g. WebGPU's); `--backend webgpu` asks the page for it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("PERCEPIANO_CHROMIUM", "/usr/bin/chromium")


def analyze(model: Path, files: list[Path]) -> dict[str, dict]:
    """`python -m runtime analyze --json` results by file name."""
    out = subprocess.run([sys.executable, "-m", "runtime", "analyze", "--model", str(model), "--device", "cpu",
                          "--json", *map(str, files)], cwd=REPO, capture_output=True, text=True, check=True)
    return {Path(r["file"]).name: r for r in json.loads(out.stdout)["results"]}


def max_abs(a: dict, b: dict) -> float:
    keys = a["scores"]
    rows = [(a["scores"], b["scores"])] + [(x["scores"], y["scores"]) for x, y in zip(a["timeline"], b["timeline"],
                                                                                      strict=True)]
    return max(abs(x[k] - y[k]) for x, y in rows for k in keys)


class Server:
    def __init__(self, model: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "runtime", "serve", "--model", str(model), "--port",
                                      str(self.port), "--device", "cpu"], cwd=REPO, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        for _ in range(900):
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def score(page, path: Path) -> tuple[dict, dict]:
    page.set_input_files("#take-a input.file", str(path))
    page.wait_for_selector(f'.status-text.done:has-text("{path.name}"), .take-error:not([hidden])', timeout=900_000)
    if page.is_visible(".take-error"):
        raise RuntimeError(page.text_content(".take-error"))
    return (json.loads(page.get_attribute("body", "data-result")),
            json.loads(page.get_attribute("body", "data-timings")))


DECODE = """async (b64) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const buf = await new OfflineAudioContext(1, 1, 22050).decodeAudioData(bytes.buffer);
    const mono = new Float32Array(buf.length);
    for (let c = 0; c < buf.numberOfChannels; c++) buf.getChannelData(c).forEach((v, i) => { mono[i] += v; });
    mono.forEach((v, i) => { mono[i] = v / buf.numberOfChannels; });
    let s = ""; const u8 = new Uint8Array(mono.buffer);
    for (let i = 0; i < u8.length; i += 32768) s += String.fromCharCode(...u8.subarray(i, i + 32768));
    return btoa(s);
}"""


def waveform(page, path: Path) -> dict:
    """The page's decode (the browser's resampler to 22,050 Hz, mono) against the runtime's (soxr HQ)."""
    import base64

    import numpy as np

    from runtime.audio import load_audio

    got = np.frombuffer(base64.b64decode(page.evaluate(DECODE, base64.b64encode(path.read_bytes()).decode())), "<f4")
    ref = load_audio(path)
    n = min(len(got), len(ref))
    diff = got[:n].astype(np.float64) - ref[:n]
    return {"samples": [len(got), len(ref)], "max_abs": float(np.abs(diff).max()),
            "rms": float(np.sqrt(np.mean(diff**2))), "snr_db": float(10 * np.log10(np.mean(ref[:n].astype(
                np.float64) ** 2) / np.mean(diff**2)))}


def measure(args) -> dict:
    from playwright.sync_api import sync_playwright

    refs = {"model": analyze(args.model, args.files)}
    if args.reference:
        refs["reference"] = analyze(args.reference, args.files)
    server, out = Server(args.model), {"model": str(args.model), "runs": []}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=args.chromium_arg)
            for threads in args.threads:
                context = browser.new_context()
                page = context.new_page()
                page.goto(f"{server.url}/on-device/?threads={threads}&backend={args.backend}")
                page.wait_for_selector("body[data-ready]", state="attached", timeout=900_000)
                if page.get_attribute("body", "data-ready") != "true":
                    raise RuntimeError(page.text_content("#notice"))
                for i, path in enumerate(args.files):
                    per_window = []
                    for _ in range(args.repeat if i == 0 else 1):
                        doc, timings = score(page, path)
                        per_window.append(timings["ms_per_window"])
                    (got,) = doc["results"]
                    run = {"file": path.name, "threads": threads, "execution": doc["model"]["execution"],
                           "self_check_max_abs": doc["model"]["self_check"].get("max_abs"),
                           "windows": timings["windows"], "ms_per_window_runs": per_window,
                           "ms_per_window_median": statistics.median(per_window)}
                    run.update({f"max_abs_vs_{name}": max_abs(got, ref[path.name]) for name, ref in refs.items()})
                    if args.waveform:
                        run["waveform_vs_runtime"] = waveform(page, path)
                    out["runs"].append(run)
                    print(json.dumps(run), file=sys.stderr)
                context.close()
            browser.close()
    finally:
        server.stop()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--reference", type=Path, help="a second model for the runtime's scores (e.g. fp32)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of the first file")
    parser.add_argument("--backend", default="wasm", choices=["auto", "wasm", "webgpu"])
    parser.add_argument("--chromium-arg", action="append", default=[])
    parser.add_argument("--waveform", action="store_true", help="also compare the decoded samples with the runtime's")
    parser.add_argument("files", type=Path, nargs="+")
    print(json.dumps(measure(parser.parse_args(argv)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
