"""GPU-only tests: the compiled kernels at real sizes, where the interpreter cannot go.

The interpreter runs the kernel code but not what only the compiled kernels can get wrong:
register/tile layouts at large E, 32-bit offset overflow beyond 2^31 elements, launch grids
with split sequences, CUDA-graph capture and torch.compile tracing. Each test runs for every fused
backend: ``triton``, and ``cuda`` (the C++ extension, skipped with a reason when it is not
built). Every test is marked
``gpu`` and skipped with a reason on a machine without CUDA (there tests/conftest.py turns on
the interpreter, which these tests must never use). Accuracy is judged by the checks
and tolerances of :mod:`sara_kernels.testing` (float64 reference on the same rounded inputs). No test here
asserts anything about time.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile

import pytest
import torch

import sara_kernels
from sara_kernels import backends, testing
from sara_kernels.ops import cuda
from sara_kernels.ops.triton import host as triton_host
from sara_kernels.ops.triton import kernels as triton_kernels

from helpers import reference_loss, reference_distribution  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(triton_kernels.INTERPRET, reason="GPU tests compile the real kernels: unset TRITON_INTERPRET"),
]

DEVICE = "cuda"
LARGE = testing.Shape(layers=6, seqs=8, seq_len=1000)
EXPERTS = [8, 16, 60, 64, 128, 256, 384, 512]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _unavailable(name: str) -> str:
    """Why backend ``name`` cannot run in this process ("" when it can)."""
    try:
        backends.REGISTRY[name].module.require()
    except RuntimeError as e:
        return str(e)
    return ""


BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(bool(_unavailable(name)), reason=_unavailable(name)))
            for name in backends.FUSED]


def _assert_passed(result: testing.CheckResult):
    assert result.passed, result.describe()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: testing.DTYPE_NAMES[d])
@pytest.mark.parametrize("experts", EXPERTS)
def test_matches_float64_reference(experts, dtype, backend):
    """JS [L, B] and gradients at 6 layers × 8 ragged sequences (~8k rows per side), with an
    empty sequence on each side, against the float64 reference on the same rounded inputs."""
    index = EXPERTS.index(experts) + len(EXPERTS) * DTYPES.index(dtype)
    case = testing.rotating_case(index, experts, dtype)
    _assert_passed(testing.check_kernel(case, LARGE, backend, DEVICE, seed=index))


@pytest.fixture
def tile_stages(monkeypatch):
    """Sets the STAGES of Triton's tile table for one test, with the launch plans rebuilt around it."""
    original = triton_host.tile_config

    def set_stages(stages: int):
        monkeypatch.setattr(triton_host, "tile_config", lambda e: dict(original(e), STAGES=stages))
        triton_host.clear_plans()

    yield set_stages
    triton_host.clear_plans()


@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("experts", [128, 512])
def test_triton_row_loop_with_and_without_pipelining(experts, stages, tile_stages):
    """Both row loops ``tile_config`` can pick from 128 experts: plain loads (STAGES = 1) and
    asynchronous copies through shared memory (STAGES = 3), with ragged masks and with cu_seqlens
    (an empty sequence on each side), against the float64 reference."""
    tile_stages(stages)
    for index, (segmentation, score) in enumerate([("mask", "softmax"), ("cu_seqlens", "sigmoid")]):
        case = testing.Case(experts=experts, segmentation=segmentation, score=score, dtype=torch.bfloat16, anchor="both")
        _assert_passed(testing.check_kernel(case, LARGE, "triton", DEVICE, seed=40 + index))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("anchor", ["detached", "both"])
def test_minus_inf_logits(score, anchor, backend):
    """An expert at −inf in layer 0 on both sides (P_e = 0: the 0·log 0 terms) and tokens with
    −inf experts: the result is finite, matches the reference, and the disabled expert's
    gradient is exactly zero."""
    case = testing.Case(experts=60, segmentation="mask", score=score, dtype=torch.bfloat16, anchor=anchor, minus_inf=True)
    _assert_passed(testing.check_kernel(case, LARGE, backend, DEVICE, seed=3))
    js, grads = testing.evaluate(testing.make_inputs(case, LARGE, DEVICE, seed=3), case, backend)
    assert torch.isfinite(js).all()
    assert (grads[0][:, 3] == 0).all()  # grads[0]: layer 0 of the target (tuple layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("segmentation", ["mask", "cu_seqlens"])
