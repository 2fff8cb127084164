"""Megatron-core's TopKRouter returns post-top-k probabilities, not logits: the capture refuses it.

Here the refusal is checked without megatron-core (on a real GPTModel in
tests/megatron/test_megatron_sara.py): a stand-in with the same class name, module path and interface (a ``weight`` parameter,
``gating()`` computing the logits, ``forward`` returning ``(probs, routing_map)``) is defined
in a namespace named like megatron's module.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sara_kernels import sara_loss
from sara_kernels.hf import capture_router_logits, find_routers, install_router_hooks

MEGATRON_ROUTER_MODULE = "megatron.core.transformer.moe.router"

_MEGATRON_LIKE_SOURCE = '''
class TopKRouter(nn.Module):
    def __init__(self, hidden_size, num_experts, topk):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_experts, hidden_size) * 0.5)
        self.topk = topk

    def gating(self, input):
        return F.linear(input, self.weight)

    def forward(self, input):
        logits = self.gating(input).view(-1, self.weight.shape[0])
        scores, indices = torch.topk(torch.softmax(logits, dim=-1), self.topk, dim=-1)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, indices, True)
        probs = torch.zeros_like(logits).scatter(1, indices, scores)
        return probs, routing_map
'''


def _megatron_like_router_class():
    namespace = {"__name__": MEGATRON_ROUTER_MODULE, "nn": nn, "torch": torch, "F": F}
    exec(_MEGATRON_LIKE_SOURCE, namespace)
    return namespace["TopKRouter"]


TopKRouter = _megatron_like_router_class()


class MoELayer(nn.Module):
    def __init__(self, router: nn.Module):
        super().__init__()
        self.router = router

    def forward(self, hidden):
        probs, _ = self.router(hidden)
        return hidden + probs.sum(-1, keepdim=True).view_as(hidden[..., :1])


class Decoder(nn.Module):
    def __init__(self, router_cls, hidden=8, experts=4, layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"mlp": MoELayer(router_cls(hidden, experts, 2))}) for _ in range(layers)
        )

    def forward(self, hidden):
        for layer in self.layers:
            hidden = layer["mlp"](hidden)
        return hidden


def test_stand_in_looks_like_megatron():
    assert TopKRouter.__module__ == MEGATRON_ROUTER_MODULE
    assert TopKRouter.forward.__module__ == MEGATRON_ROUTER_MODULE


@pytest.mark.parametrize("how", ["class", "regex", "modules"])
def test_megatron_topk_router_is_refused_with_what_to_hook(how):
    model = Decoder(TopKRouter)
    routers = {
        "class": TopKRouter,
        "regex": r"layers\.\d+\.mlp\.router",
        "modules": [layer["mlp"].router for layer in model.layers],
    }[how]
    for call in (
        lambda: capture_router_logits(model, routers=routers),
        lambda: find_routers(model, routers=routers),
        lambda: install_router_hooks(model, routers=routers),
    ):
        with pytest.raises(ValueError) as err:
            call()
        message = str(err.value)
        assert "'layers.0.mlp.router' is a Megatron-core TopKRouter" in message
        assert "(probs, routing_map)" in message and "not" in message and "logits" in message
        assert "gating()" in message and "torch.nn.Identity()" in message and "sara_loss" in message
        # with_sara's real signature: (spec, options: SARAOptions, ...), there is no coeff argument
        assert "sara_kernels.megatron: with_sara(layer_spec, SARAOptions(sara_weight=...))" in message
        assert "sara_batch(" in message and "coeff" not in message


def test_model_without_recorders_is_refused_at_its_megatron_router():
    # routers=None on a model declaring no recorder: the refusal names the Megatron router rather
    # than sending the user to routers=, which would only reach the same refusal.
    with pytest.raises(ValueError, match=r"'layers\.0\.mlp\.router' is a Megatron-core TopKRouter.*with_sara"):
        capture_router_logits(Decoder(TopKRouter))
    with pytest.raises(ValueError, match="declares no 'router_logits' OutputRecorder"):
        capture_router_logits(Decoder(RouterReturningLogits))


class RouterWithLogitsModule(TopKRouter):
    """The fix the error message proposes: the logits pass through a hookable child module."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logits = nn.Identity()

    def gating(self, input):
        return self.logits(super().gating(input))


def test_the_proposed_fix_captures_the_logits_with_gradient():
    model = Decoder(RouterWithLogitsModule)
    hidden = torch.randn(2, 5, 8)
    with capture_router_logits(model, routers=r".*\.router\.logits") as captured:
        model(hidden)
    assert captured.layers == (0, 1)
    # Layer 0's router sees the input; its captured logits are exactly its gate's.
    torch.testing.assert_close(captured.logits[0], F.linear(hidden, model.layers[0]["mlp"].router.weight).view(-1, 4))
    anchor = [z.detach() + torch.randn_like(z) for z in captured.logits]
    sara_loss(anchor, captured.logits).backward()
    for layer in model.layers:
        grad = layer["mlp"].router.weight.grad
        assert grad is not None and grad.abs().sum() > 0


class RouterReturningLogits(TopKRouter):
    """A subclass whose own forward returns the logits: not Megatron's post-top-k output."""

    def forward(self, input):
        return self.gating(input)


def test_subclass_overriding_forward_and_unrelated_topkrouter_are_accepted():
    holder = nn.ModuleDict({"router": RouterReturningLogits(8, 4, 2)})
    x = torch.randn(6, 8)
    with capture_router_logits(holder, routers=RouterReturningLogits) as captured:
        holder["router"](x)
    torch.testing.assert_close(captured.logits[0], F.linear(x, holder["router"].weight))

    class TopKRouter(nn.Module):  # same name, not megatron's
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 4)

        def forward(self, x):
            return self.gate(x)

    assert len(find_routers(nn.ModuleDict({"router": TopKRouter()}), routers=TopKRouter)) == 1
