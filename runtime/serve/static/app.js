// The page: connect to the service (asking for a token if it wants one), send recordings to /v1/analyze,
// and show the 19 scores of up to two takes. Names come from /v1/model; nothing is stored beyond memory.
import { describeDimensions, radar, timeline, timelineSeries } from "./charts.js";
import { acceptFiles } from "./take.js";

const ERROR_HINTS = {
  unsupported_audio: "This file could not be read as audio.",
  unsupported_media_type: "This kind of upload is not accepted.",
  invalid_audio: "This audio cannot be scored.",
  invalid_input: "This input cannot be scored.",
  missing_field: "No audio was sent.",
  audio_too_long: "The recording is too long.",
  too_large: "The file is too large.",
  busy: "The server is busy.",
  not_ready: "The model is still loading.",
  model_failed: "The model failed to load on the server.",
  unauthorized: "The access token was refused.",
  internal_error: "The server failed while analysing this file.",
};
const RECORD_TYPES = [["audio/webm;codecs=opus", "webm"], ["audio/ogg;codecs=opus", "ogg"], ["audio/webm", "webm"],
  ["audio/ogg", "ogg"], ["audio/mp4", "m4a"]];

const state = { token: null, model: null, dims: [], results: { a: null, b: null } };
const $ = (sel, root = document) => root.querySelector(sel);

function show(node, visible) { node.hidden = !visible; }

function headers() { return state.token ? { Authorization: `Bearer ${state.token}` } : {}; }

// A readable sentence for an API error body (or a transport failure).
function describeError(status, body, retryAfter) {
  if (!body || body.status !== "error") {
    return status === 0 ? "Could not reach the server. Check the connection and try again."
      : `The server answered with HTTP ${status} and no explanation.`;
  }
  const hint = ERROR_HINTS[body.error_type] || "The request failed.";
  const retry = retryAfter ? ` Try again in ${retryAfter} s.` : "";
  return `${hint} ${body.error}${/[.!?]$/.test(body.error) ? "" : "."}${retry}`;
}

function parseJSON(textBody) {
  try { return JSON.parse(textBody); } catch { return null; }
}

// --- connecting
async function connect() {
  let res, body;
  try {
    res = await fetch("v1/model", { headers: headers(), cache: "no-store" });
    body = parseJSON(await res.text());
  } catch {
    return notice("Could not reach the server; retrying…", 5);
  }
  if (res.status === 401) return askToken(state.token !== null);
  if (res.status === 503) {
    const wait = body && body.error_type === "model_failed" ? 30 : Number(res.headers.get("Retry-After")) || 2;
    return notice(`${describeError(503, body)} Retrying in ${wait} s…`, wait);
  }
  if (!res.ok || !body || !Array.isArray(body.dimensions)) {
    return notice(describeError(res.status, body) + " Retrying…", 5);
  }
  show($("#notice"), false);
  show($("#token-form"), false);
  setModel(body);
}

function notice(message, retrySeconds) {
  const box = $("#notice");
  box.textContent = message;
  show(box, true);
  if (retrySeconds) setTimeout(connect, retrySeconds * 1000);
}

function askToken(refused) {
  state.token = null;
  show($("#app"), false);
  show($("#token-form"), true);
  const err = $("#token-error");
  err.textContent = refused ? "That token was refused; check it and try again." : "";
  show(err, refused);
  $("#model").textContent = "Waiting for an access token.";
  $("#token").focus();
}

function setModel(model) {
  state.model = model;
  state.dims = describeDimensions(model.dimensions);
  const where = Array.isArray(model.providers) && model.providers.length ? ` (${model.providers[0]})` : "";
  $("#model").textContent = `Model ${model.version} · ${model.precision} · ${model.device}${where}`;
  const src = model.source && typeof model.source === "object" ? model.source : {};
  show($("#demo-banner"), model.demo === true || src.demo === true);
  const limits = model.limits || {}, bounds = [];
  if (limits.max_bytes) bounds.push(`${(limits.max_bytes / 1e6).toFixed(0)} MB`);
  if (limits.refuse_over_seconds) bounds.push(`${Math.round(limits.refuse_over_seconds / 6) / 10} minutes of audio`);
  const upTo = bounds.length ? `, up to ${bounds.join(" and ")}` : "";
  $("#limits").textContent = `wav, flac, ogg, mp3, m4a or webm${upTo}.`;
  fillPicker();
  show($("#app"), true);
  render();
}

