"""What SARA costs inside a training step of an MoE architecture, and what its router gates cost.

The step model is a transformers Qwen3-MoE built from a config with random weights (nothing is
downloaded): the architecture's router shape (hidden size, routed experts, top-k) and expert
width, ``layers`` MoE layers deep, parameters in the benchmark's dtype, AdamW. Other details of
the family (attention layout, shared experts, dense layers, the routing's own normalisation) are
not modelled: the router gate, the expert dispatch and the loss on the router logits are what
SARA's share depends on. SARA takes the architecture's score function. Router logits come from
``output_router_logits=True``; the anchor is the first half of the batch and the target the
second, as in SARA training. Every variant requests the router logits (and so pays the
load-balancing aux loss), so the variants differ only by the SARA loss.

Why the extra measurements: a step takes tens of milliseconds and the fused op a fraction of
one, so step-time differences sit near the run-to-run noise. Variants are therefore timed
round-robin (drift hits all of them alike), and the op is also timed on its own at the step's
shapes, together with the router gate it rides on (the [N, H] × [H, E] linear of every layer,
forward and backward), which gives a noise-free "overhead relative to the gate".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import sara_kernels
from sara_kernels.backends import REGISTRY

from .bench_archs import Arch
from .bench_op import skip_reason
from .bench_timing import copies_for, median, peak_extra_bytes, time_calls

SARA_WEIGHT = 0.1  # λ of loss = LM loss + aux loss + λ·SARA (the value does not change the cost)
NO_SARA = "none"  # the variant without the alignment loss
VOCAB = 32000  # the LM head is not the router's cost: one size for every architecture
# On a CPU a step of the real expert width does not fit beside other work (Qwen3-30B-A3B: 0.6 B
# expert parameters per layer); a CPU step checks the measurement, its share is not a GPU's.
CPU_EXPERT_WIDTH = 32
CPU_VOCAB = 1024


@dataclass(frozen=True)
class StepShape:
    """The step model and its batch: ``seqs`` sequences of ``seq_len`` tokens per side."""

    arch: Arch
    layers: int
    seqs: int
    seq_len: int
    expert_width: int
    vocab: int

    @property
    def batch(self) -> int:
        return 2 * self.seqs  # the first half is the anchor side, the second the target side

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def heads(self) -> int:
        return self.arch.hidden // self.head_dim

    @property
    def head_dim(self) -> int:
        return next((d for d in (128, 64, 32, 16, 8) if self.arch.hidden % d == 0), self.arch.hidden)

    @property
    def kv_heads(self) -> int:
        return self.heads // 8 if self.heads % 8 == 0 else self.heads


def step_shape(arch: Arch, layers: int, tokens_per_side: int, seq_len: int, device: torch.device) -> StepShape:
    """The step at ``tokens_per_side`` tokens (rounded down to whole sequences, at least one)."""
    seq_len = min(seq_len, tokens_per_side)
    on_cpu = device.type == "cpu"
    return StepShape(arch, layers, max(1, tokens_per_side // seq_len), seq_len,
                     min(arch.expert_width, CPU_EXPERT_WIDTH) if on_cpu else arch.expert_width,
                     CPU_VOCAB if on_cpu else VOCAB)


def build_model(shape: StepShape, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    arch = shape.arch
    config = Qwen3MoeConfig(
        vocab_size=shape.vocab, hidden_size=arch.hidden, intermediate_size=4 * arch.hidden,
        moe_intermediate_size=shape.expert_width, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        num_experts=arch.experts, num_experts_per_tok=arch.top_k, max_position_embeddings=max(4096, shape.seq_len),
        output_router_logits=True, use_cache=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3MoeForCausalLM(config)
    model.to(dtype).train()
    return model


def make_batch(shape: StepShape, device):
    """Random tokens, sequences of random lengths between half and all of ``seq_len`` (ragged masks)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    input_ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq_len), generator=gen).to(device)
    lengths = torch.randint(max(1, shape.seq_len // 2), shape.seq_len + 1, (shape.batch,), generator=gen)
    attention_mask = (torch.arange(shape.seq_len)[None, :] < lengths[:, None]).long().to(device)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def sara_term(outputs, attention_mask, score: str, backend: str):
    """SARA between the two halves of the batch, from the step's router logits."""
    half = attention_mask.shape[0] // 2
    rows = half * attention_mask.shape[1]
    anchor = tuple(r[:rows] for r in outputs.router_logits)
    target = tuple(r[rows:] for r in outputs.router_logits)
    return sara_kernels.sara_loss(anchor, target, attention_mask[:half], attention_mask[half:], score=score,
                                  backend=backend)


def make_step(model, optimizer, batch, score: str, variant: str):
    """One optimizer step; ``variant`` is NO_SARA or the SARA backend (a name of the registry)."""

    def step(*_):
        outputs = model(**batch, output_router_logits=True)
        loss = outputs.loss
        if variant != NO_SARA:
            loss = loss + SARA_WEIGHT * sara_term(outputs, batch["attention_mask"], score, variant)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return None

    return step


def available_variants(device) -> tuple:
    """(variants to run, notes on the ones left out): NO_SARA, then every backend of the registry
    that runs on ``device``, the reference (which runs anywhere) before the fused ones; a note
    says why each other backend is left out."""
    variants, notes = [NO_SARA], {}
    for name in sorted(REGISTRY, key=lambda name: REGISTRY[name].fused):
        reason = skip_reason(name, device)
        if reason:
            notes[name] = reason
        else:
            variants.append(name)
    return variants, notes


def time_steps(model, optimizer, batch, score: str, variants, device, reps: int, warmup: int, progress=None) -> dict:
    """Median step time per variant, timed round-robin so slow drift affects all alike; plus
    extra peak memory of one step beyond the parameters, gradients and optimizer state.
    ``progress()`` is called after every step."""
    steps = {v: make_step(model, optimizer, batch, score, v) for v in variants}
    tick = progress or (lambda: None)
    for v in variants:
        time_calls(device, steps[v], copies=1, reps=warmup, warmup=0)
        tick()
    times = {v: [] for v in variants}
    for _ in range(reps):
        for v in variants:
            times[v] += time_calls(device, steps[v], copies=1, reps=1, warmup=0)
            tick()
    # One more step per variant for its memory, where the allocator keeps the statistics.
    memory = {v: peak_extra_bytes(device, steps[v])[1] if device.type == "cuda" else None for v in variants}
    return {v: dict(median_ms=median(times[v]), min_ms=min(times[v]), reps=len(times[v]), extra_peak_bytes=memory[v])
            for v in variants}


def time_gate(shape: StepShape, device, dtype: torch.dtype, l2_bytes: int, reps: int, warmup: int) -> dict:
    """The router gate of one layer (x [N, H] · Wᵀ [H, E], no bias) over the step's tokens,
    forward and fwd+bwd, rotating over L2-cold input copies like the SARA op's inputs."""
    n, hidden = shape.tokens, shape.arch.hidden
    copies = copies_for(n * hidden * dtype.itemsize, l2_bytes)
    xs = [torch.randn(n, hidden, device=device, dtype=dtype, requires_grad=True) for _ in range(copies)]
    w = torch.randn(shape.arch.experts, hidden, device=device, dtype=dtype, requires_grad=True)
    upstream = torch.randn(n, shape.arch.experts, device=device, dtype=dtype)

    def fwd(i, _):
        return F.linear(xs[i], w)

    def fwd_bwd(i, _):
        return torch.autograd.grad(F.linear(xs[i], w), (xs[i], w), upstream)

    return dict(
        fwd_ms=median(time_calls(device, fwd, copies=copies, reps=reps, warmup=warmup)),
        fwd_bwd_ms=median(time_calls(device, fwd_bwd, copies=copies, reps=reps, warmup=warmup)),
        copies=copies,
    )


def time_sara_alone(shape: StepShape, backends, device, dtype: torch.dtype, l2_bytes: int, reps: int,
                    warmup: int) -> dict:
    """SARA fwd+bwd on its own at the step's shapes: L tensors [N/2, E] per side, the step's
    attention mask, L2-cold input copies."""
    half_tokens = shape.tokens // 2
    experts = shape.arch.experts
    side_bytes = shape.layers * half_tokens * experts * dtype.itemsize
    copies = copies_for(2 * side_bytes, l2_bytes)
    mask = make_batch(shape, device)["attention_mask"]
    half = shape.seqs

    def side():
        return tuple(torch.randn(half_tokens, experts, device=device, dtype=dtype, requires_grad=True)
                     for _ in range(shape.layers))

    anchors = [side() for _ in range(copies)]
    targets = [side() for _ in range(copies)]
    results = {}
    for backend in backends:
        def fwd_bwd(i, _, backend=backend):
            loss = sara_kernels.sara_loss(anchors[i], targets[i], mask[:half], mask[half:], score=shape.arch.score,
                                          backend=backend)
            return torch.autograd.grad(loss, targets[i])

        results[backend] = dict(fwd_bwd_ms=median(time_calls(device, fwd_bwd, copies=copies, reps=reps, warmup=warmup)),
                                copies=copies)
    return results


def overhead_rows(steps: dict, gate: dict, alone: dict, layers: int) -> list:
    base = steps[NO_SARA]["median_ms"]
    gate_all_layers = gate["fwd_bwd_ms"] * layers
    rows = []
    for variant, r in steps.items():
        added = r["median_ms"] - base
        row = dict(
            variant=variant, step_ms=round(r["median_ms"], 3), step_min_ms=round(r["min_ms"], 3), reps=r["reps"],
            added_ms=round(added, 3), overhead_pct_of_step=round(100 * added / base, 3),
            added_vs_all_gates=round(added / gate_all_layers, 3),
            extra_peak_mb=None if r["extra_peak_bytes"] is None else round(r["extra_peak_bytes"] / 2**20, 1),
        )
        if variant in alone:
            op = alone[variant]["fwd_bwd_ms"]
            row.update(op_alone_ms=round(op, 4), op_alone_pct_of_step=round(100 * op / base, 3),
                       op_alone_vs_all_gates=round(op / gate_all_layers, 3))
        rows.append(row)
    return rows


COLUMNS = [
    ("variant", "variant"), ("step ms", "step_ms"), ("+ms", "added_ms"), ("% of step", "overhead_pct_of_step"),
    ("÷ gates", "added_vs_all_gates"), ("op alone ms", "op_alone_ms"), ("op % of step", "op_alone_pct_of_step"),
    ("op ÷ gates", "op_alone_vs_all_gates"), ("extra peak MB", "extra_peak_mb"),
]
COLUMN_NOTES = {
    "added_ms": "step time minus the step without SARA (median of round-robin steps)",
    "added_vs_all_gates": "added_ms / (router gate fwd+bwd × layers)",
    "op_alone_ms": "SARA fwd+bwd timed on its own at the step's shapes (L2-cold)",
    "extra_peak_mb": "peak memory of one step beyond parameters, gradients and optimizer state",
}


def measure_step(shape: StepShape, variants: list, device: torch.device, dtype: torch.dtype, l2_bytes: int,
                 reps: int, warmup: int, progress=None) -> dict:
    """The step's variants, the router gate and SARA alone: {"rows", "gate_per_layer", "params",
    "experts_implementation"}."""
    model = build_model(shape, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    batch = make_batch(shape, device)
    params = sum(p.numel() for p in model.parameters())
    steps = time_steps(model, optimizer, batch, shape.arch.score, variants, device, reps, warmup, progress)
    experts_impl = getattr(model.config, "_experts_implementation", None)
    del model, optimizer
    gate = time_gate(shape, device, dtype, l2_bytes, 10 * reps, warmup)
    alone = time_sara_alone(shape, [v for v in variants if v != NO_SARA], device, dtype, l2_bytes, 10 * reps, warmup)
    return dict(rows=overhead_rows(steps, gate, alone, shape.layers), gate_per_layer=gate, params=params,
                experts_implementation=experts_impl)
