# Sourced by test.sh: make (once, cached) the small venv of tests/test_devices.py: onnxruntime-gpu at the runtime's
# declared onnxruntime floor, WITHOUT its [cuda,cudnn] extras, plus the runtime's decoders. On a machine without
# CUDA that wheel lists CUDA as available but cannot start it: the case where a GPU request could quietly end on
# the CPU. The same venv checks that the floor runs the exported model. The tests put this checkout on PYTHONPATH,
# so the project itself is not installed there (a cached venv shared by checkouts would hold a stale copy).
ORT_FLOOR=$(python -c 'import tomllib; extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["runtime"]; print(next(d for d in extra if d.startswith("onnxruntime>=")).split(">=")[1])')
export PERCEPIANO_GPU_CHECK_VENV=${PERCEPIANO_GPU_CHECK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/percepiano/venv-ort-gpu-$ORT_FLOOR}
if [ ! -f "$PERCEPIANO_GPU_CHECK_VENV/.complete" ]; then
    echo "creating $PERCEPIANO_GPU_CHECK_VENV (onnxruntime-gpu==$ORT_FLOOR without CUDA libraries, for tests/test_devices.py)"
    rm -rf "$PERCEPIANO_GPU_CHECK_VENV"
    python -m venv "$PERCEPIANO_GPU_CHECK_VENV"
    "$PERCEPIANO_GPU_CHECK_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "onnxruntime-gpu==$ORT_FLOOR" numpy soundfile soxr av
    touch "$PERCEPIANO_GPU_CHECK_VENV/.complete"
fi
