#!/usr/bin/env bash
# GPU CI in one call: install (building the CUDA extension for this GPU), GPU tests of both fused
# backends, kernel tests at real compile, selftest, quick benchmarks (bench_sara.py and the bench command).
#
#   bash scripts/gpu_ci.sh OUTDIR
#
# For a GPU machine without network whose Python already has torch, triton, transformers and
# pytest. The kernels are compiled for the device (TRITON_INTERPRET is unset). Every stage runs
# under `timeout`, bounded both by its own limit and by what is left of a total budget
# (GPU_CI_BUDGET_S, default 470 s, so the whole run stays under 8 minutes on an H100); a stage
# that fails or times out is recorded and the next one still runs. Everything lands in OUTDIR,
# at most one folder deep, and is also packed into OUTDIR/gpu_ci_results.tar.gz; the stage table
# is printed last and saved as OUTDIR/summary.txt. Exit status: 0 only if every stage passed.
set -uo pipefail  # no -e: a failing stage must not stop the others
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

OUT=${1:?usage: bash scripts/gpu_ci.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2  # resolved against the caller's directory, before the cd
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-$(command -v python || command -v python3)}
BUDGET_S=${GPU_CI_BUDGET_S:-470}
START=$(date +%s)
STAGES="$OUT/stages.tsv"
: >"$STAGES"

# Effective limit of a stage: its own limit, or what is left of the budget minus the time
# reserved for the stages after it (their minimal useful run), whichever is smaller.
stage_limit() {  # stage_limit LIMIT_S RESERVE_S
    local left=$((BUDGET_S - ($(date +%s) - START) - $2))
    echo $(($1 < left ? $1 : left))
}

# run_stage NAME LIMIT_S NOTE_CMD CMD...: CMD under timeout, output to OUTDIR/NAME.log and the
# terminal; NOTE_CMD (a shell snippet reading $LOG) extracts the one-line result for the table.
run_stage() {
    local name=$1 limit=$2 note_cmd=$3
    shift 3
    LOG="$OUT/$name.log"
    if ((limit < 10)); then
        printf '%s\tSKIPPED\t-\t0\tno time left in the %s s budget\n' "$name" "$BUDGET_S" >>"$STAGES"
        return
    fi
    echo "=== $name (limit ${limit} s): $*"
    local t0 rc status note
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$LOG"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=PASS ;;
        124 | 137) status=TIMEOUT ;;
        *) status=FAIL ;;
    esac
    note=$(eval "$note_cmd" 2>/dev/null | tr '\t\n' '  ' | cut -c1-110)
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(($(date +%s) - t0))" "$note" >>"$STAGES"
}

LAST_LINE_NOTE='tail -n 1 "$LOG"'

run_stage env 30 "$LAST_LINE_NOTE" bash -c "
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo 'nvidia-smi unavailable'
    '$PY' -c 'import sys, torch, triton; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"triton\", triton.__version__, \"cuda\", torch.version.cuda, \"device\", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
"

# Builds sara_kernels._C (csrc/) for the visible GPU's architecture; a failed build fails the stage.
run_stage install 240 "$LAST_LINE_NOTE" bash -c "
    '$PY' -m pip install --no-deps --no-build-isolation --disable-pip-version-check -e . || exit 1
    '$PY' -c 'import sara_kernels; from sara_kernels.ops import cuda; print(\"sara_kernels\", sara_kernels.__version__, \"CUDA extension:\", \"built\" if cuda.available() else cuda.LOAD_ERROR); exit(0 if cuda.available() else 1)'
"
if ! awk -F'\t' '$1 == "install" && $2 == "PASS" {ok = 1} END {exit !ok}' "$STAGES"; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # run the later stages from the source tree
    echo "install failed: using PYTHONPATH=$PYTHONPATH"
fi

run_stage selftest "$(stage_limit 90 300)" "$LAST_LINE_NOTE" \
    "$PY" -m sara_kernels selftest

# Both test stages are sharded over the machine's cores (scripts/sharded_pytest.sh): they are
# dominated by Triton JIT compiles, single-threaded per process (one process took 96 s for the
# 35 GPU tests on an H200, before the CUDA backend doubled them). Each shard's log lists every
# test as it finishes (-v), so a stage cut by its limit still says which ran and how.
SHARDS=$(( $(nproc) > 12 ? 12 : $(nproc) ))
run_stage gpu_tests "$(stage_limit 120 200)" 'tail -n 1 "$LOG"' \
    bash scripts/sharded_pytest.sh "$SHARDS" "$OUT/gpu_tests" tests -m gpu -rs --durations=5

