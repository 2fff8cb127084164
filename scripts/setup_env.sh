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
# Reinstall only when the extras or pyproject.toml changed since the last set-up.
STAMP="$ROOT/.venv/.sara-setup-${1:-hf}"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    "${PIP[@]}" -e "$ROOT[${1:-hf}]"
    echo "$WANT" >"$STAMP"
fi
