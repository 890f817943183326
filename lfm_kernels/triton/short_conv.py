"""Triton kernel for the fused gated short conv: y = C * causal_depthwise_conv(B * x) (see ops/short_conv.py).

One program owns a block of channels of one sequence and walks its tokens in order, keeping the last
L values of B*x in registers: bcx is read once, y written once, conv_state read at the start and
written at the end. Work is B x ceil(D / BLOCK_D) programs; LFM2's D = 2048 gives 16-32 per sequence.
Taps are padded on the left to 4 (the widest conv this op accepts), so one code path serves L in 2..4.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_WIDTH = 4


@triton.jit
def _round_to(x, ty: tl.constexpr):
    """x (fp32) rounded to ty, returned in fp32. bf16 rounds to nearest-even in integer arithmetic, because
    Triton's interpreter truncates on a bf16 cast while GPUs round: both give the same bits this way."""
    if ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(ty).to(tl.float32)


@triton.jit
def _short_conv_kernel(
    p_bcx,
    p_weight,
    p_bias,
    p_state,
    p_mask,
    p_y,
    T,
    D,
    s_bb,
    s_bt,
    s_bd,
    s_sb,
    s_sd,
    s_sl,
    s_mb,
    s_mt,
    WIDTH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_STATE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_b = tl.program_id(0)
    i_d = tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    PAD: tl.constexpr = 4 - WIDTH

    # Taps w0..w3 (w0 oldest); slots left of the real width hold zero weight and zero history.
    b_w0 = tl.load(p_weight + o_d * WIDTH + (0 - PAD), mask=m_d & (PAD <= 0), other=0.0).to(tl.float32)
    b_w1 = tl.load(p_weight + o_d * WIDTH + (1 - PAD), mask=m_d & (PAD <= 1), other=0.0).to(tl.float32)
    b_w2 = tl.load(p_weight + o_d * WIDTH + (2 - PAD), mask=m_d & (PAD <= 2), other=0.0).to(tl.float32)
    b_w3 = tl.load(p_weight + o_d * WIDTH + (3 - PAD), mask=m_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_bias = tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    else:
        b_bias = tl.zeros([BLOCK_D], dtype=tl.float32)

    p_st = p_state + i_b * s_sb + o_d * s_sd
    if HAS_STATE:
        b_s0 = tl.load(p_st + (0 - PAD) * s_sl, mask=m_d & (PAD <= 0), other=0.0).to(tl.float32)
        b_s1 = tl.load(p_st + (1 - PAD) * s_sl, mask=m_d & (PAD <= 1), other=0.0).to(tl.float32)
        b_s2 = tl.load(p_st + (2 - PAD) * s_sl, mask=m_d & (PAD <= 2), other=0.0).to(tl.float32)
        b_s3 = tl.load(p_st + (3 - PAD) * s_sl, mask=m_d, other=0.0).to(tl.float32)
    else:
        b_s0 = tl.zeros([BLOCK_D], dtype=tl.float32)
        b_s1 = tl.zeros([BLOCK_D], dtype=tl.float32)
        b_s2 = tl.zeros([BLOCK_D], dtype=tl.float32)
        b_s3 = tl.zeros([BLOCK_D], dtype=tl.float32)

    p_row = p_bcx + i_b * s_bb + o_d * s_bd
    p_out = p_y + i_b * T * D + o_d
    # A while loop rather than range(T): Triton's interpreter cannot index with a runtime scalar
    # under numpy 2 (int() of a one-element array), and a sequential loop compiles the same either way.
    t = 0
    while t < T:
        b_b = tl.load(p_row + t * s_bt, mask=m_d, other=0.0).to(tl.float32)
        b_c = tl.load(p_row + t * s_bt + D * s_bd, mask=m_d, other=0.0).to(tl.float32)
        b_x = tl.load(p_row + t * s_bt + 2 * D * s_bd, mask=m_d, other=0.0).to(tl.float32)
        if HAS_MASK:
            keep = tl.load(p_mask + i_b * s_mb + t * s_mt) != 0
            b_b = tl.where(keep, b_b, 0.0)
            b_c = tl.where(keep, b_c, 0.0)
        # B*x is what transformers stores in the cache, in the model dtype: round it the same way.
        b_u = _round_to(b_b * b_x, p_y.dtype.element_ty)
        b_s0 = b_s1
        b_s1 = b_s2
        b_s2 = b_s3
        b_s3 = b_u
        b_o = b_w0 * b_s0 + b_w1 * b_s1 + b_w2 * b_s2 + b_w3 * b_s3 + b_bias
        tl.store(p_out + t * D, _round_to(b_c * b_o, p_y.dtype.element_ty).to(p_y.dtype.element_ty), mask=m_d)
        t += 1

    if HAS_STATE:
        st_ty = p_state.dtype.element_ty
        tl.store(p_st + (0 - PAD) * s_sl, b_s0.to(st_ty), mask=m_d & (PAD <= 0))
        tl.store(p_st + (1 - PAD) * s_sl, b_s1.to(st_ty), mask=m_d & (PAD <= 1))
        tl.store(p_st + (2 - PAD) * s_sl, b_s2.to(st_ty), mask=m_d & (PAD <= 2))
        tl.store(p_st + (3 - PAD) * s_sl, b_s3.to(st_ty), mask=m_d)


def short_conv_triton(bcx, weight, bias=None, conv_state=None, attention_mask=None, block_d: int = 128):
    """Arguments as lfm_kernels.short_conv (already validated there); works on CUDA and, interpreted, on CPU."""
    batch, seqlen, d3 = bcx.shape
    dim = d3 // 3
    width = weight.shape[1]
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"weight must have 1..{MAX_WIDTH} taps, got {width}")
    y = torch.empty(batch, seqlen, dim, dtype=bcx.dtype, device=bcx.device)
    if batch == 0 or seqlen == 0 and conv_state is None:
        return y
    weight = weight.contiguous()
    mask = None
    if attention_mask is not None:
        mask = (attention_mask != 0).to(torch.int8)
    state = conv_state if conv_state is not None else y  # placeholder pointer, never read
    grid = (batch, triton.cdiv(dim, block_d))
    _short_conv_kernel[grid](
        bcx,
        weight,
        bias if bias is not None else weight,
        state,
        mask if mask is not None else weight,
        y,
        seqlen,
        dim,
        bcx.stride(0),
        bcx.stride(1),
        bcx.stride(2),
        state.stride(0),
        state.stride(1),
        state.stride(2),
        mask.stride(0) if mask is not None else 0,
        mask.stride(1) if mask is not None else 0,
        WIDTH=width,
        HAS_BIAS=bias is not None,
        HAS_STATE=conv_state is not None,
        HAS_MASK=mask is not None,
        BLOCK_D=block_d,
    )
    return y
