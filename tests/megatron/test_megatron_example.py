"""examples/megatron_sara.py runs exactly as the README's Megatron-core section prints it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'sara-kernels[megatron]')")

from helpers import REPO, free_port  # noqa: E402


def _readme_commands() -> list:
    text = (Path(REPO) / "README.md").read_text()
    section = text.split("## Megatron-core (`sara_kernels.megatron`)", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^python (examples/megatron_sara\.py.*)$", section, re.M)


COMMANDS = _readme_commands()


def test_the_readme_prints_both_commands():
    assert len(COMMANDS) == 2 and "--priors" in COMMANDS[1]


def _run(command: str, cwd: Path) -> str:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, *command.split()], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = int(re.search(r"--steps (\d+)", command).group(1))
    assert len(re.findall(r"^step +\d+ +lm ", proc.stdout, re.M)) == steps, proc.stdout
    return proc.stdout


def _sara_of_step(stdout: str, step: int) -> list:
    """The per-layer SARA values the example prints for ``step`` (rounded to 5 decimals)."""
    printed = re.search(rf"^step +{step} .*sara/layer \[([^]]*)\]", stdout, re.M).group(1)
    return [float(v) for v in printed.split(",")]


def _first_step_sara(stdout: str) -> tuple:
    """(the mean SARA of step 0 that the example prints with 4 significant digits, one unit of its last digit)."""
    printed = re.search(r"first step (\S+),", stdout).group(1)
    return float(printed), 10.0 ** (int(printed.split("e")[1]) - 3)


# Values equal up to float32 rounding print at most one unit of their last digit apart (when they
# straddle a rounding boundary); the factor keeps that unit itself from failing on its binary value.
SLACK = 1 + 1e-6


def test_example_runs_as_printed(tmp_path):
    os.symlink(os.path.join(REPO, "examples"), tmp_path / "examples")  # the README's paths, from a scratch folder
    live, cached = (_run(command, tmp_path) for command in COMMANDS)
    first, last = map(float, re.search(r"first step (\S+), last step (\S+)", live).groups())
    assert last < first / 2, live  # SARA pulls the targets' routing towards the anchors'
    assert "priors (8, 4, 8) for layers [0, 1, 2, 3]" in cached and (tmp_path / "priors.safetensors").exists()
    # The priors are the untrained model's anchor routing: before the first update, SARA against
    # them equals SARA against the live anchors (pooled over other batch compositions: float32 rounding).
    (with_priors, unit_p), (with_anchors, unit_a) = _first_step_sara(cached), _first_step_sara(live)
    assert with_anchors > 0 and abs(with_priors - with_anchors) <= max(unit_p, unit_a) * SLACK, (with_priors, with_anchors)
    per_layer_p, per_layer_a = _sara_of_step(cached, 0), _sara_of_step(live, 0)  # 5 decimals: 1-2 digits here
    assert len(per_layer_p) == len(per_layer_a) >= 1
    assert per_layer_p == pytest.approx(per_layer_a, rel=0, abs=1e-5 * SLACK), (per_layer_p, per_layer_a)
