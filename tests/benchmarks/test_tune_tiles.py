"""benchmarks/tune_tiles.py, the evidence behind ``triton_host.tile_config``, checked for logic on the
CPU (interpreted kernels, tiny shapes; timings are reported, never asserted): what it sweeps, and
that ``--stages-only`` (the same-run A/B of scripts/gpu_profile.sh) times the table's tile with each
row loop: unpipelined, pipelined with and without the register cap."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sara_kernels.ops.triton import host as triton_host

from helpers import REPO as ROOT  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import tune_tiles  # noqa: E402


@pytest.mark.parametrize("experts", [8, 64, 128, 512])
def test_candidates_hold_the_table_tile_and_each_row_loop(experts):
    table = triton_host.tile_config(experts)
    found = tune_tiles.candidates(experts)
    assert (table["num_warps"], table["BLOCK_N"], table["STAGES"], table.get("maxnreg")) in found
    tiles = {c[:2] for c in found}
    assert set(found) == {(w, n, *p) for w, n in tiles for p in tune_tiles.PIPELINES}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU logic check of a GPU benchmark")
def test_stages_only_times_the_table_tile_with_each_row_loop(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "tune_tiles.py"), "--device", "cpu", "--tiny",
                          "--stages-only", "--models", "Qwen3-30B-A3B", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = json.loads((tmp_path / "tiles.json").read_text())["rows"]
    table = triton_host.tile_config(128)
    assert {(r["stages"], r["maxnreg"]) for r in rows} == set(tune_tiles.PIPELINES)
    assert all((r["warps"], r["block_n"]) == (table["num_warps"], table["BLOCK_N"]) for r in rows)
    assert [r["table"] for r in rows] == [(r["stages"], r["maxnreg"]) == (table["STAGES"], table.get("maxnreg"))
                                          for r in rows]
    assert all(r["fwd_ms"] > 0 and r["bwd_ms"] > 0 for r in rows)
    assert "maxnreg" in (tmp_path / "tiles.md").read_text()