def test_no_valid_pair_gives_zero_loss_and_zero_gradients(segmentation, backend):
    gen = torch.Generator().manual_seed(5)
    L, B, S, E = 4, 3, 700, 128
    anchor = [torch.randn(B * S, E, generator=gen).bfloat16().to(DEVICE).requires_grad_() for _ in range(L)]
    target = [torch.randn(B * S, E, generator=gen).bfloat16().to(DEVICE).requires_grad_() for _ in range(L)]
    seg = {}
    if segmentation == "mask":
        mask_a = torch.ones(B, S, dtype=torch.int64, device=DEVICE)
        mask_t = mask_a.clone()
        mask_a[0], mask_t[1:] = 0, 0  # every pair has an empty side
        seg = dict(anchor_mask=mask_a, target_mask=mask_t)
    else:
        cu_a = torch.tensor([0, 0, S, B * S], dtype=torch.int32, device=DEVICE)
        cu_t = torch.tensor([0, B * S, B * S, B * S], dtype=torch.int32, device=DEVICE)
        seg = dict(anchor_cu_seqlens=cu_a, target_cu_seqlens=cu_t)
    loss = sara_kernels.sara_loss(anchor, target, detach_anchor=False, backend=backend, **seg)
    grads = torch.autograd.grad(loss, anchor + target)
    assert loss.item() == 0.0
    assert all((g == 0).all() for g in grads)


