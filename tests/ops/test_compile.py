"""torch.compile(fullgraph=True) of a step that calls sara_loss matches eager, on every backend.

On the CPU the Triton backend runs under the interpreter inside the registered custom op and
the CUDA backend as its emulated build (tests/conftest.py), so each op's schema, fake
implementation and autograd registration are exercised here; tests/gpu/test_gpu.py repeats the
compile test with real kernels.
"""

from __future__ import annotations

import pytest
import torch

import sara_kernels
from sara_kernels.ops.triton import autograd as triton_ops

from sara_kernels.testing import LOSS_TOL, assert_grads_close

from helpers import DEVICE, ragged_mask

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


class TinyRouter(torch.nn.Module):
    """L router linears: hidden [N, H] -> logits [N, E] per layer, as an MoE model's gates."""

    def __init__(self, layers=3, hidden=12, experts=10):
        super().__init__()
        self.gates = torch.nn.ModuleList(torch.nn.Linear(hidden, experts, bias=False) for _ in range(layers))

    def forward(self, hidden):
        return tuple(gate(hidden) for gate in self.gates)


def sara_step(model, anchor_hidden, target_hidden, anchor_mask, target_mask, backend):
    anchor_logits = model(anchor_hidden)
    target_logits = model(target_hidden)
    return sara_kernels.sara_loss(
        anchor_logits, target_logits, anchor_mask, target_mask,
        layer_weights=[1.0, 0.5, 2.0], score="softmax", temperature=0.9, detach_anchor=False, backend=backend,
        pair_weights=torch.tensor([0.75, 1.5], device=anchor_mask.device), divergence="kl",
    )


def test_fullgraph_compile_matches_eager(fused_backend):
    check_compile_matches_eager(fused_backend)


def test_fullgraph_compile_of_the_reference_matches_eager():
    check_compile_matches_eager("reference")


def router_and_pair(seed: int):
    """(model, anchor_hidden, target_hidden, (anchor_mask, target_mask)) of a fresh TinyRouter
    and 2 ragged sequences per side, after a dynamo reset."""
    torch.manual_seed(seed)
    torch._dynamo.reset()
    model = TinyRouter().to(DEVICE)
    B, S, H = 2, 5, 12
    gen = torch.Generator().manual_seed(seed + 1)
    anchor_hidden = torch.randn(B * S, H, generator=gen).to(DEVICE)
    target_hidden = torch.randn(B * S, H, generator=gen).to(DEVICE)
    return model, anchor_hidden, target_hidden, (ragged_mask(B, S, gen), ragged_mask(B, S, gen))


