"""What ``backend="auto"`` runs: the reference off CUDA, Triton on CUDA, and between Triton and the
CUDA extension the one bench_sara measured faster on the architecture (sara_kernels.ops.backend_choice,
written by benchmarks/choose_auto.py)."""

import importlib.util
import json
import os

import pytest
import torch

import sara_kernels
from sara_kernels._inputs import RoutingSide
from sara_kernels.api import resolve_backend
from sara_kernels.ops import backend_choice, cuda

from helpers import reference_loss, REPO as ROOT  # noqa: E402


def side(device="cuda", dtype=torch.bfloat16, layers=48, experts=128, tokens=16384, seqs=32):
    """The shape facts resolve_backend reads, without tensors (no GPU here)."""
    return RoutingSide("target", (), False, layers, tokens, experts, seqs, tokens // seqs, None, None, dtype,
                       torch.device(device))


@pytest.fixture
def hopper_with_extension(monkeypatch):
    """A CUDA device of compute capability 9.0 on which the CUDA extension runs."""
    monkeypatch.setattr(cuda, "runs_on", lambda device: device.type == "cuda")
    monkeypatch.setattr(backend_choice, "capability", lambda device: "9.0")


def test_auto_is_reference_on_cpu_and_for_unsupported_inputs_and_triton_on_cuda():
    assert resolve_backend("auto", side("cpu", torch.float32)) == "reference"
    assert resolve_backend("auto", side(dtype=torch.float64)) == "reference"
    assert resolve_backend("auto", side(experts=513)) == "reference"
    assert resolve_backend("auto", side(seqs=65536, tokens=65536)) == "reference"
    assert resolve_backend("auto", side()) == ("triton" if not cuda.runs_on(torch.device("cuda")) else
                                               backend_choice.faster_fused_backend(torch.device("cuda"), 128))
    logits, target = [torch.randn(6, 8)], [torch.randn(4, 8)]
    assert torch.equal(sara_kernels.sara_loss(logits, target), reference_loss(logits, target))


def test_auto_picks_the_winner_measured_at_the_nearest_expert_count(hopper_with_extension, monkeypatch):
    monkeypatch.setattr(backend_choice, "MEASURED", {"9.0": {8: ("cuda", dict(triton=1.5, cuda=0.2)),
                                                             128: ("cuda", dict(triton=3.7, cuda=0.5)),
                                                             512: ("triton", dict(triton=2.0, cuda=2.5))}})
    assert resolve_backend("auto", side()) == "cuda"
    assert resolve_backend("auto", side(experts=512, tokens=65536)) == "triton"
    assert resolve_backend("auto", side(experts=384)) == "triton"  # ratio 4/3 to 512, 3 to 128
    assert resolve_backend("auto", side(experts=200)) == "cuda"
    assert resolve_backend("auto", side(experts=6, layers=4, tokens=512)) == "cuda"
    assert resolve_backend("triton", side()) == "triton"  # an explicit choice is kept


def test_the_choice_is_made_among_the_backends_that_can_take_the_call(hopper_with_extension, monkeypatch):
    monkeypatch.setattr(backend_choice, "MEASURED", {"9.0": {128: ("cuda", dict(triton=3.7, cuda=0.5))}})
    device = torch.device("cuda")
    assert backend_choice.faster_fused_backend(device, 128) == "cuda"
    assert backend_choice.faster_fused_backend(device, 128, ("triton",)) == "triton"


def test_auto_runs_triton_on_an_architecture_never_measured(hopper_with_extension, monkeypatch):
    monkeypatch.setattr(backend_choice, "MEASURED", {"8.0": {128: ("cuda", dict(triton=1.9, cuda=0.3))}})
    assert resolve_backend("auto", side()) == "triton"


def test_nearest_measured_is_the_nearest_ratio():
    assert backend_choice.nearest_measured([8, 64, 128, 512], 96) == 128  # 4/3 vs 3/2
    assert backend_choice.nearest_measured([8, 64, 128, 512], 90) == 64  # 45/32 vs 64/45
    assert backend_choice.nearest_measured([512, 8], 64) == 8  # a tie (8x both ways): the smaller
    assert backend_choice.nearest_measured([256], 1) == 256


@pytest.mark.parametrize("dynamic", [False, True])
def test_the_choice_compiles_without_a_graph_break_and_follows_the_expert_count(hopper_with_extension, monkeypatch,
                                                                                dynamic):
    """The lookup is integer arithmetic on constants and sizes, so symbolic sizes (dynamic=True)
    trace too. (The real ``capability`` needs a GPU: tests/gpu/test_gpu.py compiles backend="auto".)"""
    monkeypatch.setattr(backend_choice, "MEASURED", {"9.0": {128: ("cuda", dict(triton=3.7, cuda=0.5)),
                                                     512: ("triton", dict(triton=2.0, cuda=2.5))}})
    device = torch.device("cuda")

    def step(x):
        return x * 2 if backend_choice.faster_fused_backend(device, x.shape[1]) == "cuda" else x * 3

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    for experts, factor in ((128, 2), (512, 3), (384, 3), (200, 2)):
        assert compiled(torch.ones(4, experts))[0, 0].item() == factor


