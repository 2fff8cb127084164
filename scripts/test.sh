#!/usr/bin/env bash
# The project's test command: sets up everything on a fresh machine, then runs the suite.
#   bash scripts/test.sh [pytest args...]
# Creates .venv (if missing), installs a CPU PyTorch when none is importable, the package in
# editable mode with its test extras, then runs pytest. Without a GPU the Triton kernels run
# under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    "$VPY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
"$VPY" -m pip install -q --disable-pip-version-check -e ".[test]"
exec "$VPY" -m pytest "$@"
