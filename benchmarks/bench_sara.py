"""SARA loss benchmark: fused Triton op vs the eager reference, torch.compile of the
reference and (when one exists) a CUDA backend, at the router shapes of real MoE models.

    python benchmarks/bench_sara.py --out results/sara            # full sweep on a GPU
    python benchmarks/bench_sara.py --quick --out results/quick   # ~3 min subset (gpu_ci)
    TRITON_INTERPRET=1 python benchmarks/bench_sara.py --device cpu --tiny --quick --out /tmp/b
                                                                  # logic check on a CPU

Inputs are what a Hugging Face model hands over: per side a tuple of L separate bf16 [N, E]
router-logit tensors (``outputs.router_logits``), N tokens per side in sequences of
``--seq-len`` tokens, all valid (so the minimum traffic is well defined). Modes: ``detach``
(default ``detach_anchor=True``: gradient to the target side only), ``both``
(``detach_anchor=False``), ``priors`` (cached anchor distributions ``anchor_probs`` [L, B, E]
instead of anchor logits). Both sides' logits require grad, as they do when anchor and target
are two halves of one training batch.

Passes: ``fwd`` (with autograd recording, as in training), ``bwd`` (the gradient of a forward
run untimed just before, L2 flushed in between), ``fwd+bwd``. Timing is L2-cold and uses CUDA
events (see benchmarks/common.py for why). Per case and pass the results give the median time,
the minimum bytes the op must move, the achieved fraction of the device-to-device copy
bandwidth measured in the same run, the Triton op's speed-up over every contender, and extra
peak memory. Everything is written to ``--out`` (results.json, results.csv, summary.md, PNG
plots), rewritten after every case so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import sara_kernels
from sara_kernels import reference
from sara_kernels._inputs import BACKENDS
from sara_kernels.ops import routing_js

from common import (
    L2Flusher,
    copies_for,
    copy_bandwidth,
    device_problem,
    environment,
    format_table,
    is_out_of_memory,
    l2_cache_bytes,
    median,
    peak_extra_bytes,
    release_memory,
    synchronize,
    time_calls,
    write_csv,
    write_json,
)


@dataclass(frozen=True)
class Model:
    """Router shape of a real MoE model: MoE layers, routed experts, routing score."""

    name: str
    layers: int
    experts: int
    score: str = "softmax"


MODELS = [
    Model("Qwen3-30B-A3B", 48, 128),
    Model("Phi-3.5-MoE", 32, 16),
    Model("Mixtral-8x7B", 32, 8),
    Model("OLMoE-1B-7B", 16, 64),
    Model("DeepSeek-V3", 58, 256, "sigmoid"),
    Model("Qwen3-Next-80B-A3B", 48, 512),
]
MODEL_BY_NAME = {m.name: m for m in MODELS}
TOKENS = [4096, 8192, 16384, 32768, 65536]
MODES = ["detach", "both", "priors"]
PASSES = ["fwd", "bwd", "fwd+bwd"]
CONTENDERS = ["triton", "reference", "compile", "cuda"]

# What the fused op is held to (reported, never asserted): at 48 layers × 128 experts ×
# ≥ 16k tokens per side, bf16, fwd+bwd.
TARGET_SHAPE = dict(layers=48, experts=128, min_tokens=16384, dtype="bf16")
TARGETS = [
    # (key, description, metric, threshold, direction)
    ("bandwidth", "fwd+bwd achieved ≥ 85% of measured copy bandwidth (minimum traffic)", "bw_fraction", 0.85, ">="),
    ("vs_reference", "fwd+bwd ≥ 5× faster than the eager reference", "speedup_vs_reference", 5.0, ">="),
    ("vs_compile", "fwd+bwd ≥ 1.5× faster than torch.compile of the reference (best mode)", "speedup_vs_compile", 1.5, ">="),
    ("memory", "fwd+bwd extra memory (workspace beyond the returned gradients) ≤ 2% of the eager reference's",
     "workspace_vs_reference", 0.02, "<="),
]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    model: str
    layers: int
    experts: int
    score: str
    tokens: int  # per side
    mode: str
    seq_len: int
    dtype: str
    compile_modes: tuple  # torch.compile modes tried for this case (empty: no compile contender)
    target_shape: bool  # the model's real shape is one the targets are stated for (kept by --tiny)

    @property
    def seqs(self) -> int:
        return self.tokens // self.seq_len

    def describe(self) -> str:
        return f"{self.model} L={self.layers} E={self.experts} {self.score} N={self.tokens}/side {self.mode} {self.dtype}"


def make_case(model: Model, tokens: int, mode: str, args, compiled: bool) -> Case:
    """``compiled``: try torch.compile in this case, with every ``--compile-modes`` entry at the
    target shape and the first one elsewhere (compiling is what makes a sweep long)."""
    t = TARGET_SHAPE
    target = (model.layers, model.experts, args.dtype) == (t["layers"], t["experts"], t["dtype"]) and tokens >= t["min_tokens"]
    modes = tuple(args.compile_modes if target else args.compile_modes[:1]) if compiled and "compile" in args.contenders else ()
    return Case(model.name, model.layers, model.experts, model.score, tokens, mode, min(args.seq_len, tokens), args.dtype,
                modes, target)


def full_sweep(args) -> list:
    """Every model × tokens × mode, torch.compile in every case."""
    return [make_case(model, tokens, mode, args, compiled=True)
            for model in _models(args) for tokens in args.tokens or TOKENS for mode in args.modes or MODES]


QUICK_SWEEP = [
    # (model, tokens, mode, with torch.compile): the headline shape, the modes, every model once.
    # The headline case comes last: compiling the 48-layer reference can take a minute or more,
    # and done first it would leave no time budget for the fast cases. It is never skipped for
    # the budget (see main), so its Triton and eager rows are written before the compile starts.
    ("Qwen3-30B-A3B", 16384, "both", False),
    ("Qwen3-30B-A3B", 16384, "priors", False),
    ("Qwen3-30B-A3B", 32768, "detach", False),
    ("Qwen3-30B-A3B", 4096, "detach", False),
    ("DeepSeek-V3", 8192, "detach", False),
    ("Qwen3-Next-80B-A3B", 8192, "detach", False),
    ("Mixtral-8x7B", 16384, "detach", False),
    ("Phi-3.5-MoE", 16384, "detach", False),
    ("OLMoE-1B-7B", 16384, "detach", False),
    ("Qwen3-30B-A3B", 16384, "detach", True),
]


def quick_sweep(args) -> list:
    """The short sweep gpu_ci runs (~3 min on an H100): torch.compile in the headline case only."""
    models = {m.name for m in _models(args)}
    return [make_case(MODEL_BY_NAME[name], tokens, mode, args, compiled)
            for name, tokens, mode, compiled in QUICK_SWEEP
            if name in models and (not args.modes or mode in args.modes)]


TINY_LAYERS = 3
TINY_SEQ_LEN = 32


def tiny_version(cases: list) -> list:
    """The same sweep at CPU size for a logic check: ≤ 3 layers, 64-256 tokens per side, the
    real E and score. Cases that become identical are dropped."""
    tiny = {}
    for case in cases:
        tokens = 64 if case.tokens <= 8192 else (128 if case.tokens <= 32768 else 256)
        small = dataclasses.replace(case, layers=min(case.layers, TINY_LAYERS), tokens=tokens,
                                    seq_len=min(case.seq_len, TINY_SEQ_LEN))
        key = (small.model, small.tokens, small.mode)
        if key not in tiny or (small.compile_modes and not tiny[key].compile_modes):  # keep the compiled one
            tiny[key] = small
    return list(tiny.values())


def _models(args):
    return [MODEL_BY_NAME[n] for n in args.models] if args.models else MODELS


# ----------------------------------------------------------------------------------------
# Inputs and traffic
# ----------------------------------------------------------------------------------------


@dataclass
class CaseInputs:
    """``copies`` independent input sets (for L2-cold rotation) and the shared masks."""

    anchors: list  # per copy: tuple of L [N, E] leaves, or None in priors mode
    targets: list  # per copy: tuple of L [N, E] leaves
    priors: list  # per copy: [L, B, E] float32, or None
    mask: torch.Tensor  # [B, S] all ones, shared by both sides (HF attention_mask, int64)

    def diff_inputs(self, i: int, mode: str) -> tuple:
        """The tensors whose gradient the step needs: the target, and the anchor in ``both`` mode."""
        return self.targets[i] + (self.anchors[i] if mode == "both" else ())


def logits_bytes(case: Case) -> int:
    return case.layers * case.tokens * case.experts * DTYPES[case.dtype].itemsize


def make_inputs(case: Case, device: torch.device, copies: int) -> CaseInputs:
    dtype = DTYPES[case.dtype]

    def side():
        return tuple(torch.randn(case.tokens, case.experts, device=device, dtype=dtype).mul_(2).requires_grad_()
                     for _ in range(case.layers))

    mask = torch.ones(case.seqs, case.seq_len, dtype=torch.int64, device=device)
    anchors, targets, priors = [], [], []
    for _ in range(copies):
        if case.mode == "priors":
            with torch.no_grad():
                priors.append(reference.routing_distribution(side(), mask, score=case.score).float())
            anchors.append(None)
        else:
            anchors.append(side())
            priors.append(None)
        targets.append(side())
    return CaseInputs(anchors, targets, priors, mask)


def min_bytes(case: Case, pass_name: str) -> int:
    """The traffic no implementation can avoid. fwd: read both sides' logits (priors mode: the
    target's and the priors) and the masks once. bwd: read the target logits again and write
    their gradient; ``both`` mode the anchor's too. Outputs of size L·B·E are left out."""
    side = logits_bytes(case)
    mask = case.seqs * case.seq_len * 8
    priors = case.layers * case.seqs * case.experts * 4
    fwd = side + mask + (priors if case.mode == "priors" else side + mask)
    bwd = (2 * side + mask) * (2 if case.mode == "both" else 1)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_name]


