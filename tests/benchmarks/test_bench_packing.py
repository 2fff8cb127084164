"""benchmarks/bench_packing.py runs end to end at a tiny size and reports what it promises: padding
fractions, step times and their ratio, and that both modes computed the same losses (timings are
reported, never asserted)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO

pytest.importorskip("transformers")


def test_bench_packing_reports_padding_and_time_ratio(tmp_path):
    out, report = tmp_path / "packing.json", tmp_path / "packing.txt"
    run = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_packing.py"), "--pairs", "6",
                          "--batch", "3", "--reps", "1", "--hidden", "32", "--layers", "2", "--json", str(out),
                          "--out", str(report)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["padding_fraction"]["packed"] == 0.0 and 0.0 < result["padding_fraction"]["padded"] < 1.0
    assert all(ms > 0 for ms in result["pass_ms"].values()) and result["time_ratio"] > 0
    assert result["loss_max_rel_diff"] < 1e-4
    assert "time / padded" in report.read_text() and "packed" in run.stdout
