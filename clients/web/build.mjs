#!/usr/bin/env node
// The on-device page as plain files for any static host: `npm run build -- MODEL.onnx [OUT_DIR]` (default dist/)
// writes the page, the chart module and style sheet it shares with the service's page (runtime/serve/static),
// the onnxruntime-web files it loads (from node_modules) and the model as model.onnx: the same layout
// `python -m runtime serve` offers at /on-device/ (runtime/serve/on_device.py). Multi-threaded WebAssembly needs
// the host to send COOP/COEP headers: _headers carries them for hosts that read it (Netlify, Cloudflare Pages);
// without them the page runs single-threaded.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const PAGE = ["index.html", "on-device.js", "pipeline.js", "model-store.js"];
const SHARED = ["charts.js", "take.js", "style.css"].map((f) => path.join(here, "..", "..", "runtime", "serve", "static", f));
const ORT = ["ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm", "ort.webgpu.min.mjs",
  "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm"];
const HEADERS = "/*\n  Cross-Origin-Opener-Policy: same-origin\n  Cross-Origin-Embedder-Policy: require-corp\n"
  + "  Cross-Origin-Resource-Policy: same-origin\n";

const [model, out = path.join(here, "dist")] = process.argv.slice(2);
if (!model) {
  console.error("usage: npm run build -- MODEL.onnx [OUT_DIR]   (a waveform-in export: convert export --input audio)");
  process.exit(2);
}
const ortDir = path.join(here, "node_modules", "onnxruntime-web", "dist");
fs.mkdirSync(path.join(out, "ort"), { recursive: true });
for (const f of PAGE) fs.copyFileSync(path.join(here, f), path.join(out, f));
for (const f of SHARED) fs.copyFileSync(f, path.join(out, path.basename(f)));
for (const f of ORT) fs.copyFileSync(path.join(ortDir, f), path.join(out, "ort", f));
fs.copyFileSync(model, path.join(out, "model.onnx"));
fs.writeFileSync(path.join(out, "_headers"), HEADERS);
console.log(`wrote ${out}`);
