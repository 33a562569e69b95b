#!/usr/bin/env bash
# The test command: install what is missing, start local services, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
# tests/test_flower.py renders the Flower dashboard in headless Chromium (Debian's package).
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq chromium >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
        || echo "test: could not install chromium; the dashboard test skips locally and fails in CI" >&2
fi
# Two test processes, a file each at a time (module fixtures stay in one process): most of the
# suite waits on worker processes, outages and leases, and the two overlap those waits. Each
# process is a run of its own (its Redis databases, PostgreSQL databases and temp folders).
# AIGC_TEST_PROCESSES=0 runs everything in this one process.
exec .venv/bin/python -m pytest -n "${AIGC_TEST_PROCESSES:-2}" --dist loadfile "$@"