# ----------------------------------------------------------------------------------------
# Contenders
# ----------------------------------------------------------------------------------------


def loss_function(case: Case, backend: str) -> Callable:
    """(anchor, target, mask, priors) -> scalar loss through ``sara_kernels.sara_loss``."""
    detach = case.mode != "both"

    def loss(anchor, target, mask, priors):
        return sara_kernels.sara_loss(
            anchor, target, None if priors is not None else mask, mask, anchor_probs=priors,
            score=case.score, detach_anchor=detach, backend=backend,
        )

    return loss


def contender_skip_reason(name: str, device: torch.device) -> Optional[str]:
    if name == "cuda" and "cuda" not in BACKENDS:
        return "sara_kernels has no CUDA backend"
    if name == "cuda" and device.type != "cuda":
        return "needs a CUDA device"
    if name == "triton" and device.type != "cuda" and not routing_js.INTERPRET:
        return "needs a CUDA device or TRITON_INTERPRET=1"
    return None


@dataclass
class Contender:
    name: str  # triton | reference | compile | cuda
    variant: str  # torch.compile mode, else ""
    build: Callable[[], Callable]  # returns the loss function; may raise (a bad compile mode)


def _compiled_reference(case: Case, mode: str) -> Callable:
    def build():
        torch._dynamo.reset()  # a fresh compile per case and mode: no cache-limit fallback to eager
        return torch.compile(loss_function(case, "reference"), mode=mode, dynamic=False)

    return build


