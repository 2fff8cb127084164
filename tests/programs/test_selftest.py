"""``python -m sara_kernels selftest`` in-process on the CPU, at its tiny shapes.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1, so the kernel checks run under the
Triton interpreter; the module must also give a clear verdict when the kernels cannot run.
"""

from __future__ import annotations

import pytest
import torch

from sara_kernels import backends, reference, testing
from sara_kernels.programs import selftest
from sara_kernels.ops import cuda
from sara_kernels.ops.triton import kernels as triton_kernels

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy on padded −inf rows


def test_reference_matches_independent_numpy_on_the_whole_grid():
    for seed, case in enumerate(testing.case_grid()):
        result = testing.check_reference(case, selftest.TINY_SHAPE, seed)
        assert result.passed, (case.label, result.error, result.js_err, result.grad_err)


def test_grid_covers_every_option():
    cases = testing.case_grid()
    for field, wanted in [
        ("experts", {8, 60, 128}),
        ("segmentation", {"none", "mask", "cu_seqlens"}),
        ("score", {"softmax", "sigmoid"}),
        ("dtype", {torch.bfloat16, torch.float32}),
        ("anchor", {"detached", "both", "priors"}),
        ("layout", {"tuple", "stacked"}),
        ("minus_inf", {True, False}),
        ("divergence", {"js", "kl", "reverse_kl"}),
        ("pair_weights", {True, False}),
    ]:
        assert {getattr(c, field) for c in cases} == wanted, field
        assert {getattr(c, field) for c in testing.case_grid(quick=True)} == wanted, f"quick grid misses a {field}"


def test_checks_pass_on_the_cpu():
    results = selftest.run_checks("cpu", quick=True, log=lambda *_: None)
    assert results and all(r.passed for r in results), selftest.results_table(results)
    kernel_checks = [r for r in results if r.check != "reference vs NumPy"]
    if triton_kernels.INTERPRET:
        assert kernel_checks and all(r.deterministic for r in kernel_checks)
    else:
        assert not kernel_checks


def test_main_prints_a_table_and_exits_zero(capsys):
    assert selftest.main(["--device", "cpu", "--max-cases", "2"]) == 0
    out = capsys.readouterr().out
    assert "result" in out and "PASS" in out and "FAIL" not in out


def test_a_wrong_result_fails_with_exit_code_one(monkeypatch, capsys):
    """A perturbed reference disagrees with both the kernels and NumPy: every check must say FAIL."""
    divergence_of = reference.divergence_of  # every divergence of the grid (js, kl, reverse_kl)
    monkeypatch.setattr(reference, "divergence_of", lambda p, q, divergence: 1.001 * divergence_of(p, q, divergence))
    assert selftest.main(["--device", "cpu", "--max-cases", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out.splitlines()[-1]
    rows = out.split("\n------", 1)[1].splitlines()[1:-1]  # the table's rows, between its rule and the summary
    assert rows and all(row.split()[-1] == "FAIL" for row in rows), out
    assert f"FAIL: 0/{len(rows)} checks passed" in out.splitlines()[-1]


def test_without_gpu_or_interpreter_it_says_the_kernels_are_not_checked(monkeypatch, capsys):
    monkeypatch.setattr(triton_kernels, "INTERPRET", False)
    results = selftest.run_checks("cpu", log=print)
    assert results and all(r.check == "reference vs NumPy" and r.passed for r in results)
    assert "NO GPU" in capsys.readouterr().out


def test_the_header_names_every_backend_and_how_to_build_a_missing_extension(monkeypatch):
    monkeypatch.setattr(cuda, "_C", None)
    line = selftest.backends_line()
    assert line.startswith("backends: triton available; cuda NOT available (") and cuda.BUILD_HINT in line
    for name in backends.NAMES:
        if name not in backends.FUSED:  # the reference: runs anywhere
            assert f"; {name} available" in line
