"""``python -m sara_kernels bench``: what SARA costs at the router shapes of an MoE architecture,
on the device it runs on.

    python -m sara_kernels bench --arch qwen3-30b-a3b --out bench_out
    python -m sara_kernels bench --model PATH --layers 4 --tokens 8192 --out bench_out

The architecture is a row of the built-in table (``--arch``, :mod:`.bench_archs`) or a saved
model's ``config.json`` (``--model``: layers, experts, top-k, score function and hidden size read
from it, nothing downloaded). Three measurements:

1. the op alone at the architecture's router shapes (every MoE layer, ``--tokens`` tokens per
   side, anchor detached): each backend of the registry that runs here, and ``torch.compile`` of
   the reference; forward, backward, fwd+bwd, host time per call, extra peak memory and, on a
   GPU, the fraction of the copy bandwidth measured in the same run (:mod:`.bench_op`);
2. SARA's share of a training step of that architecture (random weights, ``--layers`` deep),
   with no alignment loss, the eager loss and each fused one, timed round-robin (:mod:`.bench_step`);
3. the router gates' own cost in that step, for scale.

A table on the terminal; ``bench.json`` (everything), ``bench.md`` (the tables) and ``bench.png``
(per-backend times, the step share) in ``--out``.

On a CPU the numbers are CPU numbers, and the fused backends are not timed: there they run as the
Triton interpreter (or an emulated build), whose time says nothing of the kernels'. The
reference is timed (``torch.compile`` of it with ``--compile``: its C++ build takes minutes), in
fp32 unless ``--dtype`` says otherwise (bf16 arithmetic is emulated on most CPUs), and the step
model keeps the architecture's router shape but narrows its experts and vocabulary
(:mod:`.bench_step`) to fit beside other work.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from sara_kernels import backends

from .bench_archs import ARCHS, arch_from_config, resolve_arch
from .cli import PROG, _Parser
from .table import format_table

DTYPE_NAMES = ("bf16", "fp16", "fp32")
SEQ_LEN = 512  # tokens per sequence of the benchmark's batches
COMPILE_MODE = "default"
CPU_NOTE = ("CPU: these are CPU numbers, not a GPU's. The fused backends are not timed here: on a CPU they run as the "
            "Triton interpreter (or an emulated build), which is not a measurement of the kernels. Timed: the reference "
            "(torch.compile of it with --compile); the step model is narrowed (experts, vocabulary) around the real "
            "router shape.")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} bench", formatter_class=argparse.RawDescriptionHelpFormatter,
                description=__doc__.split("\n\n", 1)[0].split(": ", 1)[1], epilog=__doc__.split("\n\n", 1)[1])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--arch", help=f"a built-in architecture: {', '.join(ARCHS)}")
    which.add_argument("--model", help="a saved model folder, or its config.json (read only; nothing is downloaded)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per side (default 4096; "
                   f"a multiple of {SEQ_LEN} above {SEQ_LEN})")
    p.add_argument("--layers", type=int, default=4, help="MoE layers of the training-step model (default 4)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="router logits and step model (default: bf16 on a GPU; fp32 on "
                   "a CPU, where bf16 arithmetic is emulated and slow)")
    p.add_argument("--backends", nargs="+", choices=backends.NAMES, metavar="NAME",
                   help=f"backends to time, of {', '.join(backends.NAMES)} (default: every one that runs here)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="time torch.compile of the reference (default: on a GPU; on a CPU its C++ build takes minutes)")
    p.add_argument("--compile-timeout", type=float, default=240.0,
                   help="seconds torch.compile may take before it is recorded as a timeout (default 240)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--device", choices=("cuda", "cpu"),
                   help="default: cuda when available (choose the GPU with CUDA_VISIBLE_DEVICES)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (drawn only on a terminal anyway)")
    return p


def prepare(argv):
    """Parses and checks the options (ValueError / OSError for a user's mistake, before any work);
    returns the run."""
    args = build_parser().parse_args(argv)
    for name in ("tokens", "layers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if args.tokens > SEQ_LEN and args.tokens % SEQ_LEN:
        raise ValueError(f"--tokens: {args.tokens} is not a multiple of {SEQ_LEN} (tokens per sequence); "
                         f"use {args.tokens // SEQ_LEN * SEQ_LEN} or {(args.tokens // SEQ_LEN + 1) * SEQ_LEN}")
    arch = resolve_arch(args.arch) if args.arch else arch_from_config(args.model)
    # torch is imported past -h and the checks above: the help answers without its start-up.
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda was asked for but no CUDA device is visible; use --device cpu")
    timed, left_out = timed_backends(device, args.backends)
    return lambda: run(args, arch, device, timed, left_out)


def not_timed_reason(name: str, device) -> str:
    """Why backend ``name`` is not timed on ``device`` ("" when it is)."""
    from .bench_op import skip_reason

    if device.type != "cuda" and backends.REGISTRY[name].fused:
        return (f"its kernels are a GPU's; on a {device.type} only the Triton interpreter or an emulated build runs "
                f"them, which is not a measurement")
    return skip_reason(name, device) or ""


def timed_backends(device, requested) -> tuple:
    """(backends to time, {backend: why not}); a requested backend that cannot be timed here is a ValueError."""
    reasons = {name: not_timed_reason(name, device) for name in backends.NAMES}
    runnable = [name for name in backends.NAMES if not reasons[name]]
    for name in requested or ():
        if reasons[name]:
            raise ValueError(f"--backends: {name} cannot be timed on this {device.type}: {reasons[name]}; "
                             f"backends timed here: {', '.join(runnable)}")
    timed = [name for name in backends.NAMES if name in (requested or runnable)]
    timed.sort(key=lambda name: backends.REGISTRY[name].fused)  # the reference first, as in the step's variants
    return timed, {name: reasons[name] for name in backends.NAMES if reasons[name]}


class _Progress:
    """A bar on a terminal (stderr) where tqdm is installed (the ``hf`` extra), nothing elsewhere."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc="bench", leave=False)

    def tick(self, note: str = ""):
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note)
            self.bar.update()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run(args, arch, device, timed: list, left_out: dict) -> int:
    import torch

    from .bench_op import COMPILE, DTYPES, PASSES, Case, measure_case
    from .bench_step import COLUMNS, NO_SARA, measure_step, step_shape
    from .bench_timing import L2Flusher, copy_bandwidth, environment, l2_cache_bytes, write_json

    on_gpu = device.type == "cuda"
    dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    compiled = on_gpu if args.compile is None else args.compile
    reps = (15 if args.quick else 30) if on_gpu else 3
    step_reps = (8 if args.quick else 20) if on_gpu else 2
    warmup = 3 if on_gpu else 1
    contenders = timed + ([COMPILE] if compiled else [])
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    if not on_gpu:
        print(CPU_NOTE, flush=True)
    print(f"{arch.name}: {arch.layers} MoE layers × {arch.experts} experts (top-{arch.top_k}, {arch.score}), hidden "
          f"{arch.hidden}; {args.tokens} tokens per side, {dtype}; timed: {', '.join(contenders)}"
          + "".join(f"\n  not timed: {name}: {why}" for name, why in left_out.items()), flush=True)

    l2_bytes = l2_cache_bytes(device)
    bandwidth = copy_bandwidth(device, l2_bytes) if on_gpu else None
    variants = [NO_SARA, *timed]
    shape = step_shape(arch, args.layers, args.tokens, SEQ_LEN, device)
    progress = _Progress(len(contenders) + len(variants) * (1 + step_reps),
                         enabled=not args.no_progress and sys.stderr.isatty())
    case = Case(arch.name, arch.layers, arch.experts, arch.score, args.tokens, "detach", min(SEQ_LEN, args.tokens),
                dtype, (COMPILE_MODE,) if compiled else (), target_shape=False)
    settings = argparse.Namespace(reps=reps, warmup=warmup, compile_timeout=args.compile_timeout, contenders=contenders)
    try:
        op_rows = measure_case(case, device, l2_bytes, bandwidth and bandwidth["gbps"],
                               L2Flusher(device, l2_bytes) if on_gpu else None, settings,
                               checkpoint=lambda rows: progress.tick(rows[-1]["contender"]))
        step = measure_step(shape, variants, device, DTYPES[dtype], l2_bytes, step_reps, warmup,
                            progress=progress.tick)
    finally:
        progress.close()

    op_table = format_table(op_table_rows(op_rows, PASSES), OP_COLUMNS)
    step_table = format_table(step["rows"], COLUMNS)
    gate = step["gate_per_layer"]
    step_text = (f"Training step: {args.layers} MoE layers, expert width {shape.expert_width}, vocabulary {shape.vocab}, "
                 f"{step['params'] / 1e6:.1f}M parameters, batch {shape.batch} × {shape.seq_len} tokens (half anchor, "
                 f"half target), AdamW; router gate fwd+bwd {gate['fwd_bwd_ms']:.4g} ms per layer")
    meta = dict(
        environment=environment(device), arch=vars(arch), tokens_per_side=args.tokens, dtype=dtype,
        device_note=None if on_gpu else CPU_NOTE, copy_bandwidth=bandwidth, reps=reps, step_reps=step_reps,
        warmup=warmup, not_timed=left_out,
        step_model=dict(layers=args.layers, seqs_per_side=shape.seqs, seq_len=shape.seq_len,
                        expert_width=shape.expert_width, vocab=shape.vocab, params=step["params"],
                        experts_implementation=step["experts_implementation"]),
        seconds=round(time.perf_counter() - start, 1),
    )
    write_json(os.path.join(args.out, "bench.json"),
               dict(meta=meta, op=op_rows, step=step["rows"], gate_per_layer=gate))
    title = f"SARA at {arch.name}'s router shapes on {meta['environment']['card']}"
    note = "" if on_gpu else f"{CPU_NOTE}\n\n"
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(f"# {title}\n\n{note}"
                f"Op alone, {arch.layers} × [{args.tokens}, {arch.experts}] {dtype} per side:\n\n```\n{op_table}\n```\n\n"
                f"{step_text}:\n\n```\n{step_table}\n```\n")
    plot_note = write_plot(os.path.join(args.out, "bench.png"), op_rows, step["rows"], title, PASSES)
    print(f"\nOp alone, {arch.layers} × [{args.tokens}, {arch.experts}] {dtype} per side:\n{op_table}\n\n"
          f"{step_text}:\n{step_table}\n{plot_note}")
    shares = ", ".join(f"{r['variant']} +{r['added_ms']} ms ({r['overhead_pct_of_step']}%)" for r in step["rows"][1:])
    print(f"SARA in the step: {shares}; results in {args.out} ({meta['seconds']} s)")
    return 0


