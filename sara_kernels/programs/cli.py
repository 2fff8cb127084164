"""Command line: ``python -m sara_kernels {demo, analyze, selftest} ...``.

* ``demo``: baseline vs SARA fine-tuning of a tiny Qwen3-MoE on a synthetic parallel corpus
  (or ``--model``/``--data``), table + ``summary.json`` + ``summary.png`` in ``--out``.
* ``analyze``: per-layer routing JS and top-k overlap between anchors and targets of a jsonl
  for a saved model, table + ``routing_analysis.json`` + ``routing_heatmap.png`` in ``--out``.
* ``selftest``: the installed kernels against the float64 reference (:mod:`.selftest`).

Devices: ``demo`` and ``analyze`` run in one process on one device (``cuda:0`` when CUDA is
available; choose the GPU with ``CUDA_VISIBLE_DEVICES``). On a machine with several GPUs the
demo keeps transformers from wrapping the model in ``nn.DataParallel`` (see
:func:`sara_kernels.programs.demo.single_device`); ``analyze`` places the model on a single device and
does not use the Trainer.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", default="all", help="MoE layers: 'all', 'middle' or comma-separated decoder indices")
    p.add_argument("--max-length", type=_positive_int, default=None, help="truncate each side to this many tokens")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                   help="SARA backend: auto = Triton on CUDA, reference otherwise")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: 1 for the built-in tiny model on CPU, whose matrices are too "
                        "small for threads to pay off, torch's choice otherwise)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sara_kernels", description="SARA routing alignment tools")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="baseline vs SARA fine-tuning, before/after routing JS per layer")
    demo.add_argument("--out", default="sara_demo_out", help="output folder (summary.json, summary.png)")
    demo.add_argument("--model", default=None, help="local checkpoint folder (default: tiny random Qwen3-MoE)")
    demo.add_argument("--data", default=None, help='jsonl of {"anchor", "target", optional "lang"} (default: pseudo-language)')
    demo.add_argument("--quick", action="store_true", help="reduced size (seconds; used by the tests)")
    demo.add_argument("--steps", type=_positive_int, default=None, help="optimiser steps per run")
    demo.add_argument("--train-pairs", type=_positive_int, default=None, help="synthetic training pairs")
    demo.add_argument("--eval-pairs", type=_positive_int, default=None, help="held-out pairs for the measurements")
    demo.add_argument("--batch-size", type=_positive_int, default=None, help="pairs per batch")
    demo.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    demo.add_argument("--sara-weight", type=float, default=1.0, help="λ of the SARA run")
    demo.add_argument("--lm-target-only", action="store_true",
                      help="LM loss on the target side only (default: both sides, see sara_kernels.programs.demo)")
    demo.add_argument("--seed", type=int, default=0)
    _add_common(demo)

    analyze = sub.add_parser("analyze", help="routing JS / top-k overlap between anchor and target for a saved model")
    analyze.add_argument("--model", required=True, help="local checkpoint folder (save_pretrained output)")
    analyze.add_argument("--data", required=True, help='jsonl of {"anchor", "target", optional "lang"}')
    analyze.add_argument("--out", default="sara_analyze_out", help="output folder (routing_analysis.json, routing_heatmap.png)")
    analyze.add_argument("--score", default=None, choices=("softmax", "sigmoid"), help="default: the model family's")
    analyze.add_argument("--temperature", type=float, default=1.0)
    analyze.add_argument("--top-k", type=_positive_int, default=None, help="default: the model's experts per token")
    analyze.add_argument("--batch-size", type=_positive_int, default=8)
    _add_common(analyze)

    sub.add_parser("selftest", help="kernels vs float64 reference (see python -m sara_kernels selftest -h)", add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "selftest":
        from .selftest import main as selftest_main

        return selftest_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.command == "demo" and args.model is None and not torch.cuda.is_available():
        torch.set_num_threads(1)

    if args.command == "demo":
        from .demo import DemoConfig, run_demo, summary_table

        summary = run_demo(DemoConfig(
            out_dir=args.out, model_path=args.model, data_path=args.data, quick=args.quick, steps=args.steps,
            train_pairs=args.train_pairs, eval_pairs=args.eval_pairs, batch_size=args.batch_size,
            learning_rate=args.lr, sara_weight=args.sara_weight, layers=args.layers, lm_on_anchor=not args.lm_target_only,
            max_length=args.max_length, backend=args.backend, seed=args.seed, progress=not args.no_progress,
        ))
        print(summary_table(summary))
        t = summary["timings"]
        print(f"\n{summary['model']} on {summary['device']}: baseline {t['train_baseline_s']:.1f} s, "
              f"SARA {t['train_sara_s']:.1f} s, total {t['total_s']:.1f} s")
        print(f"wrote {os.path.join(args.out, 'summary.json')} and {os.path.join(args.out, 'summary.png')}")
        return 0

    from .analyze import run_analyze

    report = run_analyze(
        args.model, args.data, args.out, layers=args.layers, score=args.score, temperature=args.temperature,
        top_k=args.top_k, batch_size=args.batch_size, max_length=args.max_length, backend=args.backend,
        progress=not args.no_progress,
    )
    print(f"routing agreement of {report.num_pairs} pairs ({report.score}; JS in nats, JS/ln2 in [0, 1]):")
    print(report.table())
    print(f"wrote {os.path.join(args.out, 'routing_analysis.json')} and {os.path.join(args.out, 'routing_heatmap.png')}")
    return 0
