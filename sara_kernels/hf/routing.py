"""Running a model for its routing: device and forward options, evaluation mode, pooled routing
distributions of many texts (used by prior extraction and the ``analyze`` program)."""

from __future__ import annotations

import contextlib
import inspect
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..api import routing_distribution
from ..layer_selection import resolve_layers_spec
from .capture import capture_router_logits
from .collate import SARACollator, pad_right, pad_token_id


def model_device(model) -> torch.device:
    """Device of the model's first parameter (where inputs must go)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def forward_kwargs(model, *, lm_head: bool) -> dict:
    """Extra keyword arguments for a forward whose only purpose is the router logits.

    ``use_cache=False`` avoids building a KV cache; ``logits_to_keep=1`` (when ``lm_head`` is
    False and the model supports it) skips the vocabulary projection of every position but
    one, which for large vocabularies is a big part of a short forward.
    """
    params = inspect.signature(model.forward).parameters
    has_var_kw = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {}
    if "use_cache" in params or has_var_kw:
        kwargs["use_cache"] = False
    if not lm_head and "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    return kwargs


def answer_positions(answer_mask: torch.Tensor) -> torch.Tensor:
    """The columns whose logits predict an answer token of some row ([K] long: each answer
    column - 1; reading them is a host sync). The collator never marks a sequence's first token."""
    return torch.nonzero(answer_mask.any(dim=0)).reshape(-1) - 1


def answers_reproduced(logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor,
                       positions: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[num sequences] bool: whether each sequence's answer (its tokens in ``answer_mask``) is what
    the model predicts greedily, teacher-forced; False for a sequence without answer tokens.

    ``logits`` [R, K, V] are the model's at ``positions`` (:func:`answer_positions`) of ``input_ids``
    [R, S]; sequences are the rows, or with ``cu_seqlens`` those of the one packed row.
    """
    targets = positions + 1
    missed = answer_mask[:, targets].bool() & (logits.argmax(dim=-1) != input_ids[:, targets])
    return _answered_without_miss(missed, targets, answer_mask, cu_seqlens)


def answers_hit(is_top1: torch.Tensor, answer_mask: torch.Tensor,
                cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`answers_reproduced` from a forward that scored each next token instead of returning
    logits: ``is_top1`` [R, S - 1], whether the token at column ``t + 1`` is the model's most likely
    prediction at column ``t`` (TRL's fused LM head, which scores the labelled tokens)."""
    targets = torch.arange(1, answer_mask.shape[1], device=answer_mask.device)
    missed = answer_mask[:, 1:].bool() & ~is_top1.bool()
    return _answered_without_miss(missed, targets, answer_mask, cu_seqlens)


def _answered_without_miss(missed: torch.Tensor, targets: torch.Tensor, answer_mask: torch.Tensor,
                           cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """[num sequences] bool: a sequence has answer tokens and none of them is in ``missed`` [R, K]
    (``missed[:, k]`` is about the token at column ``targets[k]``)."""
    answered = answer_mask.bool()
    if cu_seqlens is None:
        return answered.any(dim=1) & ~missed.any(dim=1)
    bounds = cu_seqlens[1:].to(targets.device, torch.long)
    num = bounds.shape[0]
    of_target = torch.searchsorted(bounds, targets, right=True)
    of_token = torch.searchsorted(bounds, torch.arange(answer_mask.shape[1], device=targets.device), right=True)
    misses = torch.zeros(num, device=targets.device).index_add_(0, of_target, missed[0].float())
    counts = torch.zeros(num, device=targets.device).index_add_(0, of_token, answered[0].float())
    return (counts > 0) & (misses == 0)


def probe_routing(model, layers="all", score=None):
    """(decoder-layer indices, E, score) that capturing ``layers`` yields on ``model``.

    Found with a 2-token forward rather than read from the config, so it agrees with what
    training captures for every family ``capture_router_logits`` supports. A non-MoE model
    fails here with the capture's ValueError.
    """
    ids = torch.zeros(1, 2, dtype=torch.long, device=model_device(model))
    with torch.no_grad(), capture_router_logits(model, layers=resolve_layers_spec(layers), score=score,
                                                early_exit=True) as cap:
        model(input_ids=ids, **forward_kwargs(model, lm_head=False))
    return tuple(int(i) for i in cap.layers), int(cap.logits[0].shape[-1]), cap.score


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode for the block, its previous mode restored after (also on error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def pooled_routing(
    model,
    tokenizer,
    sides: Sequence,
    *,
    layers="all",
    score=None,
    temperature: float = 1.0,
    batch_size: int = 8,
    max_length: Optional[int] = None,
    backend: str = "auto",
    progress: bool = True,
    desc: str = "routing",
    answers: Optional[Sequence[str]] = None,
):
    """Pooled routing distribution of each text (or chat) in ``sides``: ([N, L, E] float32 on CPU, layers, score).

    No grad, model in eval mode for the duration (its mode is restored), each forward stopped
    after the last selected router (``capture_router_logits(early_exit=True)``), batches of
    ``batch_size`` right-padded sequences, tokenised exactly as the training collator does.

    With ``answers`` (one per side, see :func:`~sara_kernels.hf.data.side_answer`) the forwards
    run to the end, projecting only the answer positions as the trainer's anchor forward does, and
    a fourth value is returned: [N] bool, whether the model reproduces each side's answer.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if answers is not None and len(answers) != len(sides):
        raise ValueError(f"answers: expected one per side ({len(sides)}), got {len(answers)}")
    encoder = SARACollator(tokenizer, max_length=max_length)
    device = model_device(model)
    pad = pad_token_id(tokenizer)
    kwargs = forward_kwargs(model, lm_head=False)
    layer_spec = resolve_layers_spec(layers)
    chunks, reproduced, found_layers, found_score = [], [], None, None
    with eval_mode(model), torch.no_grad():
        for start in tqdm(range(0, len(sides), batch_size), desc=desc, disable=not progress, leave=False):
            batch = sides[start : start + batch_size]
            if answers is None:
                encoded = [encoder.encode(side, f"{desc}[{start + j}]") for j, side in enumerate(batch)]
            else:
                encoded, marks = zip(*(encoder.answer_mask(side, answers[start + j], f"{desc}[{start + j}]")
                                       for j, side in enumerate(batch)))
                answer_mask = pad_right(marks, 0)[0].to(device)
                positions = answer_positions(answer_mask)
                if "logits_to_keep" in kwargs:
                    kwargs["logits_to_keep"] = positions
            ids, mask = pad_right(encoded, pad)
            ids, mask = ids.to(device), mask.to(device)
            with capture_router_logits(model, layers=layer_spec, score=score, early_exit=answers is None) as cap:
                outputs = model(input_ids=ids, attention_mask=mask, **kwargs)
            probs = routing_distribution(cap.logits, mask, score=cap.score, temperature=temperature, backend=backend)
            chunks.append(probs.float().permute(1, 0, 2).cpu())
            found_layers, found_score = tuple(int(i) for i in cap.layers), cap.score
            if answers is not None:
                logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
                if "logits_to_keep" not in kwargs:
                    logits = logits[:, positions]
                reproduced.append(answers_reproduced(logits, ids, answer_mask, positions).cpu())
    if answers is None:
        return torch.cat(chunks), found_layers, found_score
    return torch.cat(chunks), found_layers, found_score, torch.cat(reproduced)
