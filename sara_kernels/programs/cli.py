"""Command line: ``python -m sara_kernels {train, priors, analyze, demo, selftest} ...``.

* ``train``: fine-tune a saved MoE model with LM + λ·SARA on parallel pairs (:mod:`.train`).
* ``priors``: cache the anchors' routing for ``train --sara_priors`` (:mod:`.priors`).
* ``analyze``: per-layer routing JS and top-k overlap between anchors and targets for a saved
  model, table + ``routing_analysis.json`` + ``routing_heatmap.png`` in ``--out`` (:mod:`.analyze`).
* ``demo``: baseline vs SARA fine-tuning of a tiny Qwen3-MoE on a synthetic parallel corpus
  (or ``--model``/``--data``), table + ``summary.json`` + ``summary.png`` in ``--out``.
* ``selftest``: the installed kernels against the float64 reference (:mod:`.selftest`).

``train``, ``priors`` and ``analyze`` parse their options with ``HfArgumentParser``
(:mod:`.arguments`: flags or one YAML/JSON file) and share the model and data options.

Errors: a user mistake (a bad option, a missing file, a wrong column, a model without MoE
routers) is reported in one line on stderr with exit status 2 (usage) or 1, before any work
starts. Only those expected error types are caught, and only while a command is prepared:
anything raised while it runs keeps its traceback.

Devices: ``demo`` and ``analyze`` run in one process on one device (``cuda:0`` when CUDA is
available; choose the GPU with ``CUDA_VISIBLE_DEVICES``). On a machine with several GPUs the
demo and ``train`` keep transformers from wrapping the model in ``nn.DataParallel`` (see
:func:`sara_kernels.programs.demo.single_device`); ``analyze`` places the model on a single
device (or as ``--device_map`` says) and does not use the Trainer.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

from .._inputs import BACKENDS

PROG = "python -m sara_kernels"
# Commands parsed by HfArgumentParser: each module's prepare(argv) returns the run.
PREPARED_COMMANDS = {
    "train": "fine-tune a saved MoE model with SARA (see python -m sara_kernels train -h)",
    "priors": "cache the anchors' routing priors for train --sara_priors (see python -m sara_kernels priors -h)",
    "analyze": "routing JS / top-k overlap between anchor and target for a saved model (see python -m sara_kernels analyze -h)",
}
# What a user's mistake raises while a command is prepared (bad values and files, unreadable data,
# a model without MoE routers); caught there only, so a bug while the command runs keeps its traceback.
USER_ERRORS = (ValueError, OSError)


class _Parser(argparse.ArgumentParser):
    """Usage errors are raised, to be reported in one line, not printed with the whole usage."""

    def error(self, message):
        raise argparse.ArgumentError(None, message)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", default="all", help="MoE layers: 'all', 'middle' or comma-separated decoder indices")
    p.add_argument("--max-length", type=_positive_int, default=None, help="truncate each side to this many tokens")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="SARA backend: auto = the fused backend measured faster on CUDA, reference otherwise; cuda = the C++ extension")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: 1 for the built-in tiny model on CPU, whose matrices are too "
                        "small for threads to pay off, torch's choice otherwise)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="SARA routing alignment tools")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in PREPARED_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)

    demo = sub.add_parser("demo", help="baseline vs SARA fine-tuning, before/after routing JS per layer")
    demo.add_argument("--out", default="sara_demo_out", help="output folder (summary.json, summary.png)")
    demo.add_argument("--model", default=None, help="local checkpoint folder (default: tiny random Qwen3-MoE)")
    demo.add_argument("--data", default=None, help='pairs file (jsonl of {"anchor", "target", optional "lang"}, '
                                                   'or any format train reads; default: pseudo-language)')
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

    sub.add_parser("selftest", help="kernels vs float64 reference (see python -m sara_kernels selftest -h)", add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "selftest":
        from .selftest import main as selftest_main

        return selftest_main(argv[1:])
    command = argv[0] if argv[:1] and argv[0] in (*PREPARED_COMMANDS, "demo") else None
    try:
        if command in PREPARED_COMMANDS:
            run = importlib.import_module(f".{command}", __package__).prepare(argv[1:])
        else:
            run = _prepare_demo(build_parser().parse_args(argv))
    except argparse.ArgumentError as e:
        return _report(command, f"{e} (see --help)", status=2)
    except USER_ERRORS as e:
        return _report(command, str(e), status=1)
    return run()


def _report(command, message: str, status: int) -> int:
    """The error in one line on stderr (messages may span lines); returns the exit status."""
    print(f"{PROG}{' ' + command if command else ''}: error: {' '.join(message.split())}", file=sys.stderr)
    return status


def _prepare_demo(args):
    from .demo import DemoConfig, run_demo, summary_table

    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.model is None and not torch.cuda.is_available():
        torch.set_num_threads(1)
    cfg = DemoConfig(
        out_dir=args.out, model_path=args.model, data_path=args.data, quick=args.quick, steps=args.steps,
        train_pairs=args.train_pairs, eval_pairs=args.eval_pairs, batch_size=args.batch_size,
        learning_rate=args.lr, sara_weight=args.sara_weight, layers=args.layers, lm_on_anchor=not args.lm_target_only,
        max_length=args.max_length, backend=args.backend, seed=args.seed, progress=not args.no_progress,
    ).resolved()

    def run() -> int:
        summary = run_demo(cfg)
        print(summary_table(summary))
        t = summary["timings"]
        print(f"\n{summary['model']} on {summary['device']}: baseline {t['train_baseline_s']:.1f} s, "
              f"SARA {t['train_sara_s']:.1f} s, total {t['total_s']:.1f} s")
        print(f"wrote {os.path.join(args.out, 'summary.json')} and {os.path.join(args.out, 'summary.png')}")
        return 0

    return run
