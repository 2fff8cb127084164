"""Routing agreement between the two sides of parallel pairs, for a model as it is.

For each pair and MoE layer the pooled routing distributions of anchor and target (what SARA
aligns) are compared by

* Jensen-Shannon divergence (natural log, as the loss), also divided by ln 2 so it lies in
  [0, 1] and reads the same for any number of experts;
* top-k overlap: the fraction of the anchor's k most-used experts that are also among the
  target's k most-used (k = the model's experts per token unless given), an interpretable
  "same experts?" view that JS averages away.

``python -m sara_kernels analyze --model PATH --data pairs.jsonl`` (data and model options as
for ``train``, :mod:`.arguments`) prints the per-layer table
and writes ``routing_analysis.json`` and ``routing_heatmap.png`` (normalised JS per layer and
language tag; target-minus-anchor expert usage per layer). With ``--anchor_answers`` it also
reports, per language tag, the fraction of pairs ``sara_anchor_filter="correct"`` would keep (the
anchors whose answer the model reproduces).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from .arguments import DataArguments, ModelArguments, ProgressArguments, RoutingArguments, check_positive, parse_command

LN2 = math.log(2.0)


@dataclass
class RoutingReport:
    """Per-layer routing agreement of anchor vs target over a set of pairs."""

    layers: tuple  # decoder-layer indices
    js: list  # mean JS per layer (nats)
    js_normalized: list  # js / ln 2, in [0, 1]
    topk_overlap: list  # mean top-k overlap per layer, in [0, 1]
    top_k: int
    num_pairs: int
    score: str
    temperature: float
    by_lang: dict = field(default_factory=dict)  # lang -> normalised JS per layer
    expert_shift: list = field(default_factory=list)  # [L][E]: mean P_target - mean P_anchor
    per_pair_js: Optional[torch.Tensor] = None  # [num_pairs, L]
    anchor_kept_by_lang: dict = field(default_factory=dict)  # lang -> fraction of anchors answered (anchor_answers)

    @property
    def mean_js(self) -> float:
        return float(sum(self.js) / len(self.js))

    @property
    def mean_js_normalized(self) -> float:
        return float(sum(self.js_normalized) / len(self.js_normalized))

    @property
    def mean_topk_overlap(self) -> float:
        return float(sum(self.topk_overlap) / len(self.topk_overlap))

    def to_dict(self) -> dict:
        """JSON-ready summary (no per-pair values)."""
        return {
            "layers": list(self.layers),
            "js": self.js,
            "js_normalized": self.js_normalized,
            "topk_overlap": self.topk_overlap,
            "top_k": self.top_k,
            "num_pairs": self.num_pairs,
            "score": self.score,
            "temperature": self.temperature,
            "mean_js": self.mean_js,
            "mean_js_normalized": self.mean_js_normalized,
            "mean_topk_overlap": self.mean_topk_overlap,
            "by_lang": self.by_lang,
            "expert_shift": self.expert_shift,
            **({"anchor_kept_by_lang": self.anchor_kept_by_lang} if self.anchor_kept_by_lang else {}),
        }

    def table(self) -> str:
        """Fixed-width text table: one row per layer and a mean row."""
        head = f"{'layer':>6}  {'JS':>9}  {'JS/ln2':>7}  {f'top-{self.top_k} overlap':>14}"
        lines = [head, "-" * len(head)]
        for i, layer in enumerate(self.layers):
            lines.append(
                f"{layer:>6}  {self.js[i]:>9.5f}  {self.js_normalized[i]:>7.4f}  {self.topk_overlap[i]:>14.3f}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{'mean':>6}  {self.mean_js:>9.5f}  {self.mean_js_normalized:>7.4f}  {self.mean_topk_overlap:>14.3f}"
        )
        if self.anchor_kept_by_lang:
            kept = ", ".join(f"{lang} {value:.3f}" for lang, value in self.anchor_kept_by_lang.items())
            lines.append(f"anchors answered correctly (kept by sara_anchor_filter='correct'): {kept}")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike, title: str = "routing agreement, anchor vs target") -> None:
        """Heatmaps: normalised JS (layer × language tag) and expert-usage shift (layer × expert)."""
        import torch
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        langs = sorted(self.by_lang)
        columns = (["all"] + langs) if len(langs) > 1 else ["all"]
        grid = [[self.js_normalized[i]] + [self.by_lang[lang][i] for lang in columns[1:]] for i in range(len(self.layers))]
        shift = torch.tensor(self.expert_shift)
        fig = Figure(figsize=(4 + 0.6 * len(columns) + 0.25 * shift.shape[1], 1.2 + 0.45 * len(self.layers)))
        FigureCanvasAgg(fig)
        ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [len(columns) + 1, shift.shape[1] + 1]})
        im = ax1.imshow(grid, cmap="viridis", vmin=0.0, vmax=max(1e-6, max(max(r) for r in grid)), aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax1.text(j, i, f"{v:.3f}", ha="center", va="center", color="white" if v < 0.6 * im.get_clim()[1] else "black", fontsize=7)
        ax1.set_xticks(range(len(columns)), columns)
        ax1.set_yticks(range(len(self.layers)), [str(x) for x in self.layers])
        ax1.set_ylabel("decoder layer")
        ax1.set_title("JS / ln 2")
        fig.colorbar(im, ax=ax1, fraction=0.08)
        bound = max(1e-6, float(shift.abs().max()))
        im2 = ax2.imshow(shift.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
        ax2.set_yticks(range(len(self.layers)), [str(x) for x in self.layers])
        ax2.set_xlabel("expert")
        ax2.set_title("expert usage: target − anchor")
        fig.colorbar(im2, ax=ax2, fraction=0.05)
        fig.suptitle(f"{title} ({self.num_pairs} pairs, {self.score})")
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=120)


def default_top_k(model, num_experts: int) -> int:
    """Experts per token from the config (``num_experts_per_tok`` / ``moe_k`` / ``top_k``), else 2; at most E."""
    config = getattr(model, "config", None)
    configs = [c for c in (config, getattr(config, "text_config", None)) if c is not None]
    for cfg in configs:
        for name in ("num_experts_per_tok", "moe_k", "top_k", "num_selected_experts"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return min(value, num_experts)
    return min(2, num_experts)


def compare_distributions(
    p_anchor: torch.Tensor,
    p_target: torch.Tensor,
    layers: Sequence[int],
    *,
    top_k: int,
    score: str,
    temperature: float = 1.0,
    langs: Optional[Sequence[Optional[str]]] = None,
) -> RoutingReport:
    """Build a :class:`RoutingReport` from pooled distributions [num_pairs, L, E] of both sides."""
    import torch

    from ..reference import js_divergence

    if p_anchor.shape != p_target.shape or p_anchor.dim() != 3:
        raise ValueError(f"expected two [num_pairs, L, E] tensors of one shape, got {tuple(p_anchor.shape)} and {tuple(p_target.shape)}")
    num_pairs, num_layers, num_experts = p_anchor.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, E = {num_experts}], got {top_k}")
    pa, pt = p_anchor.double(), p_target.double()
    js = js_divergence(pa, pt)  # [N, L]
    ia = torch.zeros_like(pa, dtype=torch.bool).scatter_(-1, pa.topk(top_k, dim=-1).indices, True)
    it = torch.zeros_like(pt, dtype=torch.bool).scatter_(-1, pt.topk(top_k, dim=-1).indices, True)
    overlap = (ia & it).sum(-1).double() / top_k  # [N, L]
    by_lang = {}
    if langs is not None:
        tags = ["?" if lang is None else str(lang) for lang in langs]
        for tag in sorted(set(tags)):
            rows = torch.tensor([t == tag for t in tags])
            by_lang[tag] = (js[rows].mean(0) / LN2).tolist()
    return RoutingReport(
        layers=tuple(int(i) for i in layers),
        js=js.mean(0).tolist(),
        js_normalized=(js.mean(0) / LN2).tolist(),
        topk_overlap=overlap.mean(0).tolist(),
        top_k=int(top_k),
        num_pairs=int(num_pairs),
        score=score,
        temperature=float(temperature),
        by_lang=by_lang,
        expert_shift=(pt.mean(0) - pa.mean(0)).tolist(),
        per_pair_js=js.float(),
    )


def routing_report(
    model,
    tokenizer,
    pairs: Sequence[dict],
    *,
    layers="all",
    score: Optional[str] = None,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    batch_size: int = 8,
    max_length: Optional[int] = None,
    backend: str = "auto",
    progress: bool = True,
    anchor_answers: bool = False,
) -> RoutingReport:
    """Per-layer JS (and JS / ln 2) and top-k overlap between anchors and targets of ``pairs``.

    Runs the model (eval mode, no grad) over both sides, tokenised as in training. With
    ``anchor_answers`` (every pair needs an anchor answer) also the fraction of anchors per
    language tag whose answer the model reproduces (``anchor_kept_by_lang``).
    """
    from ..hf.data import side_answer, validate_pair
    from ..hf.routing import pooled_routing

    if len(pairs) == 0:
        raise ValueError("pairs: no examples to analyse")
    for i in range(len(pairs)):
        validate_pair(pairs[i], f"pairs[{i}]")
    common = dict(layers=layers, score=score, temperature=temperature, batch_size=batch_size,
                  max_length=max_length, backend=backend, progress=progress)
    answers = None
    if anchor_answers:
        answers = [side_answer(p, "anchor") for p in pairs]
        missing = [i for i, answer in enumerate(answers) if answer is None]
        if missing:
            raise ValueError(f"anchor_answers: pairs{missing[:5]} have no anchor answer; give each pair an 'answer' "
                             "field or a chat anchor ending with the assistant's reply")
    pa, found_layers, found_score, *correct = pooled_routing(
        model, tokenizer, [p["anchor"] for p in pairs], desc="anchors", answers=answers, **common)
    pt, _, _ = pooled_routing(model, tokenizer, [p["target"] for p in pairs], desc="targets", **common)
    k = default_top_k(model, pa.shape[-1]) if top_k is None else top_k
    langs = [p.get("lang") for p in pairs]
    report = compare_distributions(pa, pt, found_layers, top_k=k, score=found_score, temperature=temperature, langs=langs)
    if correct:
        tags = ["?" if lang is None else str(lang) for lang in langs]
        answered = correct[0].tolist()
        report.anchor_kept_by_lang = {tag: sum(a for a, t in zip(answered, tags) if t == tag) / tags.count(tag)
                                      for tag in sorted(set(tags))}
    return report


def write_analysis(report: RoutingReport, out_dir: str, model_path: str, data) -> None:
    """``routing_analysis.json`` (``data``: the pair files) and ``routing_heatmap.png`` in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "routing_analysis.json"), "w") as f:
        json.dump({"model": os.fspath(model_path), "data": data, **report.to_dict()}, f, indent=2)
    report.plot(os.path.join(out_dir, "routing_heatmap.png"), title=os.path.basename(os.path.normpath(model_path)))


