"""Benchmark cases for GQA decode attention at LFM2.5-8B-A1B's shape (Hq 32, H_kv 8, head_dim 64).

One query token per sequence against a cache of `context` positions, all of them valid. The floor
is reading K and V once (plus q and the output); baselines are PyTorch's SDPA with enable_gqa and
transformers' eager attention (repeat_kv, matmul, fp32 softmax, matmul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend
from ..ops.decode_attention import decode_attention
from .core import Case

N_Q, N_KV, HEAD_DIM = 32, 8, 64
# transformers' eager path materialises repeat_kv copies of K and V (Hq / H_kv times the cache);
# cases where those copies would pass this size skip that baseline to stay within memory
_EAGER_MAX_BYTES = 1 << 30


def _sdpa(inp: dict) -> torch.Tensor:
    """PyTorch's fused attention over the valid length (equal for every sequence here)."""
    length = inp["length"]
    q, k, v = inp["q"], inp["k_cache"][:, :, :length], inp["v_cache"][:, :, :length]
    return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=inp["scale"], enable_gqa=True)[:, :, 0]


def _hf_eager(inp: dict) -> torch.Tensor:
    """transformers' eager_attention_forward for one query token (no mask needed: all positions valid)."""
    length = inp["length"]
    q, k, v = inp["q"], inp["k_cache"][:, :, :length], inp["v_cache"][:, :, :length]
    groups = q.shape[1] // k.shape[1]
    batch, n_kv, seqlen, head_dim = k.shape
    k = k[:, :, None].expand(batch, n_kv, groups, seqlen, head_dim).reshape(batch, n_kv * groups, seqlen, head_dim)
    v = v[:, :, None].expand(batch, n_kv, groups, seqlen, head_dim).reshape(batch, n_kv * groups, seqlen, head_dim)
    weights = torch.matmul(q[:, :, None], k.transpose(2, 3)) * inp["scale"]
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)[:, :, 0]


def cases(device: str = "cpu", quick: bool = False) -> list[Case]:
    dtypes = [torch.bfloat16] if device.startswith("cuda") else [torch.bfloat16, torch.float32]
    if quick:
        shapes = [(1, 1024), (1, 8192)]
    else:
        shapes = [(batch, ctx) for ctx in (1024, 8192, 32768) for batch in (1, 8)]
    out = []
    for dtype in dtypes:
        size = torch.finfo(dtype).bits // 8
        for batch, ctx in shapes:

            def make(batch=batch, ctx=ctx, dtype=dtype):
                return {
                    "q": torch.randn(batch, N_Q, HEAD_DIM, device=device).to(dtype),
                    "k_cache": torch.randn(batch, N_KV, ctx, HEAD_DIM, device=device).to(dtype),
                    "v_cache": torch.randn(batch, N_KV, ctx, HEAD_DIM, device=device).to(dtype),
                    "seq_lens": torch.full((batch,), ctx, dtype=torch.int32, device=device),
                    "length": ctx,
                    "scale": HEAD_DIM**-0.5,
                }

            cache_bytes = 2 * batch * N_KV * ctx * HEAD_DIM * size
            moved = cache_bytes + 2 * batch * N_Q * HEAD_DIM * size
            baselines = {"sdpa": _sdpa}
            if cache_bytes * (N_Q // N_KV) <= _EAGER_MAX_BYTES:
                baselines["eager"] = _hf_eager  # transformers' eager attention (repeat_kv)
            out.append(
                Case(
                    op="decode_attention",
                    name=f"ctx{ctx // 1024}k-B{batch}-Hq{N_Q}-Hkv{N_KV}-D{HEAD_DIM}",
                    dtype=dtype,
                    device=device,
                    make_inputs=make,
                    # as a decode loop calls it (lengths built in range): on CUDA the lengths check
                    # is a host sync per call, which would time the sync and forbid graph capture
                    kernel=lambda i: decode_attention(i["q"], i["k_cache"], i["v_cache"], i["seq_lens"], i["scale"],
                                                      check_lengths=False),
                    baselines=baselines,
                    bytes_moved=moved,
                    flops=4 * batch * N_Q * ctx * HEAD_DIM,
                    backend=_backend.backend_for(torch.empty(0, device=device)),
                )
            )
    return out
