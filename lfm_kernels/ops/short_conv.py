"""Fused double-gated short convolution: y = C * causal_depthwise_conv(B * x).

`short_conv` takes the in_proj output directly, so B*x, the width-L causal conv over time, and the
C gate happen in one pass that reads `bcx` once and writes `y` once; `conv_state` (transformers'
[B, D, L] layout) carries the history between calls and is updated in place.
"""

from __future__ import annotations

import torch

from .. import _backend, reference
from ._checks import (
    FLOAT_DTYPES,
    check_no_grad,
    check_no_internal_overlap,
    check_no_shared_memory,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
)

_SHAPE = "[B, T, 3D] (the in_proj output: chunks B, C, x)"


def _short_conv_impl(
    bcx: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    if bcx.device.type == "cuda" and _backend.triton_available():
        from ..triton.short_conv import short_conv_triton

        return short_conv_triton(bcx, weight, bias, conv_state, attention_mask)
    if bcx.device.type == "cpu" and _backend.cpu_extension_available():
        return torch.ops.lfm_kernels_cpu.short_conv.default(bcx, weight, bias, conv_state, attention_mask, None)
    return reference.short_conv(bcx, weight, bias, conv_state, attention_mask)


_short_conv_op = torch.library.custom_op("lfm_kernels::short_conv", _short_conv_impl, mutates_args=("conv_state",))


@_short_conv_op.register_fake
def _(bcx, weight, bias, conv_state, attention_mask):
    batch, seqlen, d3 = bcx.shape
    return bcx.new_empty(batch, seqlen, d3 // 3)


def short_conv(
    bcx: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    conv_state: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """LFM2's gated short conv from the in_proj output on: returns y = C * conv(B * x) as [B, T, D].

    Args:
        bcx: [B, T, 3D] float32 / bfloat16 / float16, chunks B, C, x in that order (any strides).
        weight: [D, L] depthwise conv taps, L in 2..4 (LFM2 uses L = conv_L_cache = 3).
        bias: optional [D] conv bias.
        conv_state: optional [B, D, L] in bcx's dtype: the last L values of B*x before the first
            token (zeros for a new sequence). Updated in place to the last L values after the last
            token, exactly what transformers' cache holds. T = 1 with a state is the decode step.
            Its elements must be distinct (no expanded, stride-0 tensor) and it must not share
            memory with the other arguments: a ValueError otherwise, as torch's in-place ops refuse.
        attention_mask: optional [B, T] (bool or 0/1): positions with 0 count as zero input, as
            transformers' padding mask does (they give y = 0 and do not reach the state).
    All arithmetic is float32; y is in bcx's dtype. No autograd: with grad mode on, an input that
    requires grad is a RuntimeError.
    """
    check_no_grad("short_conv", bcx=bcx, weight=weight, bias=bias, conv_state=conv_state)
    check_tensor("bcx", bcx, ndim=3, dtypes=FLOAT_DTYPES, shape_hint=_SHAPE)
    batch, seqlen, d3 = bcx.shape
    if d3 % 3 != 0 or d3 == 0:
        raise ValueError(f"bcx's last dimension must be 3*D (chunks B, C, x), got {d3}, not divisible by 3")
    dim = d3 // 3
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, shape_hint="[D, L]")
    if weight.shape[0] != dim or not 2 <= weight.shape[1] <= 4:
        raise ValueError(f"weight must have shape [D={dim}, L] with L in 2..4, got {tuple(weight.shape)}")
    width = weight.shape[1]
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
        check_shape("bias", bias, (dim,))
    if conv_state is not None:
        check_tensor("conv_state", conv_state, ndim=3, dtypes=FLOAT_DTYPES, shape_hint="[B, D, L]")
        check_shape("conv_state", conv_state, (batch, dim, width), "[B, D, L]")
        check_same_dtype("bcx", bcx, conv_state=conv_state)
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndim=2, shape_hint="[B, T]")
        check_shape("attention_mask", attention_mask, (batch, seqlen), "[B, T]")
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            attention_mask = attention_mask != 0
    check_same_device("bcx", bcx, weight=weight, bias=bias, conv_state=conv_state, attention_mask=attention_mask)
    if conv_state is not None and not (bcx.device.type == "cpu" and _backend.cpu_extension_available()):
        # written in place by parallel tasks: like torch's in-place ops, refuse overlapping elements
        # and memory shared with an input (the C++ op makes the same checks itself, at no Python cost
        # on the decode path)
        check_no_internal_overlap("conv_state", conv_state)
        check_no_shared_memory("conv_state", conv_state, bcx=bcx, weight=weight, bias=bias, attention_mask=attention_mask)
    op = _short_conv_impl if _backend.eager_cpu_fast_path(bcx) else _short_conv_op
    return op(bcx, weight, bias, conv_state, attention_mask)