@dataclass
class AnalyzeArguments(RoutingArguments):
    out: str = field(default="sara_analyze_out", metadata={"help": "Output folder (routing_analysis.json, routing_heatmap.png)."})
    top_k: Optional[int] = field(default=None, metadata={"help": "Default: the model's experts per token."})
    threads: Optional[int] = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})
    anchor_answers: bool = field(
        default=False,
        metadata={"help": "Also report per language the fraction of anchors whose answer the model reproduces "
                          "(what --sara_anchor_filter correct keeps; each pair needs an 'answer' or a chat reply)."},
    )

    def __post_init__(self):
        super().__post_init__()
        check_positive(self.top_k, "top_k")
        check_positive(self.threads, "threads")


def prepare(argv: list) -> Callable[[], int]:
    """The ``analyze`` command: parse, load the pairs and the model, check it has MoE routers; returns the report's run."""
    model_args, data_args, args, progress = parse_command(
        (ModelArguments, DataArguments, AnalyzeArguments, ProgressArguments), argv, "python -m sara_kernels analyze",
        "Routing JS and top-k overlap between anchors and targets for a saved model (flags, or one YAML/JSON file).",
    )
    import torch

    from ..hf.routing import probe_routing

    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = data_args.load()
    model, tokenizer = model_args.load()
    probe_routing(model, args.layers, args.score)  # a model without MoE routers fails here, before any work

    def run() -> int:
        report = routing_report(
            model, tokenizer, pairs, layers=args.layers, score=args.score, temperature=args.temperature,
            top_k=args.top_k, batch_size=args.batch_size, max_length=args.max_length, backend=args.backend,
            progress=progress.enabled, anchor_answers=args.anchor_answers,
        )
        write_analysis(report, args.out, model_args.model, data_args.data[0] if len(data_args.data) == 1 else data_args.data)
        print(f"routing agreement of {report.num_pairs} pairs ({report.score}; JS in nats, JS/ln2 in [0, 1]):")
        print(report.table())
        print(f"wrote {os.path.join(args.out, 'routing_analysis.json')} and {os.path.join(args.out, 'routing_heatmap.png')}")
        return 0

    return run