// --- analysing
function analyze(slot, blob, name) {
  const card = $(`#take-${slot}`), bar = $(".progress", card), status = $(".status-text", card);
  const errorBox = $(".take-error", card);
  const max = state.model && state.model.limits && state.model.limits.max_bytes;
  show(errorBox, false);
  if (max && blob.size > max) {
    return fail(card, `The file is too large: ${(blob.size / 1e6).toFixed(1)} MB, over the limit of `
      + `${(max / 1e6).toFixed(0)} MB.`);
  }
  setBusy(card, true);
  bar.value = 0;
  show(bar, true);
  status.textContent = `Uploading ${name}…`;
  const form = new FormData();
  form.append("audio", blob, name);
  const xhr = new XMLHttpRequest();
  let ticker = null;
  xhr.upload.onprogress = (e) => {
    if (!e.lengthComputable) return;
    bar.value = e.loaded / e.total;
    status.textContent = `Uploading ${name}: ${Math.round((100 * e.loaded) / e.total)} %`;
  };
  xhr.upload.onload = () => {
    bar.removeAttribute("value");  // indeterminate while the server works
    const t0 = performance.now();
    const tick = () => {
      status.textContent = `Analysing ${name}… ${((performance.now() - t0) / 1000).toFixed(0)} s`;
    };
    tick();
    ticker = setInterval(tick, 500);
  };
  const done = () => { clearInterval(ticker); show(bar, false); setBusy(card, false); };
  xhr.onload = () => {
    done();
    const body = parseJSON(xhr.responseText);
    if (xhr.status === 200 && body && body.status === "success") {
      state.results[slot] = { name, body };
      status.textContent = `${name}: ${body.duration_seconds.toFixed(1)} s, ${body.timeline.length} windows, `
        + `analysed in ${body.processing_seconds.toFixed(2)} s`;
      status.classList.add("done");
      if (slot === "b") show($(".clear", card), true);
      return render();
    }
    if (xhr.status === 401) askToken(true);
    fail(card, describeError(xhr.status, body, xhr.getResponseHeader("Retry-After")));
  };
  xhr.onerror = () => { done(); fail(card, describeError(0, null)); };
  xhr.open("POST", "v1/analyze");
  for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
  xhr.send(form);
}

function fail(card, message) {
  const box = $(".take-error", card), status = $(".status-text", card);
  status.textContent = "";
  status.classList.remove("done");
  box.textContent = message;
  show(box, true);
}

function setBusy(card, busy) {
  card.classList.toggle("busy", busy);
  for (const control of card.querySelectorAll("input, button")) control.disabled = busy;
}

// --- showing results
function colourClass(v) { return v >= 0.7 ? "high" : v >= 0.5 ? "mid" : "low"; }

function series() {
  return ["a", "b"].filter((s) => state.results[s]).map((s) => ({ id: s, body: state.results[s].body }));
}

function render() {
  const all = series();
  show($("#results"), all.length > 0);
  show($("#timeline-card"), all.length > 0);
  if (!all.length) return;
  radar($("#radar"), state.dims, all.map((s) => ({ id: s.id, scores: s.body.scores })));
  renderTable();
  renderTimeline();
}

function cell(row, content, classes) {
  const td = row.insertCell();
  td.textContent = content;
  if (classes) td.className = classes;
  return td;
}

