"""Shared pieces of the SARA training tests: a tiny MoE, SGD arguments, an independent oracle,
and for the resume tests an optimizer-step counter and a checkpoint changed on disk.

The oracle (:func:`expected_update`) recomputes one SGD step by hand from transformers' own
``outputs.router_logits`` (not our capture hooks), plain ``F.cross_entropy`` (not the model's
loss function) and the float64 reference SARA loss, so the trainer is checked against code it
does not share.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import random

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from sara_kernels import reference
from sara_kernels.programs.corpus import ENGLISH_WORDS, build_word_tokenizer, make_parallel_corpus
from sara_kernels.testing.tolerances import GREEDY_TOP1_MARGIN

TOKENIZER = build_word_tokenizer()
LAMBDA = 5.0  # the SARA weight of the one-step tests: large, so SARA moves the routers far beyond rounding


def tiny_moe(seed=0, *, num_experts=4, num_layers=3, mlp_only_layers=(0,), tokenizer=TOKENIZER, **overrides):
    """Qwen3-MoE with a dense decoder layer 0 (MoE layers 1, 2): decoder index != MoE position."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    kwargs = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        num_experts=num_experts, num_experts_per_tok=2, max_position_embeddings=64,
        mlp_only_layers=list(mlp_only_layers), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.2,  # peaked routing at init, so SARA gradients are far above rounding
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**kwargs))


def close_process_group():
    """End a torchrun worker in order: what the run built on the group (a DDP reducer, the Trainer)
    may sit in reference cycles, and freed by the collector after the group is gone its gloo threads
    can hang or abort the process, so it is freed while the group lives."""
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def pairs(n=8, seed=3):
    return make_parallel_corpus(n, seed=seed)


def chat_tokenizer():
    """The test tokenizer with a template that renders a generation prompt (as real chat templates do)."""
    tokenizer = copy.deepcopy(TOKENIZER)
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% else %}{{ eos_token }}{% endif %}"
    )
    return tokenizer


def chat_pairs(n=8):
    """Pairs of chats, each a user turn and the assistant's reply."""
    plain = pairs(n + 1)
    return [
        {side: [{"role": "user", "content": plain[i][side]}, {"role": "assistant", "content": plain[i + 1][side]}]
         for side in ("anchor", "target")}
        for i in range(n)
    ]


def _greedy_words(model, words: list, count: int):
    """The model's greedy continuation of ``words`` (after BOS), or None if it is not all plain words
    or a step's top two logits are within GREEDY_TOP1_MARGIN (the trainers' batched forwards could
    then pick the other one on another CPU)."""
    ids = [TOKENIZER.bos_token_id] + TOKENIZER.convert_tokens_to_ids(words)
    out = []
    with torch.no_grad():
        for _ in range(count):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            top2 = logits.topk(2).values
            if not top2[0] - top2[1] > GREEDY_TOP1_MARGIN:
                return None
            nxt = int(logits.argmax())
            token = TOKENIZER.convert_ids_to_tokens(nxt)
            if token not in ENGLISH_WORDS:
                return None
            ids.append(nxt)
            out.append(token)
    return out


def _answered_side(model, rng, right: bool, answer_words: int) -> tuple:
    """(text, answer): a prompt of plain words and an answer the model reproduces when ``right``;
    otherwise the same continuation with its last word changed."""
    while True:
        prompt = rng.sample(ENGLISH_WORDS, 3)
        answer = _greedy_words(model, prompt, answer_words)
        if answer is not None:
            break
    if not right:
        answer[-1] = next(w for w in rng.sample(ENGLISH_WORDS, 5) if w != answer[-1])
    answer = " ".join(answer)
    return " ".join(prompt) + " " + answer, answer