def _choose_auto():
    spec = importlib.util.spec_from_file_location("choose_auto", os.path.join(ROOT, "benchmarks", "choose_auto.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(contender, mode, ms, tokens=16384, experts=128, status="ok", pass_name="fwd+bwd", input_form="tuple"):
    return dict(layers=48, experts=experts, tokens=tokens, mode=mode, contender=contender, variant="", status=status,
                pass_name=pass_name, median_ms=ms, input_form=input_form)


def test_choose_auto_sums_the_shapes_both_backends_ran_per_expert_count_and_writes_the_table(tmp_path, capsys):
    choose_auto = _choose_auto()
    results = dict(meta=dict(environment=dict(card="NVIDIA H200", capability="9.0")), rows=[
        _row("triton", "detach", 2.0), _row("cuda", "detach", 0.5),
        _row("triton", "both", 2.5), _row("cuda", "both", 3.5),
        _row("triton", "priors", 1.0),  # cuda missing in this mode: not compared
        _row("cuda", "detach", 0.1, pass_name="fwd"), _row("reference", "detach", 0.01),
        _row("triton", "detach", 9.0, tokens=4096), _row("cuda", "detach", 1.0, tokens=4096, status="failed"),
        _row("triton", "detach", 1.0, tokens=8192, input_form="stacked"), _row("cuda", "detach", 2.0, tokens=8192),
        _row("triton", "detach", 3.0, experts=8), _row("cuda", "detach", 1.0, experts=8),
    ])
    rows = choose_auto.compared_rows(results)
    assert [(r["experts"], r["tokens"], r["mode"], r["faster"]) for r in rows] == [
        (8, 16384, "detach", "cuda"), (128, 16384, "both", "triton"), (128, 16384, "detach", "cuda")]
    assert choose_auto.choices(rows) == {8: ("cuda", dict(triton=3.0, cuda=1.0)),
                                         128: ("cuda", dict(triton=4.5, cuda=4.0))}
    assert choose_auto.mixed(rows) == [128]

    copy = tmp_path / "backend_choice.py"
    copy.write_text(open(backend_choice.__file__).read())
    measured = {"9.0": choose_auto.choices(rows), "8.0": {8: ("triton", dict(triton=1.0, cuda=1.5))}}
    choose_auto.write_choice(measured, str(copy))
    written = {"__package__": "sara_kernels.ops"}  # where its relative imports resolve
    exec(compile(copy.read_text(), str(copy), "exec"), written)
    assert written["MEASURED"] == measured
    choose_auto.write_choice({}, str(copy))  # rewritable: the markers survive
    written = {"__package__": "sara_kernels.ops"}  # where its relative imports resolve
    exec(compile(copy.read_text(), str(copy), "exec"), written)
    assert written["MEASURED"] == {}

    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert choose_auto.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "E = 128: auto runs cuda" in out and "E = 128: the faster backend depends" in out
    path.write_text(json.dumps(dict(results, meta=dict(environment=dict(card="CPU")))))
    with pytest.raises(SystemExit, match="not measured on a CUDA device"):
        choose_auto.main([str(path)])


def test_choose_auto_picks_the_fastest_of_every_fused_backend_the_run_measured(monkeypatch):
    from sara_kernels import backends

    choose_auto = _choose_auto()
    monkeypatch.setattr(backends, "FUSED", (*backends.FUSED, "newcomer"))
    results = dict(rows=[
        _row("triton", "detach", 2.0), _row("cuda", "detach", 1.6), _row("newcomer", "detach", 1.0),
        _row("triton", "both", 3.0), _row("cuda", "both", 2.0),  # newcomer missing in this mode: not compared
        _row("triton", "detach", 1.0, experts=8), _row("cuda", "detach", 2.0, experts=8),
        _row("newcomer", "detach", 3.0, experts=8),
    ])
    rows = choose_auto.compared_rows(results)
    assert [(r["experts"], r["mode"], r["faster"]) for r in rows] == [(8, "detach", "triton"),
                                                                      (128, "detach", "newcomer")]
    assert (rows[1]["cuda_speedup"], rows[1]["newcomer_speedup"]) == (1.25, 2.0)
    assert choose_auto.choices(rows) == {8: ("triton", dict(triton=1.0, cuda=2.0, newcomer=3.0)),
                                         128: ("newcomer", dict(triton=2.0, cuda=1.6, newcomer=1.0))}
