// The on-device page: decode a dropped or picked recording with the browser's own decoder, bring it to 22,050 Hz
// mono, cut the runtime's 3 s / 2 s windows, score them with the waveform-in model in onnxruntime-web (WASM,
// multi-threaded when the page is cross-origin isolated; WebGPU when the browser offers it and the model is meant
// for it), and show the 19 scores and the timeline with the service page's chart module. Nothing is uploaded.
//
// Query parameters (for measuring; the defaults are what a visitor gets): model=URL (same origin, default
// model.onnx beside the page), backend=auto|wasm|webgpu, threads=N, batch=N (windows per run, default 16 as the runtime).
import { describeDimensions, radar, timeline, timelineSeries } from "./charts.js";
import { loadModel } from "./model-store.js";
import { acceptFiles } from "./take.js";
import { SAMPLE_RATE, CHUNK, analysisOf, chunkAudio, mixToMono, modelInfo, selfCheckWindows } from "./pipeline.js";

const params = new URLSearchParams(location.search);
// Windows per run, as the runtime batches them: int8 quantizes each run's activations with one scale, so the
// same batches give the server's numbers.
const BATCH = 16;
const state = { doc: null, session: null, ort: null, execution: null, dims: [], analysis: null, selfCheck: null };
const $ = (sel) => document.querySelector(sel);
const show = (node, visible) => { node.hidden = !visible; };
const ms = (t0) => performance.now() - t0;

function notice(message) {
  $("#notice").textContent = message;
  show($("#notice"), true);
}

// The backends this model is meant for (its metadata's `variants.web`), else by precision: int8's integer
// kernels exist in onnxruntime-web's WASM backend only.
function webBackends(doc) {
  const web = (doc.variants || {}).web;
  if (web && Array.isArray(web.backends)) return web.backends;
  return doc.precision === "int8" ? ["wasm"] : ["webgpu", "wasm"];
}

async function pickBackend(doc) {
  const asked = params.get("backend") || "auto", meant = webBackends(doc);
  if (asked === "wasm") return "wasm";
  const adapter = navigator.gpu ? await navigator.gpu.requestAdapter().catch(() => null) : null;
  if (asked === "webgpu") {
    if (!adapter) throw new Error("WebGPU is not available in this browser");
    return "webgpu";
  }
  // fp16 on WebGPU needs the adapter's shader-f16 (SwiftShader, for one, lacks it): WebAssembly runs it instead
  const usable = adapter && (doc.precision !== "fp16" || adapter.features.has("shader-f16"));
  return usable && meant.includes("webgpu") ? "webgpu" : "wasm";
}

function threadCount() {
  if (!self.crossOriginIsolated) return 1; // SharedArrayBuffer (threads) needs COOP/COEP
  const asked = Number(params.get("threads"));
  return asked > 0 ? asked : Math.min(4, Math.ceil((navigator.hardwareConcurrency || 1) / 2));
}

async function run(input, count) {
  const { ort, session } = state;
  const { scores } = await session.run({ audio: new ort.Tensor("float32", input, [count, CHUNK]) });
  const dims = scores.dims[1];
  return Array.from({ length: count }, (_, i) => scores.data.slice(i * dims, (i + 1) * dims));
}

// The metadata's real-audio windows through this session, against JAX's scores (as the runtime's self-check).
async function selfCheck(doc) {
  const check = selfCheckWindows(doc);
  if (!check) return { status: "skipped", passed: null };
  const t0 = performance.now(), got = await run(check.inputs, check.count);
  let maxAbs = 0;
  got.forEach((row, i) => row.forEach((v, k) => { maxAbs = Math.max(maxAbs, Math.abs(v - check.scores[i][k])); }));
  const passed = maxAbs <= check.atol;
  return { status: passed ? "passed" : "failed", device: "browser", max_abs: maxAbs, atol: check.atol,
    windows: check.count, milliseconds: Math.round(ms(t0) * 1000) / 1000, passed };
}

