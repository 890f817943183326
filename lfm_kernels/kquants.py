"""GGML's K-quants (Q4_K, Q5_K, Q6_K) made in numpy, vectorised over blocks, and llama.cpp's Q4_K_M mix.

The `gguf` package decodes K-quants but cannot make them; this module makes blocks that
`gguf.quants.dequantize` (and llama.cpp) read back. Formats, per 256 weights of a row (a super-block):

- Q4_K (144 bytes): fp16 `d`, fp16 `dmin`, 12 bytes holding eight 6-bit scales `sc` and eight 6-bit
  mins `m` (one per 32 weights), 128 bytes of 4-bit `q`:  w = d * sc_j * q - dmin * m_j.
- Q5_K (176 bytes): as Q4_K with a fifth bit per weight (32 bytes `qh`).
- Q6_K (210 bytes): 6-bit `q` (128 bytes low nibbles, 64 bytes high pairs), sixteen int8 scales (one
  per 16 weights), fp16 `d`:  w = d * sc_j * (q - 32).

The search is llama.cpp's reference one (what `llama-quantize` runs without an importance matrix),
with every fp32 operation in its C code's order (sums left to right, not numpy's pairwise sums), so
that with `refine=False` the blocks are llama.cpp's byte for byte:
- Q4_K / Q5_K, per 32 weights: an affine fit x ~ scale * q + min with min <= 0, weighted by
  |x| + rms(x) so large weights count more; the range [min, max] is mapped onto 0..nmax and then the
  step is swept (iscale = (nmax + rmin + k * rdelta) / (max - min), k = 0..nstep), each candidate
  rounding followed by the weighted least-squares scale and min for those integers; the best by
  weighted squared error wins. The eight scales and mins are then quantized to 6 bits against the
  largest (d = max_scale / 63, dmin = max_min / 63) and the weights re-rounded with the scales as
  stored.
- Q6_K, per 16 weights: a symmetric fit; starting from iscale = -32 / x[argmax |x|], nineteen
  step sizes (nmax + 0.1 k, k = -9..9) are tried and the one maximising (sum w x q)^2 / sum w q^2
  (w = x^2) is kept; the sixteen scales are quantized to int8 against the largest.

On top of that reference we add one refinement (`refine=True`, the default): with the integers and
the sub-block scales fixed, the fp16 super-block factors (d and dmin for Q4_K / Q5_K, d for Q6_K)
are refitted by least squares, the weights re-rounded, and per block the better of the two results
(by squared error) is kept, so the error is never above the reference search's on any block.

`q4_k_m_type` is llama.cpp's Q4_K_M rule for which tensors get Q6_K.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
_GROUP_MAX_EPS = np.float32(1e-15)

__all__ = ["BLOCK_BYTES", "QK_K", "q4_k_m_type", "quantize", "quantize_q4_k", "quantize_q5_k", "quantize_q6_k"]


def _fp16_round(x: np.ndarray) -> np.ndarray:
    """x stored as fp16 and read back (the factors as the decoder will see them)."""
    return x.astype(np.float16).astype(np.float32)


def _nearest(x: np.ndarray) -> np.ndarray:
    # ggml's nearest_int adds 1.5 * 2^23 in fp32: round half to even, as np.rint does. Blocks of
    # subnormal weights overflow the reciprocal scales; those products are clamped (to 0..nmax
    # afterwards, as in ggml) instead of wrapping around in the integer conversion.
    return np.rint(np.clip(x, -(2**30), 2**30)).astype(np.int32)  # NaN (0 * inf) casts to INT_MIN: clamped later


def _seqsum(a: np.ndarray, start_zero: bool = True) -> np.ndarray:
    """Sum over the last axis in index order, as llama.cpp's C loops sum (numpy's own sum is pairwise,
    which rounds differently): cumsum accumulates strictly left to right. With start_zero the sum
    is `s = 0; s += a[i]` (the + 0 turns an all-negative-zero sum into +0, as C's start does);
    without it `s = a[0]; s += a[i]`, as make_qkx2_quants seeds sum_w and sum_x."""
    s = np.cumsum(a, axis=-1, dtype=a.dtype)[..., -1]
    return s + s.dtype.type(0) if start_zero else s


def _rows(x, name: str = "x") -> tuple[np.ndarray, tuple[int, ...]]:
    """x (numpy or torch, any float dtype) as float32 blocks [nb, 256], and its shape."""
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float32).numpy()
    except ImportError:  # pragma: no cover
        pass
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 1 or x.shape[-1] % QK_K:
        raise ValueError(f"{name}: the last dimension must be a multiple of {QK_K} for K-quants, got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: K-quants need finite weights (found NaN or inf)")
    return np.ascontiguousarray(x).reshape(-1, QK_K), x.shape


# ------------------------------------------------------------------------------------ Q4_K / Q5_K


def _make_qkx2(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Affine fit per sub-block (rows of x [n, 32]); returns (scale [n], the_min [n] >= 0, L [n, 32]).
    Every fp32 step is make_qkx2_quants' own, in its order (sums left to right, w * (diff * diff))."""
    f32 = np.float32
    mn = np.minimum(x.min(axis=1), f32(0))
    mx = x.max(axis=1)
    sum_w = _seqsum(w, start_zero=False)
    sum_x = _seqsum(w * x, start_zero=False)
    flat = mx == mn
    rng = np.where(flat, f32(1), mx - mn)
    iscale = f32(nmax) / rng
    scale = f32(1) / iscale
    xm = x - mn[:, None]
    L = np.clip(_nearest(iscale[:, None] * xm), 0, nmax)
    diff = scale[:, None] * L.astype(np.float32) + mn[:, None] - x
    best = _seqsum(w * (diff * diff))
    best_min = mn.copy()
    for k in range(nstep + 1):
        # as in ggml, the sweep maps [current best min, max] onto the integers: once a candidate wins,
        # later steps start from its min; the step (rmin + rdelta * k) + nmax is rounded in fp32 as C does
        rng = np.where(flat, f32(1), mx - best_min)
        iscale = ((f32(rmin) + f32(rdelta) * f32(k)) + f32(nmax)) / rng
        xm = x - best_min[:, None]
        la = np.clip(_nearest(iscale[:, None] * xm), 0, nmax).astype(np.float32)
        wl = w * la
        sum_l = _seqsum(wl)
        sum_l2 = _seqsum(wl * la)
        sum_xl = _seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = np.where(pos, f32(0), this_min)
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), this_scale)
        d = this_scale[:, None] * la + this_min[:, None] - x
        err = _seqsum(w * (d * d))
        better = ok & (err < best)
        L = np.where(better[:, None], la.astype(np.int32), L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        best_min = np.where(better, this_min, best_min)
    L = np.where(flat[:, None], 0, L)
    scale = np.where(flat, f32(0), scale)
    best_min = np.where(flat, mn, best_min)
    return scale.astype(np.float32), (-best_min).astype(np.float32), L


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [nb, 8] -> GGML's 12-byte layout [nb, 12]."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4]
    out[:, 4:8] = lm[:, 0:4]
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return out


def _affine_k(xb: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, refine: bool):
    """Shared Q4_K / Q5_K search: (d [nb], dmin [nb] as fp16-rounded fp32, ls, lm [nb, 8], L [nb, 256])."""
    f32 = np.float32
    nb = xb.shape[0]
    x = xb.reshape(nb * 8, 32)
    av_x = np.sqrt(_seqsum(x * x) / f32(32))
    w = av_x[:, None] + np.abs(x)
    scales, mins, L0 = _make_qkx2(x, w, nmax, rmin, rdelta, nstep)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    inv_scale = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, f32(1)), f32(0))
    inv_min = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, f32(1)), f32(0))
    ls = np.clip(_nearest(inv_scale[:, None] * scales), 0, 63)
    lm = np.clip(_nearest(inv_min[:, None] * mins), 0, 63)
    d = _fp16_round(max_scale / f32(63))
    dmin = _fp16_round(max_min / f32(63))
    L0 = L0.reshape(nb, 256)

    def requantize(d, dmin):
        ds = (d[:, None] * ls).astype(np.float32)  # [nb, 8]
        dm = (dmin[:, None] * lm).astype(np.float32)
        dsx = np.repeat(ds, 32, axis=1)
        dmx = np.repeat(dm, 32, axis=1)
        safe = np.where(dsx != 0, dsx, f32(1))
        L = np.clip(_nearest((xb + dmx) / safe), 0, nmax)
        L = np.where(dsx != 0, L, L0)  # ggml keeps the search's integers where the scale is 0
        e = dsx * L - dmx - xb  # float64 (L is int32)
        return L, _seqsum(e * e)

    L, err = requantize(d, dmin)
    if refine:
        # least squares for (d, dmin) with the integers and 6-bit scales fixed: x ~ d * a - dmin * b
        a = np.repeat(ls, 32, axis=1).astype(np.float64) * L
        b = np.repeat(lm, 32, axis=1).astype(np.float64)
        x64 = xb.astype(np.float64)
        saa, sbb, sab = _seqsum(a * a), _seqsum(b * b), _seqsum(a * b)
        sax, sbx = _seqsum(a * x64), _seqsum(b * x64)
        det = saa * sbb - sab * sab
        ok = det > 1e-30
        dets = np.where(ok, det, 1.0)
        d2 = np.where(ok, (sax * sbb - sbx * sab) / dets, d)
        m2 = np.where(ok, (sax * sab - sbx * saa) / dets, dmin)  # = dmin (x ~ d a - dmin b)
        d2 = _fp16_round(np.clip(d2, 0, 65504).astype(np.float32))
        m2 = _fp16_round(np.clip(m2, 0, 65504).astype(np.float32))
        L2, err2 = requantize(d2, m2)
        take = err2 < err
        d = np.where(take, d2, d)
        dmin = np.where(take, m2, dmin)
        L = np.where(take[:, None], L2, L)
    return d, dmin, ls, lm, L


