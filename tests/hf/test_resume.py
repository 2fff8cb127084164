"""Resuming after a pre-emption (fp32, CPU, fixed seeds): a run stopped at step 3 of 5 (AdamW, a
warm-up and decay schedule, clipping, 2 accumulated micro-batches, a new epoch every 2 steps) and
restarted with ``resume_from_checkpoint`` takes only steps 4-5 (its optimizer steps are counted),
logs the same losses and SARA metrics for them as the run that was never stopped, and ends with the
same weights; the same checkpoint with its weights changed on disk changes step 4. SARATrainer with
live anchors and with cached priors, and SARASFTTrainer (``python -m sara_kernels train
--resume_from_checkpoint``: tests/programs/test_train_resume.py). A checkpoint trained with other
priors or another layer set is refused, naming the change."""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import TrainerCallback  # noqa: E402

from hf_train_helpers import (  # noqa: E402
    TOKENIZER,
    counted_optimizer_steps,
    one_thread,
    pairs,
    perturb_saved_weights,
    sft_sgd_config,
    sgd_args,
    step_logs,
    tiny_moe,
)

from sara_kernels.hf import SARATrainer, extract_routing_priors  # noqa: E402
from sara_kernels.hf.checkpoint import STATE_FILE  # noqa: E402

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

STEPS, STOP = 5, 3
PAIRS = 8
SCHEDULE = dict(max_steps=STEPS, per_device_train_batch_size=2, gradient_accumulation_steps=2, optim="adamw_torch",
                learning_rate=3e-2, lr_scheduler_type="linear", warmup_steps=2, max_grad_norm=1.0, weight_decay=0.01)


class StopAt(TrainerCallback):
    """A pre-emption right after optimiser step ``step``, once its checkpoint is written (``save``)."""

    def __init__(self, step: int, save: bool = True):
        self.step, self.save = step, save

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = self.save
            control.should_training_stop = True


def sara_trainer(out, priors=None, **overrides):
    args = sgd_args(out.parent, output_dir=str(out), **{**SCHEDULE, **overrides})
    return SARATrainer(model=tiny_moe(), args=args, train_dataset=pairs(PAIRS), processing_class=TOKENIZER,
                       routing_priors=priors)


def sft_trainer(out, **overrides):
    from sara_kernels.hf import SARASFTTrainer

    args = sft_sgd_config(out.parent, output_dir=str(out), **{**SCHEDULE, **overrides})
    return SARASFTTrainer(model=tiny_moe(), args=args, train_dataset=datasets.Dataset.from_list(pairs(PAIRS)),
                          processing_class=TOKENIZER)


def assert_resume_continues_the_run(make, tmp_path):
    full = make(tmp_path / "full")
    full.train()
    stopped = make(tmp_path / "run")
    stopped.add_callback(StopAt(STOP))
    stopped.train()
    assert stopped.state.global_step == STOP and (tmp_path / "run" / f"checkpoint-{STOP}" / STATE_FILE).exists()
    altered = tmp_path / "altered" / f"checkpoint-{STOP}"
    shutil.copytree(tmp_path / "run" / f"checkpoint-{STOP}", altered)
    perturb_saved_weights(altered)
    resumed = make(tmp_path / "run")
    with counted_optimizer_steps() as optimizer_steps:
        resumed.train(resume_from_checkpoint=True)  # the last checkpoint in output_dir, as after a restart
    # A run that ignored the checkpoint would log the same steps from scratch, but take all 5.
    assert len(optimizer_steps) == STEPS - STOP, optimizer_steps

    want, got = step_logs(full.state.log_history), step_logs(resumed.state.log_history)
    assert sorted(got) == list(range(1, STEPS + 1)) and {"sara_loss", "sara_js/layer_1"} <= want[STEPS].keys()
    for step in range(STOP + 1, STEPS + 1):
        assert got[step].keys() == want[step].keys(), step
        for key, value in want[step].items():
            assert got[step][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)
    # The compared values move from step to step: equal logs are not equal by construction.
    assert want[STOP + 1]["loss"] != want[STEPS]["loss"] and want[STOP + 1]["sara_loss"] != want[STEPS]["sara_loss"]
    final = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        torch.testing.assert_close(p, final[name], rtol=1e-6, atol=1e-8, msg=lambda m: f"{name}: {m}")

    # The run starts from the checkpoint's weights: changed on disk, they change step STOP + 1's
    # losses (logged before its update) by far more than the tolerance the resumed run meets.
    from_altered = make(altered.parent)
    from_altered.add_callback(StopAt(STOP + 1, save=False))
    from_altered.train(resume_from_checkpoint=True)
    moved = step_logs(from_altered.state.log_history)[STOP + 1]
    for key in ("loss", "sara_loss"):
        assert abs(moved[key] - got[STOP + 1][key]) > 1e-3 * abs(got[STOP + 1][key]), (key, moved[key])


@pytest.fixture
def priors_file(tmp_path):
    path = tmp_path / "priors.safetensors"
    extract_routing_priors(tiny_moe(), pairs(PAIRS), TOKENIZER, path, progress=False)
    return str(path)


def test_sara_trainer_resumes_as_if_uninterrupted_with_live_anchors(tmp_path):
    assert_resume_continues_the_run(sara_trainer, tmp_path)


def test_sara_trainer_resumes_as_if_uninterrupted_with_priors(tmp_path, priors_file):
    assert_resume_continues_the_run(lambda out: sara_trainer(out, priors=priors_file), tmp_path)


def test_sft_trainer_resumes_as_if_uninterrupted(tmp_path):
    assert_resume_continues_the_run(sft_trainer, tmp_path)


@pytest.fixture
def stopped_run(tmp_path, priors_file):
    """A run with priors stopped at step 1 (its checkpoint in tmp_path/run/checkpoint-1)."""
    trainer = sara_trainer(tmp_path / "run", priors=priors_file)
    trainer.add_callback(StopAt(1))
    trainer.train()
    return tmp_path / "run"


def test_resume_refuses_other_priors(stopped_run, tmp_path):
    other = tmp_path / "other_priors.safetensors"
    extract_routing_priors(tiny_moe(seed=1), pairs(PAIRS), TOKENIZER, other, progress=False)
    trainer = sara_trainer(stopped_run, priors=str(other))
    with pytest.raises(ValueError, match=r"other SARA settings: routing_priors changed \(values_sha256 "):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="trained with cached priors, now live anchors"):
        sara_trainer(stopped_run).train(resume_from_checkpoint=str(stopped_run / "checkpoint-1"))


def test_resume_refuses_another_layer_set(stopped_run, tmp_path):
    trainer = sara_trainer(stopped_run, sara_layers="2")
    with pytest.raises(ValueError, match=r"sara_layers \[1, 2\] -> \[2\]"):
        trainer.train(resume_from_checkpoint=True)


def test_checkpoint_of_a_plain_trainer_resumes_with_a_warning(stopped_run):
    checkpoint = stopped_run / "checkpoint-1"
    (checkpoint / STATE_FILE).unlink()
    trainer = sara_trainer(stopped_run, priors=str(stopped_run.parent / "priors.safetensors"), max_steps=2)
    with pytest.warns(UserWarning, match=f"has no {STATE_FILE}"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 2

