"""Weight storage on transparent huge pages (Linux), for tensors the decode kernels stream.

A decode step reads every weight once from memory. On 4 KiB pages that is one page walk per 4 KiB
read; the kernels' GEMVs measured 1.12-1.22x faster on weights backed by 2 MiB pages (2-core Zen 4,
bf16, M = 1: lm_head 128000 x 2048 17.7 -> 15.8 ms, 6144 x 2048 0.73 -> 0.60 ms, weights from DRAM).
Most Linux systems run transparent huge pages in "madvise" mode, where memory gets them only when
asked, before it is first written, so big weights are allocated here: a 2 MiB-aligned span of a
larger buffer, marked MADV_HUGEPAGE, then returned as a view. The advice is only advice: with THP
"never", outside Linux or when madvise fails, the tensor is an ordinary one. Nothing changes a
value; the slack around the span (under 2 MiB) is never written, so never committed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import sys

import torch

_HUGE = 2 << 20  # bytes of an x86-64 huge page
_MIN_BYTES = 4 << 20  # smaller tensors: not worth the alignment slack
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


def empty(*shape: int, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """torch.empty(*shape, dtype=dtype, device=device), on huge pages where the OS grants them (CPU
    tensors of 4 MiB or more). Call before the first write: pages already touched stay small."""
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    madvise = _madvise()
    if torch.device(device).type != "cpu" or nbytes < _MIN_BYTES or madvise is None:
        return torch.empty(*shape, dtype=dtype, device=device)
    buf = torch.empty(nbytes + _HUGE, dtype=torch.uint8)
    start = buf.data_ptr()
    offset = (-start) % _HUGE
    span = (nbytes // _HUGE) * _HUGE
    if span:
        madvise(start + offset, span, _MADV_HUGEPAGE)  # advice: a failure leaves small pages
    return buf[offset:offset + nbytes].view(dtype).view(*shape)


def on_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of t allocated by `empty` (t itself when it is small, not on the CPU or not contiguous)."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() * t.element_size() < _MIN_BYTES:
        return t
    out = empty(*t.shape, dtype=t.dtype)
    out.copy_(t)
    return out


def huge_page_bytes() -> int | None:
    """Bytes of this process's anonymous memory on transparent huge pages (Linux: AnonHugePages of
    /proc/self/smaps_rollup), or None where that cannot be read. Where a weight is not on huge pages
    (the kernel found no free 2 MiB page: memory fragmented) its decode reads pay a page walk per 4 KiB,
    so the benchmarks report the share of the weights that got them."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
