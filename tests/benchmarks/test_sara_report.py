"""benchmarks/sara_report.py: the summary has columns for every contender of
sara_kernels.programs.bench_op.CONTENDERS, compared with Triton, with the committed results' column names."""

import importlib
import os
import sys

import pytest

from helpers import REPO
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from sara_kernels.programs import bench_op  # noqa: E402
import sara_report  # noqa: E402

# The headers of the committed results (benchmarks/results/*/bench_sara/summary.md) and the CUDA columns.
COMMITTED = ["model", "L", "E", "N/side", "mode", "triton ms p20/50/80", "bw frac", "cpu ms/call", "fwd kern bw",
             "bwd kern bw", "ref ms", "×ref", "compile ms", "×compile", "compile s", "ws MB", "ref ws MB",
             "cuda ms p20/50/80", "cuda cpu ms", "cuda fwd/bwd kern bw", "cuda ×triton"]
# The contenders those results have columns for; any other contender of CONTENDERS (a backend added to
# the registry since) gets its columns on top of them.
COMMITTED_CONTENDERS = ("triton", "reference", "compile", "cuda")


def _columns(name, fused):
    return ([f"{name} ms p20/50/80", f"{name} cpu ms", f"{name} fwd/bwd kern bw", f"{name} ×triton"] if fused
            else [f"{name} ms", f"×{name}"])


SINCE = [column for name in bench_op.CONTENDERS if name not in COMMITTED_CONTENDERS
         for column in _columns(name, name in bench_op.FUSED)]
KERNELS = dict(kernels=[dict(name="pool_routing_fwd_kernel", bw_fraction=0.42),
                        dict(name="pool_routing_bwd_kernel", bw_fraction=0.73)])


def _row(contender, ms, mode="detach", **extra):
    return dict(model="Qwen3-30B-A3B", layers=48, experts=128, tokens=16384, mode=mode, pass_name="fwd+bwd",
                status="ok", contender=contender, p20_ms=0.9 * ms, median_ms=ms, p80_ms=1.1 * ms, bw_fraction=0.3,
                workspace_mb=1.5, cpu_ms_per_call=0.2, triton_speedup=ms / 2.0, **extra)


@pytest.fixture
def with_contender(monkeypatch):
    """sara_report as loaded with one more contender in CONTENDERS (reloaded as it was afterwards)."""
    def add(name, fused):
        monkeypatch.setitem(bench_op.CONTENDERS, name, (False, bench_op._backend(name)))
        if fused:
            monkeypatch.setattr(bench_op, "FUSED", (*bench_op.FUSED, name))
        return importlib.reload(sara_report)

    yield add
    monkeypatch.undo()
    importlib.reload(sara_report)


def test_the_columns_of_the_existing_contenders_are_the_committed_ones():
    headers = [header for header, _ in sara_report.SUMMARY_COLUMNS]
    assert [header for header in headers if header not in SINCE] == COMMITTED
    assert sorted(headers) == sorted(COMMITTED + SINCE)


def test_every_case_gets_its_own_values():
    rows = [_row("triton", 2.0, kernel_profile=KERNELS), _row("cuda", 1.0), _row("reference", 30.0),
            _row("compile", 9.0, variant="max-autotune"), _row("compile", 7.0, variant="default", best_compile_mode=True),
            _row("triton", 3.0, mode="both", kernel_profile=KERNELS), _row("reference", 40.0, mode="both")]
    detach, both = sara_report.summary_rows(rows)
    assert detach == dict(model="Qwen3-30B-A3B", layers=48, experts=128, tokens=16384, mode="detach",
                          triton_ms="1.8/2/2.2", bw_fraction="0.3", triton_ws=1.5, triton_cpu="0.2",
                          fwd_kernel_bw="0.42", bwd_kernel_bw="0.73", cuda_ms="0.9/1/1.1", cuda_cpu="0.2",
                          cuda_kernel_bw="-/-", cuda_vs_triton=2.0, reference_ms="30", vs_reference=15.0,
                          compile_ms="7", vs_compile=3.5, compile_s=None, reference_ws=1.5)
    assert (both["triton_ms"], both["fwd_kernel_bw"], both["vs_reference"]) == ("2.7/3/3.3", "0.42", 20.0)
    assert "cuda_ms" not in both and "compile_ms" not in both


@pytest.mark.parametrize("fused", [False, True])
def test_a_new_contender_gets_columns_without_an_edit_to_the_report(with_contender, fused):
    report = with_contender("newcomer", fused)
    headers = [header for header, _ in report.SUMMARY_COLUMNS]
    added = (["newcomer ms p20/50/80", "newcomer cpu ms", "newcomer fwd/bwd kern bw", "newcomer ×triton"] if fused
             else ["newcomer ms", "×newcomer"])
    assert sorted(headers) == sorted(COMMITTED + SINCE + added)
    (line,) = report.summary_rows([_row("triton", 2.0), _row("newcomer", 4.0)])
    assert line["newcomer_ms"] == ("3.6/4/4.4" if fused else "4")
    if fused:  # how many times faster than Triton
        assert line["newcomer_vs_triton"] == 0.5
    else:  # how many times faster Triton is
        assert line["vs_newcomer"] == 2.0
