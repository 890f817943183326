"""Every `nn.Linear` of a patched model: `lfm_kernels.linear` for CPU bf16/fp32 inference."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import lfm_kernels

from . import _ledger
from ._common import no_grad_needed

_LINEAR_DTYPES = (torch.float32, torch.bfloat16)


class KernelLinear(nn.Linear):
    """nn.Linear whose CPU bf16/fp32 inference runs `lfm_kernels.linear` (set on instances by patch)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's argument name
        weight = self.weight
        if (
            input.device.type == "cpu"
            and weight.device.type == "cpu"
            and weight.dtype in _LINEAR_DTYPES
            and input.dtype == weight.dtype
            and input.dim() >= 1
            and no_grad_needed(input, weight, self.bias)
        ):
            return lfm_kernels.linear(input, weight, self.bias)  # takes [..., K] as F.linear does
        return F.linear(input, weight, self.bias)

    def __setstate__(self, state):
        # copy.deepcopy of a patched model rebuilds its modules through here: track the copy as well,
        # so unpatch() turns it back into an nn.Linear like the original.
        super().__setstate__(state)
        _ledger.track(self)
