#!/usr/bin/env bash
# The page tests' browser: Debian's chromium (Playwright drives it; it downloads no browser of its own).
# Called by scripts/test.sh under CI=true or when chromium is missing. Installs it with apt-get when it can;
# under CI a browser that cannot be had is an error (the page tests would fail anyway), elsewhere a warning.
set -euo pipefail
fail() {
    echo "ci_browser: $*" >&2
    if [ "${CI:-}" = true ]; then exit 1; fi
    echo "ci_browser: the page tests (tests/test_page.py) will be skipped" >&2
    exit 0
}
if ! command -v chromium >/dev/null; then
    [ "$(id -u)" = 0 ] || fail "chromium is missing and only root can apt-get install it"
    echo "ci_browser: installing chromium (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null \
        || fail "apt-get install chromium failed"
fi
python -c "import playwright" 2>/dev/null || python -m pip install --quiet "playwright>=1.40" \
    || fail "the playwright package is missing and pip could not install it"
echo "ci_browser: $(chromium --version 2>/dev/null || echo 'chromium (version unknown)') with playwright" >&2
