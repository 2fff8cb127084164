"""What ``backend="auto"`` picks between the fused backends, from bench_sara.py's measurements.

    python benchmarks/choose_auto.py OUT/bench_sara/results.json [more results.json ...]   # show
    python benchmarks/choose_auto.py OUT/bench_sara/results.json --write                  # and record

Every shape and mode at which one run measured the fwd+bwd (tuple inputs) of every fused
contender of that run is listed with their wall times; per expert count the times are summed and
the fastest backend is the choice. ``--write`` records the choices as ``MEASURED`` in
sara_kernels/ops/backend_choice.py for that run's GPU architecture (replacing what that
architecture had). A line says where the winner at one expert count changes with the shape.
Commit the rewritten file with the results it came from.
"""

from __future__ import annotations

import argparse
import json
import pprint
import re
import sys
from collections import defaultdict

from sara_kernels import backends
from sara_kernels.ops import backend_choice
from sara_kernels.programs.table import format_table

CHOICE_FILE = backend_choice.__file__
BEGIN = "# --- written by benchmarks/choose_auto.py: begin ---\n"
END = "# --- written by benchmarks/choose_auto.py: end ---\n"


def compared_rows(results: dict) -> list:
    """One row per (layers, experts, tokens, mode) of a results.json at which every fused backend
    measured in that run ran (at least two): ``<backend>_ms`` each, ``<backend>_speedup`` over the
    registry's first, and the fastest."""
    times = defaultdict(dict)
    for row in results["rows"]:
        if (row.get("status") == "ok" and row.get("pass_name") == "fwd+bwd" and row["contender"] in backends.FUSED
                and row.get("input_form", "tuple") == "tuple"):
            times[(row["layers"], row["experts"], row["tokens"], row["mode"])][row["contender"]] = row["median_ms"]
    # Only shapes every one of them ran: a sum per expert count must add the same shapes for each.
    measured = [name for name in backends.FUSED if any(name in t for t in times.values())]
    if len(measured) < 2:
        return []
    first, rows = measured[0], []
    for (l, e, n, m), t in sorted(times.items()):
        if len(t) == len(measured):
            rows.append(dict(layers=l, experts=e, tokens=n, mode=m, **{f"{b}_ms": t[b] for b in measured},
                             **{f"{b}_speedup": round(t[first] / t[b], 3) for b in measured[1:]},
                             faster=min(measured, key=t.get)))
    return rows


def choices(rows: list) -> dict:
    """{E: (fastest backend, {backend: ms})}, the times summed over the rows at that E (a tie goes to
    the backend listed first in the registry)."""
    sums = defaultdict(lambda: defaultdict(float))
    for r in rows:
        for name in backends.FUSED:
            if f"{name}_ms" in r:
                sums[r["experts"]][name] += r[f"{name}_ms"]
    return {e: (min(t, key=t.get), {name: round(ms, 4) for name, ms in t.items()}) for e, t in sorted(sums.items())}


def mixed(rows: list) -> list:
    """Expert counts at which the faster backend differs between shapes or modes."""
    winners = defaultdict(set)
    for r in rows:
        winners[r["experts"]].add(r["faster"])
    return [e for e, w in sorted(winners.items()) if len(w) > 1]


def architecture(results: dict) -> str:
    capability = results["meta"]["environment"].get("capability")
    if not capability:
        raise SystemExit("these results were not measured on a CUDA device (no compute capability recorded)")
    return capability


def write_choice(measured: dict, path: str = CHOICE_FILE) -> None:
    """Replace the MEASURED literal between the markers of backend_choice.py."""
    with open(path) as f:
        source = f.read()
    literal = "MEASURED: dict = " + pprint.pformat(measured, width=100, sort_dicts=True) + "\n"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(source):
        raise SystemExit(f"{path}: the markers around MEASURED are missing")
    with open(path, "w") as f:
        f.write(pattern.sub(lambda _: BEGIN + literal + END, source))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="bench_sara results.json files")
    p.add_argument("--write", action="store_true", help="record the choices in sara_kernels/ops/backend_choice.py")
    args = p.parse_args(argv)
    measured, found = dict(backend_choice.MEASURED), False
    for path in args.results:
        with open(path) as f:
            results = json.load(f)
        arch, rows = architecture(results), compared_rows(results)
        print(f"{path}: {results['meta']['environment'].get('card', '?')} (compute capability {arch})")
        if not rows:
            print("  no shape with the fwd+bwd of two or more fused backends measured")
            continue
        print(format_table(rows, [(k, k) for k in rows[0]]))
        measured[arch], found = choices(rows), True
        for e, (winner, times) in measured[arch].items():
            summed = ", ".join(f"{name} {ms} ms" for name, ms in times.items())
            print(f"  E = {e}: auto runs {winner} (sum of fwd+bwd: {summed})")
        for e in mixed(rows):
            print(f"  E = {e}: the faster backend depends on the shape or mode; auto takes the faster in sum")
    if not found:
        return 1
    if args.write:
        write_choice(measured)
        print(f"written to {CHOICE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
