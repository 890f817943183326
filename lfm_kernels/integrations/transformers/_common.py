"""What every replaced module checks before taking a kernel, and how it finds the kernel."""

from __future__ import annotations

from typing import Callable

import torch

import lfm_kernels

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL_DEVICES = ("cpu", "cuda")


def kernel(op: str) -> Callable:
    """The public op, looked up per call (so a caller can substitute it, as the tests do)."""
    return getattr(lfm_kernels, op)


def no_grad_needed(*tensors) -> bool:
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


def kernel_device(t: torch.Tensor) -> bool:
    return t.device.type in _KERNEL_DEVICES
