#!/usr/bin/env bash
# Refresh scripts/constraints.txt, the versions the image installs (pip -c), from this .venv:
# run after upgrading a dependency here and passing the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
{
    echo "# Versions the test suite passed with: pip freeze of .venv by scripts/lock.sh, less torch"
    echo "# (the image installs its CUDA build of the same version) and aigc itself. The image"
    echo "# installs with -c this file, so a rebuild gets the same libraries."
    .venv/bin/python -m pip freeze --exclude-editable 2>/dev/null | grep -v -i -E '^(torch|aigc)=='
} > scripts/constraints.txt
