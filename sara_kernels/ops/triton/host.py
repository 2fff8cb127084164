r"""The Triton backend's host side: the tile table, launch plans, caches and launches.

A training loop calls the op with the same shapes every step, so everything that
depends only on shapes (tile sizes, grid, splits, which Triton kernel binary) is planned once
and cached; a call then costs a few dictionary lookups and one launch per kernel through the
compiled kernel's own launcher (Triton's ``CompiledKernel[grid]``), not Triton's per-call
argument binding. That is safe because no runtime kernel argument is value- or alignment-
specialised: a compiled binary depends only on the constexprs, the argument dtypes and whether
each integer fits in 32 bits, which are exactly the key of ``launch``'s cache.
"""

from __future__ import annotations

import functools
import math
import operator
from collections import OrderedDict
from typing import NamedTuple

import torch

from ..._inputs import host_to_device
from .. import contract
from . import kernels
from .kernels import INTERPRET, check_segments, pool_routing_bwd, pool_routing_fwd


def tile_config(num_experts: int) -> dict:
    """BLOCK_N, BLOCK_E, num_warps and pipelining of the pooling kernels: the one table that sizes
    every tile.

    A tile holds 4096 values: 4 warps up to 64 experts (enough independent loads in flight), 8
    warps from 128, where fewer values per thread keep the forward's register accumulator small.
    From 128 experts the row loop is software-pipelined (``STAGES``: the next tile is copied to
    shared memory asynchronously while the current one is computed, as the pooling kernels are
    latency-bound), and ``maxnreg`` caps the registers the pipelined loop asks for so that it
    keeps its occupancy; the larger per-thread tiles of E ≤ 64 would need too many registers to
    pipeline. FP fusion is named so every Triton version compiles the same arithmetic.
    benchmarks/tune_tiles.py measures the candidates (results in benchmarks/results/).
    """
    # ≥ 16: fewer variants to compile, no tiny layouts. The next power of two by bit_length: this
    # runs on every call (pair_config), where triton.next_power_of_2 is a slow ConstexprFunction.
    block_e = max(16, 1 << (num_experts - 1).bit_length())
    num_warps = 8 if block_e >= 128 else 4
    block_n = max(1, min(256, 4096 // block_e))
    if block_e >= 128:
        pipelining = dict(STAGES=3, maxnreg=64)
    else:
        pipelining = dict(STAGES=1)
    return dict(BLOCK_N=block_n, BLOCK_E=block_e, **pipelining, num_warps=num_warps, enable_fp_fusion=True)


# Triton's targets on which CI checks that every tile compiles without spills
# (tests/ops/test_aot_compile.py). Triton compiles capability 90 for sm_90a, 100 for sm_100a, 103 for
# sm_103a and 120 for sm_120a.
SPILL_CHECKED_ARCHS = (80, 86, 90, 100, 103, 120)

# Where ptxas spills with the table's tile: (arch, kernel, score, BLOCK_E, VEC) -> what replaces the
# table's launch options there, from compile results alone (no timing), as
# benchmarks/spill_free_tiles.py derives them: the smallest register cap of 72, 80, 88, ... at
# which no configuration of that key in CI's grid (segmentations, logits dtypes, E short of the
# tile) spills (ptxas is not monotonic in the cap, so all of them are compiled at each cap), or 8
# warps where a tile spills with no cap at all. Every other tile keeps what it was measured with
# on an H200; tests/ops/test_aot_compile.py asserts no spills. Derived with the compilers of
# SPILL_FREE_TOOLCHAIN (aot.toolchain): another Triton or ptxas allocates registers differently.
SPILL_FREE_TOOLCHAIN = {arch: f"Triton 3.9.0, ptxas {'12.9' if arch < 90 else '13.4'}" for arch in SPILL_CHECKED_ARCHS}
SPILL_FREE_TILES = {
    (80, "pool_routing_bwd", "sigmoid", 128, 0): dict(maxnreg=88),
    (80, "pool_routing_bwd", "sigmoid", 512, 0): dict(maxnreg=80),
    (80, "pool_routing_bwd", "sigmoid", 512, 8): dict(maxnreg=88),
    (80, "pool_routing_bwd", "softmax", 128, 0): dict(maxnreg=88),
    (80, "pool_routing_bwd", "softmax", 512, 8): dict(maxnreg=72),
    (80, "pool_routing_fwd", "sigmoid", 512, 0): dict(maxnreg=88),
    (80, "pool_routing_fwd", "softmax", 512, 0): dict(maxnreg=88),
    (86, "pool_routing_bwd", "sigmoid", 128, 0): dict(maxnreg=88),
    (86, "pool_routing_bwd", "sigmoid", 512, 0): dict(maxnreg=80),
    (86, "pool_routing_bwd", "sigmoid", 512, 8): dict(maxnreg=88),
    (86, "pool_routing_bwd", "softmax", 128, 0): dict(maxnreg=88),
    (86, "pool_routing_bwd", "softmax", 512, 8): dict(maxnreg=72),
    (86, "pool_routing_fwd", "sigmoid", 128, 0): dict(maxnreg=72),
    (86, "pool_routing_fwd", "sigmoid", 512, 0): dict(maxnreg=72),
    (86, "pool_routing_fwd", "softmax", 128, 0): dict(maxnreg=72),
    (86, "pool_routing_fwd", "softmax", 512, 0): dict(maxnreg=80),
    (90, "pool_routing_bwd", "sigmoid", 128, 0): dict(maxnreg=104),
    (90, "pool_routing_bwd", "sigmoid", 256, 0): dict(maxnreg=80),
    (90, "pool_routing_bwd", "sigmoid", 256, 8): dict(maxnreg=80),
    (90, "pool_routing_bwd", "sigmoid", 512, 0): dict(maxnreg=88),
    (90, "pool_routing_bwd", "sigmoid", 512, 8): dict(maxnreg=96),
    (90, "pool_routing_bwd", "softmax", 128, 0): dict(maxnreg=96),
    (90, "pool_routing_bwd", "softmax", 128, 8): dict(maxnreg=72),
    (90, "pool_routing_bwd", "softmax", 512, 0): dict(maxnreg=72),
    (90, "pool_routing_bwd", "softmax", 512, 8): dict(maxnreg=80),
    (90, "pool_routing_fwd", "sigmoid", 128, 0): dict(maxnreg=80),
    (90, "pool_routing_fwd", "sigmoid", 512, 0): dict(maxnreg=88),
    (90, "pool_routing_fwd", "sigmoid", 512, 8): dict(maxnreg=72),
    (90, "pool_routing_fwd", "softmax", 128, 0): dict(maxnreg=88),
    (90, "pool_routing_fwd", "softmax", 512, 0): dict(maxnreg=88),
    (90, "pool_routing_fwd", "softmax", 512, 8): dict(maxnreg=72),
    (100, "pool_routing_bwd", "sigmoid", 128, 0): dict(maxnreg=112),
    (100, "pool_routing_bwd", "sigmoid", 128, 8): dict(maxnreg=96),
    (100, "pool_routing_bwd", "sigmoid", 256, 0): dict(maxnreg=88),
    (100, "pool_routing_bwd", "sigmoid", 256, 8): dict(maxnreg=96),
    (100, "pool_routing_bwd", "sigmoid", 512, 0): dict(maxnreg=88),
    (100, "pool_routing_bwd", "sigmoid", 512, 8): dict(maxnreg=96),
    (100, "pool_routing_bwd", "softmax", 128, 0): dict(maxnreg=96),
    (100, "pool_routing_bwd", "softmax", 128, 8): dict(maxnreg=80),
    (100, "pool_routing_bwd", "softmax", 256, 0): dict(maxnreg=72),
    (100, "pool_routing_bwd", "softmax", 256, 8): dict(maxnreg=80),
    (100, "pool_routing_bwd", "softmax", 512, 0): dict(maxnreg=72),
    (100, "pool_routing_bwd", "softmax", 512, 8): dict(maxnreg=80),
    (100, "pool_routing_fwd", "sigmoid", 128, 0): dict(maxnreg=80),
    (100, "pool_routing_fwd", "sigmoid", 256, 0): dict(maxnreg=72),
    (100, "pool_routing_fwd", "sigmoid", 512, 0): dict(maxnreg=72),
    (100, "pool_routing_fwd", "sigmoid", 512, 8): dict(maxnreg=72),
    (100, "pool_routing_fwd", "softmax", 16, 0): dict(num_warps=8),
    (100, "pool_routing_fwd", "softmax", 128, 0): dict(maxnreg=88),
    (100, "pool_routing_fwd", "softmax", 128, 8): dict(maxnreg=72),
    (100, "pool_routing_fwd", "softmax", 512, 0): dict(maxnreg=72),
    (100, "pool_routing_fwd", "softmax", 512, 8): dict(maxnreg=72),
    (103, "pool_routing_bwd", "sigmoid", 128, 0): dict(maxnreg=112),
    (103, "pool_routing_bwd", "sigmoid", 128, 8): dict(maxnreg=96),
    (103, "pool_routing_bwd", "sigmoid", 256, 0): dict(maxnreg=88),
    (103, "pool_routing_bwd", "sigmoid", 256, 8): dict(maxnreg=96),
    (103, "pool_routing_bwd", "sigmoid", 512, 0): dict(maxnreg=88),
    (103, "pool_routing_bwd", "sigmoid", 512, 8): dict(maxnreg=96),
    (103, "pool_routing_bwd", "softmax", 128, 0): dict(maxnreg=96),
    (103, "pool_routing_bwd", "softmax", 128, 8): dict(maxnreg=80),
    (103, "pool_routing_bwd", "softmax", 256, 0): dict(maxnreg=72),
    (103, "pool_routing_bwd", "softmax", 256, 8): dict(maxnreg=80),
    (103, "pool_routing_bwd", "softmax", 512, 0): dict(maxnreg=72),
    (103, "pool_routing_bwd", "softmax", 512, 8): dict(maxnreg=80),
    (103, "pool_routing_fwd", "sigmoid", 16, 0): dict(num_warps=8),
    (103, "pool_routing_fwd", "sigmoid", 128, 0): dict(maxnreg=80),
    (103, "pool_routing_fwd", "sigmoid", 256, 0): dict(maxnreg=72),
    (103, "pool_routing_fwd", "sigmoid", 512, 0): dict(maxnreg=72),
    (103, "pool_routing_fwd", "sigmoid", 512, 8): dict(maxnreg=72),
    (103, "pool_routing_fwd", "softmax", 16, 0): dict(num_warps=8),
    (103, "pool_routing_fwd", "softmax", 128, 0): dict(maxnreg=88),
    (103, "pool_routing_fwd", "softmax", 128, 8): dict(maxnreg=72),
    (103, "pool_routing_fwd", "softmax", 512, 0): dict(maxnreg=72),
    (103, "pool_routing_fwd", "softmax", 512, 8): dict(maxnreg=72),
    (120, "pool_routing_bwd", "sigmoid", 32, 8): dict(num_warps=8),
    (120, "pool_routing_bwd", "sigmoid", 128, 0): dict(maxnreg=96),
    (120, "pool_routing_bwd", "sigmoid", 256, 0): dict(maxnreg=88),
    (120, "pool_routing_bwd", "sigmoid", 256, 8): dict(maxnreg=80),
    (120, "pool_routing_bwd", "sigmoid", 512, 0): dict(maxnreg=88),
    (120, "pool_routing_bwd", "sigmoid", 512, 8): dict(maxnreg=96),
    (120, "pool_routing_bwd", "softmax", 32, 8): dict(num_warps=8),
    (120, "pool_routing_bwd", "softmax", 128, 0): dict(maxnreg=96),
    (120, "pool_routing_bwd", "softmax", 256, 0): dict(maxnreg=72),
    (120, "pool_routing_bwd", "softmax", 512, 0): dict(maxnreg=72),
    (120, "pool_routing_bwd", "softmax", 512, 8): dict(maxnreg=80),
    (120, "pool_routing_fwd", "sigmoid", 128, 0): dict(maxnreg=72),
    (120, "pool_routing_fwd", "sigmoid", 512, 0): dict(maxnreg=80),
    (120, "pool_routing_fwd", "sigmoid", 512, 8): dict(maxnreg=72),
    (120, "pool_routing_fwd", "softmax", 128, 0): dict(maxnreg=72),
    (120, "pool_routing_fwd", "softmax", 512, 0): dict(maxnreg=80),
    (120, "pool_routing_fwd", "softmax", 512, 8): dict(maxnreg=72),
}


def spill_free(meta: dict, kernel: str, arch) -> dict:
    """``meta``, a pooling launch's constexprs and options (``SIGMOID`` and ``VEC`` set), for
    ``kernel`` (``"pool_routing_fwd"`` or ``"pool_routing_bwd"``) on Triton target ``arch``
    (:func:`target_arch`; None: the table's own), with :data:`SPILL_FREE_TILES`'s options where it
    has an entry."""
    score = "sigmoid" if meta["SIGMOID"] else "softmax"
    options = SPILL_FREE_TILES.get((arch, kernel, score, meta["BLOCK_E"], meta["VEC"]))
    return meta if options is None else {**meta, **options}


_TARGET_ARCH = {}


def target_arch(device: torch.device):
    """The architecture of :data:`SPILL_CHECKED_ARCHS` whose :data:`SPILL_FREE_TILES` entries
    ``device`` gets: the highest not above its compute capability (sm_89 gets sm_86's, sm_110
    sm_103's, sm_121 sm_120's: not compiled in CI); None off CUDA or below sm_80."""
    if device.type != "cuda":
        return None
    if device not in _TARGET_ARCH:
        major, minor = torch.cuda.get_device_capability(device)
        below = [arch for arch in SPILL_CHECKED_ARCHS if arch <= 10 * major + minor]
        _TARGET_ARCH[device] = below[-1] if below else None
    return _TARGET_ARCH[device]


def expert_constexprs(num_experts: int) -> dict:
    """The pooling kernels' constexprs that follow from E alone: the tile table's, E_MULT =
    gcd(E, 8) (rows provably vector-aligned) and EVEN_E (E fills the tile: no column mask)."""
    meta = tile_config(num_experts)
    meta.update(E_MULT=math.gcd(num_experts, 8), EVEN_E=num_experts == meta["BLOCK_E"])
    return meta


def pair_config(num_experts: int) -> dict:
    """Launch options of ``pair_js_fwd``: one row of E values per program."""
    return dict(BLOCK_E=tile_config(num_experts)["BLOCK_E"], num_warps=4, enable_fp_fusion=True)


REDUCE_CONFIG = dict(BLOCK_L=16, BLOCK_B=64, num_warps=4, enable_fp_fusion=True)
CHECK_CONFIG = dict(BLOCK=256, num_warps=4)

_SM_COUNT = {}


def num_splits(num_tokens: int, num_seqs: int, num_layers: int, device: torch.device, block_n: int) -> int:
    """Slices per sequence (:func:`contract.num_splits`, a tile of ``block_n`` rows per iteration);
    one off CUDA, where the interpreter runs the programs one after another."""
    if device.type != "cuda":
        return 1
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return contract.num_splits(num_tokens, num_seqs, num_layers, _SM_COUNT[device], block_n)


# Compiled kernels by (kernel, device, constexprs, argument types): see the module docstring.
_COMPILED = {}
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def launch(kernel, grid, args: tuple, meta: dict, device: torch.device):
    """``kernel[grid](*args, **meta)``, through the compiled kernel's launcher once it exists.

    ``args`` are the runtime arguments in signature order, ``meta`` the constexprs and launch
    options. The key holds everything Triton specialises these kernels on (see the module
    docstring): the constexprs, the options, each tensor argument's dtype and whether each
    integer argument fits in 32 bits.
    """
    if INTERPRET:
        kernel[grid](*args, **meta)
        return
    # Triton types an int argument i32 when it fits, i64 otherwise: that choice is in the key too.
    # Runtime arguments are tensors, ints and floats only (a list comprehension over type() is
    # the cheapest form: this runs on every launch).
    key = (kernel, device, tuple(meta.items()),
           tuple([_INT32_MIN <= a <= _INT32_MAX if type(a) is int else a.dtype for a in args if type(a) is not float]))
    hit = _COMPILED.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **meta)
        _COMPILED[key] = (compiled, tuple(meta[p.name] for p in kernel.params if p.is_constexpr))
        return
    compiled, constexprs = hit
    compiled[(*grid, 1, 1)[:3]](*args, *constexprs)  # the compiled launcher reads all three grid axes


def _packer(names: tuple):
    getter = operator.itemgetter(*names)
    return getter if len(names) > 1 else lambda values: (getter(values),)


_PACKERS = {getattr(kernels, name): (name, names, _packer(names)) for name, names in kernels.RUNTIME_ARGS.items()}


def runtime_args(kernel, values: dict) -> tuple:
    """``values`` (``kernel``'s runtime arguments by its own names, :data:`.kernels.RUNTIME_ARGS`)
    in the kernel's signature order, as :func:`launch` takes them."""
    name, names, pack = _PACKERS[kernel]
    if len(values) != len(names):
        raise TypeError(f"{name}: runtime arguments {sorted(set(values) ^ set(names))} are missing or not the kernel's")
    return pack(values)


_PLACEHOLDERS = {}


def _placeholder(device: torch.device) -> torch.Tensor:
    """A small int64 buffer passed for absent optional tensors (never read: its constexpr is off)."""
    t = _PLACEHOLDERS.get(device)
    if t is None:
        t = _PLACEHOLDERS[device] = torch.zeros(16, dtype=torch.int64, device=device)
    return t


_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()
_TABLE_CACHE_SIZE = 64
_data_ptr = torch.Tensor.data_ptr
_stride = torch.Tensor.stride


def layer_table(ptrs: tuple, strides: tuple, device: torch.device) -> torch.Tensor:
    """int64 [3, L] on ``device``: data pointers, row strides, column strides (elements).

    On CUDA the table travels through pinned memory with a non-blocking copy (no host sync,
    capturable in a CUDA graph) and is cached by its contents, so a steady-state training loop
    whose allocator hands back the same addresses builds it once, and a CUDA-graph capture after
    a warm-up finds it ready instead of copying inside the capture. PyTorch's pinned-memory
    allocator keeps the source block until the copy has completed. A hit from another stream
    than the copy's waits for the copy's event first (outside a capture, where the warm-up has
    already ordered it), since the copy may not have landed yet.
    """
    key = (device, ptrs, strides)
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        table, stream, copied = hit
        if stream is not None:
            current = torch.cuda.current_stream(device)
            if current != stream and not torch.cuda.is_current_stream_capturing():
                current.wait_event(copied)
        return table
    row_strides, col_strides = zip(*strides)
    host = torch.tensor([*ptrs, *row_strides, *col_strides], dtype=torch.int64).view(3, len(ptrs))
    table = host_to_device(host, device)
    stream = copied = None
    if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        stream = torch.cuda.current_stream(device)
        copied = stream.record_event()
    _TABLES[key] = (table, stream, copied)
    if len(_TABLES) > _TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    return table


def vector_width(element_size: int, pointers, strides) -> int:
    """Elements per 16-byte load when every layer allows aligned vector loads, else 0 (the kernels'
    ``VEC``): 16-byte aligned bases, unit column stride, row stride (and layer stride, for one
    [L, N, E] tensor) a multiple of the vector. ``strides``: each layer's (…, row, column) strides."""
    vec = 16 // element_size
    if functools.reduce(operator.or_, pointers) % 16:
        return 0
    return vec if all(st[-1] == 1 and all(x % vec == 0 for x in st[:-1]) for st in strides) else 0


def layer_addressing(logits, device: torch.device):
    """(the kernels' layer addressing arguments ``table_ptr, x0_ptr, stride_l, stride_n, stride_e`` by
    name, VEC)."""
    if isinstance(logits, torch.Tensor):
        sl, sn, se = logits.stride()
        vec = vector_width(logits.element_size(), (logits.data_ptr(),), ((sl, sn, se),))
        if vec:  # the kernels multiply them back (see _layer_logits)
            sl, sn = sl // vec, sn // vec
        addressing = {"table_ptr": _placeholder(device), "x0_ptr": logits,
                      "stride_l": sl, "stride_n": sn, "stride_e": se}
        return addressing, vec
    ptrs = tuple(map(_data_ptr, logits))
    strides = tuple(map(_stride, logits))
    vec = vector_width(logits[0].element_size(), ptrs, set(strides))
    table = layer_table(ptrs, strides, device)
    return {"table_ptr": table, "x0_ptr": logits[0], "stride_l": 0, "stride_n": 0, "stride_e": 0}, vec


class SidePlan(NamedTuple):
    """What the pooling launches of one side need beyond the per-call tensors: planned once per shape."""

    grid: tuple  # (L, B, splits)
    # The pooling kernels' arguments fixed by the plan, by name: the segmentation's strides (zeros
    # for an absent mask or cu_seqlens) and the sizes L, B, N, S (the mask's row length, N without
    # one), E_DIV, inv_tau, SPLITS. Built once, so a launch adds only its tensors to it.
    constants: dict
    meta: dict  # constexprs and launch options of pool_routing_fwd
    bwd_meta: dict  # those of pool_routing_bwd but PAIR (SPILL_FREE_TILES may set other options)
    num_experts: int


# Bounded like _TABLES: a run whose batch shapes vary without end would otherwise grow it forever.
_PLANS: "OrderedDict[tuple, SidePlan]" = OrderedDict()
_PLAN_CACHE_SIZE = 256


def side_plan(logits, mask, cu, score: str, temperature: float, vec: int, device: torch.device) -> SidePlan:
    stacked = isinstance(logits, torch.Tensor)
    first = logits if stacked else logits[0]
    L = first.shape[0] if stacked else len(logits)
    N, E = first.shape[-2:]
    B = contract.num_seqs(mask, cu)
    S = mask.shape[1] if mask is not None else N
    mask_strides = mask.stride() if mask is not None else (0, 0)
    cu_stride = cu.stride(0) if cu is not None else 0
    key = (stacked, L, N, E, B, S, vec, mask is not None, cu is not None, mask_strides, cu_stride, score,
           temperature, device)
    plan = _PLANS.get(key)
    if plan is None:
        meta = expert_constexprs(E)
        splits = num_splits(N, B, L, device, meta["BLOCK_N"])
        meta.update(HAS_MASK=mask is not None, USE_CU=cu is not None, SIGMOID=score == "sigmoid", TABLE=not stacked,
                    VEC=vec)
        constants = dict(mask_sb=mask_strides[0], mask_ss=mask_strides[1], cu_stride=cu_stride, L=L, B=B, N=N, S=S,
                         E_DIV=E // meta["E_MULT"], inv_tau=1.0 / temperature, SPLITS=splits)
        arch = target_arch(device)
        plan = _PLANS[key] = SidePlan((L, B, splits), constants, spill_free(meta, "pool_routing_fwd", arch),
                                      spill_free(meta, "pool_routing_bwd", arch), E)
        if len(_PLANS) > _PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    return plan


def clear_plans():
    """Forget the cached launch plans (after changing ``tile_config``, ``SPILL_FREE_TILES`` or
    ``num_splits``)."""
    _PLANS.clear()


def _segments(mask, cu, device) -> dict:
    """The segmentation's tensor arguments by name, placeholders for absent tensors (their strides
    are in the plan)."""
    placeholder = _placeholder(device)
    return {"mask_ptr": mask if mask is not None else placeholder, "cu_ptr": cu if cu is not None else placeholder}


def _check_segments(cu, num_tokens: int, device: torch.device):
    if cu is not None and device.type == "cuda":
        args = runtime_args(check_segments,
                            {"cu_ptr": cu, "cu_stride": cu.stride(0), "B": cu.shape[0] - 1, "N": num_tokens})
        launch(check_segments, (1,), args, CHECK_CONFIG, device)


def pool_fwd(logits, mask, cu, score: str, temperature: float, device: torch.device):
    """Launch ``pool_routing_fwd`` over all layers and sequences of one side.

    Returns (partial fp32 [L, B, splits, E], count fp32 [B, splits]).
    """
    addressing, vec = layer_addressing(logits, device)
    plan = side_plan(logits, mask, cu, score, temperature, vec, device)
    L, B, splits = plan.grid
    partial = torch.empty((L, B, splits, plan.num_experts), dtype=torch.float32, device=device)
    count = torch.empty((B, splits), dtype=torch.float32, device=device)
    _check_segments(cu, plan.constants["N"], device)
    args = runtime_args(pool_routing_fwd, {**addressing, **_segments(mask, cu, device), "partial_ptr": partial,
                                           "count_ptr": count, **plan.constants})
    launch(pool_routing_fwd, plan.grid, args, plan.meta, device)
    return partial, count


def pool_bwd(logits, mask, cu, coef, scale, layer_coef, count, score: str, temperature: float, device):
    """∂L/∂z as one [L, N, E] buffer in the logits' dtype, for ∂L/∂P_{l,b} = g · coef[l, b, :] with
    g = scale[l, b] · layer_coef[l] (pair mode: ``scale`` broadcastable to [L, B]) or g = 1
    (``scale`` None), and n_b = count[b]."""
    addressing, vec = layer_addressing(logits, device)
    plan = side_plan(logits, mask, cu, score, temperature, vec, device)
    L, B, N = plan.constants["L"], plan.constants["B"], plan.constants["N"]
    grad = torch.empty((L, N, plan.num_experts), dtype=addressing["x0_ptr"].dtype, device=device)
    pair = scale is not None
    if pair:
        scale = scale.expand(L, B)  # a view: a scalar upstream gradient gets zero strides
        scale_strides = scale.stride()
    else:
        scale = layer_coef = _placeholder(device)
        scale_strides = (0, 0)
    coef_sl, coef_sb, coef_se = coef.stride()
    scale_sl, scale_sb = scale_strides
    args = runtime_args(pool_routing_bwd, {
        **addressing, **_segments(mask, cu, device),
        "coef_ptr": coef, "coef_sl": coef_sl, "coef_sb": coef_sb, "coef_se": coef_se,
        "scale_ptr": scale, "scale_sl": scale_sl, "scale_sb": scale_sb, "layer_coef_ptr": layer_coef,
        "count_ptr": count, "count_stride": count.stride(0), "grad_ptr": grad, **plan.constants,
    })
    launch(pool_routing_bwd, plan.grid, args, {**plan.bwd_meta, "PAIR": pair}, device)
    return grad
