"""The command-line programs (``python -m sara_kernels demo|analyze|selftest``), apart from the library.

* :mod:`.cli`: argument parsing and dispatch.
* :mod:`.demo`: baseline vs SARA fine-tuning of a tiny Qwen3-MoE on :mod:`.corpus`'s synthetic
  parallel corpus (or a user's model and data), routing before and after.
* :mod:`.analyze`: per-layer routing agreement of a saved model on a jsonl of pairs.
* :mod:`.selftest`: the installed kernels against the float64 reference on this machine.
* :mod:`.models` (loading a saved model), :mod:`.table` (text tables).

Imports run one way: programs → ``sara_kernels.hf`` → the core (``api``, ``reference``,
``ops``); the library never imports a program.
"""