async function start() {
  const url = params.get("model") || "model.onnx";
  const status = $("#model");
  const { bytes, fromCache, cached } = await loadModel(url, (got, total) => {
    status.textContent = `Downloading the model: ${(got / 1e6).toFixed(1)}${total ? ` of ${(total / 1e6).toFixed(1)}` : ""} MB…`;
  });
  const doc = modelInfo(bytes);
  const backend = await pickBackend(doc), threads = threadCount();
  status.textContent = `Starting onnxruntime-web (${backend})…`;
  const ort = await import(backend === "webgpu" ? "./ort/ort.webgpu.min.mjs" : "./ort/ort.wasm.min.mjs");
  ort.env.wasm.numThreads = threads;
  const t0 = performance.now();
  const session = await ort.InferenceSession.create(bytes, { executionProviders: [backend] });
  if (session.inputNames.join() !== "audio" || session.outputNames.join() !== "scores") {
    throw new Error(`not a waveform-in model (inputs ${session.inputNames}, outputs ${session.outputNames})`);
  }
  Object.assign(state, { doc, session, ort, dims: describeDimensions(doc.dimensions) });
  state.execution = { backend, threads, onnxruntime_web: ort.env.versions.web, cross_origin_isolated:
    self.crossOriginIsolated, session_ms: ms(t0), model_bytes: bytes.length, model_from_cache: fromCache,
    model_cached: cached };
  state.selfCheck = await selfCheck(doc);
  const where = `${backend === "webgpu" ? "WebGPU" : "WebAssembly"}, ${threads} thread${threads > 1 ? "s" : ""}`;
  status.textContent = `Model ${doc.version} · ${doc.precision} · onnxruntime-web `
    + `${ort.env.versions.web} (${where}) · ${fromCache ? "from this browser's cache" : "downloaded"}`;
  status.dataset.precision = doc.precision;
  show($("#demo-banner"), doc.demo);
  if (state.selfCheck.passed === false) {
    throw new Error(`the model's self-check failed in this browser (max abs ${state.selfCheck.max_abs.toExponential(2)}`
      + ` over ${state.selfCheck.atol}): its scores would not be the server's`);
  }
  $("#privacy").textContent = "Your recording stays on this device: it is decoded and scored inside this page, "
    + "and nothing is sent anywhere. Only the model was downloaded, from this page's own site.";
  fillPicker();
  show($("#app"), true);
  document.body.dataset.ready = "true";
}

// --- scoring one file
async function decode(file) {
  const data = await file.arrayBuffer();
  // decodeAudioData resamples to the context's rate (22,050 Hz) when the file's own rate differs
  const buffer = await new OfflineAudioContext(1, 1, SAMPLE_RATE).decodeAudioData(data);
  const channels = Array.from({ length: buffer.numberOfChannels }, (_, c) => buffer.getChannelData(c));
  return mixToMono(channels);
}

async function analyze(file) {
  const card = $("#take-a"), bar = $(".progress", card), text = $(".status-text", card);
  show($(".take-error", card), false);
  $(".status-text", card).classList.remove("done");
  setBusy(card, true);
  show(bar, true);
  bar.removeAttribute("value");
  try {
    text.textContent = `Decoding ${file.name}…`;
    const t0 = performance.now();
    const samples = await decode(file);
    const decodeMs = ms(t0);
    if (!samples.every(Number.isFinite)) throw new Error("the audio contains NaN or infinite samples");
    const { chunks, count } = chunkAudio(samples), batch = Math.max(1, Number(params.get("batch")) || BATCH);
    const rows = [], t1 = performance.now();
    for (let i = 0; i < count; i += batch) {
      const n = Math.min(batch, count - i);
      text.textContent = `Scoring ${file.name} on this device: windows ${i + 1}–${i + n} of ${count}…`;
      bar.value = i / count;
      rows.push(...await run(chunks.subarray(i * CHUNK, (i + n) * CHUNK), n));
    }
    const inferenceMs = ms(t1);
    state.analysis = analysisOf(file.name, samples.length, rows, state.dims.map((d) => d.key));
    const timings = { decode_ms: decodeMs, inference_ms: inferenceMs, windows: count, batch,
      ms_per_window: inferenceMs / count };
    text.textContent = `${file.name}: ${state.analysis.duration_seconds.toFixed(1)} s, ${count} windows, scored on `
      + `this device in ${(inferenceMs / 1000).toFixed(2)} s (${timings.ms_per_window.toFixed(0)} ms per window)`;
    text.classList.add("done");
    publish(timings);
    render();
  } catch (err) {
    text.textContent = "";
    text.classList.remove("done");
    $(".take-error", card).textContent = `${file.name} could not be scored: ${err.message || err}`;
    show($(".take-error", card), true);
  } finally {
    show(bar, false);
    setBusy(card, false);
  }
}

