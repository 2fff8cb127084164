"""The SARA op alone at one router shape: the inputs a model hands over, the contenders (every
backend of the registry and ``torch.compile`` of the reference), timings (median and spread),
host time, memory, the fused ops' per-kernel profile, and the metrics derived from them.

Used by ``python -m sara_kernels bench`` and by ``benchmarks/bench_sara.py``'s sweeps.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import sara_kernels
from sara_kernels import backends, testing

from .bench_timing import (
    copies_for,
    host_ms_per_call,
    is_out_of_memory,
    peak_extra_bytes,
    percentile,
    release_memory,
    synchronize,
    time_calls,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    model: str
    layers: int
    experts: int
    score: str
    tokens: int  # per side
    mode: str  # "detach" (gradient to the target only), "both", "priors" (cached anchor distributions)
    seq_len: int
    dtype: str
    compile_modes: tuple  # torch.compile modes tried for this case (empty: no compile contender)
    target_shape: bool  # the model's real shape is one the benchmark's targets are stated for

    @property
    def seqs(self) -> int:
        return self.tokens // self.seq_len

    def describe(self) -> str:
        return f"{self.model} L={self.layers} E={self.experts} {self.score} N={self.tokens}/side {self.mode} {self.dtype}"


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
    _stacked: Optional["CaseInputs"] = None

    def diff_inputs(self, i: int, mode: str) -> tuple:
        """The tensors whose gradient the step needs: the target, and the anchor in ``both`` mode."""
        as_tuple = (lambda x: (x,)) if isinstance(self.targets[i], torch.Tensor) else tuple
        anchor = as_tuple(self.anchors[i]) if mode == "both" else ()
        return as_tuple(self.targets[i]) + anchor

    def stacked(self) -> "CaseInputs":
        """The same values as one [L, N, E] leaf per side (built once, on first use): the form
        torch.compile handles best (with tuples of 48 tensors it compiles for minutes)."""
        if self._stacked is None:
            def stack(side):
                return None if side is None else torch.stack([t.detach() for t in side]).requires_grad_()

            self._stacked = CaseInputs([stack(a) for a in self.anchors], [stack(t) for t in self.targets],
                                       self.priors, self.mask)
        return self._stacked


def logits_bytes(case: Case) -> int:
    return case.layers * case.tokens * case.experts * DTYPES[case.dtype].itemsize


def make_inputs(case: Case, device: torch.device, copies: int) -> CaseInputs:
    """Per side a tuple of L [N, E] leaves (what ``outputs.router_logits`` holds), built with
    :mod:`sara_kernels.testing`'s builders as the tests' are."""
    dtype = DTYPES[case.dtype]

    def side():
        return tuple(z.requires_grad_() for z in testing.random_logits(case.layers, case.tokens, case.experts, dtype,
                                                                       device=device))

    mask = testing.padding_mask([case.seq_len] * case.seqs, case.seq_len, device)  # every sequence full
    anchors, targets, priors = [], [], []
    for _ in range(copies):
        if case.mode == "priors":
            with torch.no_grad():
                priors.append(sara_kernels.routing_distribution(side(), mask, score=case.score, backend="reference").float())
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


def _compiled_reference(case: Case, mode: str) -> Callable:
    torch._dynamo.reset()  # a fresh compile per case and mode: no cache-limit fallback to eager
    return torch.compile(loss_function(case, "reference"), mode=mode, dynamic=False)


@dataclass
class Contender:
    name: str  # a key of CONTENDERS
    variant: str  # torch.compile mode, else ""
    build: Callable[[], Callable]  # returns the loss function; may raise (a bad compile mode)
    stacked: bool = False  # inputs as one [L, N, E] tensor per side instead of a tuple of L [N, E]


# The fused ops, whose kernels the profiler breaks down.
FUSED = backends.FUSED
COMPILE = "compile"  # the contender that is torch.compile of the reference


def _backend(name: str):
    return lambda case, variant: loss_function(case, name)


# name -> (input form stacked?, builder(case, variant)): every backend of the registry, and the
# reference under torch.compile. torch.compile gets the stacked form because compiling over a
# tuple of L tensors per side took much longer than over one stacked tensor, too long for a
# sweep; each run's compile times are in benchmarks/results/ (the summaries' "compile s").
CONTENDERS = {**{name: (False, _backend(name)) for name in backends.NAMES}, COMPILE: (True, _compiled_reference)}


def skip_reason(name: str, device: torch.device) -> Optional[str]:
    """Why contender ``name`` cannot run on ``device`` (None when it can)."""
    entry = backends.REGISTRY.get(name)
    if entry is None:  # torch.compile of the reference runs anywhere
        return None
    try:
        entry.module.require()
    except RuntimeError as e:
        return str(e)
    if not entry.runs_on(device):
        return f"does not run on {device.type} tensors{entry.device_hint}"
    return None


def make_contenders(case: Case, device: torch.device, requested: list) -> tuple:
    """(runnable contenders, rows for the ones skipped). Contenders are built when measured,
    so a torch.compile mode that fails is recorded as a failure of that mode only."""
    runnable, skipped = [], []
    for name in requested:
        reason = skip_reason(name, device)
        if name == COMPILE and not case.compile_modes:
            reason = reason or "not in this sweep's compiled cases"
        if reason:
            skipped.append(dict(contender=name, variant="", status="skipped", note=reason))
            continue
        stacked, builder = CONTENDERS[name]
        for variant in (case.compile_modes if name == COMPILE else ("",)):
            runnable.append(Contender(name, variant, lambda b=builder, v=variant: b(case, v), stacked))
    return runnable, skipped


# ----------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------

PASSES = ["fwd", "bwd", "fwd+bwd"]
# The kernels of the Triton op and the pass whose minimum traffic each one moves.
KERNEL_PASSES = {"pool_routing_fwd": "fwd", "pool_routing_bwd": "bwd"}


def kernel_pass(name: str):
    """"fwd"/"bwd" for a pooling kernel of either fused backend (the profiler names CUDA C++
    kernels by their full signature, e.g. ``void sara::…::pool_routing_fwd<…>``), else None."""
    return next((p for k, p in KERNEL_PASSES.items() if k in name), None)


class CompileTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Interrupt the block after ``seconds`` (SIGALRM; main thread only): caps a torch.compile
    that would otherwise eat the whole sweep. No limit when ``seconds`` is None or off the main thread."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise CompileTimeout(f"not finished after {seconds:.0f} s (--compile-timeout)")

    try:
        previous = signal.signal(signal.SIGALRM, expire)
    except ValueError:  # not the main thread
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _failure(base: dict, exc: BaseException, device) -> dict:
    status = "oom" if is_out_of_memory(exc) else ("timeout" if isinstance(exc, CompileTimeout) else "failed")
    release_memory(device)
    return dict(base, status=status, note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")


def measure_contender(case: Case, contender: Contender, inputs: CaseInputs, device, copies: int, args, flush) -> list:
    """Rows (one per pass) for one contender: median and p20/p80 ms, CPU ms per call, memory,
    loss value. The first call (for torch.compile: the compilation, reported as first_call_s and
    capped by --compile-timeout) is outside the timings."""
    fn = None
    data = inputs.stacked() if contender.stacked else inputs

    def forward(i):
        return fn(data.anchors[i], data.targets[i], data.mask, data.priors[i])

    def gradients(i, loss):
        return torch.autograd.grad(loss, data.diff_inputs(i, case.mode))

    def fwd_bwd(i, _=None):
        return gradients(i, forward(i))

    base = dict(contender=contender.name, variant=contender.variant, input_form="stacked" if contender.stacked else "tuple")
    start = time.perf_counter()
    try:
        with time_limit(args.compile_timeout if contender.name == COMPILE else None):
            fn = contender.build()
            loss = forward(0)
            gradients(0, loss)
        loss_value = float(loss.detach())
    except Exception as exc:
        return [_failure(base, exc, device)]
    first_call_s = time.perf_counter() - start
    del loss

    rows = []
    timings = {
        "fwd": dict(call=lambda i, _: forward(i)),
        "bwd": dict(call=lambda i, loss: gradients(i, loss), prepare=forward, flush=flush),
        "fwd+bwd": dict(call=fwd_bwd),
    }
    host_calls = {"fwd": lambda i: forward(i), "fwd+bwd": fwd_bwd}
    for pass_name in PASSES:
        row = dict(base, pass_name=pass_name, loss=loss_value,
                   first_call_s=round(first_call_s, 3) if contender.name == COMPILE else None)
        try:
            times = time_calls(device, copies=copies, reps=args.reps, warmup=args.warmup, **timings[pass_name])
            row.update(status="ok", median_ms=percentile(times, 50), p20_ms=percentile(times, 20),
                       p80_ms=percentile(times, 80), min_ms=min(times), reps=len(times))
            if pass_name in host_calls:
                row["cpu_ms_per_call"] = host_ms_per_call(device, host_calls[pass_name], copies=copies)
            row.update(memory_row(case, pass_name, forward, gradients, device))
        except Exception as exc:
            row = _failure(row, exc, device)
        rows.append(row)
    return rows


def memory_row(case, pass_name, forward, gradients, device) -> dict:
    """Extra peak memory of one pass on copy 0: peak allocated during the pass minus what was
    allocated before it (the inputs; for bwd also what the forward kept). For fwd+bwd also the
    workspace: that minus the gradients returned, which every implementation must produce."""
    if pass_name == "fwd":
        _, extra = peak_extra_bytes(device, lambda: forward(0))
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


def significant(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def kernel_profile(case: Case, inputs: CaseInputs, device: torch.device, copies: int, copy_gbps: float,
                   backend: str, reps: int = 5) -> dict:
    """Where the fused op's fwd+bwd time goes, from torch.profiler's device timeline: each
    kernel's time per step and, for the pooling kernels, the fraction of copy bandwidth at which
    they move their pass's minimum traffic (forward: every logit read once; backward: read again
    and the gradient written).

    Why: the wall time alone cannot say whether the kernels stream below copy bandwidth (then
    ``tile_config`` / ``num_splits`` are the knobs) or whether the time is lost around them
    (launch gaps, host work). On the CPU (a logic check) the host timeline stands in for the device's.
    """
    from torch.profiler import ProfilerActivity, profile

    fn = loss_function(case, backend)

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
            kernels.append(dict(name=evt.key[:80], ms_per_step=significant(us / 1e3 / reps),
                                calls_per_step=evt.count / reps))
    kernels.sort(key=lambda k: -k["ms_per_step"])
    total = sum(k["ms_per_step"] for k in kernels)
    for k in kernels:
        k["share"] = significant(k["ms_per_step"] / total) if total else None
        pass_name = kernel_pass(k["name"])
        if pass_name and on_gpu:
            gbps = min_bytes(case, pass_name) / (k["ms_per_step"] * 1e-3) / 1e9
            k["bw_fraction"] = significant(gbps / copy_gbps)
    pooling = sum(k["ms_per_step"] for k in kernels if kernel_pass(k["name"]))
    gbps = min_bytes(case, "fwd+bwd") / (pooling * 1e-3) / 1e9 if pooling else None
    return dict(device_ms_per_step=significant(total), pooling_ms_per_step=significant(pooling),
                pooling_bw_fraction=significant(gbps / copy_gbps) if gbps and on_gpu else None, kernels=kernels[:12])


def add_derived_metrics(case: Case, rows: list, copy_gbps: Optional[float]):
    """Minimum bytes, achieved bandwidth and its fraction of the copy bandwidth (None: not measured), the Triton
    op's speed-up over this row (this row's time / Triton's), and the best compile mode.
    Recomputed from scratch each time, as rows are added."""
    ok = [r for r in rows if r.get("status") == "ok"]
    for r in ok:
        r.pop("best_compile_mode", None)
    for r in ok:
        nbytes = min_bytes(case, r["pass_name"])
        gbps = nbytes / (r["median_ms"] * 1e-3) / 1e9
        r.update(min_bytes=nbytes, achieved_gbps=significant(gbps),
                 bw_fraction=significant(gbps / copy_gbps) if copy_gbps else None)
    for pass_name in PASSES:
        in_pass = [r for r in ok if r["pass_name"] == pass_name]
        triton = next((r for r in in_pass if r["contender"] == "triton"), None)
        compiled = [r for r in in_pass if r["contender"] == COMPILE]
        if compiled:
            min(compiled, key=lambda r: r["median_ms"])["best_compile_mode"] = True
        for r in in_pass:
            if triton:
                r["triton_speedup"] = significant(r["median_ms"] / triton["median_ms"])
            if r["contender"] == "triton" and r.get("loss") is not None:
                ref = next((x for x in in_pass if x["contender"] == "reference"), None)
                if ref:
                    r["loss_rel_diff_vs_reference"] = abs(r["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)


def case_shape(case: Case, copies: int, bytes_per_copy: int, l2_bytes: int) -> dict:
    return dict(model=case.model, layers=case.layers, experts=case.experts, score=case.score, tokens=case.tokens,
                mode=case.mode, seq_len=case.seq_len, seqs=case.seqs, dtype=case.dtype, target_shape=case.target_shape,
                copies=copies, l2_cold_factor=round(copies * bytes_per_copy / l2_bytes, 2))


def measure_case(case: Case, device: torch.device, l2_bytes: int, copy_gbps: Optional[float], flush, args,
                 checkpoint: Callable[[list], None]) -> list:
    """All contenders × passes of one case, with bandwidth fractions and speed-ups filled in,
    and the Triton op's kernel profile on its fwd+bwd row.

    ``checkpoint(rows)`` is called after every contender, so a run killed while compiling
    (torch.compile comes last) keeps the case's other results."""
    bytes_per_copy = logits_bytes(case) * (1 if case.mode == "priors" else 2)
    copies = copies_for(bytes_per_copy, l2_bytes)
    shape = case_shape(case, copies, bytes_per_copy, l2_bytes)
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
        if contender.name in FUSED:
            fused_row = next((r for r in rows if r["contender"] == contender.name and r.get("pass_name") == "fwd+bwd"
                              and r.get("status") == "ok"), None)
            if fused_row is not None:
                try:
                    fused_row["kernel_profile"] = kernel_profile(case, inputs, device, copies, copy_gbps, contender.name)
                except Exception as exc:  # a profiler problem must not cost the measured rows
                    fused_row["kernel_profile"] = dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")
                release_memory(device)
        checkpoint(rows)
    del inputs
    release_memory(device)
    return rows


def progress_line(rows: list) -> str:
    """fwd+bwd of each contender of one case, and any failure, for the log."""
    parts = []
    for r in rows:
        name = r["contender"] + (f"[{r['variant']}]" if r.get("variant") else "")
        if r.get("status") == "ok" and r.get("pass_name") == "fwd+bwd":
            cpu = r.get("cpu_ms_per_call")
            parts.append(f"{name} {r['median_ms']:.3g} ms (bw {r['bw_fraction']:.2f}, cpu {cpu if cpu is None else f'{cpu:.3g}'} ms,"
                         f" Triton ×{r.get('triton_speedup', math.nan):.3g})")
        elif r.get("status") in ("failed", "oom", "timeout"):
            parts.append(f"{name} {r.get('pass_name') or ''} {r['status'].upper()}: {r.get('note', '')}")
    return "    fwd+bwd: " + "; ".join(parts)
