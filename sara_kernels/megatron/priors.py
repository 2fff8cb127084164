"""Cached anchor routing priors from a Megatron-core model, in the file format of
:mod:`sara_kernels.hf.priors`, so that training with ``with_sara(spec, priors=path)`` skips the
anchor forward.

The logits are read with a forward pre-hook on each ``TopKRouter`` that calls the router's own
``gating`` on the router input (in eval mode, without grad: the router's forward computes the
same logits once more, and nothing in the model changes). With ``answer_masks`` the same forward's
LM logits say whether the model reproduces each anchor's answer, recorded as the file's
``anchor_correct`` by the rule of the Hugging Face extraction (:func:`~sara_kernels.hf.routing.answers_reproduced`).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from megatron.core.transformer.moe.router import TopKRouter

from ..api import routing_distribution
from ..hf.data import anchors_fingerprint
from ..hf.priors import RoutingPriors, save_routing_priors
from ..hf.routing import answer_positions, answers_reproduced
from ..layer_selection import resolve_layers_spec, select_layers
from .router import moe_layer_indices

__all__ = ["extract_routing_priors"]

MODEL_TYPE = "megatron-core"


def _routers(model) -> dict:
    found = {}
    for module in model.modules():
        if isinstance(module, TopKRouter):
            if module.layer_number is None:
                raise ValueError("a TopKRouter of the model has no layer_number: build the model through its layer spec")
            found[module.layer_number - 1] = module
    if not found:
        raise ValueError(f"{type(model).__name__} has no Megatron TopKRouter: not a Megatron MoE model")
    return found


def _token_ids(anchor, i: int) -> list:
    ids = anchor.tolist() if isinstance(anchor, torch.Tensor) else list(anchor)
    if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError(f"anchors[{i}]: expected a non-empty 1-D sequence of token ids")
    return ids


def _answer_mask(mask, num_tokens: int, i: int) -> list:
    values = mask.tolist() if isinstance(mask, torch.Tensor) else list(mask)
    if len(values) != num_tokens or not all(v in (0, 1) for v in values):
        raise ValueError(f"answer_masks[{i}]: expected {num_tokens} entries of 0 or 1 (one per token of anchors[{i}]), "
                         f"got {mask!r}")
    if values[0] or not any(values):
        # The first token has no prediction before it; an anchor without answer tokens has nothing to check.
        raise ValueError(f"answer_masks[{i}]: expected 1 on the answer tokens, at least one and not the first token, "
                         f"got {values}")
    return [bool(v) for v in values]


def extract_routing_priors(
    model,
    anchors: Sequence,
    path: str | os.PathLike,
    *,
    layers="all",
    temperature: float = 1.0,
    batch_size: int = 8,
    pad_token_id: int = 0,
    backend: str = "auto",
    device: Optional[torch.device] = None,
    answer_masks: Optional[Sequence] = None,
) -> RoutingPriors:
    """Run a Megatron ``GPTModel`` (one pipeline stage holding every layer) over ``anchors`` and
    write their routing priors to ``path``.

    ``anchors``: token-id sequences (lists or 1-D tensors) in dataset order: row i of the file is
    anchor i, looked up by ``sara_batch(example_index=...)``. Batches are right-padded with
    ``pad_token_id`` and passed with ``padding_mask``; causal attention keeps padding out of the
    valid tokens. ``layers``: ``"all"``, ``"middle"`` or 0-based decoder-layer indices of MoE
    layers. The score is the routers' ``moe_router_score_function``. Single process: every
    rank that calls it runs all anchors.

    ``answer_masks``: one per anchor, 0/1 per token with 1 on the anchor's answer tokens (not the
    first token), as the Hugging Face collator marks them. The file then also records
    ``anchor_correct``: whether the model's greedy prediction reproduces each answer token for
    token, teacher-forced, read from the same forward's logits (the model's output layer must give
    the whole vocabulary: ``parallel_output=False`` under tensor parallelism), so that training with
    these priors and ``sara_anchor_filter="correct"`` keeps those pairs.
    """
    if len(anchors) == 0:
        raise ValueError("anchors: no examples to extract priors from")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    token_ids = [_token_ids(a, i) for i, a in enumerate(anchors)]
    marks = None
    if answer_masks is not None:
        if len(answer_masks) != len(token_ids):
            raise ValueError(f"answer_masks: expected one per anchor ({len(token_ids)}), got {len(answer_masks)}")
        marks = [_answer_mask(m, len(ids), i) for i, (m, ids) in enumerate(zip(answer_masks, token_ids))]
        if not getattr(model, "post_process", True):
            raise ValueError("answer_masks: the model has no output layer (a pipeline stage before the last); "
                             "extract from a model holding every layer")
    routers = _routers(model)
    config = next(iter(routers.values())).config
    chosen = select_layers(sorted(routers), resolve_layers_spec(layers))
    missing = [layer for layer in chosen if layer not in moe_layer_indices(config)]
    if missing:
        raise ValueError(f"layers {missing} have routers but are not MoE layers by config.moe_layer_freq")
    if device is None:
        device = next(model.parameters()).device
    score = config.moe_router_score_function
    recorded: dict = {}

    def recorder(layer):
        def pre_hook(module, args):
            recorded[layer] = module.gating(args[0])  # [s, b, E]

        return pre_hook

    handles = [routers[layer].register_forward_pre_hook(recorder(layer)) for layer in chosen]
    was_training = model.training
    model.eval()
    rows, reproduced = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(token_ids), batch_size):
                chunk = token_ids[start : start + batch_size]
                seq_len = max(len(ids) for ids in chunk)
                tokens = torch.full((len(chunk), seq_len), pad_token_id, dtype=torch.long)
                valid = torch.zeros(len(chunk), seq_len, dtype=torch.bool)
                for j, ids in enumerate(chunk):
                    tokens[j, : len(ids)] = torch.tensor(ids)
                    valid[j, : len(ids)] = True
                tokens, valid = tokens.to(device), valid.to(device)
                positions = torch.arange(seq_len, device=device).expand(len(chunk), -1)
                recorded.clear()
                lm_logits = model(tokens, positions, None, padding_mask=~valid)  # [b, s, V]
                logits = [recorded[layer].transpose(0, 1).reshape(-1, recorded[layer].shape[-1]) for layer in chosen]
                pooled = routing_distribution(logits, valid, score=score, temperature=temperature, backend=backend)
                rows.append(pooled.permute(1, 0, 2).float().cpu())  # [b, L, E]
                if marks is not None:
                    reproduced.append(_reproduced(model, lm_logits, tokens, marks[start : start + batch_size], seq_len))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    priors = RoutingPriors(
        probs=torch.cat(rows).contiguous(),
        layers=tuple(chosen),
        score=score,
        temperature=float(temperature),
        model_type=MODEL_TYPE,
        fingerprint=anchors_fingerprint([{"anchor": ids} for ids in token_ids]),
        max_length=None,
        anchor_correct=torch.cat(reproduced) if marks is not None else None,
    )
    save_routing_priors(priors, path)
    return priors


def _reproduced(model, lm_logits: torch.Tensor, tokens: torch.Tensor, marks: list, seq_len: int) -> torch.Tensor:
    """[b] bool on the CPU: whether the greedy prediction of ``lm_logits`` reproduces each row's answer."""
    vocab = getattr(model, "vocab_size", lm_logits.shape[-1])
    if lm_logits.shape[-1] != vocab:
        raise ValueError(f"answer_masks: the model's logits cover {lm_logits.shape[-1]} of its {vocab} vocabulary "
                         "entries (tensor-parallel shards); build it with parallel_output=False to extract answers")
    answer_mask = torch.tensor([m + [False] * (seq_len - len(m)) for m in marks], device=tokens.device)
    positions = answer_positions(answer_mask)
    return answers_reproduced(lm_logits[:, positions], tokens, answer_mask, positions).cpu()
