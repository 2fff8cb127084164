"""SARA's part of a Trainer checkpoint: what the SARA term was computed with, saved beside the
Trainer's own state and checked when training resumes from it.

The Trainer's checkpoint (model, optimiser, scheduler, RNG states, ``trainer_state.json``) is all
that SARA needs to continue a run exactly: the SARA term has no state across steps. What it does
depend on — the layers aligned, their weights, the score, the temperature, the anchor truncation,
the priors' values — must be what the run was started with, or the resumed run silently trains
another objective. :class:`SARACheckpointing` (a mixin of ``SARATrainer`` and ``SARASFTTrainer``)
writes them to ``sara_state.json`` in every checkpoint and, on ``train(resume_from_checkpoint=...)``,
refuses a checkpoint whose settings differ, naming each difference. A checkpoint without the file
(saved by a plain ``Trainer``) resumes with a warning.

**MoE weights on resume.** transformers (5.x) saves a model in its checkpoint format
(``save_original_format``: e.g. one tensor per expert) while the live model fuses the experts
(``experts.gate_up_proj``); the Trainer's resume then loads the file with ``load_state_dict``, which
skips the expert weights with a warning and trains on from the freshly built ones. When the file's
names differ from the model's, the mixin loads it with the model class's ``from_pretrained`` (which
converts) and copies the weights in: one extra copy of the weights in CPU memory during the resume.
(ZeRO and FSDP runs load their own engine states instead; resuming those is not tested.)
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Optional

STATE_FILE = "sara_state.json"
FORMAT = "sara-checkpoint-state"


def priors_identity(priors) -> Optional[dict]:
    """What identifies cached priors: their settings and a SHA-256 of their values."""
    if priors is None:
        return None
    values = priors.probs.detach().float().contiguous().cpu().numpy()
    return {
        "layers": list(priors.layers), "num_examples": priors.num_examples, "num_experts": priors.num_experts,
        "score": priors.score, "temperature": float(priors.temperature), "max_length": priors.max_length,
        "anchors_sha256": priors.fingerprint, "values_sha256": hashlib.sha256(values.tobytes()).hexdigest(),
    }


def sara_state(args, layers, score: str, anchor_max_length: Optional[int], priors) -> dict:
    """The settings the SARA term of a run depends on (``layers`` and ``score`` resolved on the model)."""
    weights = args.sara_layer_weights
    return {
        "sara_weight": float(args.sara_weight),
        "sara_layers": list(layers),
        "sara_layer_weights": None if weights is None else [float(w) for w in weights],
        "sara_score": score,
        "sara_temperature": float(args.sara_temperature),
        "sara_detach_anchor": bool(args.sara_detach_anchor),
        "sara_divergence": args.sara_divergence,
        "sara_lm_on_anchor": bool(args.sara_lm_on_anchor),
        "sara_anchor_filter": args.sara_anchor_filter,
        "anchor_max_length": anchor_max_length,
        "routing_priors": priors_identity(priors),
    }


def save_sara_state(checkpoint_dir: str, state: dict) -> None:
    os.makedirs(checkpoint_dir, exist_ok=True)
    with open(os.path.join(checkpoint_dir, STATE_FILE), "w") as f:
        json.dump({"format": FORMAT, "version": 1, **state}, f, indent=1)


# Settings that checkpoints written before them do not hold, with the value those runs had.
_ADDED_SETTINGS = {"sara_divergence": "js", "sara_anchor_filter": "none"}


def _differences(saved: dict, current: dict) -> list:
    found = []
    for key, now in current.items():
        then = saved.get(key, _ADDED_SETTINGS.get(key))
        if key == "routing_priors" and then is not None and now is not None:
            changed = [f"{k} {then.get(k)!r} -> {v!r}" for k, v in now.items() if then.get(k) != v]
            if changed:
                found.append("routing_priors changed (" + "; ".join(changed) + ")")
        elif key == "routing_priors" and (then is None) != (now is None):
            found.append("routing_priors: " + ("the checkpoint was trained with cached priors, now live anchors"
                                               if now is None else
                                               "the checkpoint was trained with live anchors, now cached priors"))
        elif then != now:
            found.append(f"{key} {then!r} -> {now!r}")
    return found


def check_sara_state(checkpoint_dir: str, state: dict) -> None:
    """Raise a ValueError naming every setting in which ``state`` differs from the checkpoint's."""
    path = os.path.join(checkpoint_dir, STATE_FILE)
    if not os.path.exists(path):
        warnings.warn(
            f"resume_from_checkpoint: {checkpoint_dir} has no {STATE_FILE} (not saved by a SARA trainer): the SARA "
            "settings it was trained with cannot be checked", stacklevel=3,
        )
        return
    with open(path) as f:
        saved = json.load(f)
    if saved.get("format") != FORMAT:
        raise ValueError(f"resume_from_checkpoint: {path} is not a SARA checkpoint state (format {saved.get('format')!r})")
    changed = _differences(saved, state)
    if changed:
        raise ValueError(
            f"resume_from_checkpoint: {checkpoint_dir} was trained with other SARA settings: " + "; ".join(changed)
            + " (checkpoint -> now); resume with the run's settings, or start a new run"
        )


def _names_differ(model, checkpoint_dir: str) -> bool:
    """Whether ``checkpoint_dir`` holds full-model safetensors weights named otherwise than ``model``'s
    parameters (saved in the checkpoint format of a transformers model that converts on load)."""
    from transformers import PreTrainedModel
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    if not isinstance(model, PreTrainedModel) or getattr(model, "_hf_peft_config_loaded", False):
        return False
    single, index = os.path.join(checkpoint_dir, SAFE_WEIGHTS_NAME), os.path.join(checkpoint_dir, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            names = set(json.load(f)["weight_map"])
    elif os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            names = set(f.keys())
    else:
        return False
    return names != set(model.state_dict())


class SARACheckpointing:
    """Mixin placed before the ``Trainer`` subclass (``SARATrainer``, ``SARASFTTrainer``): saves
    :func:`sara_state` into every checkpoint and checks it on resume. Reads ``args`` (the
    ``sara_*`` options; the anchor truncation is ``sara_max_length``, or TRL's ``max_length``)
    and ``routing_priors`` when the trainer has them."""

    def _sara_state(self) -> dict:
        # Computed once: hashing the priors' values reads all of them.
        if getattr(self, "_sara_checkpoint_state", None) is None:
            from .capture import capture_router_logits
            from .routers import default_score

            args = self.args
            layers, score = [], None
            if args.sara_weight > 0:
                model = self.accelerator.unwrap_model(self.model)
                layers = capture_router_logits(model, layers=args.sara_layers, score=args.sara_score).layers
                score = args.sara_score or default_score(model)
            max_length = args.sara_max_length if hasattr(args, "sara_max_length") else args.max_length
            self._sara_checkpoint_state = sara_state(args, layers, score, max_length,
                                                     getattr(self, "routing_priors", None))
        return self._sara_checkpoint_state

    def _save_checkpoint(self, model, trial):
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            save_sara_state(folder, self._sara_state())
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = self.model if model is None else model
        if not _names_differ(target, resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        loaded = type(target).from_pretrained(resume_from_checkpoint, dtype=target.dtype)
        target.load_state_dict(loaded.state_dict())

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """``Trainer.train``, refusing a checkpoint trained with other SARA settings (see the module docstring)."""
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            # Resolved here as the Trainer does; None (no checkpoint) is left to its own error.
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            check_sara_state(os.fspath(resume_from_checkpoint), self._sara_state())
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
