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
):
    """Pooled routing distribution of each text (or chat) in ``sides``: ([N, L, E] float32 on CPU, layers, score).

    No grad, model in eval mode for the duration (its mode is restored), each forward stopped
    after the last selected router (``capture_router_logits(early_exit=True)``), batches of
    ``batch_size`` right-padded sequences, tokenised exactly as the training collator does.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoder = SARACollator(tokenizer, max_length=max_length)
    device = model_device(model)
    pad = pad_token_id(tokenizer)
    kwargs = forward_kwargs(model, lm_head=False)
    layer_spec = resolve_layers_spec(layers)
    chunks, found_layers, found_score = [], None, None
    with eval_mode(model), torch.no_grad():
        for start in tqdm(range(0, len(sides), batch_size), desc=desc, disable=not progress, leave=False):
            batch = sides[start : start + batch_size]
            encoded = [encoder.encode(side, f"{desc}[{start + j}]") for j, side in enumerate(batch)]
            ids, mask = pad_right(encoded, pad)
            ids, mask = ids.to(device), mask.to(device)
            with capture_router_logits(model, layers=layer_spec, score=score, early_exit=True) as cap:
                model(input_ids=ids, attention_mask=mask, **kwargs)
            probs = routing_distribution(cap.logits, mask, score=cap.score, temperature=temperature, backend=backend)
            chunks.append(probs.float().permute(1, 0, 2).cpu())
            found_layers, found_score = tuple(int(i) for i in cap.layers), cap.score
    return torch.cat(chunks), found_layers, found_score