@np.errstate(over="ignore", invalid="ignore", divide="ignore")
def quantize_q4_k(x, refine: bool = True) -> np.ndarray:
    """x [..., K] (K a multiple of 256) -> Q4_K blocks as uint8 [..., K / 256 * 144]."""
    xb, shape = _rows(x)
    nb = xb.shape[0]
    d, dmin, ls, lm, L = _affine_k(xb, 15, -1.0, 0.1, 20, refine)
    out = np.empty((nb, 144), dtype=np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(nb, 2)
    out[:, 2:4] = dmin.astype(np.float16).view(np.uint8).reshape(nb, 2)
    out[:, 4:16] = _pack_scales_k4(ls, lm)
    Lq = L.astype(np.uint8).reshape(nb, 4, 2, 32)  # 64-weight groups: low nibble first 32, high next 32
    out[:, 16:] = (Lq[:, :, 0] | (Lq[:, :, 1] << 4)).reshape(nb, 128)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 144)


@np.errstate(over="ignore", invalid="ignore", divide="ignore")
def quantize_q5_k(x, refine: bool = True) -> np.ndarray:
    """x [..., K] (K a multiple of 256) -> Q5_K blocks as uint8 [..., K / 256 * 176]."""
    xb, shape = _rows(x)
    nb = xb.shape[0]
    d, dmin, ls, lm, L = _affine_k(xb, 31, -0.5, 0.1, 15, refine)
    out = np.empty((nb, 176), dtype=np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(nb, 2)
    out[:, 2:4] = dmin.astype(np.float16).view(np.uint8).reshape(nb, 2)
    out[:, 4:16] = _pack_scales_k4(ls, lm)
    Lq = L.astype(np.uint8).reshape(nb, 8, 32)  # sub-block s, lane j
    hi = (Lq >> 4) & 1
    qh = np.zeros((nb, 32), dtype=np.uint8)
    for s in range(8):
        qh |= hi[:, s] << s
    out[:, 16:48] = qh
    lo = (Lq & 0xF).reshape(nb, 4, 2, 32)
    out[:, 48:] = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(nb, 128)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 176)


