"""benchmarks/host_cost.py runs on a machine without a GPU (its job) and reports every backend,
input form and call (timings are reported, never asserted)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sara_kernels import backends

from helpers import REPO as ROOT  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="host_cost.py is the no-GPU measurement (bench_sara.py on a GPU)")
def test_host_cost_reports_both_backends_and_the_floor(tmp_path):
    out = tmp_path / "host.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "host_cost.py"), "--layers", "3",
                          "--experts", "12", "--tokens", "32", "--seq-len", "8", "--reps", "20", "--json", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    seen = {(r["backend"], r["form"].split()[0], r["call"]) for r in rows}
    calls = {"fwd (no_grad)", "fwd", "fwd+bwd"}
    assert seen == ({(b, f, c) for b in backends.FUSED for f in ("tuple", "stacked") for c in calls}
                    | {("floor", f, "fwd+bwd") for f in ("tuple", "stacked")})
    assert all(0 < r["p20_us"] <= r["median_us"] <= r["p80_us"] for r in rows)
    assert "triton   tuple of 3 [32, 12]" in run.stdout
