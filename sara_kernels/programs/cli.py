"""Command line: ``python -m sara_kernels {train, priors, analyze, demo, bench, selftest} ...``.

* ``train``: fine-tune a saved MoE model with LM + λ·SARA on parallel pairs (:mod:`.train`).
* ``priors``: cache the anchors' routing for ``train --sara_priors`` (:mod:`.priors`).
* ``analyze``: per-layer routing JS and top-k overlap between anchors and targets for a saved
  model, table + ``routing_analysis.json`` + ``routing_heatmap.png`` in ``--out`` (:mod:`.analyze`).
* ``demo``: baseline vs SARA fine-tuning of a tiny Qwen3-MoE on a synthetic parallel corpus
  (or ``--model``/``--data``), table + ``summary.json`` + ``summary.png`` in ``--out``.
* ``bench``: what SARA costs at an MoE architecture's router shapes (``--arch`` or ``--model``),
  the op alone and its share of a training step, table + ``bench.json`` + ``bench.png`` in
  ``--out`` (:mod:`.bench`).
* ``selftest``: the installed kernels against the float64 reference (:mod:`.selftest`).

``train``, ``priors``, ``analyze`` and ``demo`` parse their options with ``HfArgumentParser``
(:mod:`.arguments`: flags or one YAML/JSON file) and share the model and data options and
``--no_progress`` (progress bars are drawn only on a terminal); ``bench`` has its own options
(``--no-progress`` among them).

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
import sys

PROG = "python -m sara_kernels"
# Commands whose module's prepare(argv) returns the run (all parse with HfArgumentParser but bench, plain argparse). A command's module is
# imported only when it runs, and imports the heavy libraries only past its -h and usage checks.
PREPARED_COMMANDS = {
    "train": "fine-tune a saved MoE model with SARA (see python -m sara_kernels train -h)",
    "priors": "cache the anchors' routing priors for train --sara_priors (see python -m sara_kernels priors -h)",
    "analyze": "routing JS / top-k overlap between anchor and target for a saved model (see python -m sara_kernels analyze -h)",
    "demo": "baseline vs SARA fine-tuning, before/after routing JS per layer (see python -m sara_kernels demo -h)",
    "bench": "time SARA at an MoE architecture's router shapes, alone and in a training step (see python -m sara_kernels bench -h)",
}
# What a user's mistake raises while a command is prepared (bad values and files, unreadable data,
# a model without MoE routers); caught there only, so a bug while the command runs keeps its traceback.
USER_ERRORS = (ValueError, OSError)


class _Parser(argparse.ArgumentParser):
    """Usage errors are raised, to be reported in one line, not printed with the whole usage."""

    def error(self, message):
        raise argparse.ArgumentError(None, message)


def build_parser() -> argparse.ArgumentParser:
    """The command list (each command parses its own options)."""
    parser = _Parser(prog=PROG, description="SARA routing alignment tools")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in PREPARED_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    sub.add_parser("selftest", help="kernels vs float64 reference (see python -m sara_kernels selftest -h)", add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "selftest":
        from .selftest import main as selftest_main

        return selftest_main(argv[1:])
    command = argv[0] if argv[:1] and argv[0] in PREPARED_COMMANDS else None
    try:
        if command is None:
            build_parser().parse_args(argv)  # -h, or a usage error
            return 0
        run = importlib.import_module(f".{command}", __package__).prepare(argv[1:])
    except argparse.ArgumentError as e:
        return _report(command, f"{e} (see --help)", status=2)
    except USER_ERRORS as e:
        return _report(command, str(e), status=1)
    return run()


def _report(command, message: str, status: int) -> int:
    """The error in one line on stderr (messages may span lines); returns the exit status."""
    print(f"{PROG}{' ' + command if command else ''}: error: {' '.join(message.split())}", file=sys.stderr)
    return status
