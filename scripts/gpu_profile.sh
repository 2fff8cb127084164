#!/usr/bin/env bash
# Nsight Compute profile of the pooling kernels of both fused backends, for device time left after
# scripts/gpu_ci.sh (which must have installed the package and built the CUDA extension first).
#
#   bash scripts/gpu_profile.sh OUTDIR [LIMIT_S]
#
# First, for at most 60 s, benchmarks/tune_tiles.py --stages-only: the pooling kernels at the tile
# table's tile with each row loop (unpipelined; 3 stages with and without the 64-register cap),
# same run, at the two shapes below (OUTDIR/tiles/tiles.md).
#
# Why: bench_sara gives each pooling kernel's fraction of copy bandwidth; when that is below the
# target, ncu says why (DRAM throughput vs peak, achieved occupancy, registers, warp stall reasons:
# waiting on memory vs on instructions). One profiled fwd+bwd step per backend and shape, after
# two warm-up steps whose kernels are skipped. Clocks are left unlocked (--clock-control none), so
# throughputs are those of a real run. Shapes in order (the first is bench_sara's headline);
# each run is bounded, and the whole script stops starting new runs when LIMIT_S (default 150)
# is spent. Everything lands in OUTDIR: per backend and model the report ncu_<backend>_<model>.ncu-rep
# (open it in Nsight Compute), its details page as .csv and the run's .log; and
# OUTDIR/profile.tar.gz with all of them.
set -uo pipefail
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
OUT=${1:?usage: bash scripts/gpu_profile.sh OUTDIR [LIMIT_S]}
LIMIT_S=${2:-150}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-$(command -v python || command -v python3)}
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
START=$(date +%s)
SECTIONS=(SpeedOfLight MemoryWorkloadAnalysis Occupancy LaunchStats WarpStateStats SchedulerStats)
BACKENDS=$("$PY" -c 'from sara_kernels.ops import cuda; print("triton cuda" if cuda.available() else "triton")')
FAILED=0
# A timeout here is no failure: tiles.json holds every shape finished before it.
timeout --kill-after=10 $((LIMIT_S / 2 < 60 ? LIMIT_S / 2 : 60)) "$PY" benchmarks/tune_tiles.py --stages-only \
    --models Qwen3-30B-A3B Qwen3-Next-80B-A3B --time-budget 25 --out "$OUT/tiles" >"$OUT/tiles.log" 2>&1
rc=$?
((rc == 0 || rc == 124)) || FAILED=1
grep -E 'STAGES|bandwidth' "$OUT/tiles.log" | head -n 8
echo "tiles: rc=$rc ($(($(date +%s) - START)) s)"
# model tokens: the headline shape, then the largest E (most registers per thread).
for shape in "Qwen3-30B-A3B 16384" "Qwen3-Next-80B-A3B 8192"; do
    read -r model tokens <<<"$shape"
    for backend in $BACKENDS; do
        left=$((LIMIT_S - ($(date +%s) - START)))
        if ((left < 30)); then
            echo "skipped $backend $model: ${LIMIT_S} s spent"
            continue
        fi
        name="ncu_${backend}_${model}"
        # Per step, in detach mode: pool_routing_fwd for each side, then pool_routing_bwd for the
        # target: skip the 2 warm-up steps' 6 launches, profile one step's 3.
        timeout --kill-after=10 "$left" "$NCU" --target-processes all --clock-control none \
            --kernel-name regex:'pool_routing_(fwd|bwd)' --launch-skip 6 --launch-count 3 \
            "${SECTIONS[@]/#/--section=}" --export "$OUT/$name" --force-overwrite \
            "$PY" benchmarks/profile_kernels.py --backend "$backend" --model "$model" --tokens "$tokens" \
            >"$OUT/$name.log" 2>&1
        rc=$?
        [ -f "$OUT/$name.ncu-rep" ] && "$NCU" --import "$OUT/$name.ncu-rep" --csv --page details >"$OUT/$name.csv"
        echo "$backend $model: rc=$rc, $(grep -c 'pool_routing' "$OUT/$name.csv" 2>/dev/null) metric rows ($(($(date +%s) - START)) s)"
        ((rc == 0)) || FAILED=1
        # The headline numbers per kernel, for the log.
        grep -E '"(DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per Thread|Duration)"' "$OUT/$name.csv" |
            awk -F'","' '{print "    " $5 " | " $(NF-2) " = " $NF}' | sed 's/"$//' | cut -c1-150
    done
done
TARBALL=$(mktemp /tmp/profile.XXXXXX)
tar -czf "$TARBALL" -C "$OUT" --exclude=profile.tar.gz . && chmod 644 "$TARBALL" && mv "$TARBALL" "$OUT/profile.tar.gz"
exit $FAILED
