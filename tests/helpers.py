"""Test-suite glue: the device the tests run on, leaves for autograd, and the shared input
builders of :mod:`sara_kernels.testing` placed on that device. Tolerances, the oracle, the cases
and the comparison harness live in :mod:`sara_kernels.testing` (one home for the tests, the GPU
tests, the selftest and the benchmarks)."""

from __future__ import annotations

import functools
import os

import torch

import sara_kernels
from sara_kernels import testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

random_logits = functools.partial(testing.random_logits, device=DEVICE)
ragged_mask = functools.partial(testing.ragged_mask, device=DEVICE)
packed_cu_seqlens = functools.partial(testing.packed_cu_seqlens, device=DEVICE)

# The public API on the reference backend: the ground truth the tests compare with.
reference_loss = functools.partial(sara_kernels.sara_loss, backend="reference")
reference_distribution = functools.partial(sara_kernels.routing_distribution, backend="reference")

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
    import gc
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        check(rank, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        # What the check built on the group (a DDP reducer, FSDP2's mesh) may sit in reference
        # cycles; freed by the collector at exit, after the group is gone, its threads abort the
        # process ("terminate called without an active exception"), so free it while the group lives.
        gc.collect()
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

def torchrun(script_and_args: list, cwd: str, timeout: float = 240.0):
    """``torchrun --nproc_per_node 2 <script_and_args>`` on this machine's CPU (gloo), in its own
    session: on a timeout the whole process group (the launcher and its ranks) is killed, so a
    hung rank fails the test instead of outliving it. Returns the CompletedProcess."""

    import signal
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *script_and_args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The ranks may sit in sessions of their own (the elastic agent starts them), holding the
        # output pipes open: kill every descendant, not only the launcher's process group.
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"torchrun did not finish within {timeout:.0f} s:\n{out[-3000:]}{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

def _descendants(pid: int) -> list:
    """Every process below ``pid`` (Linux /proc), children before their own children."""

    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
