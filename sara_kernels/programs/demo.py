"""End-to-end SARA demo: baseline vs SARA fine-tuning from one initialisation, on CPU or GPU.

``python -m sara_kernels demo`` with no arguments needs nothing from the network:

1. a word-level tokenizer and a parallel corpus are built in code (English anchors, targets in
   the documented pseudo-language of :mod:`sara_kernels.hf.data`, same meaning word for word);
2. a tiny Qwen3-MoE (4 layers, 8 experts, top-2) is created from a config with a fixed seed;
3. the same initial model is fine-tuned twice with :class:`~sara_kernels.hf.SARATrainer`:
   a baseline with the LM loss only (``sara_weight=0``) and a SARA run (``sara_weight=λ``).
   Both runs train the LM on both sides (``--lm-target-only`` turns that off): a randomly
   initialised model has learnt no anchor language, so an anchor side it is never trained on
   would give SARA a meaningless routing to align with;
4. before and after each run it measures, on held-out pairs, the per-layer routing JS between
   the languages (:func:`sara_kernels.programs.analyze.routing_report`) and the target LM loss.

It prints a table, and writes ``summary.json`` and ``summary.png`` to ``--out``. ``--model`` (a
local ``save_pretrained`` folder) and ``--data`` (jsonl pairs) run the same comparison on a real
model and corpus; ``--quick`` / ``--steps`` shrink it.

**Devices.** Run as one plain process, the demo uses one device (``cuda:0`` when CUDA is
available; pick the GPU with ``CUDA_VISIBLE_DEVICES``): transformers' ``TrainingArguments`` would
otherwise count every visible GPU (``n_gpu = torch.cuda.device_count()``) and wrap the model in
``nn.DataParallel``, which :class:`~sara_kernels.hf.SARATrainer` rejects. The demo pins
``n_gpu`` to 1 as transformers' own ``Trainer`` does for model-parallel models
(:func:`single_device`). Launched by ``torchrun`` / ``accelerate launch``, each process already
has ``n_gpu == 1`` and trains on its own GPU with DDP.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

from .arguments import DataArguments, ModelArguments, ProgressArguments, SaraArguments, check_positive, parse_command
from .corpus import build_word_tokenizer, make_parallel_corpus
from .table import format_table

PROG = "python -m sara_kernels demo"
SIZES = {
    # train pairs, held-out pairs, optimiser steps, pairs per batch
    "default": dict(train_pairs=1024, eval_pairs=128, steps=250, batch_size=16),
    "quick": dict(train_pairs=96, eval_pairs=32, steps=12, batch_size=8),
}


@dataclass
class DemoConfig:
    """Everything one demo run depends on (saved in ``summary.json``)."""

    out_dir: str = "sara_demo_out"
    model_path: Optional[str] = None
    data_path: Optional[str] = None
    quick: bool = False
    steps: Optional[int] = None
    train_pairs: Optional[int] = None
    eval_pairs: Optional[int] = None
    batch_size: Optional[int] = None
    learning_rate: float = 3e-3
    sara_weight: float = 1.0
    layers: str = "all"
    lm_on_anchor: bool = True
    max_length: Optional[int] = None
    backend: str = "auto"
    seed: int = 0
    progress: bool = True

    def resolved(self) -> "DemoConfig":
        size = SIZES["quick" if self.quick else "default"]
        out = DemoConfig(**self.__dict__)
        for key, value in size.items():
            if getattr(out, key) is None:
                setattr(out, key, value)
        for key in ("steps", "train_pairs", "eval_pairs", "batch_size"):
            if getattr(out, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(out, key)}")
        if not out.sara_weight > 0:
            raise ValueError(f"sara_weight must be > 0 for the SARA run, got {out.sara_weight}")
        return out


# --------------------------------------------------------------------------------------------
# Model, data, evaluation
# --------------------------------------------------------------------------------------------


def tiny_qwen3_moe_config(tokenizer, *, hidden_size=64, num_layers=4, num_experts=8, top_k=2):
    """A Qwen3-MoE config small enough to train in seconds on a CPU (every layer is MoE)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        moe_intermediate_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=128,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_model(tokenizer, seed: int = 0, **config_kwargs):
    """Random-init tiny Qwen3-MoE, identical for equal seeds (the global RNG is restored after)."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(tiny_qwen3_moe_config(tokenizer, **config_kwargs))
    finally:
        torch.random.set_rng_state(state)
    return model


def target_lm_loss(model, tokenizer, pairs, *, batch_size: int = 16, max_length: Optional[int] = None) -> float:
    """Mean next-token cross-entropy on the target sides of ``pairs`` (eval mode, no grad)."""
    import torch

    from ..hf.collate import IGNORE_INDEX, SARACollator
    from ..hf.routing import eval_mode, forward_kwargs, model_device

    collate = SARACollator(tokenizer, max_length=max_length, include_anchor=False)
    device = model_device(model)
    total, count = 0.0, 0
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = collate(list(pairs[start : start + batch_size]))
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                        **forward_kwargs(model, lm_head=True))
            logits = out.logits[:, :-1].float()
            labels = batch["labels"][:, 1:].to(device)
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def _progress_callback(name: str, enabled: bool):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class TqdmProgress(TrainerCallback):
        """One bar per run with the latest losses; replaces Trainer's dict printing."""

        def __init__(self):
            self.bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc=name, disable=not enabled, leave=True)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs:
                shown = {k: f"{logs[k]:.4f}" for k in ("lm_loss", "sara_loss") if k in logs}
                if shown:
                    self.bar.set_postfix(shown)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return TqdmProgress()


