#!/usr/bin/env bash
# The project's test command: sets up everything on a fresh machine, then runs the suite.
#   bash scripts/test.sh [pytest args...]
# Without a GPU the Triton kernels run under the Triton interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1) and are compiled ahead of time for sm_80/sm_90.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh" test
cd "$ROOT"
exec "$VPY" -m pytest "$@"
