"""examples/recipes/qwen3-30b-a3b.yaml, SARA's published recipe, parses into the ``train`` command's
arguments with the paper's values (no model is loaded: it needs the real 30B checkpoint and GPUs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import transformers.training_args

from sara_kernels.hf.trainer import SARATrainingArguments
from sara_kernels.programs.arguments import DataArguments, ModelArguments, ProgressArguments, parse_command
from sara_kernels.programs.train import PROG, TrainCommandArguments
from helpers import REPO

RECIPE = Path(REPO, "examples", "recipes", "qwen3-30b-a3b.yaml")
GPUS = 8  # the world size the recipe's comment splits the global batch over


@pytest.fixture
def bf16_device(monkeypatch):
    """TrainingArguments refuses bf16 without a bf16 GPU; the recipe is for one."""
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)


def test_recipe_parses_into_the_train_arguments_with_the_papers_values(bf16_device, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe names the ZeRO-3 config relative to the repository root
    model, data, command, _, args = parse_command(
        (ModelArguments, DataArguments, TrainCommandArguments, ProgressArguments, SARATrainingArguments),
        [str(RECIPE)], PROG, "")
    assert isinstance(args, SARATrainingArguments)
    assert args.sara_layers == list(range(7, 35))
    assert args.sara_weight == 1.5
    assert args.sara_divergence == "js"
    assert args.sara_anchor_filter == "correct"
    assert args.learning_rate == 2e-5
    assert args.num_train_epochs == 2
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * GPUS == 256
    assert args.bf16 and model.dtype == "bfloat16"
    assert args.deepspeed == "examples/deepspeed_zero3.json"
    assert command.sara_priors is None  # live self-anchors: the filter reads the anchor forward's predictions


def test_every_recipe_value_says_where_it_comes_from():
    for number, line in enumerate(RECIPE.read_text().splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            assert re.search(r"#\s*(paper|our choice)\b", line), f"{RECIPE.name}:{number}: {line!r} has no source"