OP_COLUMNS = [
    ("contender", "name"), ("pass", "pass_name"), ("ms p20/50/80", "ms"), ("host ms/call", "cpu_ms_per_call"),
    ("bw frac", "bw_fraction"), ("extra peak MB", "extra_peak_mb"), ("status", "status"),
]


def op_table_rows(rows: list, passes) -> list:
    out = []
    for r in rows:
        name = r["contender"] + (f"[{r['variant']}]" if r.get("variant") else "")
        if r.get("status") != "ok":
            out.append(dict(name=name, pass_name=r.get("pass_name"), status=f"{r['status']}: {r.get('note', '')}"[:90]))
            continue
        cpu = r.get("cpu_ms_per_call")
        out.append(dict(name=name, pass_name=r["pass_name"], status="ok",
                        ms=f"{r['p20_ms']:.3g}/{r['median_ms']:.3g}/{r['p80_ms']:.3g}",
                        cpu_ms_per_call=None if cpu is None else f"{cpu:.3g}", bw_fraction=r.get("bw_fraction"),
                        extra_peak_mb=r.get("extra_peak_mb")))
    return out


def write_plot(path: str, op_rows: list, step_rows: list, title: str, passes) -> str:
    """Left: median ms per contender and pass; right: SARA's share of the step per variant.
    Returns a note for the log when no plot could be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "bench.png not written: matplotlib is not installed (pip install 'sara-kernels[hf]')\n"
    ok = [r for r in op_rows if r.get("status") == "ok"]
    names = list(dict.fromkeys(r["contender"] + (f"[{r['variant']}]" if r.get("variant") else "") for r in ok))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(passes), 1)
    for j, pass_name in enumerate(passes):
        values = [next((r["median_ms"] for r in ok if r["pass_name"] == pass_name and
                        r["contender"] + (f"[{r['variant']}]" if r.get("variant") else "") == name), 0.0) for name in names]
        left.bar([i + j * width for i in range(len(names))], values, width, label=pass_name)
    left.set_xticks([i + width * (len(passes) - 1) / 2 for i in range(len(names))], names, fontsize=8)
    left.set_ylabel("median ms")
    left.set_title("the op alone", fontsize=10)
    left.legend(fontsize=8)
    sara = [r for r in step_rows if r.get("op_alone_pct_of_step") is not None]
    xs = range(len(sara))
    right.bar([x - 0.2 for x in xs], [r["overhead_pct_of_step"] for r in sara], 0.4, label="added step time")
    right.bar([x + 0.2 for x in xs], [r["op_alone_pct_of_step"] for r in sara], 0.4, label="op alone")
    right.set_xticks(list(xs), [r["variant"] for r in sara], fontsize=8)
    right.set_ylabel("% of a step without SARA")
    right.set_title("share of a training step", fontsize=10)
    right.axhline(0, color="black", linewidth=0.5)
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return ""