# The normal suite's kernel files (those calling the Triton backend), now at real compile.
# Left out: test_gpu.py (the stage above), and the files that compile for fixed targets or run an
# emulation without a device, the same on every machine and run by the CPU suite:
# test_aot_compile.py, test_cuda_build.py (nvcc for CHECK_ARCHS), test_cuda_emulation.py; but
# test_cuda_build.py's check of the op's device and dtype errors runs here on the built extension.
# The files kept run the CUDA backend too (the built extension, on the GPU).
KERNEL_FILES=$(grep -l -E 'backend="triton"|routing_js|ops\.triton|triton_(host|kernels|ops)' tests/*/test_*.py | grep -v -x -E 'tests/(gpu/test_gpu|ops/test_(aot_compile|cuda_build|cuda_emulation))\.py' | tr '\n' ' ')
KERNEL_FILES="$KERNEL_FILES tests/ops/test_cuda_build.py::test_cuda_backend_rejects_another_devices_tensors_and_float64"
if [ -n "$KERNEL_FILES" ]; then
    run_stage kernel_tests "$(stage_limit 120 140)" 'tail -n 1 "$LOG"' \
        bash scripts/sharded_pytest.sh "$SHARDS" "$OUT/kernel_tests" $KERNEL_FILES -m "not gpu"
fi

LIMIT=$(stage_limit 175 40)
run_stage bench_sara "$LIMIT" 'f="$OUT/bench_sara/summary.md"; [ -f "$f" ] || { tail -n 1 "$LOG"; exit; }; echo "targets: $(grep -c ": MET:" "$f") met, $(grep -c ": NOT MET:" "$f") not met, $(grep -c "NOT MEASURED" "$f") not measured"' \
    "$PY" benchmarks/bench_sara.py --quick --out "$OUT/bench_sara" --time-budget $((LIMIT > 80 ? LIMIT - 45 : 35))

# The package's bench command at Qwen3-30B-A3B's routers (torch.compile is bench_sara's headline case's).
run_stage bench "$(stage_limit 90 5)" "$LAST_LINE_NOTE" \
    "$PY" -m sara_kernels bench --arch qwen3-30b-a3b --layers 4 --tokens 4096 --quick --no-compile --no-progress --out "$OUT/bench"

{
    if [ -f "$OUT/bench_sara/summary.md" ]; then
        echo "--- bench_sara targets (48 layers × 128 experts × ≥16k tokens per side, bf16) ---"
        grep -E '^- .*\]: (MET|NOT MET|NOT MEASURED)' "$OUT/bench_sara/summary.md" | head -n 20
    fi
    if [ -f "$OUT/bench_sara/results.json" ]; then
        # What backend="auto" would run per expert count (record it with choose_auto.py --write).
        echo "--- auto: triton vs cuda, fwd+bwd (benchmarks/choose_auto.py) ---"
        "$PY" benchmarks/choose_auto.py "$OUT/bench_sara/results.json" 2>&1 | grep -E "^  " | head -n 12
    fi
    if [ -f "$OUT/bench/bench.md" ]; then
        echo "--- SARA in a training step at Qwen3-30B-A3B's routers (python -m sara_kernels bench) ---"
        sed -n '/^Training step/,$p' "$OUT/bench/bench.md" | grep -v '^```$'
    fi
    echo "--- gpu_ci stages ($(($(date +%s) - START)) s of a ${BUDGET_S} s budget) ---"
    printf '%-15s %-8s %-4s %-6s %s\n' stage status rc secs result
    while IFS=$'\t' read -r name status rc secs note; do
        printf '%-15s %-8s %-4s %-6s %s\n' "$name" "$status" "$rc" "$secs" "$note"
    done <"$STAGES"
} >"$OUT/summary.txt"

TARBALL=$(mktemp /tmp/gpu_ci_results.XXXXXX)
tar -czf "$TARBALL" -C "$OUT" --exclude=gpu_ci_results.tar.gz . && chmod 644 "$TARBALL" && mv "$TARBALL" "$OUT/gpu_ci_results.tar.gz"
echo
cat "$OUT/summary.txt"
awk -F'\t' '$2 != "PASS" {failed = 1} END {exit failed}' "$STAGES"
