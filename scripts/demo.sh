#!/usr/bin/env bash
# The main job on a built-in default: export a demo checkpoint (original pickle format, production
# size) to a parity-checked ONNX model, then score the shipped piano clips with the lean runtime.
EXTRAS=convert,runtime
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
python -m convert export --out artifacts/model.onnx "$@"
python -m runtime info artifacts/model.onnx
python -m runtime analyze convert/clips/*.flac --model artifacts/model.onnx