# ------------------------------------------------------------------------------------ Q6_K


def _make_qx(x: np.ndarray, nmax: int):
    """Symmetric fit per row of x [n, 16] (rmse_type 1: weights x^2); (scale [n], L [n, 16] in 0..2nmax-1)."""
    f32 = np.float32
    n = x.shape[0]
    idx = np.abs(x).argmax(axis=1)
    mx = x[np.arange(n), idx]
    amax = np.abs(mx)
    zero = amax < _GROUP_MAX_EPS
    mxs = np.where(zero, f32(1), mx)
    w = x * x

    def fit(iscale):
        l = np.clip(_nearest(iscale[:, None] * x), -nmax, nmax - 1)
        lf = l.astype(np.float32)
        sumlx = _seqsum(w * x * lf)
        suml2 = _seqsum(w * lf * lf)
        return l, sumlx, suml2

    L, sumlx, suml2 = fit(f32(-nmax) / mxs)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0))
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        l, sx, s2 = fit(-(f32(nmax) + f32(0.1) * f32(k)) / mxs)
        better = (s2 > 0) & (sx * sx > best * s2)
        L = np.where(better[:, None], l, L)
        scale = np.where(better, sx / np.where(s2 > 0, s2, f32(1)), scale)
        best = np.where(better, scale * sx, best)
    L = np.where(zero[:, None], -nmax, L) + nmax  # all-zero groups: ggml writes L = 0 (q = -32 after offset)
    scale = np.where(zero, f32(0), scale)
    return scale.astype(np.float32), L