def single_device(args):
    """``args`` with ``n_gpu`` pinned to 1 when transformers counted several GPUs in this process.

    Without a distributed launch, ``TrainingArguments`` sets up ``cuda:0`` as the device but
    counts every visible GPU in ``n_gpu``, and the Trainer then wraps the model in
    ``nn.DataParallel`` (which SARATrainer rejects). Resolving the device first (``args.n_gpu``
    runs the cached ``_setup_devices``) and then setting ``_n_gpu = 1`` is what transformers' own
    ``Trainer`` does to keep a model-parallel model out of DataParallel; the device stays
    ``cuda:0`` (the first of ``CUDA_VISIBLE_DEVICES``). CPU-only (``n_gpu == 0``) and distributed
    runs (``n_gpu == 1`` per process) are left as they are.
    """
    if args.n_gpu > 1:
        args._n_gpu = 1
    return args


def training_args(name: str, cfg: DemoConfig, sara_weight: float):
    """The SARATrainingArguments of one demo run (single device unless launched distributed)."""
    import torch

    from ..hf.trainer import SARATrainingArguments

    args = SARATrainingArguments(
        output_dir=os.path.join(cfg.out_dir, f"trainer_{name}"),
        per_device_train_batch_size=cfg.batch_size,
        max_steps=cfg.steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, cfg.steps // 10),
        weight_decay=0.0,
        logging_steps=max(1, cfg.steps // 25),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=cfg.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        sara_weight=sara_weight,
        sara_layers=cfg.layers,
        sara_lm_on_anchor=cfg.lm_on_anchor,
        sara_backend=cfg.backend,
        sara_max_length=cfg.max_length,
    )
    return single_device(args)


def fine_tune(name, model, tokenizer, train_pairs, cfg: DemoConfig, sara_weight: float) -> list:
    """Fine-tune ``model`` in place with SARATrainer; returns the Trainer's log history."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ..hf.trainer import SARATrainer

    args = training_args(name, cfg, sara_weight)
    trainer = SARATrainer(model=model, args=args, train_dataset=train_pairs, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_callback(name, cfg.progress))
    trainer.train()
    return [dict(entry) for entry in trainer.state.log_history]


def _measure(model, tokenizer, eval_pairs, cfg: DemoConfig) -> dict:
    from .analyze import routing_report

    report = routing_report(model, tokenizer, eval_pairs, layers=cfg.layers, batch_size=cfg.batch_size,
                            max_length=cfg.max_length, backend=cfg.backend, progress=False)
    return {"routing": report.to_dict(),
            "target_lm_loss": target_lm_loss(model, tokenizer, eval_pairs, batch_size=cfg.batch_size, max_length=cfg.max_length)}


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

STAGES = ("init", "baseline", "sara")


def summary_table(summary: dict) -> str:
    """The end-of-run table: per-layer normalised JS and top-k overlap per stage, and LM losses."""
    r = {s: summary["results"][s]["routing"] for s in STAGES}
    k = r["init"]["top_k"]
    columns = [("layer", "layer")] + [(s, f"js_{s}") for s in STAGES] + [(f"top-{k} {s}", f"overlap_{s}") for s in STAGES]

    def row(layer, js, overlap):
        return {"layer": layer, **{f"js_{s}": f"{js[s]:.4f}" for s in STAGES},
                **{f"overlap_{s}": f"{overlap[s]:.3f}" for s in STAGES}}

    rows = [row(layer, {s: r[s]["js_normalized"][i] for s in STAGES}, {s: r[s]["topk_overlap"][i] for s in STAGES})
            for i, layer in enumerate(r["init"]["layers"])]
    rows.append(row("mean", {s: r[s]["mean_js_normalized"] for s in STAGES}, {s: r[s]["mean_topk_overlap"] for s in STAGES}))
    rows.append({"layer": "LM loss", **{f"js_{s}": f"{summary['results'][s]['target_lm_loss']:.4f}" for s in STAGES}})
    return "\n".join([
        f"routing JS/ln2 (columns init..sara) and top-{k} expert overlap between anchor and target, "
        f"{r['init']['num_pairs']} held-out pairs (JS 0 = same experts); LM loss: target side, held-out, nats/token",
        format_table(rows, columns),
    ])


def plot_summary(summary: dict, path: Optional[str] = None):
    """Three panels: per-layer JS/ln2 per stage, top-k overlap per stage, training LM loss curves.

    Returns the matplotlib ``Figure`` (so that tests can inspect it), and saves it to ``path`` when
    one is given (the demo passes ``out_dir/summary.png``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8))
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    results = summary["results"]
    layers = results["init"]["routing"]["layers"]
    width = 0.27
    for j, stage in enumerate(STAGES):
        xs = [i + (j - 1) * width for i in range(len(layers))]
        ax1.bar(xs, results[stage]["routing"]["js_normalized"], width, label=stage)
        ax2.bar(xs, results[stage]["routing"]["topk_overlap"], width, label=stage)
    for ax, title in ((ax1, "routing JS / ln 2 (lower = aligned)"), (ax2, f"top-{results['init']['routing']['top_k']} expert overlap")):
        ax.set_xticks(range(len(layers)), [str(x) for x in layers])
        ax.set_xlabel("decoder layer")
        ax.set_title(title)
        ax.legend(fontsize=8)
    for name in ("baseline", "sara"):
        history = [h for h in summary["log_history"][name] if "lm_loss" in h]
        ax3.plot([h["step"] for h in history], [h["lm_loss"] for h in history], label=f"{name} LM loss")
    curves = list(ax3.get_lines())
    sara_hist = [h for h in summary["log_history"]["sara"] if "sara_loss" in h]
    if sara_hist:
        twin = ax3.twinx()
        curves += twin.plot([h["step"] for h in sara_hist], [h["sara_loss"] for h in sara_hist], color="tab:red", ls="--",
                            label="sara SARA loss (JS, right axis)")
        twin.set_ylabel("SARA loss", color="tab:red")
    ax3.set_xlabel("step")
    ax3.set_title("training")
    ax3.legend(curves, [c.get_label() for c in curves], fontsize=8, loc="upper right")  # both axes' curves
    title = f"SARA demo: {summary['model']}, {summary['sizes']['train_pairs']} train pairs, {summary['sizes']['steps']} steps"
    if summary["config"].get("quick"):
        title += " (--quick: a smoke test, too short to show the effect)"
    fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


