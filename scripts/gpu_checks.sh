#!/usr/bin/env bash
# Every check that needs an NVIDIA GPU, in one run (about 4-8 minutes on one H100 with production-size models):
#   1. nvidia-smi: the GPU and its driver against the declared floor (runtime/cuda.py: CUDA 13, driver 580.65.06+)
#   2. onnxruntime-gpu with its CUDA provider; `runtime info --device cuda --json`: the options a session gets
#   3. python -m benchmarks.gpu_check: session, self-checks fp32/fp16, fp16 vs fp32, IO binding, CUDA graphs,
#      latency at batch 1/15/32, cold start of a fresh process
#   4. python -m benchmarks.gpu_precision: fp32 with TF32 off (within 1e-5 of the CPU) and on (reported, within
#      its own tolerance), the waveform-in model against its CPU run, latency at batch 1/15/32
#   5. runtime serve --device cuda on 127.0.0.1: time to ready (cold start), then python -m deploy smoke
#   6. python -m benchmarks.cpu_cost: process CPU ms per 30 s request (decode + resample (+ features))
# Results in OUT (default gpu-checks/): one JSON per step and summary.json; the closing table on stdout.
#
#   bash scripts/gpu_checks.sh [OUT]          MODELS=DIR (default artifacts): model.fp32.onnx (or an fp32
#                                             model.onnx), model.fp16.onnx, model-audio.fp16.onnx (optional)
#   EXPORT=demo bash scripts/gpu_checks.sh    first export the production-size demo models into MODELS (needs
#                                             the convert extra; adds several minutes)
# Exit codes: 0 every step passed, 1 a step failed, 3 no NVIDIA GPU here, 4 onnxruntime has no CUDA provider,
# 5 a model file is missing. Nothing is installed: run it in an environment with the gpu, serve and convert
# extras (the convert extra only for the CPU references and the shipped clips' features).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
OUT=${1:-gpu-checks}
MODELS=${MODELS:-artifacts}
PORT=${PORT:-8765}
mkdir -p "$OUT"
say() { printf '%s\n' "$*" >&2; }

# 1. a GPU at all
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >"$OUT/nvidia-smi.txt" 2>&1 \
        || ! grep -q "^GPU" "$OUT/nvidia-smi.txt"; then
    say "no NVIDIA GPU here: nvidia-smi is missing or lists no GPU ($(head -c 200 "$OUT/nvidia-smi.txt" 2>/dev/null))."
    say "Run scripts/gpu_checks.sh on a machine with an NVIDIA GPU and driver; nothing was checked (exit 3)."
    exit 3
fi
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | tr -d ' ')
FLOOR=$("$PY" -c 'from runtime.cuda import DRIVER_FLOOR; print(DRIVER_FLOOR)')
say "GPU: $(head -1 "$OUT/nvidia-smi.txt"); driver $DRIVER (floor $FLOOR)"
DRIVER_OK=$("$PY" -c "import sys; v=lambda s: tuple(int(p) for p in s.split('.')); print(v('$DRIVER') >= v('$FLOOR'))")

# 2. onnxruntime's CUDA provider
if ! "$PY" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' \
        2>"$OUT/onnxruntime.txt"; then
    say "onnxruntime here has no CUDAExecutionProvider ($("$PY" -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())' 2>&1 | tail -1)):"
    say "install the gpu extra (pip install -r deploy/requirements-gpu.txt '.[gpu,serve,convert]') and run again (exit 4)."
    exit 4
fi

# the models
if [ "${EXPORT:-}" = demo ]; then
    say "exporting the production-size demo models into $MODELS (several minutes)"
    timeout 900 "$PY" -m convert -q export --out "$MODELS/model.onnx" --quantize auto || exit 1
    timeout 900 "$PY" -m convert -q export --out "$MODELS/model-audio.fp16.onnx" --input audio --quantize fp16 || exit 1
fi
FP32=$MODELS/model.fp32.onnx
[ -f "$FP32" ] || FP32=$MODELS/model.onnx
FP16=$MODELS/model.fp16.onnx
AUDIO=$MODELS/model-audio.fp16.onnx
for f in "$FP32" "$FP16"; do
    [ -f "$f" ] || { say "model file not found: $f (export with python -m convert export --quantize auto, set MODELS, or EXPORT=demo) (exit 5)"; exit 5; }
