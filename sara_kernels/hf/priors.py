"""Cached anchor routing priors: run the model once over the anchors, train without them.

With ``detach_anchor=True`` the anchor side of SARA is a fixed target per step. When the
anchor's routing may be taken from the model before fine-tuning (the usual setting: the
high-resource language's routing is the reference to preserve), it can be computed once,
stored, and the anchor forward dropped from every training step — half the forward passes.

File format (safetensors): one float32 tensor ``"priors"`` [num_examples, L, E] — row i is the
pooled routing distribution of anchor i at each captured layer — and string metadata: format
tag and version, the model's ``name_or_path`` and ``model_type``, the decoder-layer indices
(JSON), E, score, temperature, number of examples, a fingerprint of the anchors (see
:func:`~sara_kernels.hf.data.anchors_fingerprint`) and the ``max_length`` the anchors were
truncated to (JSON: an int, or ``null`` for no truncation). The trainer looks rows up by the
example index its collator carries, so the file is tied to the dataset order; the fingerprint
catches a different or reordered dataset, and ``max_length`` must equal the trainer's
``sara_max_length`` so cached anchors are truncated as live ones would be. The rest of the
tokenisation (special tokens for texts, the chat template for messages) is the collator's and
is fixed by the tokenizer: extract with the tokenizer you train with. Extracted with
``anchor_answers=True``, the file also holds ``"anchor_correct"`` [num_examples] uint8: whether the
model reproduced each anchor's answer, which ``sara_anchor_filter="correct"`` then reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from .._inputs import check_temperature
from ..layer_selection import resolve_layers_spec
from .data import anchors_fingerprint, side_answer, validate_pair
from .routing import pooled_routing, probe_routing

FORMAT = "sara-routing-priors"
VERSION = "1"


# --------------------------------------------------------------------------------------------
# Priors
# --------------------------------------------------------------------------------------------


@dataclass
class RoutingPriors:
    """Cached anchor routing distributions and the settings they were computed with."""

    probs: torch.Tensor  # [num_examples, L, E] float32
    layers: tuple  # decoder-layer index of each of the L layers
    score: str
    temperature: float
    model_name_or_path: str = ""
    model_type: str = ""
    fingerprint: str = ""
    max_length: Optional[int] = None  # the anchors' truncation at extraction (None: none)
    anchor_correct: Optional[torch.Tensor] = None  # [num_examples] bool: answer reproduced (anchor_answers=True)

    @property
    def num_examples(self) -> int:
        return int(self.probs.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.probs.shape[-1])

    def gather(self, index: torch.Tensor, layers: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Priors of the examples ``index`` [B] as ``anchor_probs`` [L, B, E] (on ``index``'s device).

        ``layers`` selects decoder layers (default: all stored, in stored order), so priors
        extracted for all layers serve training on a subset.
        """
        index = torch.as_tensor(index)
        if index.dim() != 1:
            raise ValueError(f"index: expected a 1-D tensor of example indices, got shape {tuple(index.shape)}")
        idx = index.detach().to("cpu", torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_examples):
            bad = idx[(idx < 0) | (idx >= self.num_examples)].tolist()
            raise ValueError(
                f"example index {bad[:5]} outside the {self.num_examples} cached priors; priors need each example's "
                "dataset position (wrap the training pairs in PairDataset, which adds 'index')"
            )
        if layers is None:
            rows = list(range(len(self.layers)))
        else:
            missing = [int(i) for i in layers if int(i) not in self.layers]
            if missing:
                raise ValueError(f"layers {missing} are not in the priors file (it has layers {list(self.layers)})")
            rows = [self.layers.index(int(i)) for i in layers]
        out = self.probs[idx][:, rows, :].permute(1, 0, 2).contiguous()
        return out.to(index.device)

    def check_against(self, layers: Sequence[int], num_experts: int, score: str) -> None:
        """ValueError unless these priors fit routing captured as (layers, E, score)."""
        if num_experts != self.num_experts:
            raise ValueError(
                f"routing priors have E = {self.num_experts} experts but the model's routers have E = {num_experts}: "
                f"the priors file comes from another model ({self.model_name_or_path or 'unknown'})"
            )
        missing = [int(i) for i in layers if int(i) not in self.layers]
        if missing:
            raise ValueError(
                f"routing priors cover decoder layers {list(self.layers)} but layers {missing} are trained; "
                "extract the priors with the same layers"
            )
        if score != self.score:
            raise ValueError(f"routing priors were computed with score={self.score!r}, training uses score={score!r}")


