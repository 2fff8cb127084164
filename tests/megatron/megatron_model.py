"""A tiny Megatron-core GPTModel with SARA in its spec, on the CPU (gloo), and the expected SARA
loss written independently of the router: from the logits the router's gating returned,
sliced per side as sara_loss documents it."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Optional

import pytest
import torch

megatron = pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'sara-kernels[megatron]')")

from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.tensor_parallel import random as random_module  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.moe.moe_utils import (  # noqa: E402
    MoEAuxLossAutoScaler,
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

try:  # megatron-core 0.19 keeps the aux-loss tracker in a MoEMetricsTracker object
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker  # noqa: E402
except ImportError:  # megatron-core 0.16: the tracker is moe_utils' module-level dict
    destroy_moe_metrics_tracker = None

from helpers import REPO  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "examples"))
from megatron_cpu import CPUGatingSARARouter, with_sdpa_attention  # noqa: E402

from sara_kernels import sara_loss  # noqa: E402
from sara_kernels.testing.tolerances import GREEDY_TOP1_MARGIN  # noqa: E402
from sara_kernels.megatron import TRACKER_NAME, SARAOptions, sara_batch, with_sara  # noqa: E402

NUM_LAYERS, HIDDEN, EXPERTS, VOCAB, MAX_LEN = 4, 16, 6, 40, 16


class RecordingRouter(CPUGatingSARARouter):
    """Keeps every logits tensor its gating returned, with its autograd history."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded = []

    def gating(self, input):
        logits = super().gating(input)
        self.recorded.append(logits)
        return logits


def init_parallel(seed: int = 0) -> None:
    """Megatron's parallel state on the default group (tp = pp = 1: every rank is data parallel)."""
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)
    reset_megatron_state()


def reset_megatron_state() -> None:
    """Aux-loss scale 1 (the shape the schedule copies into) and an empty aux-loss tracker."""
    MoEAuxLossAutoScaler.main_loss_backward_scale = torch.ones(1)
    if destroy_moe_metrics_tracker is not None:
        # 0.19's get_moe_layer_wise_logging_tracker() builds a new dict per call: clearing it
        # would leave the tracker's values to accumulate across tests; drop the tracker instead.
        destroy_moe_metrics_tracker()
    else:
        get_moe_layer_wise_logging_tracker().clear()


def tiny_config(**overrides) -> TransformerConfig:
    options = dict(
        num_layers=NUM_LAYERS, hidden_size=HIDDEN, num_attention_heads=2, ffn_hidden_size=32, moe_ffn_hidden_size=32,
        num_moe_experts=EXPERTS, moe_router_topk=2, moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=0.0,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    options.update(overrides)
    return TransformerConfig(**options)


def tiny_model(seed: int = 0, *, weight: float = 0.7, layers="middle", priors=None, router_class=RecordingRouter,
               layer_weights=None, divergence="js", anchor_filter="none", **config_overrides) -> GPTModel:
    torch.manual_seed(seed)
    options = SARAOptions(sara_weight=weight, sara_layers=layers, sara_layer_weights=layer_weights,
                          sara_divergence=divergence, sara_anchor_filter=anchor_filter)
    spec = with_sara(with_sdpa_attention(get_gpt_layer_local_spec(num_experts=EXPERTS)), options, priors=priors,
                     router_class=router_class)
    model = GPTModel(config=tiny_config(**config_overrides), transformer_layer_spec=spec, vocab_size=VOCAB,
                     max_sequence_length=MAX_LEN, position_embedding_type="learned_absolute")
    model.train()
    return model


def routers(model) -> list:
    return [layer.mlp.router for layer in model.decoder.layers]


def sara_layers(model) -> list:
    return [r for r in routers(model) if r.sara_layer is not None]


def random_batch(num_seqs: int, seq_len: int, seed: int, lengths: Optional[list] = None):
    """(tokens [b, s], position_ids, padding_mask [b, s], True = padding) with ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (num_seqs, seq_len), generator=g)
    if lengths is None:
        lengths = torch.randint(1, seq_len + 1, (num_seqs,), generator=g).tolist()
    padding = torch.arange(seq_len)[None, :] >= torch.tensor(lengths)[:, None]
    positions = torch.arange(seq_len).expand(num_seqs, -1)
    return tokens, positions, padding


def clean_forward(model, *args, **kwargs):
    """The model's forward in eval mode, where no router attaches anything: the logits it records
    carry a graph without MoEAuxLossAutoScaler nodes, which would add every lower layer's attached
    term to any gradient that passes through them, so gradients of an expected loss built on them
    are independent of what the routers attach (no dropout or jitter here: same values as training)."""
    model.eval()
    try:
        return model(*args, **kwargs)
    finally:
        model.train()


def expected_sara_padded(model, padding, anchor=None, target=None, anchor_probs=None, pair_weights=None):
    """sara_weight * sara_loss over the SARA layers from the last recorded logits [s, b, E] (float64
    reference, with ``pair_weights``), and its per-layer values."""
    logits = [r.recorded[-1].double() for r in sara_layers(model)]
    valid = ~padding  # [b, s]
    if target is None:
        target = list(range(valid.shape[0]))
    side = lambda z, cols: z.transpose(0, 1)[cols].reshape(-1, z.shape[-1])  # noqa: E731
    kwargs = dict(target_logits=[side(z, target) for z in logits], target_mask=valid[target])
    if anchor_probs is None:
        kwargs.update(anchor_logits=[side(z, anchor) for z in logits], anchor_mask=valid[anchor])
    else:
        kwargs.update(anchor_logits=None, anchor_probs=anchor_probs.double())
    options = sara_layers(model)[0].sara
    loss, per_layer = sara_loss(**kwargs, score=model.config.moe_router_score_function, backend="reference",
                                layer_weights=options.sara_layer_weights, divergence=options.sara_divergence,
                                pair_weights=None if pair_weights is None else torch.as_tensor(pair_weights).double(),
                                return_per_layer=True)
    return options.sara_weight * loss, per_layer


def tracked_sara(model) -> torch.Tensor:
    """The per-layer values the routers saved in Megatron's aux-loss tracker, SARA layers only."""
    values = get_moe_layer_wise_logging_tracker()[TRACKER_NAME]["values"]
    return values[[r.layer_number - 1 for r in sara_layers(model)]]


def grads_of(model) -> dict:
    return {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for name, p in model.named_parameters()}


@contextlib.contextmanager
def cpu_rng_for_recomputation():
    """Megatron's recomputation (``tensor_parallel.checkpoint``) saves and restores the CUDA RNG
    state around the recomputed forward; on a CPU there is none, and no CUDA random op runs, so
    the stand-in saves nothing and restores nothing. The CPU RNG state is still saved and
    restored by megatron-core itself."""
    saved = random_module._get_cuda_rng_state, random_module._set_cuda_rng_state
    random_module._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    random_module._set_cuda_rng_state = lambda *args, **kwargs: None
    try:
        yield
    finally:
        random_module._get_cuda_rng_state, random_module._set_cuda_rng_state = saved


@contextlib.contextmanager
def cpu_token_counter():
    """``forward_backward_no_pipelining`` allocates its token counter with ``device="cuda"``, its
    only CUDA allocation on one process; the stand-in puts a zeros(..., device="cuda") on the CPU."""
    zeros = torch.zeros

    def cpu_zeros(*args, device=None, **kwargs):
        return zeros(*args, device="cpu" if str(device).startswith("cuda") else device, **kwargs)

    torch.zeros = cpu_zeros
    try:
        yield
    finally:
        torch.zeros = zeros


def lm_logits_alone(model, ids: list) -> torch.Tensor:
    """The LM logits [n, V] of one unpadded sequence, by a plain eval forward."""
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.tensor([ids]), torch.arange(len(ids))[None], None)[0].double()
    finally:
        model.train()