done
[ -f "$AUDIO" ] || { say "no waveform-in model at $AUDIO: its checks are skipped"; AUDIO=; }

declare -A RC
step() {  # step NAME TIMEOUT_S COMMAND...: run, keep its exit code, never stop the script
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    say "== $name"
    timeout "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
    RC[$name]=$?
    say "   exit ${RC[$name]} in $((SECONDS - t0)) s"
}

step info 60 "$PY" -m runtime info "$FP32" --device cuda --json
step gpu_check 240 "$PY" -m benchmarks.gpu_check --model "$FP32" --fp16 "$FP16" --runs 5 --out "$OUT/gpu_check.json"
step gpu_precision 180 "$PY" -m benchmarks.gpu_precision --fp32 "$FP32" ${AUDIO:+--audio "$AUDIO"} --runs 5 \
    --out "$OUT/gpu_precision.json"

# 5. the service on CUDA: cold start to ready, then the smoke check against it
say "== serve_smoke"
T0=$("$PY" -c 'import time; print(time.time())')
"$PY" -m runtime serve --model "$FP32" --device cuda --host 127.0.0.1 --port "$PORT" >"$OUT/serve.log" 2>&1 &
SERVE_PID=$!
READY=none
for _ in $(seq 1 300); do  # at most ~150 s; stops at once if the server exits (CUDA did not start, ...)
    kill -0 "$SERVE_PID" 2>/dev/null || break
    if READY=$("$PY" -c "import sys, time, urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/readyz', timeout=2); print(round(time.time() - $T0, 2))" 2>/dev/null); then
        break
    fi
    READY=none
    sleep 0.5
done
if [ "$READY" != none ]; then
    step smoke 180 "$PY" -m deploy smoke "http://127.0.0.1:$PORT" --model "$FP32" --repeat 3 --json
else
    RC[smoke]=1
    say "   runtime serve --device cuda did not become ready: see $OUT/serve.log"
fi
kill "$SERVE_PID" 2>/dev/null
wait "$SERVE_PID" 2>/dev/null

step cpu_cost 120 "$PY" -m benchmarks.cpu_cost --repeats 3 --out "$OUT/cpu_cost.json"

# the closing summary: every figure in one JSON, and one line per step
"$PY" - "$OUT" "$DRIVER" "$FLOOR" "$DRIVER_OK" "$READY" \
    "info=${RC[info]}" "gpu_check=${RC[gpu_check]}" "gpu_precision=${RC[gpu_precision]}" \
    "smoke=${RC[smoke]}" "cpu_cost=${RC[cpu_cost]}" <<'EOF'
import json, sys
from pathlib import Path
out, driver, floor, driver_ok, ready, *codes = sys.argv[1:]
rcs = {k: int(v) for k, v in (c.split("=") for c in codes)}
def read(name):
    for p in (Path(out) / f"{name}.json", Path(out) / f"{name}.out"):
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            continue
    return None
doc = {"driver": driver, "driver_floor": floor, "driver_ok": driver_ok == "True",
       "serve_ready_s": None if ready == "none" else float(ready), "exit_codes": rcs,
       "provider_options": (read("info") or {}).get("runtime", {}).get("provider_options"),
       **{name: read(name) for name in ("gpu_check", "gpu_precision", "smoke", "cpu_cost")}}
doc["passed"] = all(v == 0 for v in rcs.values()) and doc["driver_ok"]
(Path(out) / "summary.json").write_text(json.dumps(doc, indent=2))
for name, rc in rcs.items():
    print(f"{'passed' if rc == 0 else 'FAILED':7s} {name} (exit {rc})")
print(f"driver {driver} (floor {floor}): {'ok' if doc['driver_ok'] else 'BELOW THE FLOOR'}; "
      f"runtime serve --device cuda ready in {ready} s")
print(f"all figures: {out}/summary.json -> {'PASSED' if doc['passed'] else 'FAILED'}")
sys.exit(0 if doc["passed"] else 1)
EOF
