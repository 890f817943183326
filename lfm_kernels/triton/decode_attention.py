"""Split-KV GQA decode attention in Triton (flash-decoding).

Stage 1: a program per (sequence, KV head, split of positions) loads the G query heads of the
group as one [G padded to 16, D] tile and walks its positions in blocks of BLOCK_N, scoring them
with one tl.dot against the [BLOCK_N, D] K block, so every K/V row is read once for the whole
group; it keeps an online softmax and writes its normalised partial output and log-sum-exp.
Stage 2: a program per (sequence, query head) merges the splits by their log-sum-exp.

The split count comes from batch x H_kv against the SM count so batch 1 still fills the chip. It
is derived from the cache length S rather than seq_lens, so choosing it never syncs with the host;
splits past a sequence's length exit at once and weigh nothing in the merge.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting

BLOCK_N = 64  # positions per K/V block (the tl.dot's N)
MAX_SPLITS = 128
_DEFAULT_SMS = 132  # H100's count, used when there is no CUDA device (the interpreter)


@triton.jit
def _attend_block(
    b_q, p_k0, p_v0, s_ks, s_vs, j0, end, scale, b_m, b_l, b_acc, o_n, o_d, m_d,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of the group's (m, l, acc) with positions [j0, min(j0 + BLOCK_N, end))."""
    o_pos = j0 + o_n
    m_n = o_pos < end
    m_kv = m_n[:, None] & m_d[None, :]
    # masked rows are never read: cache positions past the length may hold anything (NaN).
    # 64-bit: position x stride passes 2^31 for a long cache in a layout with a large position stride
    o_pos64 = o_pos.to(tl.int64)[:, None]
    b_k = tl.load(p_k0 + o_pos64 * s_ks + o_d[None, :], mask=m_kv, other=0.0)
    b_v = tl.load(p_v0 + o_pos64 * s_vs + o_d[None, :], mask=m_kv, other=0.0)
    if UPCAST:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale  # [BLOCK_G, BLOCK_N]
    b_s = tl.where(m_n[None, :], b_s, float("-inf"))
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    # a fully masked block (only in FIXED_TRIP mode) leaves m = -inf: keep exp's argument finite
    b_mn_safe = tl.where(b_mn == float("-inf"), 0.0, b_mn)
    b_p = tl.exp(b_s - b_mn_safe[:, None])
    b_alpha = tl.exp(b_m - b_mn_safe)  # 0 while nothing was seen yet
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    return b_mn, b_l, b_acc


@triton.jit
def _decode_attn_stage1(
    q,
    k,
    v,
    lens,
    mid_o,
    mid_lse,
    s_qb,
    s_qh,
    s_kb,
    s_kh,
    s_ks,
    s_vb,
    s_vh,
    s_vs,
    scale,
    S,
    split_len,
    H_KV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FIXED_TRIP: tl.constexpr,  # blocks per split when the loop bound must be static, else 0
):
    i_bh = tl.program_id(0)
    i_s = tl.program_id(1)
    # 64-bit: batch x cache stride passes 2^31 elements for large batches of long caches, and a
    # preallocated cache much longer than S can do the same with head x head stride
    i_b = (i_bh // H_KV).to(tl.int64)
    i_h = (i_bh % H_KV).to(tl.int64)
    # clamped so that an unchecked bad length can never read outside the cache
    seqlen = tl.minimum(tl.maximum(tl.load(lens + i_b).to(tl.int32), 0), S)
    start = i_s * split_len
    end = tl.minimum(start + split_len, seqlen)

    o_g = tl.arange(0, BLOCK_G)
    o_d = tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    m_g = o_g < G
    m_d = o_d < D

    p_q = q + i_b * s_qb + (i_h * G + o_g[:, None]) * s_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_g[:, None] & m_d[None, :], other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)

    b_m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_G], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    p_k0 = k + i_b * s_kb + i_h * s_kh
    p_v0 = v + i_b * s_vb + i_h * s_vh
    if FIXED_TRIP > 0:
        # The interpreter (with NumPy 2) cannot take a loop bound from a tensor: walk the split's
        # full length and let the masks drop positions past `end`.
        for i_n in range(0, FIXED_TRIP):
            b_m, b_l, b_acc = _attend_block(
                b_q, p_k0, p_v0, s_ks, s_vs, start + i_n * BLOCK_N, end, scale, b_m, b_l, b_acc,
                o_n, o_d, m_d, UPCAST, DOT_PRECISION,
            )
    else:
        for j0 in range(start, end, BLOCK_N):
            b_m, b_l, b_acc = _attend_block(
                b_q, p_k0, p_v0, s_ks, s_vs, j0, end, scale, b_m, b_l, b_acc,
                o_n, o_d, m_d, UPCAST, DOT_PRECISION,
            )

    # an empty split (past this sequence's length) stores lse = -inf and zeros: weight 0 in the merge
    b_has = b_l != 0  # a NaN sum is not an empty split: NaN in K or V must reach the output
    b_o = tl.where(b_has[:, None], b_acc / tl.where(b_has, b_l, 1.0)[:, None], 0.0)
    b_lse = tl.where(b_has, b_m + tl.log(tl.where(b_has, b_l, 1.0)), float("-inf"))
    o_row = (i_b * H_KV * G + i_h * G + o_g) * NUM_SPLITS + i_s
    tl.store(mid_o + o_row[:, None] * D + o_d[None, :], b_o, mask=m_g[:, None] & m_d[None, :])
    tl.store(mid_lse + o_row, b_lse, mask=m_g)


