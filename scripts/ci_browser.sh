#!/usr/bin/env bash
# The page tests' browsers: Debian's chromium (driven by Playwright, which downloads no browser of its own) and
# firefox-esr (driven over Marionette). Called by scripts/test.sh under CI=true or when chromium is missing.
# Installs what is missing with apt-get when it can; under CI a browser that cannot be had is an error (the page
# tests would fail anyway), elsewhere a warning (they skip, saying why).
set -euo pipefail
fail() {
    echo "ci_browser: $*" >&2
    if [ "${CI:-}" = true ]; then exit 1; fi
    echo "ci_browser: the page tests (tests/test_page*.py) will be skipped" >&2
    exit 0
}
missing=()
command -v chromium >/dev/null || missing+=(chromium fonts-liberation)
command -v firefox-esr >/dev/null || command -v firefox >/dev/null || missing+=(firefox-esr)
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || fail "${missing[*]} missing, and only root can apt-get install them"
    echo "ci_browser: installing ${missing[*]} (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; } \
        || fail "apt-get install ${missing[*]} failed"
fi
python -c "import playwright" 2>/dev/null || python -m pip install --quiet "playwright>=1.40" \
    || fail "the playwright package is missing and pip could not install it"
echo "ci_browser: $(chromium --version 2>/dev/null | head -1); $(firefox-esr --version 2>/dev/null || firefox --version 2>/dev/null || echo 'no firefox')" >&2