# --------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------


def _pairs(cfg: DemoConfig, pairs: Optional[list]):
    if pairs is None and cfg.data_path is None:
        pairs = make_parallel_corpus(cfg.train_pairs + cfg.eval_pairs, seed=cfg.seed)
        return pairs[: cfg.train_pairs], pairs[cfg.train_pairs :], False
    if pairs is None:
        pairs = list(DataArguments(data=[cfg.data_path]).load())  # a demo-sized corpus, split by slicing below
    if len(pairs) < 10:  # too few to hold any out: report on the training pairs (flagged in the summary)
        return pairs, pairs, True
    n_eval = min(cfg.eval_pairs, max(1, len(pairs) // 10))
    return pairs[: len(pairs) - n_eval], pairs[len(pairs) - n_eval :], False


def run_demo(
    cfg: Optional[DemoConfig] = None, *, pairs: Optional[list] = None, load_model: Optional[Callable] = None, **overrides
) -> dict:
    """Run the demo; returns the summary (also written to ``out_dir/summary.json`` with ``summary.png``).

    ``pairs`` (dicts as :func:`sara_kernels.hf.load_pairs` yields them) replace reading
    ``cfg.data_path``; ``load_model`` (called once per run, returns (model, tokenizer)) replaces
    loading ``cfg.model_path``: the command line passes what it read with its own options.
    """
    import torch

    if cfg is None:
        cfg = DemoConfig(**overrides)
    elif overrides:
        cfg = DemoConfig(**{**cfg.__dict__, **overrides})
    cfg = cfg.resolved()
    os.makedirs(cfg.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    train_pairs, eval_pairs, eval_on_train = _pairs(cfg, pairs)
    if load_model is None and cfg.model_path is not None:
        load_model = ModelArguments(model=os.fspath(cfg.model_path)).load

    if load_model is None:
        tokenizer = build_word_tokenizer()
        model_name = "tiny Qwen3-MoE (random init)"

        def fresh_model():
            model = build_tiny_model(tokenizer, seed=cfg.seed)
            return model.to("cuda") if torch.cuda.is_available() else model
    else:
        tokenizer = None
        model_name = os.fspath(cfg.model_path or "the given model")

        def fresh_model():  # reloaded rather than copied: one model in memory at a time
            nonlocal tokenizer
            model, tokenizer = load_model()
            return model

    timings = {}
    results, histories = {}, {}
    model = fresh_model()
    start = time.perf_counter()
    results["init"] = _measure(model, tokenizer, eval_pairs, cfg)
    timings["measure_init_s"] = time.perf_counter() - start

    for stage, weight in (("baseline", 0.0), ("sara", cfg.sara_weight)):
        if stage == "sara":
            del model
            model = fresh_model()
        start = time.perf_counter()
        histories[stage] = fine_tune(stage, model, tokenizer, train_pairs, cfg, weight)
        timings[f"train_{stage}_s"] = time.perf_counter() - start
        start = time.perf_counter()
        results[stage] = _measure(model, tokenizer, eval_pairs, cfg)
        timings[f"measure_{stage}_s"] = time.perf_counter() - start
    timings["total_s"] = time.perf_counter() - t0

    summary = {
        "model": model_name,
        "data": cfg.data_path or "pseudo-language corpus (sara_kernels.programs.corpus.make_parallel_corpus)",
        "device": str(next(model.parameters()).device),
        "backend": cfg.backend,
        "eval_on_train_pairs": eval_on_train,
        "sizes": {"train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs), "steps": cfg.steps, "batch_size": cfg.batch_size},
        "config": {k: v for k, v in cfg.__dict__.items() if k != "progress"},
        "results": results,
        "log_history": histories,
        "timings": timings,
    }
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)  # config paths may be PathLike
    plot_summary(summary, os.path.join(cfg.out_dir, "summary.png"))
    return summary


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


@dataclass
class DemoModelArguments(ModelArguments):
    required: ClassVar[bool] = False
    model: Optional[str] = field(
        default=None, metadata={"help": "Local checkpoint folder (save_pretrained output); default: a tiny random Qwen3-MoE."}
    )


@dataclass
class DemoDataArguments(DataArguments):
    required: ClassVar[bool] = False
    data: list[str] = field(
        default_factory=list,
        metadata={"help": "Pair files or a save_to_disk folder, read as train reads them (same column and language "
                          "options); default: the pseudo-language corpus."},
    )


@dataclass
class DemoArguments(SaraArguments):
    """The demo's own options (sizes default to those of SIZES, --quick's when given)."""

    out: str = field(default="sara_demo_out", metadata={"help": "Output folder (summary.json, summary.png)."})
    quick: bool = field(
        default=False,
        metadata={"help": "A smoke test in seconds (what the tests run): too short for SARA to change the routing "
                          "(top-k overlap stays near 1 in both runs); the full demo shows the effect."},
    )
    steps: Optional[int] = field(default=None, metadata={"help": "Optimiser steps per run."})
    train_pairs: Optional[int] = field(default=None, metadata={"help": "Synthetic training pairs."})
    eval_pairs: Optional[int] = field(default=None, metadata={"help": "Held-out pairs for the measurements."})
    batch_size: Optional[int] = field(default=None, metadata={"help": "Pairs per batch."})
    lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate."})
    sara_weight: float = field(default=1.0, metadata={"help": "λ of the SARA run."})
    lm_target_only: bool = field(
        default=False, metadata={"help": "LM loss on the target side only (default: both sides, see sara_kernels.programs.demo)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation, the corpus and the batches."})
    threads: Optional[int] = field(
        default=None,
        metadata={"help": "torch CPU threads (default: 1 for the built-in tiny model on CPU, whose matrices are too small "
                          "for threads to pay off, torch's choice otherwise)."},
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("steps", "train_pairs", "eval_pairs", "batch_size", "threads"):
            check_positive(getattr(self, name), name)


def prepare(argv: list) -> Callable[[], int]:
    """Parse, read the data and load the model (where user errors surface); returns the two runs."""
    model_args, data_args, args, progress = parse_command(
        (DemoModelArguments, DemoDataArguments, DemoArguments, ProgressArguments), argv, PROG,
        "Baseline vs SARA fine-tuning from one initialisation, routing before and after (flags, or one YAML/JSON file).",
    )
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    elif model_args.model is None and not torch.cuda.is_available():
        torch.set_num_threads(1)
    cfg = DemoConfig(
        out_dir=args.out, model_path=model_args.model, data_path=", ".join(data_args.data) or None, quick=args.quick,
        steps=args.steps, train_pairs=args.train_pairs, eval_pairs=args.eval_pairs, batch_size=args.batch_size,
        learning_rate=args.lr, sara_weight=args.sara_weight, layers=args.layers, lm_on_anchor=not args.lm_target_only,
        max_length=args.max_length, backend=args.backend, seed=args.seed, progress=progress.enabled,
    ).resolved()
    pairs = list(data_args.load()) if data_args.data else None
    load_model = None
    if model_args.model is not None:
        loaded = [model_args.load()]  # the first run uses this model; the second loads it afresh

        def load_model():
            return loaded.pop() if loaded else model_args.load()

    def run() -> int:
        summary = run_demo(cfg, pairs=pairs, load_model=load_model)
        print(summary_table(summary))
        t = summary["timings"]
        print(f"\n{summary['model']} on {summary['device']}: baseline {t['train_baseline_s']:.1f} s, "
              f"SARA {t['train_sara_s']:.1f} s, total {t['total_s']:.1f} s")
        print(f"wrote {os.path.join(args.out, 'summary.json')} and {os.path.join(args.out, 'summary.png')}")
        if cfg.quick:
            print("--quick is a smoke test: too short for SARA to change the routing; run without it to see the effect")
        return 0

    return run