def check_compile_matches_eager(backend):
    model, anchor_hidden, target_hidden, masks = router_and_pair(0)
    results = []
    for compiled in (False, True):
        model.zero_grad()
        step = torch.compile(sara_step, fullgraph=True) if compiled else sara_step
        loss = step(model, anchor_hidden, target_hidden, *masks, backend)
        loss.backward()
        results.append((loss.detach(), [g.weight.grad.clone() for g in model.gates]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, **LOSS_TOL)
    for g, eg in zip(compiled_grads, eager_grads):
        assert g.abs().sum() > 0
        assert_grads_close(g, eg, torch.float32)


def test_routing_distribution_fullgraph_compile_matches_eager(fused_backend):
    torch.manual_seed(3)
    torch._dynamo.reset()
    model = TinyRouter().to(DEVICE)
    B, S, H = 2, 5, 12
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(B * S, H, generator=gen).to(DEVICE)
    mask = ragged_mask(B, S, gen)
    weights = torch.randn(3, B, 10, generator=gen).to(DEVICE)

    def step(hidden, mask):
        probs = sara_kernels.routing_distribution(model(hidden), mask, score="sigmoid", temperature=1.3,
                                                   backend=fused_backend)
        return (probs * weights).sum()

    results = []
    for compiled in (False, True):
        model.zero_grad()
        out = (torch.compile(step, fullgraph=True) if compiled else step)(hidden, mask)
        out.backward()
        results.append((out.detach(), [g.weight.grad.clone() for g in model.gates]))
    (eager_out, eager_grads), (compiled_out, compiled_grads) = results
    torch.testing.assert_close(compiled_out, eager_out, **LOSS_TOL)
    for g, eg in zip(compiled_grads, eager_grads):
        assert g.abs().sum() > 0
        assert_grads_close(g, eg, torch.float32)


OPCHECK_UTILS = ("test_schema", "test_faketensor")


def _opcheck_inputs():
    gen = torch.Generator().manual_seed(2)
    L, B, S, E = 2, 2, 4, 8
    anchor = [torch.randn(B * S, E, generator=gen).to(DEVICE) for _ in range(L)]
    target = [torch.randn(L, B * S, E, generator=gen).to(DEVICE)]  # the stacked form
    return anchor, target, ragged_mask(B, S, gen), torch.tensor([0.5, 2.0], dtype=torch.float64, device=DEVICE)


# Per reduction: the pair weights and divergence its op call takes.
PAIR_OPTIONS = {"mean": (torch.tensor([1.5, 0.25], device=DEVICE), "reverse_kl"), "none": (None, "js")}


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_custom_ops_pass_opcheck(reduction):
    anchor, target, mask, weights = _opcheck_inputs()
    pair_weights, divergence = PAIR_OPTIONS[reduction]
    fwd_args = (anchor, target, mask, None, mask, None, None, weights, pair_weights, "sigmoid", 1.0, reduction,
                divergence)
    torch.library.opcheck(triton_ops.sara_loss_fwd.op, fwd_args, test_utils=OPCHECK_UTILS)
    _, _, ga, gt, stats, layer_coef = triton_ops.sara_loss_fwd(*fwd_args)
    grad = torch.randn(gt.shape[:2] if reduction == "none" else (), device=DEVICE)
    bwd_args = (grad, anchor, target, mask, None, mask, None, ga, gt, stats, layer_coef, "sigmoid", 1.0, True)
    torch.library.opcheck(triton_ops.sara_loss_bwd.op, bwd_args, test_utils=OPCHECK_UTILS)
    for normalize in (True, False):
        probs_args = (anchor, mask, None, "softmax", 0.8, normalize)
        torch.library.opcheck(triton_ops.routing_distribution_fwd.op, probs_args, test_utils=OPCHECK_UTILS)
        probs, count = triton_ops.routing_distribution_fwd(*probs_args)
        grad_args = (torch.randn_like(probs), anchor, mask, None, count, "softmax", 0.8, normalize)
        torch.library.opcheck(triton_ops.routing_distribution_bwd.op, grad_args, test_utils=OPCHECK_UTILS)


def test_cuda_ops_pass_opcheck(cuda_backend):
    """The CUDA backend's ops: the halves (schema, fakes), and the differentiable ops (autograd
    registered for the Autograd key)."""
    anchor, target, mask, weights = _opcheck_inputs()
    ops = torch.ops.sara_kernels
    for reduction, (pair_weights, divergence) in PAIR_OPTIONS.items():
        fwd_args = (anchor, target, mask, None, mask, None, None, weights, pair_weights, "sigmoid", 1.0, reduction,
                    divergence)
        torch.library.opcheck(ops.cuda_sara_loss_fwd.default, fwd_args, test_utils=OPCHECK_UTILS)
        _, _, ga, gt, stats, layer_coef = ops.cuda_sara_loss_fwd(*fwd_args)
        grad = torch.randn(gt.shape[:2] if reduction == "none" else (), device=DEVICE)
        bwd_args = (grad, anchor, target, mask, None, mask, None, ga, gt, stats, layer_coef, "sigmoid", 1.0, True)
        torch.library.opcheck(ops.cuda_sara_loss_bwd.default, bwd_args, test_utils=OPCHECK_UTILS)
    leaf = [target[0].detach().requires_grad_(True)]
    loss_args = ([t.requires_grad_(True) for t in anchor], leaf, mask, None, mask, None, None, weights,
                 PAIR_OPTIONS["mean"][0], "softmax", 0.8, False, "mean", "kl")
    torch.library.opcheck(ops.cuda_sara_loss.default, loss_args, test_utils=(*OPCHECK_UTILS, "test_autograd_registration"))
    for normalize in (True, False):
        probs_args = (anchor, mask, None, "softmax", 0.8, normalize)
        torch.library.opcheck(ops.cuda_routing_distribution.default, probs_args,
                              test_utils=(*OPCHECK_UTILS, "test_autograd_registration"))
        probs, count = ops.cuda_routing_distribution_fwd(*probs_args)
        grad_args = (torch.randn_like(probs), anchor, mask, None, count, "softmax", 0.8, normalize)
        torch.library.opcheck(ops.cuda_routing_distribution_bwd.default, grad_args, test_utils=OPCHECK_UTILS)


def test_double_backward_is_refused(fused_backend):
    anchor, target, mask, _ = _opcheck_inputs()
    leaf = target[0].detach().requires_grad_(True)
    loss = sara_kernels.sara_loss(anchor, leaf, mask, mask, backend=fused_backend)
    (grad,) = torch.autograd.grad(loss, leaf, create_graph=False)
    assert grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(sara_kernels.sara_loss(anchor, leaf, mask, mask, backend=fused_backend), leaf,
                            create_graph=True)


def test_compiled_autograd_matches_eager(fused_backend):
    """A compiled step whose backward runs under compiled autograd (the backward graph traced
    through the op's autograd node: Python for Triton, a C++ Function for CUDA)."""
    model, anchor_hidden, target_hidden, masks = router_and_pair(5)

    def train_step():
        loss = sara_step(model, anchor_hidden, target_hidden, *masks, fused_backend)
        loss.backward()
        return loss.detach()

    eager_loss = train_step()
    eager_grads = [g.weight.grad.clone() for g in model.gates]
    model.zero_grad()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(compiled_autograd=True):
        compiled_loss = torch.compile(train_step, backend="aot_eager")()
    assert torch._dynamo.utils.counters["compiled_autograd"]["captures"] >= 1
    torch.testing.assert_close(compiled_loss, eager_loss, **LOSS_TOL)
    for g, eg in zip(model.gates, eager_grads):
        assert_grads_close(g.weight.grad, eg, torch.float32)
