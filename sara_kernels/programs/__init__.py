"""The command-line programs (``python -m sara_kernels train|priors|analyze|demo|bench|selftest``), apart from the library.

* :mod:`.cli`: dispatch, and one-line reports of user mistakes.
* :mod:`.train`: fine-tuning a saved model with :class:`~sara_kernels.hf.SARATrainer`.
* :mod:`.priors`: cached anchor routing priors for ``train``.
* :mod:`.arguments`: the model and data options of ``train``, ``priors`` and ``analyze``
  (``HfArgumentParser`` dataclasses; flags or one YAML/JSON file).
* :mod:`.demo`: baseline vs SARA fine-tuning of a tiny Qwen3-MoE on :mod:`.corpus`'s synthetic
  parallel corpus (or a user's model and data), routing before and after.
* :mod:`.analyze`: per-layer routing agreement of a saved model on parallel pairs.
* :mod:`.selftest`: the installed kernels against the float64 reference on this machine.
* :mod:`.bench`: what SARA costs at an architecture's router shapes (:mod:`.bench_archs`, the table
  of real models; :mod:`.bench_op`, the op alone; :mod:`.bench_step`, a training step;
  :mod:`.bench_timing`, the timing helpers ``benchmarks/`` shares).
* :mod:`.models` (loading a saved model), :mod:`.table` (text tables).

Imports run one way: programs → ``sara_kernels.hf`` → the core (``api``, ``reference``,
``ops``); the library never imports a program.
"""
