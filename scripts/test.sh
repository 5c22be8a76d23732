#!/usr/bin/env bash
# The test suite: installs the dev extras into .venv, makes (once) the cached onnxruntime-gpu check venv and the
# tf2onnx backend's venv, lints, and runs pytest. Under CI=true a skipped test fails (tests/conftest.py).
#   bash scripts/test.sh            everything (what CI runs)
#   bash scripts/test.sh --quick    the quick tier: no browser, Node.js, legacy converter, production-size, GPU-wheel
#                                   or slow tests, and none of their setup (docs/testing.md)
# Further arguments go to pytest.
QUICK=
if [ "${1:-}" = --quick ]; then QUICK=1; shift; fi
EXTRAS=dev
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ruff check .
if [ -n "$QUICK" ]; then
    exec python -m pytest -q -m "not (slow or browser or node or legacy or production or gpu or network)" "$@"
fi
if [ "${CI:-}" = true ] || ! command -v chromium >/dev/null; then bash scripts/ci_browser.sh; fi  # page tests
# promtool (Debian's prometheus package) for the alert rules' tests (tests/test_alerts.py)
if [ "${CI:-}" = true ] || ! command -v promtool >/dev/null; then bash scripts/ci_promtool.sh; fi
source scripts/_check_venv.sh
# the pinned jax2tf -> TensorFlow -> tf2onnx venv of `export --backend tf2onnx` (tests/test_tf2onnx.py): made once
# (~1.9 GB, from convert/tf2onnx/requirements-tf2onnx.txt) under ~/.cache/percepiano, reused while that file is unchanged
python -m convert.tf2onnx.env >/dev/null || exit 1
# the Node.js client's onnxruntime-node (tests/test_node_client.py); its CUDA binaries are not needed
! command -v npm >/dev/null || [ -d clients/node/node_modules/onnxruntime-node ] ||
    npm ci --prefix clients/node --onnxruntime-node-install-cuda=skip
# the on-device page's onnxruntime-web (tests/test_on_device_page.py): served from clients/web/node_modules
! command -v npm >/dev/null || [ -d clients/web/node_modules/onnxruntime-web ] || npm ci --prefix clients/web
python -m pytest -q "$@"
