#!/usr/bin/env bash
# Shared set-up for scripts/test.sh and scripts/sara.sh: a .venv in the repository with PyTorch
# (a CPU build from PyTorch's CPU wheel index when none is importable; PyPI's, a CUDA build, if that
# index is unreachable), and this package in editable mode with the extras
# named in $1. Sourced, not run: leaves VPY pointing at the venv's python and ROOT at the
# repository; the caller's working directory is kept (user paths stay relative to it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
[ -x "$ROOT/.venv/bin/python" ] || "$PY" -m venv "$ROOT/.venv"
VPY="$ROOT/.venv/bin/python"
PIP=("$VPY" -m pip install -q --disable-pip-version-check)
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    # PyTorch's own CPU wheels: PyPI's Linux torch is the CUDA build, with about 3 GB of nvidia-* libraries.
    if ! "${PIP[@]}" --retries 1 --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"; then
        echo "setup_env.sh: PyTorch's CPU wheel index is not reachable; installing torch from PyPI instead" \
             "(on Linux its CUDA build, about 3 GB; the tests run on the CPU all the same)" >&2
        "${PIP[@]}" "torch==2.13.0"
    fi
fi
# Reinstall only when the extras or pyproject.toml changed since the last set-up.
STAMP="$ROOT/.venv/.sara-setup-${1:-hf}"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    "${PIP[@]}" -e "$ROOT[${1:-hf}]"
    echo "$WANT" >"$STAMP"
fi
