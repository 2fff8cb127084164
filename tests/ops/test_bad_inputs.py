"""Every bad input gets a clear error naming the argument, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sara_kernels
from sara_kernels.ops.triton import kernels as triton_kernels

from helpers import reference_loss  # noqa: E402

L, B, S, E = 2, 2, 3, 8


def logits(n=B * S, e=E, layers=L, dtype=torch.float32):
    return [torch.randn(n, e, dtype=dtype) for _ in range(layers)]


MASK = torch.ones(B, S, dtype=torch.long)

BAD = {
    "layer counts": (dict(anchor_logits=logits(layers=3)), ValueError, "layer counts must match"),
    "E across layers": (dict(anchor_logits=[torch.randn(B * S, E), torch.randn(B * S, E + 1)]), ValueError, r"anchor_logits\[1\] has E = 9"),
    "E across sides": (dict(anchor_logits=logits(e=E + 2)), ValueError, "E must match"),
    "N across layers": (dict(target_logits=[torch.randn(B * S, E), torch.randn(B * S - 1, E)]), ValueError, r"target_logits\[1\] has N"),
    "mask B*S": (dict(anchor_mask=torch.ones(B, S + 1)), ValueError, "anchor_mask: B\\*S = 2\\*4 = 8 does not match"),
    "mask not 2-D": (dict(target_mask=torch.ones(B * S)), ValueError, "target_mask: expected a \\[B, S\\] tensor"),
    "B differs": (
        dict(anchor_mask=torch.ones(1, B * S), target_mask=MASK), ValueError, "B = 1 sequences.*B = 2",
    ),
    "cu start": (dict(anchor_cu_seqlens=torch.tensor([1, 3, 6])), ValueError, "anchor_cu_seqlens: must start at 0"),
    "cu decreasing": (dict(target_cu_seqlens=torch.tensor([0, 4, 3, 6])), ValueError, "target_cu_seqlens: must be non-decreasing"),
    "cu end": (dict(anchor_cu_seqlens=torch.tensor([0, 3, 5])), ValueError, "must end at the token count N = 6"),
    "cu float": (dict(anchor_cu_seqlens=torch.tensor([0.0, 3.0, 6.0])), TypeError, "anchor_cu_seqlens: expected an integer tensor"),
    "cu B differs": (
        dict(anchor_cu_seqlens=torch.tensor([0, 6]), target_cu_seqlens=torch.tensor([0, 2, 6])), ValueError, "B = 1 sequences",
    ),
    "mask and cu": (dict(anchor_mask=MASK, anchor_cu_seqlens=torch.tensor([0, 6])), ValueError, "either anchor_mask or anchor_cu_seqlens"),
    "numpy logits": (dict(target_logits=np.zeros((B * S, E), np.float32)), TypeError, "target_logits: expected a tuple/list.*got ndarray"),
    "numpy layers": (dict(anchor_logits=[np.zeros((B * S, E), np.float32)] * L), TypeError, r"anchor_logits\[0\]: expected a tensor, got ndarray"),
    "integer logits": (dict(anchor_logits=[torch.ones(B * S, E, dtype=torch.long)] * L), TypeError, "must be floating point"),
    "dtype across layers": (dict(target_logits=[torch.randn(B * S, E), torch.randn(B * S, E).double()]), TypeError, "must share a dtype"),
    "2-D tensor": (dict(anchor_logits=torch.randn(B * S, E)), ValueError, "or one \\[L, N, E\\] tensor"),
    "not a tensor": (dict(target_logits="logits"), TypeError, "target_logits: expected a tuple/list"),
    "empty list": (dict(anchor_logits=[]), ValueError, "at least one layer"),
    "temperature zero": (dict(temperature=0.0), ValueError, "temperature: expected a finite number > 0"),
    "temperature negative": (dict(temperature=-1), ValueError, "temperature"),
    "temperature string": (dict(temperature="1"), TypeError, "temperature"),
    "score": (dict(score="sparsemax"), ValueError, "score: expected one of"),
    "reduction": (dict(reduction="avg"), ValueError, "reduction: expected one of"),
    "backend": (dict(backend="tpu"), ValueError, "backend: expected one of"),
    "priors shape": (dict(anchor_logits=None, anchor_probs=torch.rand(L, B + 1, E), target_mask=MASK), ValueError, "anchor_probs: expected shape"),
    "priors and logits": (dict(anchor_probs=torch.rand(L, 1, E)), ValueError, "either anchor_logits or anchor_probs"),
    "no anchor": (dict(anchor_logits=None), ValueError, "anchor_logits is None"),
    "priors int": (dict(anchor_logits=None, anchor_probs=torch.ones(L, 1, E, dtype=torch.long)), TypeError, "anchor_probs"),
    "layer weights length": (dict(layer_weights=[1.0]), ValueError, "layer_weights: expected L = 2"),
    "layer weights negative": (dict(layer_weights=[1.0, -1.0]), ValueError, "non-negative"),
    "layer weights zero sum": (dict(layer_weights=[0.0, 0.0]), ValueError, "positive sum"),
    "layer weights shape": (dict(layer_weights=torch.ones(3)), ValueError, "layer_weights: expected shape"),
    "pair weights negative": (dict(pair_weights=torch.tensor([-0.5])), ValueError,
                              r"pair_weights: expected finite weights >= 0, got pair_weights\[0\] = -0.5"),
    "pair weights nan": (dict(target_mask=MASK, anchor_mask=MASK, pair_weights=torch.tensor([1.0, float("nan")])),
                         ValueError, r"pair_weights: expected finite weights >= 0, got pair_weights\[1\] = nan"),
    "pair weights inf": (dict(pair_weights=[float("inf")]), ValueError, "pair_weights: expected finite weights >= 0"),
    "pair weights shape": (dict(pair_weights=torch.ones(2)), ValueError, r"pair_weights: expected shape \[B\] = \[1\]"),
    "pair weights int": (dict(pair_weights=torch.ones(1, dtype=torch.long)), TypeError,
                         "pair_weights: expected a floating-point tensor"),
    "pair weights not numbers": (dict(pair_weights=["a"]), TypeError, "pair_weights: expected a sequence of B numbers"),
    "divergence": (dict(divergence="jsd"), ValueError, "divergence: expected one of \\('js', 'kl', 'reverse_kl'\\)"),
}


def call(fn, overrides):
    args = dict(anchor_logits=logits(), target_logits=logits())
    args.update(overrides)
    anchor, target = args.pop("anchor_logits"), args.pop("target_logits")
    return fn(anchor, target, **args)


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("fn", [sara_kernels.sara_loss, reference_loss], ids=["api", "reference"])
def test_bad_input_raises_clear_error(case, fn):
    overrides, error, message = BAD[case]
    if fn is reference_loss and "backend" in overrides:
        pytest.skip("reference_loss fixes the backend")
    with pytest.raises(error, match=message):
        call(fn, overrides)


def test_devices_must_match():
    meta = [torch.randn(B * S, E, device="meta") for _ in range(L)]
    with pytest.raises(ValueError, match="anchor_logits are on cpu, target_logits on meta"):
        sara_kernels.sara_loss(logits(), meta)
    with pytest.raises(ValueError, match="anchor_mask is on meta"):
        sara_kernels.sara_loss(logits(), logits(), MASK.to("meta"), MASK)
    with pytest.raises(ValueError, match=r"anchor_logits\[1\] is on meta"):
        sara_kernels.sara_loss([torch.randn(B * S, E), meta[0]], logits())


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(triton_kernels, "INTERPRET", False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        sara_kernels.sara_loss(logits(), logits(), backend="triton")


def test_triton_backend_rejects_float64_and_too_many_experts():
    with pytest.raises(TypeError, match="backend='triton' takes float32, bfloat16 or float16"):
        sara_kernels.sara_loss(logits(dtype=torch.float64), logits(dtype=torch.float64), backend="triton")
    with pytest.raises(ValueError, match="up to E = 512"):
        sara_kernels.sara_loss(logits(e=513), logits(e=513), backend="triton")
    many = torch.ones(65536, 1)
    with pytest.raises(ValueError, match="up to B = 65535 sequences"):
        sara_kernels.sara_loss(logits(n=65536), logits(n=65536), many, many, backend="triton")


def test_routing_distribution_bad_inputs():
    with pytest.raises(ValueError, match="mask: B\\*S"):
        sara_kernels.routing_distribution(logits(), torch.ones(5, 5))
    with pytest.raises(ValueError, match="score"):
        sara_kernels.routing_distribution(logits(), score="relu")
    with pytest.raises(TypeError, match="logits: router logits must be floating point"):
        sara_kernels.routing_distribution([torch.ones(3, 4, dtype=torch.int32)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the table's tensors are CPU tensors: on a GPU machine "
                    "backend='cuda' refuses them first (and checks cu_seqlens values on the device)")
@pytest.mark.parametrize("case", sorted(k for k in BAD if "backend" not in BAD[k][0]))
def test_cuda_backend_raises_the_same_errors(case, cuda_backend):
    """The CUDA backend checks a tuple's layers in C++ (here the emulated build on CPU tensors,
    tests/conftest.py); its errors must be those of the Python checks, type and message."""
    overrides, error, message = BAD[case]
    with pytest.raises(error, match=message):
        call(sara_kernels.sara_loss, {**overrides, "backend": cuda_backend})


def test_pair_weights_off_the_cpu_are_checked_by_a_device_assertion_without_a_host_sync(monkeypatch):
    """The path a GPU tensor takes (here while compiling, the other case that takes it): no value is
    read on the host (no bool(), item() or tolist()), and a bad weight fails the device assertion."""
    from sara_kernels import _inputs

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for method in ("__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, method, lambda *_: pytest.fail("a host sync on the pair_weights check"))
    _inputs.pair_weight_tensor(torch.tensor([0.0, 2.5]), 2, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="pair_weights: expected finite weights >= 0"):
        _inputs.pair_weight_tensor(torch.tensor([1.0, -1.0]), 2, torch.device("cpu"))
