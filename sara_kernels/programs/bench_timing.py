"""Measurement helpers of ``python -m sara_kernels bench`` and ``benchmarks/``: device facts,
L2-cold timing, copy bandwidth, peak memory and result files.

Why L2-cold: an H100 keeps 50 MB in L2. A benchmark that calls the op again and again on the
same small inputs reads them from L2 after the first call and reports a bandwidth no
training step ever sees (the router logits of a real step were written long before the
loss reads them). So every timed call reads inputs that have not been touched for at least
``L2_COLD_FACTOR`` × L2 bytes: the caller rotates over enough copies of the inputs, and a
pass that must run untimed work first (the forward before a timed backward) flushes L2
afterwards by reading a buffer of that size.

Why CUDA events and medians: events time the GPU stream, including the gaps where the GPU
waits for the host to launch the next kernel (which is the op's real cost in a step), and
the median of many repetitions ignores the odd slow call (clock ramp, another process).
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch

DEFAULT_L2_BYTES = 50 * 2**20  # H100's L2, used when the device does not report its own
L2_COLD_FACTOR = 4  # bytes touched between two reads of the same input, in L2 sizes
MAX_COPIES = 30  # input copies rotated at most (the op's pointer-table cache holds 64 entries)


def l2_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        if size:
            return int(size)
    return DEFAULT_L2_BYTES


def environment(device: torch.device) -> dict:
    """Card, versions and date: what a reader needs to reproduce or compare a result."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "device": str(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "l2_bytes": l2_cache_bytes(device),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(sm_count=props.multi_processor_count, memory_bytes=props.total_memory,
                    capability=f"{props.major}.{props.minor}")
    return info


def device_problem(device: torch.device, tiny: bool, cpu_hint: str = "") -> str:
    """Why a benchmark cannot run on ``device`` ("" when it can): real shapes need a GPU; the CPU
    only checks a script's logic at tiny shapes."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"no CUDA device: run on a GPU, or check the logic with --device cpu --tiny{cpu_hint}"
    if device.type == "cpu" and not tiny:
        return "--device cpu needs --tiny: the real shapes are for a GPU"
    return ""


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copies_for(bytes_per_copy: int, l2_bytes: int) -> int:
    """How many input copies to rotate so that one copy is reread only after ≥ L2_COLD_FACTOR·L2 bytes."""
    wanted = math.ceil(L2_COLD_FACTOR * l2_bytes / max(bytes_per_copy, 1))
    return max(1, min(MAX_COPIES, wanted))


class L2Flusher:
    """Evicts L2 by reading (not writing: no dirty lines to write back later) a large buffer."""

    def __init__(self, device: torch.device, l2_bytes: int):
        self.buffer = torch.ones(L2_COLD_FACTOR * l2_bytes // 4, dtype=torch.float32, device=device)

    def __call__(self):
        self.buffer.sum()


def time_calls(
    device: torch.device,
    call: Callable[[int, Any], Any],
    *,
    copies: int,
    reps: int,
    warmup: int,
    prepare: Optional[Callable[[int], Any]] = None,
    flush: Optional[Callable[[], None]] = None,
) -> list:
    """Milliseconds of ``call(i, prepared)`` for ``reps`` repetitions, i cycling over the copies.

    ``prepare(i)`` runs untimed before each call (e.g. the forward whose backward is timed),
    then ``flush()`` if given. Results of a call are dropped before the next one.
    """
    for r in range(warmup):
        state = prepare(r % copies) if prepare else None
        call(r % copies, state)
        del state
    synchronize(device)
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for r, (start, end) in enumerate(events):
            state = prepare(r % copies) if prepare else None
            if flush:
                flush()
            start.record()
            call(r % copies, state)
            end.record()
            del state
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for r in range(reps):
            state = prepare(r % copies) if prepare else None
            start = time.perf_counter()
            call(r % copies, state)
            times.append(1e3 * (time.perf_counter() - start))
            del state
    return times


def median(values) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values, q: float) -> float:
    """The q-th percentile (0-100, linear interpolation) of ``values``; the spread of a timing
    is reported as p20 / p50 / p80 beside its median."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


HOST_CALLS = 20  # calls issued per host-time measurement
GPU_BUSY_MS = 200  # GPU sleep queued before them


def host_ms_per_call(device: torch.device, call: Callable[[int], Any], copies: int, calls: int = HOST_CALLS) -> float:
    """CPU milliseconds to issue one ``call(i)`` while the GPU is busy: what the op costs the
    host in a training step, where the GPU runs behind the CPU.

    A long sleep kernel is queued first, so no call can wait for the GPU unless it synchronises
    (a hidden sync would show up here as the sleep's length). Results are dropped as they come:
    the caching allocator reuses their memory in stream order, as in training.
    """
    synchronize(device)
    if device.type == "cuda":
        clock_khz = getattr(torch.cuda.get_device_properties(device), "clock_rate", 0) or 2_000_000
        torch.cuda._sleep(int(GPU_BUSY_MS * clock_khz))
    start = time.perf_counter()
    for i in range(calls):
        call(i % copies)
    elapsed = time.perf_counter() - start
    synchronize(device)
    return 1e3 * elapsed / calls


def copy_bandwidth(device: torch.device, l2_bytes: int, reps: int = 20) -> dict:
    """Device-to-device ``copy_`` bandwidth (bytes read + written per second), the roofline the
    op's minimum traffic is compared with. The tensor is many times L2, so the copy is L2-cold."""
    nbytes = max(2**30, 16 * l2_bytes) if device.type == "cuda" else 2**26
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    times = time_calls(device, lambda i, _: dst.copy_(src), copies=1, reps=reps, warmup=3)
    ms = median(times)
    return {"bytes_per_copy": 2 * nbytes, "median_ms": ms, "gbps": 2 * nbytes / (ms * 1e-3) / 1e9}


def peak_extra_bytes(device: torch.device, fn: Callable[[], Any]):
    """(result of fn(), peak bytes allocated during fn beyond what was allocated before it).

    ``None`` on the CPU, where PyTorch keeps no allocator statistics.
    """
    if device.type != "cuda":
        return fn(), None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    synchronize(device)
    return out, torch.cuda.max_memory_allocated(device) - before


def release_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def write_json(path, payload: dict):
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)


def write_csv(path, rows: list, columns: list):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