def make_contenders(case: Case, device: torch.device, requested: list) -> tuple:
    """(runnable contenders, rows for the ones skipped). Contenders are built when measured,
    so a torch.compile mode that fails is recorded as a failure of that mode only."""
    runnable, skipped = [], []
    for name in requested:
        reason = contender_skip_reason(name, device)
        if name == "compile" and not case.compile_modes:
            reason = reason or "not in this sweep's compiled cases"
        if reason:
            skipped.append(dict(contender=name, variant="", status="skipped", note=reason))
            continue
        if name == "compile":
            for mode in case.compile_modes:
                runnable.append(Contender("compile", mode, _compiled_reference(case, mode)))
        else:
            runnable.append(Contender(name, "", lambda name=name: loss_function(case, name)))
    return runnable, skipped


# ----------------------------------------------------------------------------------------
# Measuring one case
# ----------------------------------------------------------------------------------------


def measure_contender(case: Case, contender: Contender, inputs: CaseInputs, device, copies: int, args, flush) -> list:
    """Rows (one per pass) for one contender: median ms, memory, loss value. The first call
    (for torch.compile: the compilation, timed as first_call_s) is outside the timings."""
    fn = None

    def forward(i):
        return fn(inputs.anchors[i], inputs.targets[i], inputs.mask, inputs.priors[i])

    def gradients(i, loss):
        return torch.autograd.grad(loss, inputs.diff_inputs(i, case.mode))

    def fwd_bwd(i, _):
        return gradients(i, forward(i))

    base = dict(contender=contender.name, variant=contender.variant)
    start = time.perf_counter()
    try:
        fn = contender.build()
        loss = forward(0)
        gradients(0, loss)
        loss_value = float(loss.detach())
    except Exception as exc:
        status = "oom" if is_out_of_memory(exc) else "failed"
        release_memory(device)
        return [dict(base, status=status, note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")]
    first_call_s = time.perf_counter() - start
    del loss

    rows = []
    timings = {
        "fwd": dict(call=lambda i, _: forward(i)),
        "bwd": dict(call=lambda i, loss: gradients(i, loss), prepare=forward, flush=flush),
        "fwd+bwd": dict(call=fwd_bwd),
    }
    for pass_name in PASSES:
        row = dict(base, pass_name=pass_name, loss=loss_value,
                   first_call_s=round(first_call_s, 3) if contender.name == "compile" else None)
        try:
            times = time_calls(device, copies=copies, reps=args.reps, warmup=args.warmup, **timings[pass_name])
            row.update(status="ok", median_ms=median(times), min_ms=min(times), reps=len(times))
            row.update(memory_row(case, pass_name, forward, gradients, device, inputs))
        except Exception as exc:
            row.update(status="oom" if is_out_of_memory(exc) else "failed",
                       note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            release_memory(device)
        rows.append(row)
    return rows


def memory_row(case, pass_name, forward, gradients, device, inputs) -> dict:
    """Extra peak memory of one pass on copy 0: peak allocated during the pass minus what was
    allocated before it (the inputs; for bwd also what the forward kept). For fwd+bwd also the
    workspace: that minus the gradients returned, which every implementation must produce."""
    if pass_name == "fwd":
        loss, extra = peak_extra_bytes(device, lambda: forward(0))
        return dict(extra_peak_mb=_mb(extra))
    if pass_name == "bwd":
        loss = forward(0)
        _, extra = peak_extra_bytes(device, lambda: gradients(0, loss))
        return dict(extra_peak_mb=_mb(extra))
    grads, extra = peak_extra_bytes(device, lambda: gradients(0, forward(0)))
    grad_bytes = sum(g.numel() * g.element_size() for g in grads if g is not None)
    return dict(extra_peak_mb=_mb(extra), workspace_mb=_mb(None if extra is None else extra - grad_bytes))


def _mb(nbytes):
    return None if nbytes is None else round(nbytes / 2**20, 3)


def progress_line(rows: list) -> str:
    """fwd+bwd of each contender of one case, and any failure, for the log."""
    parts = []
    for r in rows:
        name = r["contender"] + (f"[{r['variant']}]" if r.get("variant") else "")
        if r.get("status") == "ok" and r.get("pass_name") == "fwd+bwd":
            parts.append(f"{name} {r['median_ms']:.3g} ms (bw {r['bw_fraction']:.2f}, Triton ×{r.get('triton_speedup', math.nan):.3g})")
        elif r.get("status") in ("failed", "oom"):
            parts.append(f"{name} {r.get('pass_name') or ''} {r['status'].upper()}: {r.get('note', '')}")
    return "    fwd+bwd: " + "; ".join(parts)


def measure_case(case: Case, device: torch.device, l2_bytes: int, copy_gbps: float, flush, args,
                 checkpoint: Callable[[list], None]) -> list:
    """All contenders × passes of one case, with bandwidth fractions and speed-ups filled in.

    ``checkpoint(rows)`` is called after every contender, so a run killed while compiling
    (torch.compile comes last) keeps the case's other results."""
    bytes_per_copy = logits_bytes(case) * (1 if case.mode == "priors" else 2)
    copies = copies_for(bytes_per_copy, l2_bytes)
    shape = dict(model=case.model, layers=case.layers, experts=case.experts, score=case.score, tokens=case.tokens,
                 mode=case.mode, seq_len=case.seq_len, seqs=case.seqs, dtype=case.dtype, target_shape=case.target_shape,
                 copies=copies, l2_cold_factor=round(copies * bytes_per_copy / l2_bytes, 2))
    try:
        inputs = make_inputs(case, device, copies)
    except Exception as exc:
        release_memory(device)
        status = "oom" if is_out_of_memory(exc) else "failed"
        return [dict(shape, contender=c, variant="", status=status, note=f"inputs: {type(exc).__name__}") for c in args.contenders]
    runnable, skipped = make_contenders(case, device, args.contenders)
    rows = [dict(shape, **row) for row in skipped]
    for contender in runnable:
        rows += [dict(shape, **row) for row in measure_contender(case, contender, inputs, device, copies, args, flush)]
        release_memory(device)
        add_derived_metrics(case, rows, copy_gbps)
        if contender.name == "triton" and case.target_shape:
            triton_row = next((r for r in rows if r["contender"] == "triton" and r.get("pass_name") == "fwd+bwd"
                               and r.get("status") == "ok"), None)
            if triton_row is not None:
                try:
                    triton_row["kernel_breakdown"] = kernel_breakdown(case, inputs, device, copies, copy_gbps)
                except Exception as exc:  # a profiler problem must not cost the measured rows
                    triton_row["kernel_breakdown"] = dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")
                release_memory(device)
        checkpoint(rows)
    del inputs
    release_memory(device)
    return rows


def kernel_breakdown(case: Case, inputs: CaseInputs, device: torch.device, copies: int, copy_gbps: float,
                     reps: int = 5) -> dict:
    """Where the fused op's fwd+bwd time goes, from torch.profiler's device timeline.

    Why: when a target is missed, the median alone cannot say whether the pooling kernels stream
    below copy bandwidth (then ``tile_config`` / ``num_splits`` are the knobs) or whether the time
    is lost around them (launch gaps, the small PyTorch reduction ops, pointer-table copies).
    ``pooling_bw_fraction`` charges the case's minimum traffic to the pooling kernels alone.
    On the CPU (a logic check) the host timeline stands in for the device's.
    """
    from torch.profiler import ProfilerActivity, profile

    fn = loss_function(case, "triton")

    def step(i):
        loss = fn(inputs.anchors[i], inputs.targets[i], inputs.mask, inputs.priors[i])
        return torch.autograd.grad(loss, inputs.diff_inputs(i, case.mode))

    on_gpu = device.type == "cuda"
    for i in range(min(copies, 2)):
        step(i)
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        for i in range(reps):
            step(i % copies)
        synchronize(device)
    kernels = []
    for evt in prof.key_averages():
        if on_gpu:
            us = getattr(evt, "self_device_time_total", None)
            us = getattr(evt, "self_cuda_time_total", 0.0) if us is None else us
        else:
            us = evt.self_cpu_time_total
        if us > 0:
            kernels.append(dict(name=evt.key[:80], ms_per_step=_significant(us / 1e3 / reps), calls_per_step=evt.count / reps))
    kernels.sort(key=lambda k: -k["ms_per_step"])
    total = sum(k["ms_per_step"] for k in kernels)
    pooling = sum(k["ms_per_step"] for k in kernels if k["name"].startswith("pool_routing"))
    for k in kernels:
        k["share"] = _significant(k["ms_per_step"] / total) if total else None
    gbps = min_bytes(case, "fwd+bwd") / (pooling * 1e-3) / 1e9 if pooling else None
    return dict(device_ms_per_step=_significant(total), pooling_ms_per_step=_significant(pooling),
                pooling_bw_fraction=_significant(gbps / copy_gbps) if gbps else None, kernels=kernels[:12])


def add_derived_metrics(case: Case, rows: list, copy_gbps: float):
    """Minimum bytes, achieved bandwidth and its fraction of the copy bandwidth, the Triton
    op's speed-up over this row (this row's time / Triton's), and the best compile mode.
    Recomputed from scratch each time, as rows are added."""
    ok = [r for r in rows if r.get("status") == "ok"]
    for r in ok:
        r.pop("best_compile_mode", None)
    for r in ok:
        nbytes = min_bytes(case, r["pass_name"])
        gbps = nbytes / (r["median_ms"] * 1e-3) / 1e9
        r.update(min_bytes=nbytes, achieved_gbps=_significant(gbps), bw_fraction=_significant(gbps / copy_gbps))
    for pass_name in PASSES:
        in_pass = [r for r in ok if r["pass_name"] == pass_name]
        triton = next((r for r in in_pass if r["contender"] == "triton"), None)
        compiled = [r for r in in_pass if r["contender"] == "compile"]
        if compiled:
            min(compiled, key=lambda r: r["median_ms"])["best_compile_mode"] = True
        for r in in_pass:
            if triton:
                r["triton_speedup"] = _significant(r["median_ms"] / triton["median_ms"])
            if r["contender"] == "triton" and r.get("loss") is not None:
                ref = next((x for x in in_pass if x["contender"] == "reference"), None)
                if ref:
                    r["loss_rel_diff_vs_reference"] = abs(r["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)


# ----------------------------------------------------------------------------------------
# Targets, summary, plots
# ----------------------------------------------------------------------------------------


def evaluate_targets(rows: list) -> list:
    """For every case at the target shape: each target's value, whether it is met and the
    margin (value / threshold for ≥ targets, threshold / value for ≤ targets: > 1 is met)."""
    results = []
    keys = sorted({(r["model"], r["tokens"], r["mode"]) for r in rows if r.get("target_shape")},
                  key=lambda k: (k[0], k[1], MODES.index(k[2])))
    for model, tokens, mode in keys:
        case_rows = [r for r in rows if (r["model"], r["tokens"], r["mode"]) == (model, tokens, mode)
                     and r.get("pass_name") == "fwd+bwd" and r.get("status") == "ok"]
        triton = next((r for r in case_rows if r["contender"] == "triton"), None)
        ref = next((r for r in case_rows if r["contender"] == "reference"), None)
        best_compile = next((r for r in case_rows if r.get("best_compile_mode")), None)
        values = {
            "bw_fraction": triton and triton.get("bw_fraction"),
            "speedup_vs_reference": ref and triton and ref.get("triton_speedup"),
            "speedup_vs_compile": best_compile and triton and best_compile.get("triton_speedup"),
            "workspace_vs_reference": _ratio(triton and triton.get("workspace_mb"), ref and ref.get("workspace_mb")),
        }
        for key, text, metric, threshold, direction in TARGETS:
            value = values[metric]
            entry = dict(target=key, description=text, model=model, tokens=tokens, mode=mode, threshold=threshold,
                         direction=direction, value=value, met=None, margin=None)
            if value is None:
                entry["note"] = "a contender it needs was skipped, failed or ran out of memory"
            else:
                entry["met"] = value >= threshold if direction == ">=" else value <= threshold
                entry["margin"] = _significant(value / threshold if direction == ">=" else threshold / max(value, 1e-12))
            results.append(entry)
    return results


def _ratio(a, b):
    if a is None or b is None or b <= 0:
        return None
    return _significant(max(a, 0.0) / b)


def _significant(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def target_lines(targets: list) -> list:
    lines = []
    for t in targets:
        where = f"{t['model']} N={t['tokens']} {t['mode']}"
        if t["met"] is None:
            lines.append(f"- {t['description']} [{where}]: NOT MEASURED ({t.get('note', '')})")
        else:
            verdict = "MET" if t["met"] else "NOT MET"
            lines.append(f"- {t['description']} [{where}]: {verdict}: value {t['value']:.4g} vs {t['direction']} "
                         f"{t['threshold']:g} (margin ×{t['margin']:.3g}; > 1 means met)")
    return lines


SUMMARY_COLUMNS = [
    ("model", "model"), ("L", "layers"), ("E", "experts"), ("N/side", "tokens"), ("mode", "mode"),
    ("triton ms", "triton_ms"), ("bw frac", "bw_fraction"), ("ref ms", "reference_ms"), ("×ref", "vs_reference"),
    ("compile ms", "compile_ms"), ("×compile", "vs_compile"), ("ws MB", "triton_ws"), ("ref ws MB", "reference_ws"),
]


def summary_rows(rows: list, pass_name: str = "fwd+bwd") -> list:
    """One line per case: Triton vs the contenders for one pass."""
    out = []
    keys = []
    for r in rows:
        key = (r["model"], r["tokens"], r["mode"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        rs = [r for r in rows if (r["model"], r["tokens"], r["mode"]) == key and r.get("pass_name") == pass_name
              and r.get("status") == "ok"]
        first = next(r for r in rows if (r["model"], r["tokens"], r["mode"]) == key)
        get = {c: next((r for r in rs if r["contender"] == c and (c != "compile" or r.get("best_compile_mode"))), None)
               for c in ("triton", "reference", "compile")}
        line = dict(model=first["model"], layers=first["layers"], experts=first["experts"], tokens=first["tokens"], mode=first["mode"])
        if get["triton"]:
            line.update(triton_ms=f"{get['triton']['median_ms']:.3g}", bw_fraction=f"{get['triton']['bw_fraction']:.3g}",
                        triton_ws=get["triton"].get("workspace_mb"))
        for c, col in (("reference", "vs_reference"), ("compile", "vs_compile")):
            if get[c]:
                line[f"{c}_ms"] = f"{get[c]['median_ms']:.3g}"
                line[col] = get[c].get("triton_speedup")
        if get["reference"]:
            line["reference_ws"] = get["reference"].get("workspace_mb")
        out.append(line)
    return out


def write_plots(rows: list, out_dir: str, card: str) -> list:
    """time_<pass>.png and bandwidth_<pass>.png: a grid (models × modes) of median time and
    achieved fraction of copy bandwidth against tokens per side, one line per contender."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["plots skipped: matplotlib is not installed"]
    ok = [r for r in rows if r.get("status") == "ok" and (r["contender"] != "compile" or r.get("best_compile_mode"))]
    models = [m for m in dict.fromkeys(r["model"] for r in ok)]
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    written = []
    if not ok:
        return written
    for pass_name in PASSES:
        for metric, label, fname in (("median_ms", "median time (ms)", "time"), ("bw_fraction", "fraction of copy bandwidth", "bandwidth")):
            fig, axes = plt.subplots(len(models), len(modes), figsize=(4 * len(modes), 2.8 * len(models)), squeeze=False)
            for i, model in enumerate(models):
                for j, mode in enumerate(modes):
                    ax = axes[i][j]
                    ax.set_title(f"{model} · {mode}", fontsize=9)
                    for contender in CONTENDERS:
                        pts = sorted((r["tokens"], r[metric]) for r in ok if r["model"] == model and r["mode"] == mode
                                     and r["pass_name"] == pass_name and r["contender"] == contender)
                        if pts:
                            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=contender)
                    if not ax.has_data():
                        ax.axis("off")
                        ax.text(0.5, 0.5, "not in this sweep", ha="center", va="center", transform=ax.transAxes, fontsize=8)
                        continue
                    ax.set_xscale("log", base=2)
                    if metric == "median_ms":
                        ax.set_yscale("log")
                    ax.set_xlabel("tokens per side", fontsize=8)
                    ax.set_ylabel(label, fontsize=8)
                    ax.grid(True, alpha=0.3)
                    ax.legend(fontsize=7)
            fig.suptitle(f"SARA loss {pass_name}: {card} (compile: best mode per point)", fontsize=11)
            fig.tight_layout(rect=(0, 0, 1, 0.97))
            path = os.path.join(out_dir, f"{fname}_{pass_name.replace('+', '_')}.png")
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
    return written


CSV_COLUMNS = [
    "model", "layers", "experts", "score", "tokens", "mode", "seq_len", "seqs", "dtype", "pass_name", "contender",
    "variant", "status", "median_ms", "min_ms", "reps", "min_bytes", "achieved_gbps", "bw_fraction", "triton_speedup",
    "extra_peak_mb", "workspace_mb", "best_compile_mode", "first_call_s", "loss", "loss_rel_diff_vs_reference",
    "copies", "l2_cold_factor", "target_shape", "note",
]


def write_results(out_dir: str, meta: dict, rows: list, final: bool = False) -> dict:
    targets = evaluate_targets(rows)
    payload = dict(meta=meta, targets=targets, rows=rows)
    if final:
        payload["plots"] = write_plots(rows, out_dir, meta["environment"]["card"])
    write_json(os.path.join(out_dir, "results.json"), payload)
    write_csv(os.path.join(out_dir, "results.csv"), rows, CSV_COLUMNS)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(meta, rows, targets))
    return payload


def breakdown_lines(rows: list) -> list:
    """The profile of the Triton op at the target shape: the "why" behind a missed target."""
    lines = []
    for r in rows:
        b = r.get("kernel_breakdown")
        if not b:
            continue
        lines += [f"## Where the Triton fwd+bwd time goes: {r['model']} N={r['tokens']} {r['mode']}", ""]
        if "error" in b:
            lines += [f"- profiler failed: {b['error']}", ""]
            continue
        frac = b["pooling_bw_fraction"]
        lines += [f"- device time {b['device_ms_per_step']} ms per step, of which pooling kernels {b['pooling_ms_per_step']} ms"
                  f" ({'n/a' if frac is None else f'{frac:.2f}'} of copy bandwidth for the case's minimum traffic);"
                  f" median wall time {r['median_ms']:.4g} ms (the rest: launch gaps and host work)", ""]
        lines += [f"  - {k['name']}: {k['ms_per_step']} ms ({k['share']:.0%}), {k['calls_per_step']:g} calls" for k in b["kernels"]]
        lines.append("")
    return lines


def summary_markdown(meta: dict, rows: list, targets: list) -> str:
    env = meta["environment"]
    lines = [
        "# SARA loss benchmark",
        "",
        f"Card: {env['card']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; {env['date']}.",
        f"Copy bandwidth measured in this run: {meta['copy_bandwidth']['gbps']:.0f} GB/s (device-to-device copy_, L2-cold).",
        f"Inputs: per side a tuple of L {meta['dtype']} [N, E] router-logit tensors, sequences of {meta['seq_len']} tokens, "
        f"all valid. Times: median of {meta['reps']} L2-cold repetitions "
        f"({'CUDA events' if env['device'].startswith('cuda') else 'wall clock: a CPU logic check, not a measurement'}).",
        "",
        "## Targets (48 layers × 128 experts × ≥ 16k tokens per side, bf16)",
        "",
        *(target_lines(targets) or ["- no case at the target shape was measured"]),
        "",
        "## fwd+bwd per case (×: how many times faster the Triton op is; ws: workspace beyond the gradients)",
        "",
        "```",
        format_table(summary_rows(rows), SUMMARY_COLUMNS),
        "```",
        "",
    ]
    lines += breakdown_lines(rows)
    skipped = sorted({f"{r['contender']}: {r.get('note', '')}" for r in rows if r.get("status") == "skipped"})
    failed = [f"{r['contender']} {r.get('variant') or ''} {r['model']} N={r['tokens']} {r['mode']} {r.get('pass_name') or ''}: "
              f"{r['status']}: {r.get('note', '')}" for r in rows if r.get("status") in ("failed", "oom")]
    if skipped or failed:
        lines += ["## Not measured", ""] + [f"- {line}" for line in failed + skipped] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny)")
    p.add_argument("--quick", action="store_true", help="the short sweep gpu_ci runs")
    p.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU logic check")
    p.add_argument("--models", nargs="*", choices=list(MODEL_BY_NAME), help="default: all")
    p.add_argument("--tokens", nargs="*", type=int, help=f"tokens per side (default {TOKENS})")
    p.add_argument("--modes", nargs="*", choices=MODES, help="default: all")
    p.add_argument("--contenders", nargs="*", choices=CONTENDERS, default=CONTENDERS)
    p.add_argument("--compile-modes", nargs="*", default=None,
                   help="torch.compile modes to try (default: default, max-autotune-no-cudagraphs; --quick: default)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (B = N / seq_len)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per pass (default 30; quick 15; tiny 3)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; cases not started by then are recorded as skipped, except the quick "
                        "sweep's headline case (default: none; --quick 140)")
    args = p.parse_args(argv)
    if args.compile_modes is None:
        args.compile_modes = ["default"] if (args.quick or args.tiny) else ["default", "max-autotune-no-cudagraphs"]
    if args.reps is None:
        args.reps = 3 if args.tiny else (15 if args.quick else 30)
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 3
    if args.time_budget is None and args.quick and not args.tiny:
        args.time_budget = 140.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    problem = device_problem(device, args.tiny, " (TRITON_INTERPRET=1 for the Triton op)")
    if problem:
        print(problem)
        return 2
    os.makedirs(args.out, exist_ok=True)
    cases = quick_sweep(args) if args.quick else full_sweep(args)
    if args.tiny:
        cases = tiny_version(cases)
    l2_bytes = l2_cache_bytes(device)
    bandwidth = copy_bandwidth(device, l2_bytes)
    meta = dict(
        environment=environment(device), copy_bandwidth=bandwidth, dtype=args.dtype,
        seq_len=min(args.seq_len, TINY_SEQ_LEN) if args.tiny else args.seq_len,
        sweep="tiny" if args.tiny else ("quick" if args.quick else "full"), reps=args.reps, warmup=args.warmup,
        compile_modes=args.compile_modes, contenders=args.contenders, targets=[t[:4] for t in TARGETS],
        target_shape=TARGET_SHAPE, cases=[dataclasses.asdict(c) for c in cases],
        traffic="fwd: both sides' logits (priors mode: target logits + priors) + masks, read once; bwd: target logits "
                "read + gradient written (both mode: anchor too)",
    )
    print(f"{meta['environment']['card']}: copy bandwidth {bandwidth['gbps']:.0f} GB/s, L2 {l2_bytes / 2**20:.0f} MiB, "
          f"{len(cases)} cases")
    flush = L2Flusher(device, l2_bytes) if device.type == "cuda" else None  # CPU runs check logic, not caches
    start = time.perf_counter()
    rows = []
    for n, case in enumerate(cases, 1):
        elapsed = time.perf_counter() - start
        headline = args.quick and case.target_shape and bool(case.compile_modes)  # the last quick case
        if args.time_budget is not None and elapsed > args.time_budget and not headline:
            rows.append(dict(model=case.model, layers=case.layers, experts=case.experts, tokens=case.tokens, mode=case.mode,
                             contender="all", status="skipped", note=f"time budget of {args.time_budget:.0f} s spent"))
            continue
        print(f"[{n}/{len(cases)} {elapsed:6.1f} s] {case.describe()}", flush=True)
        case_rows = measure_case(case, device, l2_bytes, bandwidth["gbps"], flush, args,
                                 checkpoint=lambda partial: write_results(args.out, meta, rows + partial))
        print(progress_line(case_rows), flush=True)
        rows += case_rows
    meta["seconds"] = round(time.perf_counter() - start, 1)
    payload = write_results(args.out, meta, rows, final=True)
    print()
    print(format_table(summary_rows(rows), SUMMARY_COLUMNS))
    print()
    print("\n".join(target_lines(payload["targets"]) or ["no case at the target shape was measured"]))
    print(f"\nresults in {args.out} ({meta['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
