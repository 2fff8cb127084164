"""Derive ``triton_host.SPILL_FREE_TILES`` from ptxas's spill reports, without a GPU.

Compiles the grid of pooling-kernel configurations that CI checks for spills
(tests/ops/test_aot_compile.py: ``pooling_cases``, the tiles the launchers pick) for each
architecture with ``tile_config``'s options alone. For each key of the table (architecture,
kernel, score, BLOCK_E, VEC) where any configuration spills, it tries register caps of 72, 80,
88, ... on the tiles the table caps, 8 then 16 warps on the others, and keeps the first step at
which no configuration of the key spills. ptxas is not monotonic in the cap (a configuration
spill-free at 64 can spill at 80), so each step compiles every configuration of the key, not only
those that spilled. Prints the entries for host.py and, per architecture, the configurations that
spilled before. Compile-only: nothing here says whether a changed tile is slower or faster.

    TRITON_INTERPRET=0 python benchmarks/spill_free_tiles.py [--arch 100 --arch 103 ...]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sara_kernels.ops import aot  # noqa: E402
from sara_kernels.ops.triton import host as triton_host  # noqa: E402
from sara_kernels.ops.triton import kernels as triton_kernels  # noqa: E402
from tests.ops import test_aot_compile  # noqa: E402  (the grid CI checks: one home)

CAPS = tuple(range(72, 169, 8))
WARPS = (8, 16)


def table_key(case, arch: int) -> tuple:
    return (arch, case.name, "sigmoid" if case.meta["SIGMOID"] else "softmax", case.meta["BLOCK_E"], case.meta["VEC"])


def steps(case) -> list[dict]:
    """The options tried, in order, for the key of ``case`` (compiled with the table's tile)."""
    if "maxnreg" in case.meta:
        return [dict(maxnreg=cap) for cap in CAPS]
    return [dict(num_warps=warps) for warps in WARPS]


def spills(job) -> int:
    """Spill bytes (stores + loads) of one (case, arch, options); a failed compile counts as a spill."""
    case, arch, options = job
    try:
        _, report = aot.compile_with_report(case.name, arch, {**case.meta, **options}, case.dtype, case.mask_dtype)
    except Exception as exc:
        print(f"{case.label} sm_{arch} {options}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return -1
    return report.spill_stores + report.spill_loads


def derive(archs, pool) -> dict:
    """{key: options} for every key of ``archs`` where the table's tile spills."""
    groups = {}
    for arch in archs:
        for case in test_aot_compile.pooling_cases(arch):
            if case.from_table:
                groups.setdefault(table_key(case, arch), []).append(case)
    jobs = [(case, key[0], {}) for key, cases in groups.items() for case in cases]
    before = dict(zip(((job[0].label, job[1]) for job in jobs), pool.map(spills, jobs)))
    spilled = {key for key, cases in groups.items() if any(before[case.label, key[0]] for case in cases)}
    for arch in archs:
        labels = sorted(f"  {label}: {b} B" for (label, a), b in before.items() if a == arch and b)
        print(f"sm_{arch}: {len(labels)} of {sum(a == arch for _, a in before)} configurations spill with "
              f"tile_config alone", *labels, sep="\n")
    entries, step = {}, 0
    while spilled:
        tried = {key: steps(groups[key][0])[step] for key in spilled}
        jobs = [(case, key[0], tried[key]) for key in sorted(spilled) for case in groups[key]]
        results = dict(zip(((job[0].label, job[1]) for job in jobs), pool.map(spills, jobs)))
        for key in sorted(spilled):
            if not any(results[case.label, key[0]] for case in groups[key]):
                entries[key] = tried[key]
        step += 1
        unresolved = {key for key in spilled - set(entries) if step == len(steps(groups[key][0]))}
        for key in sorted(unresolved):
            print(f"UNRESOLVED {key}: spills at every step of {steps(groups[key][0])}")
        spilled -= set(entries) | unresolved
    return entries


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=triton_host.SPILL_CHECKED_ARCHS,
                        help="architectures to derive (default: every one of SPILL_CHECKED_ARCHS)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    if triton_kernels.INTERPRET:
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    triton_host.SPILL_FREE_TILES = {}  # the grid with tile_config's options alone
    archs = args.arch or list(triton_host.SPILL_CHECKED_ARCHS)
    print("; ".join(f"sm_{arch}: {aot.toolchain(arch)}" for arch in archs))
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("fork")) as pool:
        entries = derive(archs, pool)
    print("SPILL_FREE_TILES entries:")
    for key, options in sorted(entries.items()):
        print(f"    {key!r}: dict({', '.join(f'{k}={v}' for k, v in options.items())}),".replace("'", '"'))


if __name__ == "__main__":
    main()