def _metadata_of(model) -> tuple[str, str]:
    config = getattr(model, "config", None)
    return str(getattr(config, "name_or_path", "") or ""), str(getattr(config, "model_type", "") or "")


def extract_routing_priors(
    model,
    pairs: Sequence[dict],
    tokenizer,
    path: str | os.PathLike,
    *,
    layers="all",
    score: Optional[str] = None,
    temperature: float = 1.0,
    batch_size: int = 8,
    max_length: Optional[int] = None,
    backend: str = "auto",
    progress: bool = True,
    anchor_answers: bool = False,
) -> RoutingPriors:
    """Run ``model`` over the anchors of ``pairs`` (no grad, batched) and save their routing priors.

    Writes ``path`` (safetensors, see the module docstring) and returns the priors. ``max_length``
    is recorded in the file and must equal the trainer's ``sara_max_length`` (SARATrainer refuses
    priors extracted at another one), so that cached anchors are truncated as live ones would be.

    Under ``torch.distributed`` (e.g. torchrun) every rank of the default group calls this with
    the same arguments: each runs the model over its share of the anchors (every W-th one), the
    shares are gathered, rank 0 writes the file, and every rank returns the whole priors once
    the file exists. The result equals a single-process extraction.

    ``anchor_answers=True`` also records whether the model reproduces each anchor's answer
    (greedy, teacher-forced, as ``sara_anchor_filter`` checks it in training; every pair needs an
    anchor answer), so that training with these priors and ``sara_anchor_filter="correct"``
    keeps the same pairs; the forwards then run to the end.
    """
    # Checked before the first forward, not left to routing_distribution, so bad input costs no model call.
    check_temperature(temperature, option=True)
    if len(pairs) == 0:
        raise ValueError("pairs: no examples to extract priors from")
    for i in range(len(pairs)):
        validate_pair(pairs[i], f"pairs[{i}]")
    anchors = [pairs[i]["anchor"] for i in range(len(pairs))]
    answers = None
    if anchor_answers:
        answers = [side_answer(pairs[i], "anchor") for i in range(len(pairs))]
        missing = [i for i, answer in enumerate(answers) if answer is None]
        if missing:
            raise ValueError(f"anchor_answers: pairs{missing[:5]} have no anchor answer; give each pair an 'answer' "
                             "field or a chat anchor ending with the assistant's reply")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    mine = list(range(rank, len(anchors), world))
    shard = None
    if mine:
        shard = pooled_routing(
            model, tokenizer, [anchors[i] for i in mine], layers=layers, score=score, temperature=temperature,
            batch_size=batch_size, max_length=max_length, backend=backend, progress=progress and rank == 0,
            desc="anchor priors", answers=None if answers is None else [answers[i] for i in mine],
        )
    probs, found_layers, found_score, *correct = shard if world == 1 else _gather_shards(mine, shard, len(anchors), world)
    name, model_type = _metadata_of(model)
    priors = RoutingPriors(
        probs=probs.contiguous(),
        layers=found_layers,
        score=found_score,
        temperature=float(temperature),
        model_name_or_path=name,
        model_type=model_type,
        fingerprint=anchors_fingerprint([pairs[i] for i in range(len(pairs))]),
        max_length=max_length,
        anchor_correct=correct[0] if correct else None,
    )
    if rank == 0:
        save_routing_priors(priors, path)
    if world > 1:
        dist.barrier()  # no rank may read the file before it is written
    return priors


def save_routing_priors(priors: RoutingPriors, path: str | os.PathLike) -> None:
    """Write ``priors`` to ``path`` in the file format of the module docstring (one writer for
    every framework's extraction)."""
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "model_name_or_path": priors.model_name_or_path,
        "model_type": priors.model_type,
        "layers": json.dumps([int(i) for i in priors.layers]),
        "num_experts": str(priors.num_experts),
        "score": priors.score,
        "temperature": repr(float(priors.temperature)),
        "num_examples": str(priors.num_examples),
        "anchors_sha256": priors.fingerprint,
        "max_length": json.dumps(priors.max_length),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tensors = {"priors": priors.probs.contiguous()}
    if priors.anchor_correct is not None:
        tensors["anchor_correct"] = priors.anchor_correct.to(torch.uint8).contiguous()
    save_file(tensors, os.fspath(path), metadata=metadata)


