#!/usr/bin/env bash
# Run a pytest selection as SHARDS concurrent processes (round-robin over the collected test ids).
#
#   bash scripts/sharded_pytest.sh SHARDS LOGPREFIX [pytest args...]
#
# Why: without the interpreter, the kernel tests spend most of their time in Triton JIT compiles,
# which are single-threaded per process; a GPU machine's idle cores compile in parallel (the
# Triton cache is shared and written atomically). Each shard logs to LOGPREFIX.<k>.log, one
# line per test as it finishes (-v: a shard cut by a time limit still says which ran), and writes
# LOGPREFIX.<k>.xml; the last line printed sums the shards. Paths, -m and -k select the tests;
# every other option goes to each shard. Exit status: 0 only if every shard passed.
set -uo pipefail
SHARDS=${1:?usage: sharded_pytest.sh SHARDS LOGPREFIX [pytest args...]}
PREFIX=${2:?usage: sharded_pytest.sh SHARDS LOGPREFIX [pytest args...]}
shift 2
PY=${PYTHON:-$(command -v python || command -v python3)}
# Split the arguments: the selection (paths, -m/-k and their values) is used once, to collect
# the ids; the other options go to each shard, before its ids so that no option swallows them.
SELECT=()
OPTS=()
while (($#)); do
    case $1 in
        -m | -k) SELECT+=("$1" "$2"); shift ;;
        -*) OPTS+=("$1") ;;
        *) SELECT+=("$1") ;;
    esac
    shift
done
mkdir -p "$(dirname "$PREFIX")"
IDS="$PREFIX.ids"
"$PY" -m pytest "${SELECT[@]}" --collect-only -q -p no:cacheprovider 2>/dev/null | grep '::' >"$IDS"
TOTAL=$(wc -l <"$IDS")
if [ "$TOTAL" -eq 0 ]; then
    echo "no tests collected"
    exit 1
fi
PIDS=()
for ((k = 0; k < SHARDS; k++)); do
    mapfile -t SHARD < <(awk -v k="$k" -v n="$SHARDS" '(NR - 1) % n == k' "$IDS")
    [ "${#SHARD[@]}" -eq 0 ] && continue
    "$PY" -m pytest -v -rfE "${OPTS[@]}" -p no:cacheprovider --junitxml="$PREFIX.$k.xml" "${SHARD[@]}" \
        >"$PREFIX.$k.log" 2>&1 &
    PIDS+=($!)
done
FAILED=0
for pid in "${PIDS[@]}"; do
    wait "$pid" || FAILED=1
done
grep -h -E '^(FAILED|ERROR) ' "$PREFIX".*.log
"$PY" - "$PREFIX" <<'PYEOF'
import glob, sys, xml.etree.ElementTree as ET
totals = dict(tests=0, failures=0, errors=0, skipped=0)
for path in glob.glob(sys.argv[1] + ".*.xml"):
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for k in totals:
            totals[k] += int(suite.get(k, 0))
passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
print(f"{passed} passed, {totals['failures']} failed, {totals['errors']} errors, {totals['skipped']} skipped in shards")
PYEOF
exit $FAILED
