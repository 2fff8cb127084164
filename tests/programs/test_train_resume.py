"""``python -m sara_kernels train --resume_from_checkpoint`` (in-process, CPU, fixed seeds): a run
resumed from the step-2 checkpoint of a 4-step run takes only steps 3-4 (its optimizer steps are
counted) and logs the same losses and SARA metrics for them as that run; the checkpoint with its
weights changed on disk changes step 3. The trainers' own resume tests are tests/hf/test_resume.py."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from hf_train_helpers import (  # noqa: E402
    TOKENIZER,
    counted_optimizer_steps,
    one_thread,
    pairs,
    perturb_saved_weights,
    step_logs,
    tiny_moe,
)

from sara_kernels.hf import save_pairs  # noqa: E402

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def test_train_command_resumes_from_a_checkpoint(tmp_path):
    from sara_kernels.programs.cli import main

    model_dir = tmp_path / "model"
    tiny_moe().save_pretrained(model_dir)
    TOKENIZER.save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    save_pairs(pairs(8), data)

    def train(out, *extra):
        argv = ["train", "--model", str(model_dir), "--data", str(data), "--output_dir", str(out),
                "--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "0.03",
                "--lr_scheduler_type", "linear", "--save_strategy", "steps", "--save_steps", "2",
                "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
                "--dataloader_pin_memory", "false", "--sara_weight", "5", *extra]
        assert main(argv) == 0
        return step_logs(json.loads((out / "trainer_state.json").read_text())["log_history"])

    full = train(tmp_path / "full")
    with counted_optimizer_steps() as optimizer_steps:
        resumed = train(tmp_path / "resumed", "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-2"))
    # A run that ignored the checkpoint would log the same steps from scratch, but take all 4 and save step 2.
    assert len(optimizer_steps) == 2, optimizer_steps
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-4"]
    assert sorted(resumed) == [1, 2, 3, 4] and "sara_loss" in full[4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-9), step

    # The run starts from the checkpoint's weights: changed on disk, they change step 3's losses (logged
    # before its update) far beyond the tolerance above. Same --max_steps: with fewer, the schedule
    # alone would change step 3 of a run that ignored the checkpoint.
    altered = tmp_path / "altered" / "checkpoint-2"
    shutil.copytree(tmp_path / "full" / "checkpoint-2", altered)
    perturb_saved_weights(altered)
    moved = train(tmp_path / "from_altered", "--resume_from_checkpoint", str(altered))[3]
    for key in ("loss", "sara_loss"):
        assert abs(moved[key] - full[3][key]) > 1e-3 * abs(full[3][key]), (key, moved[key])