// The result as `python -m runtime analyze --json` writes it: a download link and document.body.dataset.result.
function publish(timings) {
  const { doc, execution } = state;
  const model = { version: doc.version, sha256: doc.sha256, precision: doc.precision, device: "browser",
    self_check: state.selfCheck, demo: doc.demo, execution };
  const json = JSON.stringify({ model, results: [state.analysis] }, null, 2);
  const link = $("#download");
  if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([json], { type: "application/json" }));
  link.download = `${state.analysis.file.replace(/\.[^.]*$/, "")}.percepiano.json`;
  show($("#download-row"), true);
  document.body.dataset.timings = JSON.stringify(timings);
  document.body.dataset.result = json;
}

function setBusy(card, busy) {
  card.classList.toggle("busy", busy);
  for (const control of card.querySelectorAll("input, button")) control.disabled = busy;
}

// --- showing the result
function colourClass(v) { return v >= 0.7 ? "high" : v >= 0.5 ? "mid" : "low"; }

function render() {
  const a = state.analysis;
  show($("#results"), Boolean(a));
  show($("#timeline-card"), Boolean(a));
  if (!a) return;
  radar($("#radar"), state.dims, [{ id: "a", scores: a.scores }]);
  const tbody = $("#score-table tbody");
  tbody.replaceChildren();
  let family = null;
  state.dims.forEach((d, i) => {
    if (d.family !== family) {
      family = d.family;
      const head = tbody.insertRow();
      head.className = "family";
      Object.assign(head.insertCell(), { textContent: family, colSpan: 3 });
    }
    const row = tbody.insertRow();
    row.dataset.key = d.key;
    row.title = d.label;
    Object.assign(row.insertCell(), { textContent: String(i + 1), className: "idx" });
    Object.assign(row.insertCell(), { textContent: d.name, className: "name" });
    Object.assign(row.insertCell(), { textContent: a.scores[d.key].toFixed(3),
      className: `num score ${colourClass(a.scores[d.key])}` });
  });
  renderTimeline();
}

function fillPicker() {
  const picker = $("#dimension");
  let group = null;
  for (const d of state.dims) {
    if (!group || group.label !== d.family) {
      group = document.createElement("optgroup");
      group.label = d.family;
      picker.appendChild(group);
    }
    group.appendChild(new Option(d.name, d.key));
  }
}

function renderTimeline() {
  const key = $("#dimension").value, dim = state.dims.find((d) => d.key === key);
  if (dim && state.analysis) {
    timeline($("#timeline"), [timelineSeries("a", state.analysis, key)], `${dim.family}: ${dim.name}`);
  }
}

function setup() {
  acceptFiles($("#take-a"), analyze);
  $("#dimension").addEventListener("change", renderTimeline);
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(renderTimeline, 150);
  });
  start().catch((err) => {
    $("#model").textContent = "The model could not be started.";
    notice(`${err.message || err}`);
    document.body.dataset.ready = "false";
  });
}

setup();
