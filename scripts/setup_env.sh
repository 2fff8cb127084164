#!/usr/bin/env bash
# Shared set-up for scripts/test.sh and scripts/sara.sh: a .venv in the repository with PyTorch
# (a CPU build when none is importable), and this package in editable mode with the extras
# named in $1. Sourced, not run: leaves VPY pointing at the venv's python and ROOT at the
# repository; the caller's working directory is kept (user paths stay relative to it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
[ -x "$ROOT/.venv/bin/python" ] || "$PY" -m venv "$ROOT/.venv"
VPY="$ROOT/.venv/bin/python"
PIP=("$VPY" -m pip install -q --disable-pip-version-check)
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    "${PIP[@]}" "torch==2.13.0"
fi
"${PIP[@]}" -e "$ROOT[${1:-hf}]"
