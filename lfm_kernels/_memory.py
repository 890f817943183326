"""Weight storage on transparent huge pages (Linux), for tensors the decode kernels stream.

A decode step reads every weight once from memory. On 4 KiB pages that is one page walk per 4 KiB
read, and the hardware prefetchers stop at every 4 KiB boundary; the kernels' GEMVs measured
1.12-1.22x faster on weights backed by 2 MiB pages (2-core Zen 4, bf16, M = 1: lm_head 128000 x 2048
17.7 -> 15.8 ms, 6144 x 2048 0.73 -> 0.60 ms, weights from DRAM), and on a 2-core Zen 5, 2048 x 2048
cold (share of the read probe) bf16 83 -> 89%, Q8_0 67 -> 73%, Q4_0 55 -> 58%.

Most Linux systems run transparent huge pages in "madvise" mode, where memory gets them only when
asked, before it is first written. So a big weight gets a fresh private anonymous mapping of its own
(not the C heap: glibc serves allocations under its dynamic mmap threshold, up to 32 MiB, from memory
freed earlier and already touched, which stays on small pages whatever the advice; loading the full
size Q4_0 model that way left a sixth of its 4-32 MiB weights off huge pages), marked MADV_HUGEPAGE,
and the tensor is a span of it starting on a 2 MiB boundary. The advice is only advice: with THP
"never", outside Linux or when any of this fails, the tensor is an ordinary one. Nothing changes a
value; the slack around the span (under 2 MiB) is never written, so never committed, and the part of
a weight past its last whole 2 MiB page stays on small pages rather than commit a page it half uses.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import mmap
import sys

import torch

_HUGE = 2 << 20  # bytes of an x86-64 huge page
_MIN_BYTES = 2 << 20  # smaller tensors: no whole huge page to gain
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
    tensors of 2 MiB or more). Call before the first write: pages already touched stay small."""
    nbytes = _nbytes(shape, dtype)
    if torch.device(device).type != "cpu" or nbytes < _MIN_BYTES or _madvise() is None:
        return torch.empty(*shape, dtype=dtype, device=device)
    buf = _fresh_mapping(nbytes + _HUGE)
    if buf is None:
        return torch.empty(*shape, dtype=dtype, device=device)
    start = buf.data_ptr()
    offset = (-start) % _HUGE
    span = (nbytes // _HUGE) * _HUGE
    _madvise()(start + offset, span, _MADV_HUGEPAGE)  # advice: a failure leaves small pages
    return buf[offset:offset + nbytes].view(dtype).view(*shape)


def scratch(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(*shape, dtype=dtype) on the CPU, for a big short-lived buffer (a checkpoint tensor on
    its way to being quantized): over a mapping of its own, handed back to the OS when the last view
    is freed. From the C heap, a freed buffer under glibc's dynamic mmap threshold (up to 32 MiB) stays
    in the process whenever anything allocated later sits above it: loading a 94 MB quantized model
    kept 40 MB of such freed buffers resident in one run of eight, the same file, nothing else changed."""
    nbytes = _nbytes(shape, dtype)
    buf = _fresh_mapping(nbytes) if nbytes >= _MIN_BYTES else None
    if buf is None:
        return torch.empty(*shape, dtype=dtype)
    return buf.view(dtype).view(*shape)


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty(0, dtype=dtype).element_size()


def _fresh_mapping(nbytes: int) -> torch.Tensor | None:
    """A uint8 tensor over a new private anonymous mapping of nbytes (untouched, so the huge-page advice
    can still take), which lives as long as any view of it; None where mmap cannot make one."""
    if not hasattr(mmap, "MAP_PRIVATE") or not hasattr(mmap, "MAP_ANONYMOUS"):
        return None
    try:
        mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError):
        return None
    # the tensor holds the buffer (and so the mapping) until its storage is freed
    return torch.frombuffer(mapping, dtype=torch.uint8)


def on_huge_pages(t):
    """A copy of t allocated by `empty` (t itself when it is small, not on the CPU or not contiguous).
    A QuantizedTensor comes back as one whose blocks were so copied, in the same format and layout."""
    from .quant import QuantizedTensor

    if isinstance(t, QuantizedTensor):
        data = on_huge_pages(t.data)
        return t if data is t.data else QuantizedTensor(data, t.format, t.shape, t.layout)
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() * t.element_size() < _MIN_BYTES:
        return t
    out = empty(*t.shape, dtype=t.dtype)
    out.copy_(t)
    return out


def huge_page_share(tensors) -> float | None:
    """The share of the bytes of `tensors` (CPU tensors, each counted once) that sit on transparent
    huge pages, from the AnonHugePages of the mappings holding them (Linux: /proc/self/smaps); None
    where that cannot be read. Where a weight is not on huge pages (THP off, or the kernel found no
    free 2 MiB page: memory fragmented) its decode reads pay a page walk per 4 KiB, so the benchmarks
    report it. A mapping's huge pages are credited to the weights inside it up to their bytes there."""
    spans = {}
    for t in tensors:
        if t.device.type == "cpu" and t.numel():
            spans[t.data_ptr()] = t.numel() * t.element_size()
    total = sum(spans.values())
    if not total:
        return None
    try:
        with open("/proc/self/smaps") as f:
            mappings, cur = [], None
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = head.split("-")
                    cur = [int(lo, 16), int(hi, 16), 0]
                    mappings.append(cur)
                elif head == "AnonHugePages:" and cur is not None:
                    cur[2] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    huge = 0
    for lo, hi, anon_huge in mappings:
        if anon_huge:
            inside = sum(max(0, min(hi, p + n) - max(lo, p)) for p, n in spans.items())
            huge += min(anon_huge, inside)
    return min(1.0, huge / total)
