"""Helpers shared by the Triton kernels of every op."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its Python interpreter (TRITON_INTERPRET=1, the CPU tests),
    which computes bf16/fp16 dots wrongly and cannot loop to a bound read from memory: the
    launchers pick interpreter-safe variants then."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tl_dtype(dtype: torch.dtype):
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


@triton.jit
def round_to(b_x, dtype: tl.constexpr):
    """b_x (fp32) rounded to dtype's precision, nearest-even, kept in fp32. bf16 is rounded with integer
    ops because a plain cast truncates under the Triton interpreter, and the conv state must match
    transformers bit for bit."""
    if dtype == tl.bfloat16:
        b_bits = b_x.to(tl.uint32, bitcast=True)
        b_bits = (b_bits + 0x7FFF + ((b_bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(b_x != b_x, b_x, b_bits.to(tl.float32, bitcast=True))
    elif dtype == tl.float16:
        return b_x.to(tl.float16).to(tl.float32)
    else:
        return b_x
