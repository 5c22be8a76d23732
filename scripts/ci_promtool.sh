#!/usr/bin/env bash
# promtool (Debian's `prometheus` package) for the alert rules' tests (tests/test_alerts.py: `promtool check rules`
# and `promtool test rules` over deploy/alerts.yml). Called by scripts/test.sh under CI=true or when promtool is
# missing. Installs it with apt-get when it can; under CI a promtool that cannot be had is an error (the alert tests
# would fail anyway), elsewhere a warning (they skip, saying why).
set -euo pipefail
fail() {
    echo "ci_promtool: $*" >&2
    if [ "${CI:-}" = true ]; then exit 1; fi
    echo "ci_promtool: the alert rule tests (tests/test_alerts.py) will be skipped" >&2
    exit 0
}
if ! command -v promtool >/dev/null; then
    [ "$(id -u)" = 0 ] || fail "promtool missing, and only root can apt-get install prometheus"
    echo "ci_promtool: installing prometheus (apt-get, for promtool)" >&2
    export DEBIAN_FRONTEND=noninteractive
    # --no-install-recommends: promtool only, not the server's web assets and exporters
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
        || fail "apt-get install prometheus failed"
fi
echo "ci_promtool: $(promtool --version 2>&1 | head -1)" >&2
