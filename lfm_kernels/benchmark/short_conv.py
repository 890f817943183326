"""Benchmark cases for the fused gated short conv at LFM2.5-8B-A1B's width (D = 2048, L = 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend, reference
from ..ops.short_conv import short_conv
from .core import Case

DIM, WIDTH = 2048, 3


def _hf_eager(inp: dict) -> torch.Tensor:
    """What transformers' Lfm2MoeShortConv does between in_proj and out_proj (its eager path)."""
    bcx, weight, state = inp["bcx"], inp["weight"], inp["conv_state"]
    b, c, x = bcx.transpose(-1, -2).chunk(3, dim=-2)
    u = b * x
    seqlen = u.shape[-1]
    if seqlen == 1:
        full = torch.cat([state, u], dim=-1).to(weight.dtype)
        state.copy_(full[:, :, -WIDTH:])
        out = F.conv1d(full, weight.unsqueeze(1), groups=u.shape[1])[:, :, -1:]
    else:
        state.copy_(F.pad(u, (max(WIDTH - seqlen, 0), 0))[:, :, -WIDTH:])
        out = F.conv1d(u.to(weight.dtype), weight.unsqueeze(1), padding=WIDTH - 1, groups=u.shape[1])[:, :, :seqlen]
    return (c * out.to(u.dtype)).transpose(-1, -2).contiguous()


def cases(device: str = "cpu", quick: bool = False) -> list[Case]:
    dtypes = [torch.bfloat16] if device.startswith("cuda") else [torch.bfloat16, torch.float32]
    shapes = [("decode", 1, 1), ("prefill", 1, 128 if quick else 512)]
    out = []
    for dtype in dtypes:
        for kind, batch, seqlen in shapes:

            def make(batch=batch, seqlen=seqlen, dtype=dtype):
                return {
                    "bcx": torch.randn(batch, seqlen, 3 * DIM, dtype=dtype, device=device),
                    "weight": torch.randn(DIM, WIDTH, dtype=dtype, device=device) * 0.5,
                    # A prefill starts a sequence: transformers' prefill ignores any earlier history,
                    # so the state going in is empty (it is an output there); a decode step reads it.
                    "conv_state": (
                        torch.randn(batch, DIM, WIDTH, device=device).to(dtype)
                        if seqlen == 1
                        else torch.zeros(batch, DIM, WIDTH, dtype=dtype, device=device)
                    ),
                }

            size = torch.finfo(dtype).bits // 8
            moved = batch * seqlen * 4 * DIM * size + 2 * batch * DIM * WIDTH * size + DIM * WIDTH * size
            out.append(
                Case(
                    op="short_conv",
                    name=f"{kind}-B{batch}-T{seqlen}-D{DIM}",
                    dtype=dtype,
                    device=device,
                    make_inputs=make,
                    kernel=lambda i: short_conv(i["bcx"], i["weight"], None, i["conv_state"]),
                    baselines={
                        "eager": _hf_eager,
                        "reference": lambda i: reference.short_conv(i["bcx"], i["weight"], None, i["conv_state"]),
                    },
                    bytes_moved=moved,
                    backend=_backend.backend_for(torch.empty(0, device=device)),
                )
            )
    return out
