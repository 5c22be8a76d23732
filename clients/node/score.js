#!/usr/bin/env node
// Scores a recording with an audio-input PercePiano model (`python -m convert export --input audio`), whose graph
// computes the log-mel features itself. Input: raw little-endian float32 mono samples at 22,050 Hz (decode and
// resample with any library first). Output: one JSON document with the 19 scores and the per-chunk ones.
//
//   node score.js model.onnx samples.f32
'use strict';

const fs = require('fs');
const ort = require('onnxruntime-node');

const SAMPLE_RATE = 22050;
const CHUNK = 3 * SAMPLE_RATE; // 66150 samples per model input
const HOP = 2 * SAMPLE_RATE; // 44100: chunks overlap by 1 s
const MIN_SAMPLES = 2 * SAMPLE_RATE; // shorter audio is zero-padded to 2 s first
const BATCH = 16;

// The chunking the model was trained with (README, "Clients in other languages"): full chunks at 0, hop, 2 hop, ...
// while they fit; then the remainder, if any, zero-padded to a full chunk.
function chunkAudio(samples) {
  const n = Math.max(samples.length, MIN_SAMPLES);
  const starts = [];
  let start = 0;
  for (; start + CHUNK <= n; start += HOP) starts.push(start);
  if (start < n) starts.push(start);
  const chunks = new Float32Array(starts.length * CHUNK); // zeros: the padding
  starts.forEach((s, i) => chunks.set(samples.subarray(s, Math.min(s + CHUNK, samples.length)), i * CHUNK));
  return { chunks, count: starts.length };
}

function readSamples(path) {
  const bytes = fs.readFileSync(path);
  if (bytes.length === 0 || bytes.length % 4 !== 0) {
    throw new Error(`${path}: expected raw float32 samples, got ${bytes.length} bytes`);
  }
  const samples = new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length));
  if (!samples.every(Number.isFinite)) throw new Error(`${path}: the samples contain NaN or infinite values`);
  return samples;
}

async function score(modelPath, samplesPath) {
  const session = await ort.InferenceSession.create(modelPath, { executionProviders: ['cpu'] });
  if (session.inputNames.join() !== 'audio' || session.outputNames.join() !== 'scores') {
    throw new Error(`${modelPath}: not an audio-input model (inputs ${session.inputNames}, outputs ${session.outputNames})`);
  }
  const { chunks, count } = chunkAudio(readSamples(samplesPath));
  const chunkScores = [];
  for (let i = 0; i < count; i += BATCH) {
    const n = Math.min(BATCH, count - i);
    const input = new ort.Tensor('float32', chunks.subarray(i * CHUNK, (i + n) * CHUNK), [n, CHUNK]);
    const { scores } = await session.run({ audio: input });
    const dims = scores.dims[1];
    for (let j = 0; j < n; j++) chunkScores.push(Array.from(scores.data.subarray(j * dims, (j + 1) * dims)));
  }
  // Label-unit scores per chunk -> mean over chunks -> clipped to [0, 1].
  const mean = chunkScores[0].map((_, k) => chunkScores.reduce((sum, row) => sum + row[k], 0) / count);
  const clip = (v) => Math.min(1, Math.max(0, v));
  return { chunks: count, scores: mean.map(clip), chunk_scores: chunkScores.map((row) => row.map(clip)) };
}

if (require.main === module) {
  const [modelPath, samplesPath] = process.argv.slice(2);
  if (!modelPath || !samplesPath) {
    console.error('usage: node score.js MODEL.onnx SAMPLES.f32');
    process.exit(2);
  }
  score(modelPath, samplesPath).then(
    (result) => console.log(JSON.stringify(result)),
    (err) => {
      console.error(`error: ${err.message}`);
      process.exit(1);
    },
  );
}

module.exports = { chunkAudio, score };