def greedy_continuation(model, prompt: list, length: int) -> list:
    """``prompt`` followed by the model's greedy continuation of ``length`` tokens."""
    ids = list(prompt)
    for _ in range(length):
        ids.append(int(lm_logits_alone(model, ids)[-1].argmax()))
    return ids


def reproduced_by_hand(model, ids: list, mask: list) -> bool:
    """Whether the model's greedy prediction, run on ``ids`` alone, reproduces each token ``mask``
    marks (each prediction clear of a top-1 tie by GREEDY_TOP1_MARGIN)."""
    logits = lm_logits_alone(model, ids)
    reproduced = True
    for t in (t for t, marked in enumerate(mask) if marked):
        top2 = logits[t - 1].topk(2).values
        assert top2[0] - top2[1] > GREEDY_TOP1_MARGIN, f"answer token {t}: top-1 tie, choose another seed"
        reproduced &= int(logits[t - 1].argmax()) == ids[t]
    return reproduced


def answered_columns(model, answer_len: int, lengths: list, seed: int, changed=(1, 4), random=(5,)):
    """(tokens [b, s] right-padded with random tokens, padding mask, answer mask, whether each
    sequence is answered by :func:`reproduced_by_hand`): each sequence of ``lengths`` ends with
    ``answer_len`` answer tokens, the model's own greedy continuation, with its last token changed in
    the sequences ``changed``, random in ``random``; a sequence of length 0 is padding only."""
    g = torch.Generator().manual_seed(seed)
    seq_len = max(lengths)
    tokens = torch.randint(0, VOCAB, (len(lengths), seq_len), generator=g)
    answer_mask = torch.zeros(len(lengths), seq_len, dtype=torch.bool)
    answered = []
    for i, n in enumerate(lengths):
        if n == 0:  # a sequence of padding only
            answered.append(False)
            continue
        ids = greedy_continuation(model, tokens[i, : n - answer_len].tolist(), answer_len)
        if i in changed:
            ids[-1] = (ids[-1] + 1) % VOCAB
        if i in random:
            ids[-answer_len:] = torch.randint(0, VOCAB, (answer_len,), generator=g).tolist()
        tokens[i, :n] = torch.tensor(ids)
        answer_mask[i, n - answer_len : n] = True
        answered.append(reproduced_by_hand(model, ids, answer_mask[i, :n].tolist()))
    padding = torch.arange(seq_len)[None, :] >= torch.tensor(lengths)[:, None]
    return tokens, padding, answer_mask, answered



def sara_only_backward(output: torch.Tensor) -> None:
    """Backward through the model with the LM loss weighted 0: the gradients are SARA's alone."""
    (output.float().sum() * 0.0).backward()


__all__ = [
    "clear_aux_losses_tracker", "init_parallel", "reset_megatron_state", "tiny_config", "tiny_model", "routers",
    "sara_layers", "random_batch", "expected_sara_padded", "tracked_sara", "grads_of", "sara_only_backward",
    "RecordingRouter", "parallel_state", "clean_forward", "cpu_rng_for_recomputation", "cpu_token_counter",
    "lm_logits_alone", "greedy_continuation", "reproduced_by_hand", "answered_columns",
]
