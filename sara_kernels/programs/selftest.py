r"""Check the installed SARA kernels on this machine: ``python -m sara_kernels selftest``.

Why: the Triton kernels are compiled on the user's machine, by the user's Triton, for the
user's GPU. A new cluster (driver, Triton release, GPU generation) can miscompile or reject
them without any error in the library itself, so this module runs a small grid of cases and
compares every kernel backend against a float64 evaluation of the PyTorch reference on the
*same* (already rounded) inputs. Only fp32 rounding of the kernels' arithmetic, plus one
rounding of the gradient to the logits' dtype, separates the two, so the tolerances (in
:mod:`sara_kernels.testing`, as are the cases and the checks, shared with the test suite) are
tight enough to catch a wrong result and loose enough never to flag a correct one.

What runs depends on the machine:

* CUDA device: every kernel backend installed (``triton``, and ``cuda`` when the C++ extension
  is built) on the GPU, the full grid.
* no CUDA device, ``TRITON_INTERPRET=1`` set before importing ``sara_kernels``: the same
  checks at tiny shapes under the Triton interpreter (slow, but exercises the kernel code).
* neither: the kernels cannot run; this is said clearly and only the reference itself is
  checked against an independent NumPy computation (forward and the closed-form gradient).

The NumPy check always runs too: it guards the reference, which every other check trusts.
The command prints one table row per check and exits 1 when any check fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import torch
import triton

from .. import backends
from ..testing import Shape, case_grid, check_kernel, check_reference
from .table import format_table

GPU_SHAPE = Shape(layers=4, seqs=6, seq_len=200)
TINY_SHAPE = Shape(layers=2, seqs=3, seq_len=8)  # the Triton interpreter: seconds, not minutes


def kernel_backends(device: torch.device) -> list:
    """Every fused backend this installation offers that runs on ``device``: on a GPU ``triton``,
    and ``cuda`` when the C++ extension is built; on the CPU those that run there (``triton``
    under the interpreter)."""
    return [name for name in backends.available_fused() if backends.REGISTRY[name].runs_on(device)]


def _availability(entry: backends.Backend) -> str:
    try:
        entry.module.require()
    except RuntimeError as e:  # the backend's own words on what is missing (for cuda: how to build it)
        return f"NOT available ({e})"
    return "available"


def backends_line() -> str:
    """Which backends are installed, and why any other is not, for the report's header."""
    return "backends: " + "; ".join(f"{name} {_availability(entry)}" for name, entry in backends.REGISTRY.items())


def plan(device: torch.device):
    """(shape, kernel backends to check, a line saying what is checked and why)."""
    kernels = kernel_backends(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return GPU_SHAPE, kernels, f"CUDA device {name}: kernels vs float64 reference"
    if kernels:
        return TINY_SHAPE, kernels, f"no GPU: the kernels that run on the CPU ({', '.join(kernels)}), tiny shapes"
    hints = "".join(backends.REGISTRY[name].device_hint for name in backends.FUSED)
    return TINY_SHAPE, [], (
        f"NO GPU: the kernels cannot run here, so they are NOT checked{hints}. Only the reference is checked "
        "against an independent NumPy computation."
    )


def run_checks(device=None, quick: bool = False, max_cases: Optional[int] = None, log=print) -> list:
    """Run the grid and return one :class:`CheckResult` per check (no printing beyond ``log``)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape, backends, what = plan(device)
    log(what)
    cases = case_grid(quick or (shape is TINY_SHAPE and bool(backends)))
    if max_cases is not None:
        cases = cases[:max_cases]
    # The NumPy loop is cheap at tiny shapes; with no kernel to check it covers the whole grid.
    reference_cases = case_grid(quick=True) if backends else cases
    results = [check_reference(case, TINY_SHAPE, seed) for seed, case in enumerate(reference_cases)]
    for backend in backends:
        for seed, case in enumerate(cases):
            results.append(check_kernel(case, shape, backend, device, seed))
            log(f"  {'PASS' if results[-1].passed else 'FAIL'}  {backend}  {case.label}  ({results[-1].seconds:.1f} s)")
    return results


RESULT_COLUMNS = [("check", "check"), ("case", "case"), ("JS max err", "js"), ("grad err/tol", "grad"),
                  ("determ.", "det"), ("result", "result")]


def results_table(results) -> str:
    rows = [dict(check=r.check, case=r.case.label, js="error" if r.error else f"{r.js_err:.1e}",
                 grad="error" if r.error else f"{r.grad_err:.1e}/{r.grad_tol:.0e}",
                 det="-" if r.deterministic is None else ("yes" if r.deterministic else "NO"),
                 result="PASS" if r.passed else "FAIL") for r in results]
    return "\n".join([format_table(rows, RESULT_COLUMNS)] + [f"  {r.case.label}: {r.error}" for r in results if r.error])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sara_kernels selftest", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--quick", action="store_true", help="a covering subset of the grid")
    parser.add_argument("--max-cases", type=int, default=None, help="check only the first N cases of the grid")
    args = parser.parse_args(argv)
    print(f"sara_kernels selftest: torch {torch.__version__}, triton {triton.__version__}, python {sys.version.split()[0]}")
    print(backends_line())
    start = time.perf_counter()
    results = run_checks(args.device, args.quick, args.max_cases)
    print(results_table(results))
    failed = [r for r in results if not r.passed]
    kernels_checked = any(r.check != "reference vs NumPy" for r in results)
    verdict = "FAIL" if failed else "PASS"
    scope = "" if kernels_checked else " (reference only: no kernel was checked)"
    print(f"{verdict}: {len(results) - len(failed)}/{len(results)} checks passed in {time.perf_counter() - start:.1f} s{scope}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