def _loss_and_grads(anchor, target, mask, backend, **options):
    a = [t.detach().clone().requires_grad_() for t in anchor]
    t = [x.detach().clone().requires_grad_() for x in target]
    loss = sara_kernels.sara_loss(a, t, mask, mask, backend=backend, **options)
    return loss.detach(), torch.autograd.grad(loss, a + t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_bitwise(backend):
    """Few long sequences, so each sequence is split over many programs (partials reduced in a
    fixed order, no float atomics): loss and gradients must be bitwise equal run to run."""
    gen = torch.Generator().manual_seed(7)
    L, B, S, E = 8, 2, 32768, 128
    anchor = [torch.randn(B * S, E, generator=gen).bfloat16().to(DEVICE) for _ in range(L)]
    target = [torch.randn(B * S, E, generator=gen).bfloat16().to(DEVICE) for _ in range(L)]
    mask = torch.ones(B, S, dtype=torch.int64, device=DEVICE)
    mask[1, S // 3 :] = 0
    first_loss, first_grads = _loss_and_grads(anchor, target, mask, backend, detach_anchor=False)
    for _ in range(3):
        loss, grads = _loss_and_grads(anchor, target, mask, backend, detach_anchor=False)
        assert torch.equal(loss, first_loss)
        assert all(torch.equal(g, h) for g, h in zip(grads, first_grads))


@pytest.mark.skipif(not cuda.available(), reason=f"CUDA extension not built: {cuda.BUILD_HINT}")
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("segmentation", ["mask", "cu_seqlens"])
def test_cuda_matches_triton(segmentation, score):
    """The two fused backends on the same inputs: equal up to float32 rounding (both sum in
    float32, in different orders), loss, per-layer JS and gradients, tuple and stacked."""
    gen = torch.Generator(device=DEVICE).manual_seed(19)
    L, B, S, E = 6, 5, 900, 128
    anchor = torch.randn(L, B * S, E, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    target = [torch.randn(B * S, E, generator=gen, device=DEVICE, dtype=torch.bfloat16) for _ in range(L)]
    lengths = torch.tensor([S, 700, 0, 1, 450], device=DEVICE)
    if segmentation == "mask":
        mask = testing.padding_mask(lengths, S, DEVICE)
        seg = dict(anchor_mask=mask, target_mask=mask)
    else:
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).int()
        cu[-1] = B * S
        seg = dict(anchor_cu_seqlens=cu, target_cu_seqlens=cu)
    out = {}
    for backend in ("triton", "cuda"):
        a = anchor.clone().requires_grad_()
        t = [x.clone().requires_grad_() for x in target]
        loss, per_layer = sara_kernels.sara_loss(a, t, detach_anchor=False, score=score, temperature=0.8,
                                                 layer_weights=[1.0 + l for l in range(L)], return_per_layer=True,
                                                 backend=backend, **seg)
        out[backend] = (loss, per_layer, torch.autograd.grad(loss, [a, *t]))
    (loss_t, per_t, grads_t), (loss_c, per_c, grads_c) = out["triton"], out["cuda"]
    torch.testing.assert_close(loss_c, loss_t, **testing.on_device(testing.JS_TOL["long"], "cuda"))
    torch.testing.assert_close(per_c, per_t, **testing.on_device(testing.JS_TOL["long"], "cuda"))
    assert testing.relative_grad_error(grads_c, grads_t) <= testing.GRAD_TOL[torch.bfloat16]["max_rel"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_distribution_matches_reference(backend):
    """P [L, B, E] and its gradient against the float64 reference, an empty sequence included."""
    gen = torch.Generator(device=DEVICE).manual_seed(23)
    L, B, S, E = 4, 3, 1500, 60
    logits = torch.randn(L, B * S, E, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    mask = testing.padding_mask([S, 0, 333], S, DEVICE)
    weight = torch.randn(L, B, E, generator=gen, device=DEVICE, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    probs = sara_kernels.routing_distribution(x, mask, score="sigmoid", temperature=0.9, backend=backend)
    (grad,) = torch.autograd.grad((probs.double() * weight).sum(), x)
    ref_x = logits.double().requires_grad_()
    ref = reference_distribution(ref_x, mask, score="sigmoid", temperature=0.9)
    (ref_grad,) = torch.autograd.grad((ref * weight).sum(), ref_x)
    torch.testing.assert_close(probs.double(), ref, **testing.on_device(testing.PROBS_TOL, "cuda"))
    assert (probs[:, 1] == 0).all()
    assert testing.relative_grad_error([grad], [ref_grad]) <= testing.GRAD_TOL[torch.bfloat16]["max_rel"]


def check_layer_by_layer(layers, experts, target_bounds, anchor_bounds, device, backend):
    """Kernel loss, per-layer JS and target gradient against the float64 reference evaluated
    one layer at a time (a whole-side float64 evaluation may not fit in memory). With equal
    layer weights loss = mean_l(loss_l), so ∂loss/∂z_l = (1/L)·∂loss_l/∂z_l.

    The target side is one stacked [L, N, E] bf16 tensor; ``*_bounds`` are the cu_seqlens.
    """
    gen = torch.Generator(device=device).manual_seed(11)
    L, E = layers, experts
    cu_t = torch.tensor(target_bounds, dtype=torch.int32, device=device)
    cu_a = torch.tensor(anchor_bounds, dtype=torch.int32, device=device)
    target = torch.randn(L, target_bounds[-1], E, generator=gen, device=device, dtype=torch.bfloat16).requires_grad_()
    anchor = [torch.randn(anchor_bounds[-1], E, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(L)]
    loss, per_layer = sara_kernels.sara_loss(
        anchor, target, anchor_cu_seqlens=cu_a, target_cu_seqlens=cu_t, return_per_layer=True, backend=backend
    )
    (grad,) = torch.autograd.grad(loss, target)
    assert grad.shape == target.shape and grad.dtype == torch.bfloat16
    ref_per_layer = []
    for l in range(L):
        ref_target = target[l].detach().double().requires_grad_()
        ref_loss = reference_loss([anchor[l].double()], [ref_target], anchor_cu_seqlens=cu_a, target_cu_seqlens=cu_t)
        (ref_grad,) = torch.autograd.grad(ref_loss / L, ref_target)
        err = testing.relative_grad_error([grad[l]], [ref_grad])
        assert err <= testing.GRAD_TOL[torch.bfloat16]["max_rel"], f"layer {l}: gradient error {err:.2e}"
        ref_per_layer.append(ref_loss.detach())
        del ref_target, ref_grad
    ref_per_layer = torch.stack(ref_per_layer)
    torch.testing.assert_close(per_layer.double(), ref_per_layer, **testing.on_device(testing.JS_TOL["long"], "cuda"))
    torch.testing.assert_close(loss.double(), ref_per_layer.mean(), **testing.on_device(testing.JS_TOL["long"], "cuda"))


@contextlib.contextmanager
def one_process_at_a_time(name: str):
    """Hold an exclusive file lock while the block runs, and hand the cached memory back after.

    scripts/gpu_ci.sh runs these tests in concurrent pytest processes on one card; tests that
    need a large share of its memory take this lock so that two of them never overlap."""
    with open(os.path.join(tempfile.gettempdir(), f"sara_kernels_{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            torch.cuda.empty_cache()
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_more_than_2_31_elements_per_side(backend):
    """L·N·E > 2^31 on the target side (48 layers × 350k rows × 128 experts in bf16: 4.3 GB,
    and a gradient as large): every offset past 2^31 must be computed in 64 bits. The last
    sequence ends at the last row, the element farthest from the base pointer."""
    L, E, N = 48, 128, 350_000
    assert L * N * E > 2**31
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs ≥ 40 GB of GPU memory")
    with one_process_at_a_time("large_gpu_memory"):
        check_layer_by_layer(L, E, [0, 60_000, 200_000, 290_000, N], [0, 1_000, 2_000, 3_000, 4_000], DEVICE, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("segmentation", ["mask", "cu_seqlens"])
def test_cuda_graph_capture_of_forward_and_backward(segmentation, backend):
    """A step computing sara_loss and its gradients on static buffers is captured once and
    replayed on new data; it must equal the eager step on that data bitwise.

    sara_loss builds its layer pointer table with a pinned, non-blocking copy cached by data
    pointers, so the warm-up (on a side stream, as CUDA graphs require) fills that cache first.
    """
    gen = torch.Generator(device=DEVICE).manual_seed(13)
    L, B, S, E = 8, 4, 1024, 128

    def fresh():
        return [torch.randn(B * S, E, generator=gen, device=DEVICE, dtype=torch.bfloat16) for _ in range(L)]

    static_a = [t.requires_grad_() for t in fresh()]
    static_t = [t.requires_grad_() for t in fresh()]
    if segmentation == "mask":
        mask = testing.padding_mask([S, 700, 1, 300], S, DEVICE)
        seg = dict(anchor_mask=mask, target_mask=mask)
    else:
        cu = torch.tensor([0, 1000, 1000, 3000, B * S], dtype=torch.int32, device=DEVICE)
        seg = dict(anchor_cu_seqlens=cu, target_cu_seqlens=cu)

    def step():
        loss = sara_kernels.sara_loss(static_a, static_t, detach_anchor=False, backend=backend, **seg)
        return loss, torch.autograd.grad(loss, static_a + static_t)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_loss, graph_grads = step()

    with torch.no_grad():
        for static, new in zip(static_a + static_t, fresh() + fresh()):
            static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    eager_loss, eager_grads = step()
    assert torch.isfinite(graph_loss) and graph_loss.item() > 0
    assert torch.equal(graph_loss, eager_loss)
    assert all(torch.equal(g, h) for g, h in zip(graph_grads, eager_grads))


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
def test_torch_compile_fullgraph(backend):
    """sara_loss inside a function compiled with fullgraph=True (no graph breaks): same loss and
    gradients as eager. ``auto`` traces its choice too (the device's compute capability)."""
    gen = torch.Generator(device=DEVICE).manual_seed(17)
    L, B, S, E = 4, 4, 512, 64
    anchor = [torch.randn(B * S, E, generator=gen, device=DEVICE, dtype=torch.bfloat16) for _ in range(L)]
    target = [torch.randn(B * S, E, generator=gen, device=DEVICE, dtype=torch.bfloat16) for _ in range(L)]
    mask = testing.padding_mask([S, 100, 0, 400], S, DEVICE)

    def loss_fn(a, t, m):
        return sara_kernels.sara_loss(a, t, m, m, detach_anchor=False, backend=backend)

    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        a = [x.clone().requires_grad_() for x in anchor]
        t = [x.clone().requires_grad_() for x in target]
        loss = fn(a, t, mask)
        results.append((loss.detach(), torch.autograd.grad(loss, a + t)))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, **testing.on_device(testing.JS_TOL["long"], "cuda"))
    for g, h in zip(compiled_grads, eager_grads):
        assert testing.relative_grad_error([g], [h]) <= testing.GRAD_TOL[torch.bfloat16]["max_rel"]
