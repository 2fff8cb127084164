"""Context parallelism on torch.distributed (gloo, 2 processes, CPU): each rank holds a share
of every sequence's tokens; loss and gradients must equal one process that sees whole
sequences, for every reduction, detach mode, priors, divergence and with pair weights, also when
a rank holds no token of some sequence, on every backend of the registry. The Triton backend runs under the interpreter,
the CUDA backend as its emulated build (tests/conftest.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from sara_kernels import backends

from helpers import run_ranks

WORLD = 2
L, B, S, E = 2, 3, 8, 10  # E not a power of two


def _full_inputs(seg: str):
    """Whole-sequence inputs, the same on every rank, and each rank's share of the tokens.

    Rank r holds token positions [r·S/2, (r+1)·S/2) of every sequence (mask form), or the first
    or second half of every packed segment (cu_seqlens form). Sequence 0's valid tokens all lie
    in the first half, so rank 1 holds none of them.
    """
    from sara_kernels import testing

    gen = torch.Generator().manual_seed(5)
    if seg == "mask":
        lengths = {"anchor": torch.tensor([3, 8, 5]), "target": torch.tensor([4, 6, 8])}
        masks = {k: (torch.arange(S)[None, :] < v[:, None]).long() for k, v in lengths.items()}
        full = {k: dict(mask=m) for k, m in masks.items()}
        logits = {k: torch.stack(testing.random_logits(L, B * S, E, generator=gen)) for k in masks}
        shares = {}
        for r in range(WORLD):
            cols = slice(r * S // 2, (r + 1) * S // 2)
            shares[r] = {k: (logits[k].view(L, B, S, E)[:, :, cols].reshape(L, -1, E), dict(mask=masks[k][:, cols]))
                         for k in masks}
        rows = {r: {k: torch.arange(B * S).view(B, S)[:, r * S // 2 : (r + 1) * S // 2].reshape(-1) for k in masks}
                for r in range(WORLD)}
        return logits, full, shares, rows
    sizes = {"anchor": [3, 9, 6], "target": [4, 7, 10]}
    logits, full, shares, rows = {}, {}, {r: {} for r in range(WORLD)}, {r: {} for r in range(WORLD)}
    for k, lens in sizes.items():
        n = sum(lens)
        logits[k] = torch.stack(testing.random_logits(L, n, E, generator=gen))
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
        full[k] = dict(cu_seqlens=cu)
        for r in range(WORLD):
            idx, local_lens = [], []
            for b, length in enumerate(lens):
                first = 0 if b == 0 else length // 2  # sequence 0 entirely on rank 0
                part = range(int(cu[b]), int(cu[b]) + first) if r == 0 else range(int(cu[b]) + first, int(cu[b + 1]))
                idx += list(part)
                local_lens.append(len(part))
            local_cu = torch.tensor([0] + list(torch.tensor(local_lens).cumsum(0)), dtype=torch.int32)
            rows[r][k] = torch.tensor(idx, dtype=torch.long)
            shares[r][k] = (logits[k][:, rows[r][k]], dict(cu_seqlens=local_cu))
    return logits, full, shares, rows


CASES = [
    # (segmentation, mode, reduction, divergence, pair_weights), each run on every backend
    ("mask", "both", "mean", "kl", [0.5, 1.5, 0.0]),
    ("mask", "both", "sum", "js", None),
    ("mask", "priors", "sum", "reverse_kl", [2.0, 0.5, 1.0]),
    ("cu", "both", "none", "reverse_kl", [0.25, 1.0, 3.0]),
    ("cu", "detach", "mean", "js", [1.5, 0.0, 0.5]),
    ("cu", "detach", "none", "kl", None),
    ("cu", "priors", "mean", "js", None),
]


def _loss(side_a, side_t, mode, reduction, divergence, pair_weights, backend, group, priors=None):
    import sara_kernels

    (za, seg_a), (zt, seg_t) = side_a, side_t
    kwargs = dict(target_mask=seg_t.get("mask"), target_cu_seqlens=seg_t.get("cu_seqlens"), score="sigmoid",
                  temperature=0.8, reduction=reduction, layer_weights=[0.5, 2.0], backend=backend,
                  detach_anchor=mode != "both", return_per_layer=True, group=group, divergence=divergence,
                  pair_weights=pair_weights)
    if mode == "priors":
        return sara_kernels.sara_loss(None, zt, anchor_probs=priors, **kwargs)
    return sara_kernels.sara_loss(za, zt, anchor_mask=seg_a.get("mask"), anchor_cu_seqlens=seg_a.get("cu_seqlens"),
                                  **kwargs)


def _check_rank(rank: int, names, emulated_cuda=None):
    """Every case on each backend of ``names``, then a compiled step on each fused one. A spawned
    rank starts without the emulated CUDA build: ``emulated_cuda`` is its library, loaded here."""
    import sara_kernels
    from sara_kernels.testing import LOSS_TOL, assert_grads_close

    if emulated_cuda:
        from cuda_emulation.extension import load_emulated_extension
        from sara_kernels.ops import cuda

        cuda._C = load_emulated_extension(emulated_cuda)
    group = dist.group.WORLD
    for backend, (seg, mode, reduction, divergence, pair_weights) in itertools.product(names, CASES):
        logits, full, shares, rows = _full_inputs(seg)
        priors = sara_kernels.routing_distribution(logits["anchor"], **full["anchor"], score="sigmoid",
                                                   temperature=0.8, backend="reference")
        whole = {k: v.clone().requires_grad_() for k, v in logits.items()}
        loss, per_layer = _loss((whole["anchor"], full["anchor"]), (whole["target"], full["target"]), mode,
                                reduction, divergence, pair_weights, backend, None, priors)
        upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(9)) + 0.5
        wanted = ["target"] + (["anchor"] if mode == "both" else [])
        grads = torch.autograd.grad((loss * upstream).sum(), [whole[k] for k in wanted])
        local = {k: shares[rank][k][0].clone().requires_grad_() for k in logits}
        got, got_per_layer = _loss((local["anchor"], shares[rank]["anchor"][1]), (local["target"], shares[rank]["target"][1]),
                                   mode, reduction, divergence, pair_weights, backend, group, priors)
        local_grads = torch.autograd.grad((got * upstream).sum(), [local[k] for k in wanted])
        where = f"rank {rank} {backend} {seg} {mode} {reduction} {divergence} pair_weights={pair_weights}"
        torch.testing.assert_close(got, loss, **LOSS_TOL, msg=where)
        torch.testing.assert_close(got_per_layer, per_layer, **LOSS_TOL, msg=where)
        for k, g, lg in zip(wanted, grads, local_grads):
            assert_grads_close(lg, g[:, rows[rank][k]], torch.float32)
        probs = sara_kernels.routing_distribution(shares[rank]["target"][0], **shares[rank]["target"][1],
                                                  backend=backend, group=group)
        whole_probs = sara_kernels.routing_distribution(logits["target"], **full["target"], backend="reference")
        torch.testing.assert_close(probs, whole_probs, **LOSS_TOL, msg=where)
    for backend in names:
        if backends.REGISTRY[backend].fused:  # their custom ops must trace beside the collective
            _check_compiled(rank, group, backend)


def _check_compiled(rank: int, group, backend):
    """fullgraph torch.compile of a step with the group's all-reduce (a functional collective)."""
    import sara_kernels
    from sara_kernels.testing import LOSS_TOL, assert_grads_close

    logits, _, shares, _ = _full_inputs("mask")
    (za, seg_a), (zt, seg_t) = shares[rank]["anchor"], shares[rank]["target"]

    def step(za, zt):
        return sara_kernels.sara_loss(za, zt, seg_a["mask"], seg_t["mask"], detach_anchor=False, backend=backend,
                                      group=group)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        a, t = za.clone().requires_grad_(), zt.clone().requires_grad_()
        loss = fn(a, t)
        results.append((loss.detach(), torch.autograd.grad(loss, [a, t])))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, **LOSS_TOL, msg=f"rank {rank} {backend} compiled")
    for g, h in zip(compiled_grads, eager_grads):
        assert_grads_close(g, h.double(), torch.float32)


def test_context_parallel_equals_whole_sequences():
    """The backends that run on CPU tensors in a fresh process (Triton under the interpreter and
    the reference, without a GPU), all in one launch of the ranks."""
    cpu = torch.device("cpu")
    names = [name for name, entry in backends.REGISTRY.items() if entry.available() and entry.runs_on(cpu)]
    if not torch.cuda.is_available():  # no backend of the registry goes unchecked
        assert set(names) == set(backends.NAMES) - {"cuda"}  # cuda: the emulated build, the test below
    run_ranks(_check_rank, WORLD, names)


def test_context_parallel_cuda_backend(emulated_cuda_extension):
    """The CUDA backend on its emulated build in each rank: this rank's unnormalised sums from
    the op, all-reduced and normalised in sara_kernels/distributed.py as for every backend."""
    run_ranks(_check_rank, WORLD, ["cuda"], emulated_cuda_extension.__file__)


def test_group_must_be_a_process_group():
    import sara_kernels

    z = [torch.randn(4, 5)]
    with pytest.raises(TypeError, match="group: expected a torch.distributed ProcessGroup"):
        sara_kernels.sara_loss(z, z, group="world")
    with pytest.raises(TypeError, match="group"):
        sara_kernels.routing_distribution(z, group=1)
