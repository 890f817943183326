"""Benchmark plumbing shared by `lfm-kernels bench` and the pytest-benchmark suites in bench/.

Each op contributes a module lfm_kernels/benchmark/<op>.py with `cases(device, quick) -> list[Case]`;
the command and bench/ both time exactly those cases, so their figures agree.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Case:
    op: str  # "short_conv", "moe", ...
    name: str  # readable shape id, e.g. "decode-B1-T1-D2048"
    dtype: torch.dtype
    device: str
    make_inputs: Callable[[], dict]  # fresh random inputs (never zeros)
    kernel: Callable[[dict], Any]  # our op
    baselines: dict[str, Callable[[dict], Any]] = field(default_factory=dict)  # "eager", "sdpa", ...
    bytes_moved: int = 0  # fewest bytes read + written through memory
    flops: int = 0
    compute_bound: bool = False  # report GFLOP/s against compute rather than GB/s against bandwidth
    backend: str = ""  # which implementation `kernel` runs: avx2 / portable / triton / reference


def time_cpu(fn: Callable[[], Any], *, repeats: int = 20, warmup: int = 3, min_time: float = 0.0) -> float:
    """Median wall time of fn() in seconds over `repeats` runs (after `warmup`)."""
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < repeats or (time.perf_counter() - start) < min_time:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 10 * repeats:
            break
    return statistics.median(samples)


def time_cuda(fn: Callable[[], Any]) -> float:
    """Median device time in seconds (CUDA events through triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def time_fn(fn: Callable[[], Any], device: str, **kw) -> float:
    return time_cuda(fn) if device.startswith("cuda") else time_cpu(fn, **kw)


def measure_read_bandwidth(device: str = "cpu", nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second this machine reads from memory, with all threads (a reduction over a buffer
    far larger than the last-level cache). On CUDA: device-to-device copy, bytes read + written."""
    if device.startswith("cuda"):
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        t = time_cuda(lambda: dst.copy_(src))
        return 2 * nbytes / t
    buf = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    t = time_cpu(lambda: buf.sum(), repeats=repeats, warmup=1)
    return nbytes / t
