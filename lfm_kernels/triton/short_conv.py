"""Triton kernels for the fused gated short conv (GPU; run interpreted in the CPU tests).

Prefill tiles time and channels: each program owns BLOCK_T steps x BLOCK_D channels and re-loads the
L-1 rows before its tile (from bcx, or from conv_state before t = 0), so tiles are independent. The new
conv_state is written by a second, tiny launch that runs after every tile has read the old one.
Decode (T = 1 with a state) is one launch that reads and rewrites each channel's state in place.
u = B*x is rounded to the input dtype before use, as transformers stores it, so chunked prefill and
decode agree bit-for-bit with one prefill.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import round_to


@triton.jit
def _short_conv_prefill_kernel(
    p_bcx, p_w, p_bias, p_state, p_mask, p_y,
    T, D,
    s_xb, s_xt, s_xd,
    s_sb, s_sd, s_sl,
    s_mb, s_mt,
    L: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Offsets are 64-bit wherever an index meets a stride: B*T*3D passes 2^31 at batch 64 x 8k tokens,
    # T*3D for one 350k-token prompt, and a strided view can make any stride large.
    i_b = tl.program_id(0).to(tl.int64)
    i_d, i_t = tl.program_id(1), tl.program_id(2)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_d = o_d < D
    m_t = o_t < T
    o_d64 = o_d.to(tl.int64)
    dtype = p_y.dtype.element_ty
    p_row = p_bcx + i_b * s_xb
    p_b = p_row + o_d64 * s_xd
    p_c = p_row + (D + o_d64) * s_xd
    p_x = p_row + (2 * D + o_d64) * s_xd

    b_acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        b_acc += tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(L):
        # tap j reads u at time t - (L - 1) + j; negative times come from the state (index L + time)
        o_src = o_t - (L - 1) + j
        m_src = m_t & (o_src >= 0)
        m_2d = m_src[:, None] & m_d[None, :]
        o_src_t = o_src.to(tl.int64)[:, None] * s_xt
        b_b = tl.load(p_b[None, :] + o_src_t, mask=m_2d, other=0.0).to(tl.float32)
        b_x = tl.load(p_x[None, :] + o_src_t, mask=m_2d, other=0.0).to(tl.float32)
        b_u = round_to(b_b * b_x, dtype)
        if HAS_MASK:
            b_keep = tl.load(p_mask + i_b * s_mb + o_src.to(tl.int64) * s_mt, mask=m_src, other=0)
            b_u = tl.where((b_keep != 0)[:, None], b_u, 0.0)
        if HAS_STATE:
            m_hist = m_t & (o_src < 0)
            b_h = tl.load(
                p_state + i_b * s_sb + o_d64[None, :] * s_sd + (L + o_src[:, None]).to(tl.int64) * s_sl,
                mask=m_hist[:, None] & m_d[None, :], other=0.0,
            ).to(tl.float32)
            b_u += b_h
        b_w = tl.load(p_w + o_d64 * L + j, mask=m_d, other=0.0).to(tl.float32)
        b_acc += b_u * b_w[None, :]
    m_out = m_t[:, None] & m_d[None, :]
    b_c = tl.load(p_c[None, :] + o_t.to(tl.int64)[:, None] * s_xt, mask=m_out, other=0.0).to(tl.float32)
    if HAS_MASK:
        b_keep_t = tl.load(p_mask + i_b * s_mb + o_t.to(tl.int64) * s_mt, mask=m_t, other=0)
        b_c = tl.where((b_keep_t != 0)[:, None], b_c, 0.0)
    tl.store(p_y + (i_b * T + o_t[:, None]) * D + o_d[None, :], (b_c * b_acc).to(dtype), mask=m_out)


@triton.jit
def _short_conv_state_kernel(
    p_bcx, p_state, p_mask,
    T, D,
    s_xb, s_xt, s_xd,
    s_sb, s_sd, s_sl,
    s_mb, s_mt,
    L: tl.constexpr, LP: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # new state[j] = u[T - L + j] for T - L + j >= 0, else old state[T + j]; LP = L rounded up to a power
    # of 2. Offsets are 64-bit where an index meets a stride (see the prefill kernel).
    i_b, i_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_d64 = o_d.to(tl.int64)
    o_l = tl.arange(0, LP)
    m_l = o_l < L
    o_src = T - L + o_l
    m_new = (o_src >= 0) & m_l
    o_src_t = o_src.to(tl.int64)[None, :] * s_xt
    p_row = p_bcx + i_b * s_xb
    p_s = p_state + i_b * s_sb + o_d64[:, None] * s_sd
    m_2d = m_d[:, None] & m_new[None, :]
    b_b = tl.load(p_row + o_src_t + o_d64[:, None] * s_xd, mask=m_2d, other=0.0).to(tl.float32)
    b_x = tl.load(p_row + o_src_t + (2 * D + o_d64[:, None]) * s_xd, mask=m_2d, other=0.0).to(tl.float32)
    b_u = round_to(b_b * b_x, p_state.dtype.element_ty)
    if HAS_MASK:
        b_keep = tl.load(p_mask + i_b * s_mb + o_src.to(tl.int64) * s_mt, mask=m_new, other=0)
        b_u = tl.where((b_keep != 0)[None, :], b_u, 0.0)
    m_old = m_l & (o_src < 0)
    b_old = tl.load(p_s + (T + o_l[None, :]).to(tl.int64) * s_sl, mask=m_d[:, None] & m_old[None, :], other=0.0)
    b_new = tl.where(m_new[None, :], b_u.to(b_old.dtype), b_old)
    tl.debug_barrier()  # all of this program's old values are read before any is overwritten
    tl.store(p_s + o_l[None, :].to(tl.int64) * s_sl, b_new, mask=m_d[:, None] & m_l[None, :])


@triton.jit
def _short_conv_decode_kernel(
    p_bcx, p_w, p_bias, p_state, p_y,
    D,
    s_xb, s_xd,
    s_sb, s_sd, s_sl,
    L: tl.constexpr, LP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # 64-bit offsets: bcx may be a row of a long strided buffer (see the prefill kernel)
    i_b, i_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_d64 = o_d.to(tl.int64)
    dtype = p_y.dtype.element_ty
    p_row = p_bcx + i_b * s_xb
    b_b = tl.load(p_row + o_d64 * s_xd, mask=m_d, other=0.0).to(tl.float32)
    b_c = tl.load(p_row + (D + o_d64) * s_xd, mask=m_d, other=0.0).to(tl.float32)
    b_x = tl.load(p_row + (2 * D + o_d64) * s_xd, mask=m_d, other=0.0).to(tl.float32)
    b_u = round_to(b_b * b_x, dtype)
    o_l = tl.arange(0, LP)  # LP = L rounded up to a power of 2; lanes >= L are masked off
    p_s = p_state + i_b * s_sb + o_d64[:, None] * s_sd + o_l[None, :].to(tl.int64) * s_sl
    m_s = m_d[:, None] & (o_l[None, :] < L)
    b_w = tl.load(p_w + o_d64[:, None] * L + o_l[None, :], mask=m_s, other=0.0).to(tl.float32)
    # taps 0..L-2 see state[1..L-1]; tap L-1 sees u. Shift by one: new[j] = old[j+1], new[L-1] = u
    b_shift = tl.load(p_s + s_sl, mask=m_d[:, None] & (o_l[None, :] < L - 1), other=0.0)
    b_new = tl.where(o_l[None, :] == L - 1, b_u[:, None].to(b_shift.dtype), b_shift)
    b_acc = tl.sum(tl.where(o_l[None, :] == L - 1, b_u[:, None], b_shift.to(tl.float32)) * b_w, axis=1)
    if HAS_BIAS:
        b_acc += tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    tl.store(p_y + i_b * D + o_d, (b_c * b_acc).to(dtype), mask=m_d)
    tl.debug_barrier()  # every lane has read the old state before any lane overwrites it
    tl.store(p_s, b_new, mask=m_s)


def _pow2_width(width: int) -> int:
    return 1 << (width - 1).bit_length()


def short_conv_triton(bcx, weight, bias=None, conv_state=None, attention_mask=None, out=None):
    """Same contract as lfm_kernels.short_conv (inputs already validated). `out`, if given, is a
    contiguous [B, T, D] buffer to write (tests pass a NaN-poisoned one)."""
    batch, seqlen, d3 = bcx.shape
    dim = d3 // 3
    width = weight.shape[1]
    y = torch.empty(batch, seqlen, dim, dtype=bcx.dtype, device=bcx.device) if out is None else out
    if batch == 0 or seqlen == 0:
        return y
    weight = weight.contiguous()
    dummy = y  # never read when the matching HAS_* flag is off
    width_p2 = _pow2_width(width)
    if seqlen == 1 and conv_state is not None and attention_mask is None:
        block_d = 256
        grid = (batch, triton.cdiv(dim, block_d))
        _short_conv_decode_kernel[grid](
            bcx, weight, bias if bias is not None else dummy, conv_state, y,
            dim, bcx.stride(0), bcx.stride(2),
            conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
            L=width, LP=width_p2, HAS_BIAS=bias is not None, BLOCK_D=block_d,
        )
        return y
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.to(torch.uint8)
    block_t, block_d = 32, 128
    grid = (batch, triton.cdiv(dim, block_d), triton.cdiv(seqlen, block_t))
    state = conv_state if conv_state is not None else dummy
    s_state = conv_state.stride() if conv_state is not None else (0, 0, 0)
    s_mask = mask.stride() if mask is not None else (0, 0)
    _short_conv_prefill_kernel[grid](
        bcx, weight, bias if bias is not None else dummy, state, mask if mask is not None else dummy, y,
        seqlen, dim, bcx.stride(0), bcx.stride(1), bcx.stride(2), *s_state, *s_mask,
        L=width, HAS_BIAS=bias is not None, HAS_STATE=conv_state is not None, HAS_MASK=mask is not None,
        BLOCK_T=block_t, BLOCK_D=block_d,
    )
    if conv_state is not None:
        _short_conv_state_kernel[(batch, triton.cdiv(dim, block_d))](
            bcx, conv_state, mask if mask is not None else dummy,
            seqlen, dim, bcx.stride(0), bcx.stride(1), bcx.stride(2), *s_state, *s_mask,
            L=width, LP=width_p2, HAS_MASK=mask is not None, BLOCK_D=block_d,
        )
    return y
