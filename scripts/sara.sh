#!/usr/bin/env bash
# The main job on a fresh machine: sets up .venv, then runs `python -m sara_kernels ARGS`.
#   bash scripts/sara.sh demo            # tiny Qwen3-MoE, baseline vs SARA, table + PNG + JSON
#   bash scripts/sara.sh analyze --model PATH --data pairs.jsonl
#   bash scripts/sara.sh bench --arch qwen3-30b-a3b --layers 2 --tokens 256 --out bench_out
set -euo pipefail
source "$(dirname "$0")/setup_env.sh" hf
exec "$VPY" -m sara_kernels "$@"
