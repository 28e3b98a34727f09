#!/usr/bin/env bash
# Install llmscape and its pinned stack into the current Python (>= 3.11; activate a venv first if
# you want one). Idempotent: a stamp keyed on the pins skips the work when nothing changed.
#  - torch 2.13.0 goes first: on CPU machines its CPU wheel must be the one pip keeps (elsewhere pass
#    TORCH_INDEX=https://download.pytorch.org/whl/cpu to avoid several GB of CUDA wheels);
#  - numpy stays < 2 while dadapy needs it (pinned in pyproject.toml and constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp="resources/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)-$($PY -c 'import sys; print(sys.prefix)' | sha256sum | cut -c1-8)"
if [ -e "$stamp" ] && $PY -c "import llmscape, dadapy, snakemake" 2>/dev/null; then
  exit 0
fi
echo "[setup] installing llmscape and its pinned dependencies into $($PY -c 'import sys; print(sys.prefix)')"
$PY -m pip install -q --disable-pip-version-check ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch==2.13.0
$PY -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,deepspeed,bench]"
mkdir -p resources && touch "$stamp"
echo "[setup] done"