@np.errstate(over="ignore", invalid="ignore", divide="ignore")
def quantize_q6_k(x, refine: bool = True) -> np.ndarray:
    """x [..., K] (K a multiple of 256) -> Q6_K blocks as uint8 [..., K / 256 * 210]."""
    f32 = np.float32
    xb, shape = _rows(x)
    nb = xb.shape[0]
    scales, L0 = _make_qx(xb.reshape(nb * 16, 16), 32)
    scales = scales.reshape(nb, 16)
    L0 = L0.reshape(nb, 256)
    idx = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), idx]
    zero = np.abs(max_scale) < _GROUP_MAX_EPS
    iscale = np.where(zero, f32(0), f32(-128) / np.where(zero, f32(1), max_scale))
    d = _fp16_round(np.where(zero, f32(0), f32(1) / np.where(zero, f32(1), iscale)))
    sc = np.minimum(127, _nearest(iscale[:, None] * scales))
    sc = np.maximum(sc, -128)

    def requantize(d):
        ds = np.repeat((d[:, None] * sc).astype(np.float32), 16, axis=1)
        safe = np.where(ds != 0, ds, f32(1))
        L = np.clip(_nearest(xb / safe), -32, 31) + 32
        L = np.where(ds != 0, L, L0)
        e = ds * (L - 32) - xb  # float64 (L is int32)
        return L, _seqsum(e * e)

    L, err = requantize(d)
    if refine:
        # least squares for d with the integers and int8 scales fixed; kept per block only if better
        a = np.repeat(sc.astype(np.float64), 16, axis=1) * (L - 32)
        saa = _seqsum(a * a)
        d2 = np.where(saa > 0, _seqsum(a * xb) / np.where(saa > 0, saa, 1.0), d)
        d2 = _fp16_round(np.clip(d2, -65504, 65504).astype(np.float32))
        L2, err2 = requantize(d2)
        take = (err2 < err) & ~zero
        d = np.where(take, d2, d)
        L = np.where(take[:, None], L2, L)
    L = np.where(zero[:, None], 0, L).astype(np.uint8)
    sc = np.where(zero[:, None], 0, sc)
    out = np.zeros((nb, 210), dtype=np.uint8)
    Lg = L.reshape(nb, 2, 4, 32)  # two 128-weight halves, four 32-weight quarters
    ql = np.empty((nb, 2, 64), dtype=np.uint8)
    ql[:, :, 0:32] = (Lg[:, :, 0] & 0xF) | ((Lg[:, :, 2] & 0xF) << 4)
    ql[:, :, 32:64] = (Lg[:, :, 1] & 0xF) | ((Lg[:, :, 3] & 0xF) << 4)
    qh = (Lg[:, :, 0] >> 4) | ((Lg[:, :, 1] >> 4) << 2) | ((Lg[:, :, 2] >> 4) << 4) | ((Lg[:, :, 3] >> 4) << 6)
    out[:, 0:128] = ql.reshape(nb, 128)
    out[:, 128:192] = qh.reshape(nb, 64)
    out[:, 192:208] = sc.astype(np.int8).view(np.uint8)
    out[:, 208:210] = d.astype(np.float16).view(np.uint8).reshape(nb, 2)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 210)


_QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


@np.errstate(over="ignore", invalid="ignore", divide="ignore")
def quantize(x, fmt: str, chunk_rows: int = 4096) -> np.ndarray:
    """x [..., K] -> K-quant blocks (uint8 [..., K / 256 * block bytes]) in `fmt` ("Q4_K", "Q5_K" or
    "Q6_K", any case), a chunk of rows at a time so temporaries stay small."""
    key = str(fmt).upper()
    if key not in _QUANTIZERS:
        raise ValueError(f"fmt must be one of {sorted(_QUANTIZERS)}, got {fmt!r}")
    xb, shape = _rows(x)
    per_row = shape[-1] // QK_K
    rows = xb.reshape(-1, shape[-1])
    out = np.empty((rows.shape[0], per_row * BLOCK_BYTES[key]), dtype=np.uint8)
    for r0 in range(0, rows.shape[0], chunk_rows):
        out[r0 : r0 + chunk_rows] = _QUANTIZERS[key](rows[r0 : r0 + chunk_rows])
    return out.reshape(*shape[:-1], per_row * BLOCK_BYTES[key])


# ------------------------------------------------------------------------------------ Q4_K_M mix


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def q4_k_m_type(name: str, n_layers: int, i_attn_v: int = 0, n_attn_v: int = 0, i_ffn_down: int | None = None,
                tied_embeddings: bool = True, row_len: int | None = None) -> str | None:
    """llama.cpp's Q4_K_M choice for one tensor of an LFM2 / LFM2-MoE file: "Q6_K", "Q4_K", "Q8_0"
    (a K-quant that does not fit the row length) or None (kept as it is: 1-D tensors, norms, the
    router, the conv taps).

    - the output matrix (the token embedding when tied): Q6_K;
    - attn_v (or a fused attn_qkv), the i-th of n: Q6_K when use_more_bits(i, n);
    - ffn_down / ffn_down_exps of layer i of n: Q6_K when use_more_bits(i, n) (the layer comes from
      the name for MoE files, from the count of ffn_down tensors seen so far for dense ones:
      pass i_ffn_down for those);
    - everything else quantizable: Q4_K.
    use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2: the first and last eighth of
    the layers and every third one between them.
    A row length not a multiple of 256 falls back as llama.cpp does (Q6_K -> Q8_0; Q4_K -> Q5_0,
    which is not supported here: ValueError).
    """
    if not name.endswith("weight") or "_norm.weight" in name or "ffn_gate_inp.weight" in name \
            or "shortconv.conv.weight" in name:
        return None
    if name == "output.weight" or (tied_embeddings and name == "token_embd.weight"):
        t = "Q6_K"
    elif "attn_v.weight" in name or "attn_qkv.weight" in name:
        t = "Q6_K" if _use_more_bits(i_attn_v, n_attn_v) else "Q4_K"
    elif "ffn_down" in name:
        if i_ffn_down is None:
            i_ffn_down = int(name.split(".")[1])
        t = "Q6_K" if _use_more_bits(i_ffn_down, n_layers) else "Q4_K"
    else:
        t = "Q4_K"
    if row_len is not None and row_len % QK_K:
        if t == "Q6_K":
            return "Q8_0"
        raise ValueError(f"{name}: row length {row_len} is not a multiple of {QK_K}; llama.cpp would use Q5_0, "
                         "which lfm_kernels does not support")
    return t
