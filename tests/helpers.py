"""Test-suite glue: the device the tests run on, leaves for autograd, and the shared input
builders of :mod:`sara_kernels.testing` placed on that device. Tolerances and the oracle live
in :mod:`sara_kernels.testing` (one table for the tests, the GPU tests and the selftest)."""

from __future__ import annotations

import functools

import torch

from sara_kernels import testing

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

random_logits = functools.partial(testing.random_logits, device=DEVICE)
ragged_mask = functools.partial(testing.ragged_mask, device=DEVICE)
packed_cu_seqlens = functools.partial(testing.packed_cu_seqlens, device=DEVICE)


def as_float64_leaves(layers):
    """float64 copies of the (rounded) inputs that require grad: the reference's inputs."""
    return [t.detach().double().requires_grad_(True) for t in layers]


def as_leaves(layers):
    return [t.detach().clone().requires_grad_(True) for t in layers]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, errors, check, args):
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        check(rank, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_ranks(check, world: int, *args, timeout: float = 240.0):
    """``check(rank, *args)`` in ``world`` spawned processes joined in a gloo group (CPU), each
    bounded by ``timeout`` and leaving no process group behind; fails with every rank's
    traceback. ``check`` must be a module-level function (spawn pickles it by name)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, errors, check, args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not alive, f"a rank did not finish within {timeout:.0f} s"
    assert not messages, "\n".join(messages)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