def answered_pairs(model, anchor_right, target_right, answer_words=2, seed=7) -> list:
    """Text pairs with ``answer`` and ``target_answer`` for the ``sara_anchor_filter`` tests: pair b's
    anchor (target) answer is ``model``'s greedy continuation of its prompt when ``anchor_right[b]``
    (``target_right[b]``), else that continuation with its last word replaced, so which answers the
    model reproduces is known."""
    rng = random.Random(seed)
    data = []
    for anchor_ok, target_ok in zip(anchor_right, target_right):
        anchor, answer = _answered_side(model, rng, anchor_ok, answer_words)
        target, target_answer = _answered_side(model, rng, target_ok, answer_words)
        data.append({"anchor": anchor, "answer": answer, "target": target, "target_answer": target_answer})
    return data


def trl_encode(text):
    """A text target as TRL tokenises it: with its EOS appended to the text."""
    return TOKENIZER(text + TOKENIZER.eos_token)["input_ids"]


def filtered_sara(model, data, weights, encode_target=None) -> torch.Tensor:
    """SARA of one micro-batch from transformers' own router logits, one example at a time, in float64:
    per MoE layer the π-weighted mean over pairs of JS(pooled anchor, pooled target) (0 when no pair
    is kept), then the mean over layers. The anchors run without grad; the targets are tokenised by
    ``encode_target`` (default: as the tokenizer does)."""
    pooled = {"anchor": [], "target": []}
    for example in data:
        for side in pooled:
            ids = _encode(example[side]) if side == "anchor" or encode_target is None else encode_target(example[side])
            with torch.set_grad_enabled(side == "target" and torch.is_grad_enabled()):
                out = model(input_ids=torch.tensor([ids]), output_router_logits=True, use_cache=False)
            pooled[side].append(torch.stack([torch.softmax(z.double(), -1).mean(0) for z in out.router_logits]))
    js = reference.js_divergence(torch.stack(pooled["anchor"], 1), torch.stack(pooled["target"], 1))  # [L, B]
    w = torch.tensor(weights, dtype=torch.float64)
    if not w.sum() > 0:
        return js.sum() * 0.0
    return ((js * w).sum(1) / w.sum()).mean()


# What the resume tests compare step by step, besides the per-layer sara_js/* metrics.
LOGGED = ("loss", "grad_norm", "learning_rate", "lm_loss", "sara_loss")


def step_logs(log_history) -> dict:
    """global step -> the logged values of that step (losses, SARA metrics, schedule)."""
    return {e["step"]: {k: v for k, v in e.items() if k in LOGGED or k.startswith("sara_js/")}
            for e in log_history if "loss" in e}


@contextlib.contextmanager
def counted_optimizer_steps():
    """A list that gets one entry per ``torch.optim`` optimizer step taken in this process inside the
    block (a global post-step hook: what the optimizer ran, not what the Trainer's state says)."""
    steps = []
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: steps.append(type(optimizer).__name__))
    try:
        yield steps
    finally:
        handle.remove()


