#!/usr/bin/env bash
# Install llmscape and its pinned stack for the Python in $PY (make passes it; default python3, >= 3.11).
# Idempotent: a stamp keyed on the pins and the interpreter skips the work when nothing changed.
#  - inside a virtual environment, or with a Python that lets pip install: into that Python;
#  - an externally managed Python (PEP 668, e.g. Debian's /usr/bin/python3): into a project-local
#    .venv made from it (the Makefile then runs everything with .venv/bin/python);
#  - torch 2.13.0 goes first: on CPU machines its CPU wheel must be the one pip keeps (elsewhere pass
#    TORCH_INDEX=https://download.pytorch.org/whl/cpu to avoid several GB of CUDA wheels);
#  - numpy stays < 2 while dadapy needs it (pinned in pyproject.toml and constraints.txt);
#  - offline: LLMSCAPE_WHEELHOUSE=<folder of wheels> installs from that folder only (pip download the
#    pins into it on a machine with registry access: pip download -d <folder> -c constraints.txt torch==2.13.0
#    setuptools wheel .).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-${PYTHON:-python3}}
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "[setup] no Python named '$PY'. Fix: PY=python3.11 make run (any Python >= 3.11)" >&2
  exit 2
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "[setup] $PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); llmscape needs >= 3.11 (snakemake 9). Fix: PY=python3.11 make run" >&2
  exit 2
fi
in_venv=$("$PY" -c 'import sys; print(int(sys.prefix != sys.base_prefix))')
managed=$("$PY" -c 'import sysconfig, os; print(int(os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))')
if [ "$in_venv" = 0 ] && [ "$managed" = 1 ]; then
  if [ ! -x .venv/bin/python ]; then
    echo "[setup] $PY is externally managed (PEP 668): making a project-local virtual environment .venv"
    "$PY" -m venv .venv || { echo "[setup] could not make .venv. Fix: apt-get install python3-venv (Debian), or activate a virtualenv first" >&2; exit 2; }
  fi
  PY=.venv/bin/python
fi
stamp="resources/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)-$("$PY" -c 'import sys; print(sys.prefix)' | sha256sum | cut -c1-8)"
if [ -e "$stamp" ] && "$PY" -c "import llmscape, dadapy, snakemake" 2>/dev/null; then
  exit 0
fi
if ! "$PY" -c "import dadapy" 2>/dev/null && ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
  echo "[setup] dadapy builds from source and needs a C compiler, and none was found. Fix: apt-get install build-essential (Debian/Ubuntu), dnf install gcc (Fedora), or module load gcc on a cluster" >&2
  exit 2
fi
pip_args=(-q --disable-pip-version-check)
if [ -n "${LLMSCAPE_WHEELHOUSE:-}" ]; then
  pip_args+=(--no-index --find-links "$LLMSCAPE_WHEELHOUSE")
  echo "[setup] offline: installing from the wheelhouse $LLMSCAPE_WHEELHOUSE only"
fi
echo "[setup] installing llmscape and its pinned dependencies into $("$PY" -c 'import sys; print(sys.prefix)')"
"$PY" -m pip install "${pip_args[@]}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch==2.13.0
"$PY" -m pip install "${pip_args[@]}" -c constraints.txt -e ".[all,dev,deepspeed,bench]"
mkdir -p resources && touch "$stamp"
echo "[setup] done"