function renderTable() {
  const a = state.results.a && state.results.a.body.scores, b = state.results.b && state.results.b.body.scores;
  const table = $("#score-table"), tbody = $("tbody", table);
  table.classList.toggle("has-b", Boolean(b));
  tbody.replaceChildren();
  let family = null;
  state.dims.forEach((d, i) => {
    if (d.family !== family) {
      family = d.family;
      const head = tbody.insertRow();
      head.className = "family";
      cell(head, family).colSpan = 5;
    }
    const row = tbody.insertRow();
    row.dataset.key = d.key;
    row.title = d.label;
    cell(row, String(i + 1), "idx");
    cell(row, d.name, "name");
    for (const [slot, scores] of [["a", a], ["b", b]]) {
      const td = cell(row, scores ? scores[d.key].toFixed(3) : "–",
        `num score ${slot === "b" ? "col-b " : ""}${scores ? colourClass(scores[d.key]) : ""}`);
      td.dataset.slot = slot;
    }
    const delta = a && b ? Math.round(1000 * (b[d.key] - a[d.key])) : null;  // in thousandths: no "-0.000"
    const sign = delta > 0 ? "+" : delta < 0 ? "−" : "";
    cell(row, delta === null ? "–" : `${sign}${(Math.abs(delta) / 1000).toFixed(3)}`, "num delta col-b");
  });
}

function fillPicker() {
  const picker = $("#dimension"), keep = picker.value;
  picker.replaceChildren();
  let group = null;
  for (const d of state.dims) {
    if (!group || group.label !== d.family) {
      group = document.createElement("optgroup");
      group.label = d.family;
      picker.appendChild(group);
    }
    group.appendChild(new Option(d.name, d.key));
  }
  if (keep && state.dims.some((d) => d.key === keep)) picker.value = keep;
}

function renderTimeline() {
  const key = $("#dimension").value, dim = state.dims.find((d) => d.key === key);
  if (!dim) return;
  timeline($("#timeline"), series().map((s) => timelineSeries(s.id, s.body, key)), `${dim.family}: ${dim.name}`);
}

// --- input: drop, pick, record
function setupTake(card) {
  const slot = card.dataset.slot;
  acceptFiles(card, (file) => analyze(slot, file, file.name));
  const clear = $(".clear", card);
  if (clear) {
    clear.addEventListener("click", () => {
      state.results[slot] = null;
      $(".status-text", card).textContent = "";
      show(clear, false);
      render();
    });
  }
  setupRecorder(card, slot);
}

function setupRecorder(card, slot) {
  const button = $(".record", card);
  if (!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia && window.MediaRecorder)) {
    show(button, false);
    const note = $("#mic-note");
    note.textContent = "Recording from the microphone needs a secure page (https or localhost) and a browser "
      + "with MediaRecorder; you can still upload a file.";
    show(note, true);
    return;
  }
  let recorder = null, timer = null;
  button.addEventListener("click", async () => {
    if (recorder) { recorder.stop(); return; }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (err) {
      return fail(card, `The microphone is not available: ${err.message || err.name}.`);
    }
    const [type, ext] = RECORD_TYPES.find(([t]) => MediaRecorder.isTypeSupported(t)) || ["", "webm"];
    recorder = new MediaRecorder(stream, type ? { mimeType: type } : {});
    const chunks = [], t0 = Date.now();
    recorder.ondataavailable = (e) => { if (e.data.size) chunks.push(e.data); };
    recorder.onstop = () => {
      clearInterval(timer);
      stream.getTracks().forEach((t) => t.stop());
      const blob = new Blob(chunks, { type: recorder.mimeType || type });
      recorder = null;
      button.textContent = "Record";
      button.classList.remove("recording");
      analyze(slot, blob, `recording-${slot.toUpperCase()}.${ext}`);
    };
    recorder.start(1000);
    button.classList.add("recording");
    const tick = () => { button.textContent = `Stop (${Math.floor((Date.now() - t0) / 1000)} s)`; };
    tick();
    timer = setInterval(tick, 500);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  for (const card of document.querySelectorAll(".take")) setupTake(card);
  $("#dimension").addEventListener("change", renderTimeline);
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => { if (series().length) renderTimeline(); }, 150);
  });
  $("#token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("#token").value.trim();
    $("#token").value = "";
    connect();
  });
  connect();
});
