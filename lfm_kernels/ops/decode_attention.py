"""GQA decode attention: one query token per sequence against transformers-layout KV caches.

`decode_attention` is the part of a decode step that grows with the context. The kernels split the
valid cache positions of each sequence into chunks (flash-decoding): every chunk produces a partial
output with its log-sum-exp and the partials are merged at the end, so even batch 1 spreads over
all CPU threads / GPU SMs; the K and V rows of a KV head are read once for all the query heads of
its GQA group. Softmax and accumulation are float32 whatever the input dtype.
"""

from __future__ import annotations

import numbers

import torch

from .. import _backend, reference
from ._checks import FLOAT_DTYPES, check_no_grad, check_same_device, check_same_dtype, check_shape, check_tensor

_Q_SHAPE = "[B, Hq, D] (one query token per sequence)"
_KV_SHAPE = "[B, H_kv, S, D] (transformers' KV cache layout)"
# Head dims the CPU extension has AVX2 kernels for; any other D runs its portable C++ loop (CPU)
# or the same Triton kernel with a padded, masked head dim (CUDA): correct, just not tuned.
FAST_HEAD_DIMS = (64, 128)


def _tuned_head_dim(head_dim: int) -> bool:
    """Whether head_dim has a tuned kernel (callers that may route elsewhere ask this)."""
    return head_dim in FAST_HEAD_DIMS


def _decode_attention_impl(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    if q.device.type == "cuda" and _backend.triton_available():
        from ..triton.decode_attention import decode_attention_triton

        return decode_attention_triton(q, k_cache, v_cache, seq_lens, scale)
    if q.device.type == "cpu" and _backend.cpu_extension_available():
        return torch.ops.lfm_kernels_cpu.decode_attention.default(q, k_cache, v_cache, seq_lens, scale)
    return reference.decode_attention(q, k_cache, v_cache, seq_lens, scale)


_decode_attention_op = torch.library.custom_op("lfm_kernels::decode_attention", _decode_attention_impl, mutates_args=())


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, seq_lens, scale):
    return q.new_empty(q.shape)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    check_lengths: bool = True,
) -> torch.Tensor:
    """softmax(q . K^T * scale) . V over each sequence's first seq_lens[b] cache positions: [B, Hq, D].

    Args:
        q: [B, Hq, D] float32 / bfloat16 / float16, the new token's (normed, rotated) queries.
        k_cache, v_cache: [B, H_kv, S, D] in q's dtype (transformers' layout). Strided views are
            fine, e.g. a slice of a longer preallocated cache; a last dim that is not contiguous
            is copied first. Positions at and past seq_lens[b] are never read (may hold anything).
        seq_lens: [B] int32 / int64 on q's device, each in [1, S]: how many cache positions
            (including the new token's own, already written) sequence b attends to.
        scale: softmax scale, usually D ** -0.5.
        check_lengths: validate the values of seq_lens (a ValueError naming seq_lens). On CUDA this
            reads seq_lens back to the host, a device sync per call; a decode loop that builds its
            lengths itself may pass False (the Triton kernel then clamps lengths into [0, S], so a
            bad value gives a wrong row, never an out-of-bounds read). Skipped while torch.compile
            traces, where the data is not available. On CPU the check is free and the extension
            re-checks anyway.
    Query head h uses KV head h // (Hq // H_kv), as transformers' repeat_kv does. D = 64 and 128
    have tuned CPU kernels; other head dims are computed correctly by slower code. Returns q's dtype.
    A NaN in q, K or V gives NaN in the affected outputs on every path, as the reference's softmax
    does. Meta tensors give a meta result of the right shape (the seq_lens check needs data and is
    skipped). No autograd: with grad mode on, an input that requires grad is a RuntimeError.
    """
    check_no_grad("decode_attention", q=q, k_cache=k_cache, v_cache=v_cache)
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, shape_hint=_Q_SHAPE)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES, shape_hint=_KV_SHAPE)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=FLOAT_DTYPES, shape_hint=_KV_SHAPE)
    batch, n_q, head_dim = q.shape
    _, n_kv, max_len, _ = k_cache.shape
    check_shape("k_cache", k_cache, (batch, None, None, head_dim), _KV_SHAPE + " with q's B and D")
    check_shape("v_cache", v_cache, tuple(k_cache.shape), "[B, H_kv, S, D], the shape of k_cache")
    if n_kv == 0 or n_q == 0 or n_q % n_kv != 0:
        raise ValueError(
            f"q's head count Hq={n_q} must be a positive multiple of the caches' H_kv={n_kv} (GQA groups)"
        )
    if head_dim == 0:
        raise ValueError("q's head dim D must be positive")
    if max_len == 0:
        raise ValueError(f"k_cache must hold at least one position (S >= 1), got shape {tuple(k_cache.shape)}")
    check_same_dtype("q", q, k_cache=k_cache, v_cache=v_cache)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32, torch.int64), shape_hint="[B]")
    check_shape("seq_lens", seq_lens, (batch,), "[B]")
    check_same_device("q", q, k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float (usually D ** -0.5), got {type(scale).__name__}")
    scale = float(scale)
    if check_lengths and batch > 0 and q.device.type != "meta" and not _compiling():
        lo, hi = int(seq_lens.min()), int(seq_lens.max())
        if lo < 1 or hi > max_len:
            raise ValueError(
                f"seq_lens values must be in [1, S={max_len}] (S = k_cache.shape[2]), got min {lo}, max {hi}"
            )
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1:
        k_cache = k_cache.contiguous()
    if v_cache.stride(-1) != 1:
        v_cache = v_cache.contiguous()
    op = _decode_attention_impl if _backend.eager_cpu_fast_path(q) else _decode_attention_op
    return op(q, k_cache, v_cache, seq_lens, scale)


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False