def perturb_saved_weights(folder, seed=0, scale=0.05):
    """Adds seeded noise to every tensor of ``folder``/model.safetensors, in place (a checkpoint
    whose weights changed on disk)."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    weights = {k: v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in load_file(path).items()}
    save_file(weights, path, metadata={"format": "pt"})


def sgd_args(tmp_path, **overrides):
    """One plain-SGD step, no clipping/decay/schedule: Δθ = -lr · grad exactly."""
    from sara_kernels.hf.trainer import SARATrainingArguments

    kwargs = dict(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=8, gradient_accumulation_steps=1,
        max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
        weight_decay=0.0, warmup_steps=0, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False, sara_weight=LAMBDA, seed=0,
    )
    kwargs.update(overrides)
    return SARATrainingArguments(**kwargs)


def sft_sgd_config(tmp_path, config_class=None, **overrides):
    """One plain-SGD step of TRL in float32 (Δθ = -lr · grad exactly; TRL defaults to bf16), TRL's aux
    loss off; ``config_class`` defaults to SARASFTConfig (with sara_weight = LAMBDA)."""
    from sara_kernels.hf import SARASFTConfig

    config_class = config_class or SARASFTConfig
    kwargs = dict(
        output_dir=str(tmp_path / "sft"), per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=1,
        learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        warmup_steps=0, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True,
        dataloader_pin_memory=False, seed=0, router_aux_loss_coef=0.0, max_length=64, bf16=False,  # exact oracle
    )
    if config_class is SARASFTConfig:
        kwargs["sara_weight"] = LAMBDA
    kwargs.update(overrides)
    return config_class(**kwargs)


def updates(base, model):
    """Each parameter of ``model`` minus the same parameter of ``base``."""
    before = dict(base.named_parameters())
    return {n: p.detach() - before[n].detach() for n, p in model.named_parameters()}


def train_delta(base, tmp_path, data, **overrides):
    """(parameter updates of one SARATrainer step on a copy of ``base``, the trainer)."""
    from sara_kernels.hf.trainer import SARATrainer

    priors = overrides.pop("routing_priors", None)
    model = copy.deepcopy(base)
    trainer = SARATrainer(model=model, args=sgd_args(tmp_path, **overrides), train_dataset=data,
                          processing_class=TOKENIZER, routing_priors=priors)
    trainer.train()
    return updates(base, model), trainer


def _encode(text):
    return TOKENIZER(text)["input_ids"]


def manual_loss(model, data, *, sara_weight, lm_on_anchor=False, anchor_probs=None, layer_weights=None):
    """LM (token mean) + λ·SARA on the whole of ``data``, one example at a time (no padding at all);
    SARA is the mean over pairs of each layer's JS, averaged over layers with ``layer_weights``
    (one per MoE layer) or equally."""
    lm_sum, lm_count = 0.0, 0
    pooled_a, pooled_t = [], []
    for example in data:
        sides = [("target", True)] + [("anchor", lm_on_anchor)]
        for side, with_lm in sides:
            ids = torch.tensor([_encode(example[side])])
            grad = side == "target" or lm_on_anchor
            with torch.set_grad_enabled(grad):
                out = model(input_ids=ids, output_router_logits=True, use_cache=False)
            if with_lm:
                lm_sum = lm_sum + F.cross_entropy(out.logits[0, :-1], ids[0, 1:], reduction="sum")
                lm_count += ids.shape[1] - 1
            probs = torch.stack([torch.softmax(z.double(), dim=-1).mean(0) for z in out.router_logits])  # [L, E]
            (pooled_t if side == "target" else pooled_a).append(probs)
    p_t = torch.stack(pooled_t, dim=1)  # [L, B, E]
    p_a = torch.stack(pooled_a, dim=1).detach() if anchor_probs is None else anchor_probs.double()
    per_layer = reference.js_divergence(p_a, p_t).mean(dim=1)  # [L]: mean over pairs
    w = torch.ones_like(per_layer) if layer_weights is None else torch.tensor(layer_weights, dtype=per_layer.dtype)
    sara = (w * per_layer).sum() / w.sum()
    return lm_sum / lm_count + sara_weight * sara, sara


def expected_update(base, data, *, lr=1.0, sara_weight, lm_on_anchor=False, layer_weights=None):
    model = copy.deepcopy(base)
    model.train()
    loss, _ = manual_loss(model, data, sara_weight=sara_weight, lm_on_anchor=lm_on_anchor, layer_weights=layer_weights)
    loss.backward()
    return {n: -lr * (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def assert_updates_close(actual, expected, rtol=2e-4):
    """Every parameter's update matches, with atol relative to that tensor's largest entry."""
    assert actual.keys() == expected.keys()
    for name in expected:
        scale = max(float(expected[name].abs().max()), 1e-12)
        torch.testing.assert_close(actual[name], expected[name].to(actual[name].dtype), rtol=rtol,
                                   atol=rtol * scale, msg=lambda m: f"{name}: {m}")


def one_thread():
    """Module fixture body: tiny models run faster single-threaded, and a busy 2-core CI machine
    makes multi-threaded tiny matmuls 5-10x slower. The previous count is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
