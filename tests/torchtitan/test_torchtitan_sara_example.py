"""examples/torchtitan_sara.py runs as a script: a few training steps of torchtitan's Qwen3-MoE with SARA on a CPU."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("torchtitan")

from helpers import REPO  # noqa: E402


def test_example_trains_and_logs_each_layer():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "torchtitan_sara.py"), "--steps", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 2
    for line in lines:
        values = dict(re.findall(r"(lm loss|sara_js/layer_\d+) ([-\d.naninf]+)", line))
        assert set(values) == {"lm loss", "sara_js/layer_0", "sara_js/layer_1"}, line
        assert all(math.isfinite(float(v)) and float(v) >= 0 for v in values.values()), line
