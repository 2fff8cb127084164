"""Router shapes of real MoE models: the one table ``python -m sara_kernels bench`` and
``benchmarks/`` use, and the reading of the same fields from a saved model's ``config.json``.

Standard library only: ``bench -h`` lists the table without importing torch.

Each entry's values are those of the model's public ``config.json`` on the Hugging Face Hub
(``source``). ``layers`` counts the MoE layers (the routers SARA sees), not the decoder layers:
DeepSeek-V3 has 61 decoder layers, of which the first 3 are dense (``first_k_dense_replace``).
``score`` is the function SARA applies to the router logits: ``sigmoid`` where the model scores
experts with a sigmoid, ``softmax`` otherwise, including the families that pick the top k first
and normalise over those (GPT-OSS) or use sparsemixer (Phi-3.5-MoE), whose router logits are still
a softmax over all experts in SARA's pooled distribution.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """The router shape of one MoE model, and the width of its experts."""

    name: str
    layers: int  # MoE layers (routers)
    experts: int  # routed experts per layer
    top_k: int  # experts per token
    score: str  # "softmax" or "sigmoid"
    hidden: int  # the router gate is a [hidden] -> [experts] linear
    expert_width: int  # intermediate size of one routed expert
    source: str  # where the values come from


def _hub(repo: str) -> str:
    return f"https://huggingface.co/{repo}/blob/main/config.json"


ARCHS = {
    arch.name.lower(): arch
    for arch in (
        Arch("Qwen3-30B-A3B", 48, 128, 8, "softmax", 2048, 768, _hub("Qwen/Qwen3-30B-A3B")),
        Arch("Qwen3-235B-A22B", 94, 128, 8, "softmax", 4096, 1536, _hub("Qwen/Qwen3-235B-A22B")),
        Arch("Qwen3-Next-80B-A3B", 48, 512, 10, "softmax", 2048, 512, _hub("Qwen/Qwen3-Next-80B-A3B-Instruct")),
        Arch("Phi-3.5-MoE", 32, 16, 2, "softmax", 4096, 6400, _hub("microsoft/Phi-3.5-MoE-instruct")),
        Arch("Mixtral-8x7B", 32, 8, 2, "softmax", 4096, 14336, _hub("mistralai/Mixtral-8x7B-v0.1")),
        Arch("OLMoE-1B-7B", 16, 64, 8, "softmax", 2048, 1024, _hub("allenai/OLMoE-1B-7B-0924")),
        # 61 decoder layers, first_k_dense_replace = 3; scoring_func = "sigmoid".
        Arch("DeepSeek-V3", 58, 256, 8, "sigmoid", 7168, 2048, _hub("deepseek-ai/DeepSeek-V3")),
        Arch("GPT-OSS-20B", 24, 32, 4, "softmax", 2880, 2880, _hub("openai/gpt-oss-20b")),
        Arch("GPT-OSS-120B", 36, 128, 4, "softmax", 2880, 2880, _hub("openai/gpt-oss-120b")),
    )
}

# Where the MoE families of transformers 5.x keep each field, first match wins; DBRX nests its
# under "ffn_config", Llama 4 and other multimodal wrappers under "text_config".
_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "experts_per_token", "moe_k", "moe_top_k", "moe_topk")
_HIDDEN_KEYS = ("hidden_size", "d_model")
_WIDTH_KEYS = ("moe_intermediate_size", "intermediate_size", "ffn_hidden_size")
# Families that score with a sigmoid without saying so in a scoring_func field (transformers' own
# configs of DeepSeek-V3 and GLM-4-MoE have none; the Hub's DeepSeek-V3 config.json does).
_SIGMOID_FAMILIES = ("deepseek_v3", "glm4_moe", "llama4", "llama4_text")


def arch_from_config(path: str) -> Arch:
    """The router shape of a saved model (a folder with ``config.json``, or the file itself).

    Raises ValueError naming the file and what is missing when it describes no MoE routers or lacks
    a field the step model needs (top-k, hidden size, expert width).
    """
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"--model: {path} is neither a model folder with a config.json nor a config.json file")
    try:
        with open(file) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model: {file} is not valid JSON ({e})") from None
    config = config.get("text_config") or config  # multimodal wrappers (Llama 4) keep the LM's fields there
    fields = {**config.get("ffn_config", {}), **config}
    experts = _first(fields, _EXPERTS_KEYS)
    if isinstance(experts, list):  # Hunyuan may give one count per layer
        experts = max(experts)
    if not experts or experts < 2:
        raise ValueError(f"--model: {file} has no MoE routers (none of {', '.join(_EXPERTS_KEYS)} is > 1); "
                         f"bench needs an MoE model, or --arch NAME ({', '.join(ARCHS)})")
    layers = _moe_layers(config, fields.get("num_hidden_layers") or fields.get("n_layers"), file)
    score = "sigmoid" if config.get("scoring_func") == "sigmoid" or config.get("model_type") in _SIGMOID_FAMILIES else "softmax"
    top_k, hidden, width = (_first(fields, keys) for keys in (_TOP_K_KEYS, _HIDDEN_KEYS, _WIDTH_KEYS))
    for value, keys in ((top_k, _TOP_K_KEYS), (hidden, _HIDDEN_KEYS), (width, _WIDTH_KEYS)):
        if not value:
            raise ValueError(f"--model: {file} has none of {', '.join(keys)}; bench needs it to build the step "
                             f"model, or use --arch NAME ({', '.join(ARCHS)})")
    name = config.get("_name_or_path") or os.path.basename(os.path.dirname(os.path.abspath(file)))
    return Arch(name, layers, int(experts), int(top_k), score, int(hidden), int(width), file)


def _first(fields: dict, keys: tuple):
    return next((fields[k] for k in keys if fields.get(k)), None)


def _moe_layers(config: dict, layers, file: str) -> int:
    """MoE layers among the decoder layers, by the family's dense-layer fields."""
    if not layers:
        raise ValueError(f"--model: {file} has no num_hidden_layers")
    indices = range(layers)
    if "first_k_dense_replace" in config:  # DeepSeek-V3, GLM-4-MoE
        step = config.get("moe_layer_freq") or 1
        moe = [i for i in indices if i >= config["first_k_dense_replace"] and i % step == 0]
    elif "decoder_sparse_step" in config or "mlp_only_layers" in config:  # Qwen MoE families
        step, dense = config.get("decoder_sparse_step") or 1, set(config.get("mlp_only_layers") or ())
        moe = [i for i in indices if i not in dense and (i + 1) % step == 0]
    elif "expert_layer_period" in config:  # Jamba
        period, offset = config["expert_layer_period"], config.get("expert_layer_offset", 0)
        moe = [i for i in indices if i % period == offset]
    elif config.get("moe_layers") is not None:  # Llama 4
        moe = list(config["moe_layers"])
    elif "interleave_moe_layer_step" in config:
        step = config["interleave_moe_layer_step"] or 1
        moe = [i for i in indices if (i + 1) % step == 0]
    else:
        moe = list(indices)
    if not moe:
        raise ValueError(f"--model: {file} has {layers} decoder layers but none of them is an MoE layer")
    return len(moe)


def resolve_arch(name: str) -> Arch:
    """The table's entry for ``name`` (case-insensitive)."""
    arch = ARCHS.get(name.lower())
    if arch is None:
        raise ValueError(f"--arch: unknown architecture {name!r}; choose one of {', '.join(ARCHS)}, "
                         f"or give --model PATH (a saved model folder or its config.json)")
    return arch
