"""torch.compile(fullgraph=True) of a step that calls sara_loss matches eager, on both backends.

On the CPU the Triton backend runs under the interpreter inside the registered custom op, so the
op's schema, fake implementation and autograd registration are exercised here; tests/test_gpu.py
repeats the compile test with real kernels.
"""

from __future__ import annotations

import pytest
import torch

import sara_kernels
from sara_kernels.ops import routing_js

from helpers import DEVICE, LOSS_TOL, assert_grads_close, ragged_mask

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
    )


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fullgraph_compile_matches_eager(backend):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = TinyRouter().to(DEVICE)
    B, S, H = 2, 5, 12
    gen = torch.Generator().manual_seed(1)
    anchor_hidden = torch.randn(B * S, H, generator=gen).to(DEVICE)
    target_hidden = torch.randn(B * S, H, generator=gen).to(DEVICE)
    masks = (ragged_mask(B, S, gen), ragged_mask(B, S, gen))
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


def test_custom_op_registration_passes_opcheck():
    gen = torch.Generator().manual_seed(2)
    L, B, S, E = 2, 2, 4, 8
    anchor = [torch.randn(B * S, E, generator=gen).to(DEVICE).requires_grad_(True) for _ in range(L)]
    target = [torch.randn(B * S, E, generator=gen).to(DEVICE).requires_grad_(True) for _ in range(L)]
    mask = ragged_mask(B, S, gen)
    args = (anchor, target, mask, None, mask, None, None, "sigmoid", 1.0, False)
    torch.library.opcheck(routing_js.pair_js_fwd_op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
