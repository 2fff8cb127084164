"""Stand-ins that let a tiny Megatron-core GPTModel run on a CPU, for examples/megatron_sara.py and
the tests (never part of sara_kernels; on a GPU neither is used).

megatron-core 0.16 assumes CUDA in two places a tiny model reaches: ``Router.gating`` moves the
router weight to ``torch.cuda.current_device()``, and ``DotProductAttention`` takes its score
buffer from a CUDA memory pool (and refuses packed sequences). :class:`CPUGatingSARARouter` is
the SARA router with the same gating minus the device move, and :class:`SDPACoreAttention`
is causal attention by ``torch.nn.functional.scaled_dot_product_attention``, block-diagonal per
packed sequence for ``qkv_format="thd"``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from sara_kernels.megatron import SARARouter


class CPUGatingSARARouter(SARARouter):
    """``Router.gating`` without moving the weight to CUDA (and without its Transformer Engine GEMM,
    which megatron-core 0.16 references even when TE is absent)."""

    def gating(self, input):
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(input.to(dtype), self.weight.to(dtype), bias)


class SDPACoreAttention(MegatronModule):
    """Causal core attention: [s, b, heads, d] -> [s, b, heads * d] ([t, heads, d] -> [t, heads * d] packed)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:  # [s, b, h, d] -> [b, h, s, d]
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)
        cu = packed_seq_params.cu_seqlens_q_padded
        cu = packed_seq_params.cu_seqlens_q if cu is None else cu
        positions = torch.arange(query.shape[0], device=query.device)
        sequence = torch.bucketize(positions, cu[1:].to(query.device), right=True)
        allowed = (sequence[:, None] == sequence[None, :]) & (positions[:, None] >= positions[None, :])
        q, k, v = (x.permute(1, 0, 2) for x in (query, key, value))  # [h, t, d]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return out.permute(1, 0, 2).reshape(query.shape[0], -1)


def with_sdpa_attention(layer_spec):
    """``layer_spec`` (a TransformerLayer ModuleSpec) with :class:`SDPACoreAttention` as its core attention."""
    attention = layer_spec.submodules.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=SDPACoreAttention)
    )
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, self_attention=attention))
