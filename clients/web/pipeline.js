// What the on-device page computes around the model, as plain functions (no DOM, no onnxruntime): the runtime's
// chunking (docs/spec.md §3, runtime/features.py), the mono mix, the mean-then-clip of the scores, the result in the shape
// of `python -m runtime analyze --json`, and the model's `percepiano` metadata read from the ONNX file's bytes.
// Node runs the same module in the tests (tests/test_web_client.py).

export const SAMPLE_RATE = 22050;
export const CHUNK = 3 * SAMPLE_RATE; // 66150 samples per model input
export const HOP = 2 * SAMPLE_RATE; // 44100: windows overlap by 1 s
export const MIN_SAMPLES = 2 * SAMPLE_RATE; // shorter audio is zero-padded to 2 s first
export const METADATA_KEY = "percepiano";

// Channels (Float32Array each, same length) -> one Float32Array: their mean, as librosa.to_mono.
export function mixToMono(channels) {
  if (!channels.length) throw new Error("the audio has no channels");
  if (channels.length === 1) return Float32Array.from(channels[0]);
  const out = new Float32Array(channels[0].length);
  for (let i = 0; i < out.length; i++) {
    let sum = 0;
    for (const ch of channels) sum += ch[i];
    out[i] = sum / channels.length;
  }
  return out;
}

// Start sample of each window: full windows at 0, hop, 2 hop... while they fit; then the remainder, if any.
export function chunkStarts(length) {
  const n = Math.max(length, MIN_SAMPLES), starts = [];
  let start = 0;
  for (; start + CHUNK <= n; start += HOP) starts.push(start);
  if (start < n) starts.push(start);
  return starts;
}

// Mono samples at 22,050 Hz -> {chunks: Float32Array(count * CHUNK), count}; the padding is zeros.
export function chunkAudio(samples) {
  const starts = chunkStarts(samples.length);
  const chunks = new Float32Array(starts.length * CHUNK);
  starts.forEach((s, i) => chunks.set(samples.subarray(s, Math.min(s + CHUNK, samples.length)), i * CHUNK));
  return { chunks, count: starts.length };
}

const clip01 = (v) => Math.min(1, Math.max(0, v));

function named(keys, values) {
  return Object.fromEntries(keys.map((k, i) => [k, values[i]]));
}

// One file's entry of `analyze --json`'s "results": per-window label-unit scores (arrays of 19) -> the mean over
// windows (float64, in window order) clipped to [0, 1], and the clipped per-window timeline at 2 s steps.
export function analysisOf(file, sampleCount, windowScores, keys) {
  const mean = keys.map((_, k) => windowScores.reduce((sum, row) => sum + row[k], 0) / windowScores.length);
  return {
    file,
    duration_seconds: Math.round((sampleCount / SAMPLE_RATE) * 1e6) / 1e6,
    scores: named(keys, mean.map(clip01)),
    timeline: windowScores.map((row, i) => ({
      start_seconds: (i * HOP) / SAMPLE_RATE, scores: named(keys, Array.from(row, clip01)),
    })),
    error: null,
  };
}

// --- the ONNX file's metadata_props, read from its top-level protobuf fields (as runtime/protowire.py does)
function varint(buf, pos) {
  let value = 0, scale = 1;
  for (;;) {
    if (pos >= buf.length || scale > 2 ** 63) throw new Error("not an ONNX file (bad varint)");
    const byte = buf[pos++];
    value += (byte & 0x7f) * scale;
    if (byte < 0x80) return [value, pos];
    scale *= 128;
  }
}

// Yields [field number, wire type, payload start, payload end] of each field in buf[start, stop).
function* fields(buf, start = 0, stop = buf.length) {
  let pos = start;
  while (pos < stop) {
    let key, len;
    [key, pos] = varint(buf, pos);
    const number = Math.floor(key / 8), kind = key % 8;
    if (kind === 0) { const s = pos; [, pos] = varint(buf, pos); yield [number, kind, s, pos]; continue; }
    if (kind === 1 || kind === 5) { const s = pos; pos += kind === 1 ? 8 : 4; yield [number, kind, s, pos]; continue; }
    if (kind !== 2) throw new Error(`not an ONNX file (wire type ${kind})`);
    [len, pos] = varint(buf, pos);
    if (pos + len > stop) throw new Error("not an ONNX file (truncated field)");
    yield [number, kind, pos, pos + len];
    pos += len;
  }
}

// {key: value} of ModelProto.metadata_props (field 14: StringStringEntryProto, 1 key, 2 value).
export function metadataProps(bytes) {
  const text = new TextDecoder("utf-8", { fatal: true }), props = {};
  for (const [number, kind, start, stop] of fields(bytes)) {
    if (number !== 14 || kind !== 2) continue;
    const entry = {};
    for (const [n, k, s, e] of fields(bytes, start, stop)) if (k === 2) entry[n] = text.decode(bytes.subarray(s, e));
    if (entry[1] !== undefined) props[entry[1]] = entry[2] ?? "";
  }
  return props;
}

// The model's `percepiano` document, refused unless it is a waveform-in PercePiano model.
export function modelInfo(bytes) {
  const raw = metadataProps(bytes)[METADATA_KEY];
  if (!raw) throw new Error("this file is not a PercePiano model (no 'percepiano' metadata)");
  const doc = JSON.parse(raw);
  if ((doc.io || {}).input !== "audio") {
    throw new Error("this model takes log-mel windows; the page needs the waveform-in export "
      + "(python -m convert export --input audio)");
  }
  const sha = (doc.source || {}).sha256 || "";
  return { ...doc, version: `percepiano-ast-${sha.slice(0, 12) || "unknown"}-${doc.precision}`, sha256: sha,
    demo: (doc.source || {}).demo === true };
}

// The self-check windows of the metadata: {inputs: Float32Array(n * CHUNK), count, scores, atol}.
export function selfCheckWindows(doc) {
  const check = doc.self_check;
  if (!check || !check.inputs) return null;
  const bytes = Uint8Array.from(atob(check.inputs.base64), (c) => c.charCodeAt(0));
  const inputs = new Float32Array(bytes.buffer, 0, bytes.length / 4);
  return { inputs, count: check.inputs.shape[0], scores: check.scores, atol: check.atol };
}
