#!/usr/bin/env bash
# Create .venv and install aigc (CPU torch) with its test tools. Idempotent: re-runs are quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: with 2.13.0 in place nothing asks pip for a multi-GB CUDA build.
# Elsewhere, PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu gives the CPU wheel.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
if .venv/bin/python -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
    echo "setup: CUDA packages (nvidia-*) were pulled into .venv on a CPU host; see README" >&2
    exit 1
fi