@triton.jit
def _decode_attn_stage2(
    mid_o,
    mid_lse,
    out,
    D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_bq = tl.program_id(0).to(tl.int64)  # b * Hq + query head; out is [B, Hq, D] contiguous
    o_s = tl.arange(0, BLOCK_S)
    o_d = tl.arange(0, BLOCK_D)
    m_s = o_s < NUM_SPLITS
    m_d = o_d < D
    b_lse = tl.load(mid_lse + i_bq * NUM_SPLITS + o_s, mask=m_s, other=float("-inf"))
    b_w = tl.exp(b_lse - tl.max(b_lse, 0))
    p_o = mid_o + (i_bq * NUM_SPLITS + o_s[:, None]) * D + o_d[None, :]
    b_o = tl.load(p_o, mask=m_s[:, None] & m_d[None, :], other=0.0)
    b_out = tl.sum(b_w[:, None] * b_o, 0) / tl.sum(b_w, 0)
    tl.store(out + i_bq * D + o_d, b_out.to(out.dtype.element_ty), mask=m_d)


def num_splits_for(batch: int, n_kv: int, max_len: int, device: torch.device) -> int:
    """Splits per (sequence, KV head) so about two stage-1 programs land on every SM."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = _DEFAULT_SMS
    want = triton.cdiv(2 * sms, max(1, batch * n_kv))
    return max(1, min(want, triton.cdiv(max_len, BLOCK_N), MAX_SPLITS))


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, D], caches [B, H_kv, S, D] (last dim contiguous), seq_lens [B] -> [B, Hq, D].

    Inputs are assumed validated (lfm_kernels.decode_attention does it). num_splits overrides the
    SM-based choice (tests use it to exercise the merge)."""
    batch, n_q, head_dim = q.shape
    n_kv, max_len = k_cache.shape[1], k_cache.shape[2]
    group = n_q // n_kv
    # the interpreter rounds fp32 -> bf16 stores by truncation: there the kernel writes fp32 and
    # torch rounds to nearest even
    out_dtype = torch.float32 if interpreting() else q.dtype
    out = torch.empty(batch, n_q, head_dim, dtype=out_dtype, device=q.device)
    if batch == 0:
        return out.to(q.dtype)
    if q.stride(-1) != 1:
        q = q.contiguous()
    splits = num_splits or num_splits_for(batch, n_kv, max_len, q.device)
    split_len = triton.cdiv(triton.cdiv(max_len, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(max_len, split_len)
    mid_o = torch.empty(batch, n_q, splits, head_dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(batch, n_q, splits, dtype=torch.float32, device=q.device)
    # the interpreter computes bf16/fp16 wrongly: upcast there; fp32 keeps exact (non-TF32) dots
    upcast = interpreting() or q.dtype == torch.float32
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_attn_stage1[(batch * n_kv, splits)](
        q,
        k_cache,
        v_cache,
        seq_lens,
        mid_o,
        mid_lse,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        float(scale),
        max_len,
        split_len,
        H_KV=n_kv,
        G=group,
        D=head_dim,
        NUM_SPLITS=splits,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d,
        BLOCK_N=BLOCK_N,
        UPCAST=upcast,
        DOT_PRECISION="ieee" if upcast else "tf32",
        FIXED_TRIP=split_len // BLOCK_N if interpreting() else 0,
        num_warps=4,
    )
    _decode_attn_stage2[(batch * n_q,)](
        mid_o,
        mid_lse,
        out,
        D=head_dim,
        NUM_SPLITS=splits,
        BLOCK_S=max(2, triton.next_power_of_2(splits)),
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out.to(q.dtype)