def _gather_shards(mine: list, shard, num_examples: int, world: int):
    """(priors [num_examples, L, E], layers, score[, answers reproduced [num_examples]]) from every
    rank's (indices, pooled routing)."""
    gathered = [None] * world
    dist.all_gather_object(gathered, (mine, shard))
    found = next(s for _, s in gathered if s is not None)
    probs = torch.empty((num_examples, *found[0].shape[1:]), dtype=found[0].dtype)
    correct = torch.zeros(num_examples, dtype=torch.bool) if len(found) > 3 else None
    for indices, part in gathered:
        if part is not None:
            probs[indices] = part[0]
            if correct is not None:
                correct[indices] = part[3]
    return (probs, found[1], found[2]) + (() if correct is None else (correct,))


def load_routing_priors(
    path: str | os.PathLike,
    model=None,
    layers=None,
    score: Optional[str] = None,
) -> RoutingPriors:
    """Load a priors file and check it fits: ValueError on any mismatch.

    * ``model``: its routers must have the file's E, its MoE layers must include the file's
      layers (or ``layers``), its family must match the file's ``model_type``, and its default
      score must be the file's (unless ``score`` says otherwise). A different ``name_or_path``
      is allowed (a fine-tuned checkpoint of the same base keeps its routers' shape).
    * ``layers``: decoder indices (or ``"all"``/``"middle"``, resolved on ``model``) that
      training will use; each must be in the file.
    * ``score``: the score training will use; must equal the file's.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"routing priors file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT or "priors" not in f.keys():
                raise ValueError(f"{path} is not a SARA routing-priors file (no {FORMAT!r} metadata / 'priors' tensor)")
            probs = f.get_tensor("priors")
            anchor_correct = f.get_tensor("anchor_correct").bool() if "anchor_correct" in f.keys() else None
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    if metadata.get("version") != VERSION:
        raise ValueError(f"{path}: priors format version {metadata.get('version')!r}, this library reads {VERSION!r}")
    try:
        file_layers = tuple(int(i) for i in json.loads(metadata["layers"]))
        num_experts, score_in_file = int(metadata["num_experts"]), metadata["score"]
        temperature = float(metadata["temperature"])
    except (KeyError, TypeError, ValueError) as e:  # a hand-made or truncated header
        raise ValueError(f"{path}: missing or malformed priors metadata ({type(e).__name__}: {e})") from None
    if "max_length" not in metadata:
        raise ValueError(
            f"{path}: missing or malformed priors metadata (no 'max_length': the file predates recording the "
            "anchors' truncation); re-extract it with extract_routing_priors"
        )
    try:
        max_length = json.loads(metadata["max_length"])
    except ValueError:
        max_length = metadata["max_length"]
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(
            f"{path}: missing or malformed priors metadata (max_length must be a positive int or null, "
            f"got {metadata['max_length']!r})"
        )
    if probs.dim() != 3 or probs.shape[1] != len(file_layers) or probs.shape[2] != num_experts:
        raise ValueError(f"{path}: priors tensor of shape {tuple(probs.shape)} does not match its metadata")
    priors = RoutingPriors(
        probs=probs.float(),
        layers=file_layers,
        score=score_in_file,
        temperature=temperature,
        model_name_or_path=metadata.get("model_name_or_path", ""),
        model_type=metadata.get("model_type", ""),
        fingerprint=metadata.get("anchors_sha256", ""),
        max_length=max_length,
        anchor_correct=anchor_correct,
    )
    if anchor_correct is not None and anchor_correct.shape != (priors.num_examples,):
        raise ValueError(f"{path}: anchor_correct of shape {tuple(anchor_correct.shape)} does not match its "
                         f"{priors.num_examples} examples")
    if score is not None and score != priors.score:
        raise ValueError(f"score={score!r} but the priors in {path} were computed with score={priors.score!r}")
    if model is not None:
        _, model_type = _metadata_of(model)
        if priors.model_type and model_type and model_type != priors.model_type:
            raise ValueError(
                f"the priors in {path} come from a {priors.model_type!r} model "
                f"({priors.model_name_or_path or 'unknown'}), not from this {model_type!r} model"
            )
        model_layers, num_experts, model_score = probe_routing(model, "all", score)
        wanted = priors.layers if layers is None else probe_routing(model, layers, score)[0]
        not_moe = [i for i in priors.layers if i not in model_layers]
        if not_moe:
            raise ValueError(
                f"the priors in {path} cover decoder layers {list(priors.layers)}, but layers {not_moe} of this model "
                f"are not MoE layers (its MoE layers: {list(model_layers)}): the file comes from another model"
            )
        priors.check_against(wanted, num_experts, model_score)
    elif layers is not None:
        spec = resolve_layers_spec(layers)
        if isinstance(spec, str):
            raise ValueError(f"layers={layers!r} can only be resolved with model=; pass decoder indices or the model")
        priors.check_against(spec, priors.num_experts, priors.score)
    return priors
