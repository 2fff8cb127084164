"""SARA on MoE code outside transformers, in a plain PyTorch loop: ``python examples/torchtitan_style.py``.

The model mimics torchtitan's MoE transformer (it does not import torchtitan): decoder blocks in a
``layers`` ModuleDict, the first ``n_dense_layers`` dense, the others with an ``moe`` whose
``TokenChoiceTopKRouter`` scores the experts with an independent sigmoid of its ``gate`` Linear
(DeepSeek-V3 style) and returns the *post-top-k* scores and expert indices. Those are not the
logits SARA needs, so the capture hooks the gate itself, whose output is the raw [N, E] logits::

    capture_router_logits(model, routers=r"layers\\.\\d+\\.moe\\.router\\.gate", score="sigmoid")

and ``sara_loss(..., score="sigmoid")`` aligns the normalised sigmoid (what the router uses).
The data are synthetic parallel sentences of token ids: the "target" language is the anchor's
words through a fixed word map, in reverse order, so meaning is aligned exactly. Runs on a CPU in
seconds; needs torch and sara-kernels (no transformers).

It stays beside ``examples/torchtitan_sara.py`` (SARA inside torchtitan itself, through its
model converter) as the example of ``capture_router_logits(routers=...)`` on MoE code that is
neither a transformers model nor torchtitan's, with torch alone: the README's "Other MoE code" line
points here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sara_kernels import sara_loss
from sara_kernels.hf import capture_router_logits

#: Module paths of the router gates: the one pattern that ties this model to the capture.
ROUTER_GATES = r"layers\.\d+\.moe\.router\.gate"
PAD, IGNORE_INDEX = 0, -100


@dataclass
class ModelArgs:
    vocab_size: int = 64
    dim: int = 32
    n_layers: int = 4
    n_dense_layers: int = 1  # DeepSeek-V3's first_k_dense_replace
    n_heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 32


class TokenChoiceTopKRouter(nn.Module):
    """torchtitan's router: sigmoid scores of a Linear gate, top-k per token, route_norm."""

    def __init__(self, dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.top_k = top_k

    def forward(self, x: torch.Tensor):
        scores = torch.sigmoid(self.gate(x).float())  # [N, E]
        top_scores, expert_indices = scores.topk(self.top_k, dim=-1)
        top_scores = top_scores / top_scores.sum(dim=-1, keepdim=True)
        return top_scores, expert_indices


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.router = TokenChoiceTopKRouter(args.dim, args.num_experts, args.top_k)
        scale = args.dim**-0.5
        self.w1 = nn.Parameter(torch.randn(args.num_experts, args.dim, args.expert_hidden) * scale)
        self.w2 = nn.Parameter(torch.randn(args.num_experts, args.expert_hidden, args.dim) * args.expert_hidden**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        tokens = x.reshape(-1, dim)  # router sees [N, dim] with N = batch * seq, row = b * seq + s
        top_scores, expert_indices = self.router(tokens)
        out = torch.zeros_like(tokens)
        for expert in range(self.w1.shape[0]):
            token_idx, slot = (expert_indices == expert).nonzero(as_tuple=True)
            hidden = F.silu(tokens[token_idx] @ self.w1[expert]) @ self.w2[expert]
            out.index_add_(0, token_idx, hidden * top_scores[token_idx, slot, None].to(hidden.dtype))
        return out.reshape(batch, seq, dim)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.attention_norm = nn.RMSNorm(args.dim)
        self.wqkv = nn.Linear(args.dim, 3 * args.dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)
        self.ffn_norm = nn.RMSNorm(args.dim)
        self.moe_enabled = layer_id >= args.n_dense_layers
        if self.moe_enabled:
            self.moe = MoE(args)
        else:
            self.feed_forward = nn.Sequential(
                nn.Linear(args.dim, 4 * args.dim), nn.SiLU(), nn.Linear(4 * args.dim, args.dim)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.wqkv(self.attention_norm(x)).view(batch, seq, 3, self.n_heads, -1).unbind(2)
        # Causal attention and right padding: valid tokens never attend to padding.
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.wo(attn.transpose(1, 2).reshape(batch, seq, dim))
        h = self.ffn_norm(x)
        return x + (self.moe(h) if self.moe_enabled else self.feed_forward(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm = nn.RMSNorm(args.dim)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h)
        return self.output(self.norm(h))


def parallel_batch(batch_size: int, vocab_size: int, generator: torch.Generator, max_len: int = 12):
    """(anchor_ids, anchor_mask, target_ids, target_mask): right-padded [B, S] token ids and masks.

    Anchor words are ids in [1, V/2); the target is each word mapped to V/2 + (word * 7) % (V/2)
    in reverse order, so the pairs are exact translations with different surface forms.
    """
    half = vocab_size // 2
    lengths = torch.randint(4, max_len + 1, (batch_size,), generator=generator)
    anchor = torch.full((batch_size, max_len), PAD)
    target = torch.full((batch_size, max_len), PAD)
    for row, n in enumerate(lengths.tolist()):
        words = torch.randint(1, half, (n,), generator=generator)
        anchor[row, :n] = words
        target[row, :n] = half + (words.flip(0) * 7) % half
    mask = (torch.arange(max_len) < lengths[:, None]).long()
    return anchor, mask, target, mask.clone()


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def sara_step(model: nn.Module, batch, sara_weight: float):
    """(LM + λ·SARA, LM, SARA) of one batch: anchor forward without gradient, target forward with."""
    anchor_ids, anchor_mask, target_ids, target_mask = batch
    with torch.no_grad(), capture_router_logits(model, routers=ROUTER_GATES, score="sigmoid") as anchor:
        model(anchor_ids)
    with capture_router_logits(model, routers=ROUTER_GATES, score="sigmoid") as target:
        logits = model(target_ids)
    lm = lm_loss(logits, target_ids, target_mask)
    sara = sara_loss(anchor.logits, target.logits, anchor_mask, target_mask, score=target.score)
    return lm + sara_weight * sara, lm, sara


def build_model(seed: int = 0) -> Transformer:
    """A random-init model, identical for equal seeds."""
    torch.manual_seed(seed)
    return Transformer(ModelArgs())


def train(steps: int = 40, *, sara_weight: float = 1.0, lr: float = 3e-3, batch_size: int = 16, seed: int = 0):
    """Train ``build_model(seed)``; returns (model, history): per step {"step", "loss", "lm", "sara"}."""
    args = ModelArgs()
    model = build_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed + 1)
    history = []
    for step in range(steps):
        loss, lm, sara = sara_step(model, parallel_batch(batch_size, args.vocab_size, generator), sara_weight)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append({"step": step, "loss": loss.item(), "lm": lm.item(), "sara": sara.item()})
    return model, history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--sara-weight", type=float, default=1.0)
    args = parser.parse_args()
    _, history = train(args.steps, sara_weight=args.sara_weight)
    for entry in history[:: max(1, len(history) // 8)] + history[-1:]:
        print(f"step {entry['step']:4d}  loss {entry['loss']:.4f}  lm {entry['lm']:.4f}  sara {entry['sara']:.5f}")


if __name__ == "__main__":
    main()
