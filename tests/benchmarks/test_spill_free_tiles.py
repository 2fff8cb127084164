"""benchmarks/spill_free_tiles.py, which derives ``triton_host.SPILL_FREE_TILES``, checked for logic
with a stand-in for ptxas's spill report (nothing compiled; the real reports are checked by
tests/ops/test_aot_compile.py)."""

import os
import sys

from sara_kernels.ops.triton import host as triton_host

from helpers import REPO as ROOT  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import spill_free_tiles  # noqa: E402


class InlinePool:
    map = staticmethod(lambda fn, jobs: list(map(fn, jobs)))


def test_each_spilling_key_gets_the_first_step_at_which_none_of_its_configurations_spills(monkeypatch):
    """ptxas is not monotonic in the cap: a configuration that does not spill at 64 may at 72, so
    the step taken must leave every configuration of the key spill-free, not only those that
    spilled. Keys that never spill get no entry; a key that spills at every step gets none."""
    monkeypatch.setattr(triton_host, "SPILL_FREE_TILES", {})
    capped = (90, "pool_routing_bwd", "sigmoid", 512, 8)  # a maxnreg tile
    uncapped = (90, "pool_routing_fwd", "softmax", 16, 0)  # E <= 64: no cap in the table
    hopeless = (90, "pool_routing_fwd", "sigmoid", 256, 8)
    groups = {}
    for case in spill_free_tiles.test_aot_compile.pooling_cases(90):
        groups.setdefault(spill_free_tiles.table_key(case, 90), []).append(case.label)
    first, second = groups[capped][:2]

    def spills(job):
        case, arch, options = job
        key = spill_free_tiles.table_key(case, arch)
        if key == capped:
            spilling = {(): {first}, (("maxnreg", 72),): {second}}.get(tuple(options.items()), set())
            return 4 if case.label in spilling else 0
        if key == uncapped:
            return 8 if options.get("num_warps", 4) < 8 else 0
        return 12 if key == hopeless else 0

    monkeypatch.setattr(spill_free_tiles, "spills", spills)
    entries = spill_free_tiles.derive([90], InlinePool())
    assert entries == {capped: dict(maxnreg=80), uncapped: dict(num_warps=8)}
