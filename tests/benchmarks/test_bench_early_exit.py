"""benchmarks/bench_early_exit.py: its FLOPs count equals torch's FlopCounterMode on the model it
describes (eager attention and experts, whose matrix products the counter sees), with and without
early exit, dense layers included; and the script runs end to end at a tiny size (timings are
reported, never asserted)."""

import os
import sys

import pytest
import torch

from helpers import REPO

pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_early_exit  # noqa: E402

from sara_kernels.hf import capture_router_logits  # noqa: E402
from sara_kernels.hf.routing import forward_kwargs  # noqa: E402
from sara_kernels.programs.corpus import build_word_tokenizer  # noqa: E402


@pytest.mark.parametrize("mlp_only_layers, layers", [([], (1, 2)), ([0], (2,)), ([], (3,))])
def test_early_exit_flops_count_equals_torchs_flop_counter(mlp_only_layers, layers):
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen3MoeForCausalLM

    from sara_kernels.programs.demo import tiny_qwen3_moe_config

    config = tiny_qwen3_moe_config(build_word_tokenizer())
    config.mlp_only_layers = mlp_only_layers
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).eval()
    model.set_attn_implementation("eager")  # matmuls the counter sees (its CPU SDPA is not counted)
    model.set_experts_implementation("eager")
    ids = torch.randint(3, config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    for early_exit in (False, True):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            with capture_router_logits(model, layers=list(layers), early_exit=early_exit) as captured:
                model(input_ids=ids, attention_mask=torch.ones_like(ids), **forward_kwargs(model, lm_head=False))
        assert captured.stopped_early == early_exit
        assert bench_early_exit.forward_flops(config, layers, 3, 7, early_exit) == counter.get_total_flops()


def test_bench_early_exit_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "early_exit.txt"
    assert bench_early_exit.main(["--batch", "2", "--batches", "1", "--reps", "1", "--out", str(out)]) == 0
    report = out.read_text()
    assert "time / full" in report and "early exit" in report and "equal (torch.equal)" in report
    assert report.strip() == capsys.readouterr().out.strip()
