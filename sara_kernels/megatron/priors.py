"""Cached anchor routing priors from a Megatron-core model, in the file format of
:mod:`sara_kernels.hf.priors`, so that training with ``with_sara(spec, priors=path)`` skips the
anchor forward.

The logits are read with a forward pre-hook on each ``TopKRouter`` that calls the router's own
``gating`` on the router input (in eval mode, without grad: the router's forward computes the
same logits once more, and nothing in the model changes).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from megatron.core.transformer.moe.router import TopKRouter

from ..api import routing_distribution
from ..hf.data import anchors_fingerprint
from ..hf.priors import RoutingPriors, save_routing_priors
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
) -> RoutingPriors:
    """Run a Megatron ``GPTModel`` (one pipeline stage holding every layer) over ``anchors`` and
    write their routing priors to ``path``.

    ``anchors``: token-id sequences (lists or 1-D tensors) in dataset order: row i of the file is
    anchor i, looked up by ``sara_batch(example_index=...)``. Batches are right-padded with
    ``pad_token_id`` and passed with ``padding_mask``; causal attention keeps padding out of the
    valid tokens. ``layers``: ``"all"``, ``"middle"`` or 0-based decoder-layer indices of MoE
    layers. The score is the routers' ``moe_router_score_function``. Single process: every
    rank that calls it runs all anchors.
    """
    if len(anchors) == 0:
        raise ValueError("anchors: no examples to extract priors from")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    token_ids = [_token_ids(a, i) for i, a in enumerate(anchors)]
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
    rows = []
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
                model(tokens, positions, None, padding_mask=~valid)
                logits = [recorded[layer].transpose(0, 1).reshape(-1, recorded[layer].shape[-1]) for layer in chosen]
                pooled = routing_distribution(logits, valid, score=score, temperature=temperature, backend=backend)
                rows.append(pooled.permute(1, 0, 2).float().cpu())  # [b, L, E]
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
    )
    save_routing_priors(priors, path)
    return priors
