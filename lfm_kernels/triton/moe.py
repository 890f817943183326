"""Triton kernels for the top-k MoE (GPU; run interpreted in the CPU tests).

Router: one program per token computes the E logits, rounds logits and sigmoid to the hidden dtype
as transformers does, adds expert_bias, and picks the top k by repeated argmax (ties to the lower
index), normalising the unbiased weights: one launch, nothing in between goes to memory.

Experts:
  1. align: the N*k (token, slot) pairs are sorted by expert (stable) and each expert's run padded
     to a multiple of BLOCK_M, so every BLOCK_M-row block belongs to one expert; blocks past the
     last expert are marked -1 and exit at once (the buffer size is a bound known without a sync).
  2. gate_up: grouped GEMM over those blocks; each program computes the gate and up tiles of the
     same BLOCK_N intermediate columns and writes silu(gate) * up (SwiGLU fused in the epilogue).
  3. down: grouped GEMM that multiplies each row by its routing weight and writes y[pair, :].
  4. combine: out[n] = sum over slots s = 0..k-1 of y[n*k + s], in that order: deterministic, no atomics.
H and I are compile-time constants: they are fixed per model, and the loops over them then also run
under the Triton interpreter (which cannot loop to a runtime bound with this numpy). Block sizes come from a small per-shape table (small blocks for decode) or, when present, from
moe_configs.json next to this file (written by a GPU block-size search), keyed
"E={E},N={I},H={H},dtype={bf16|fp16|fp32}" -> {"<max tokens>": {BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
num_stages, optional "down": {BLOCK_N, BLOCK_K, num_warps, num_stages}}}; the bucket used is the
smallest key >= N (else the largest key).
"""

from __future__ import annotations

import functools
import json
import os

import torch
import triton
import triton.language as tl

from .short_conv import _round_to

_CONFIG_FILE = os.path.join(os.path.dirname(__file__), "moe_configs.json")
_DTYPE_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------------------------------------
# Router


@triton.jit
def _moe_route_kernel(
    p_x, p_w, p_bias, p_wout, p_iout,
    E, s_xn, s_we, scale,
    H: tl.constexpr, TOP_K: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    HDT: tl.constexpr, CDT: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    o_e = tl.arange(0, BLOCK_E)
    m_e = o_e < E
    b_acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        o_h = h0 + tl.arange(0, BLOCK_H)
        m_h = o_h < H
        b_x = tl.load(p_x + i_n * s_xn + o_h, mask=m_h, other=0.0).to(tl.float32)
        b_w = tl.load(p_w + o_e[:, None] * s_we + o_h[None, :], mask=m_e[:, None] & m_h[None, :], other=0.0)
        b_acc += tl.sum(b_w.to(tl.float32) * b_x[None, :], axis=1)
    # transformers computes the router in the model dtype: round where it rounds
    b_l = _round_to(b_acc, HDT)
    b_s = _round_to(tl.sigmoid(b_l), HDT)
    b_c = b_s
    if HAS_BIAS:
        b_c = _round_to(b_s + tl.load(p_bias + o_e, mask=m_e, other=0.0).to(tl.float32), CDT)
    b_c = tl.where(m_e, b_c, float("-inf"))
    o_k = tl.arange(0, BLOCK_K)
    b_wk = tl.zeros([BLOCK_K], dtype=tl.float32)
    b_ik = tl.zeros([BLOCK_K], dtype=tl.int64)
    for j in tl.static_range(TOP_K):
        b_max = tl.max(b_c, axis=0)
        i_best = tl.min(tl.where(b_c == b_max, o_e, BLOCK_E), axis=0)
        i_best = tl.minimum(i_best, E - 1)  # a NaN score must not produce an out-of-range id
        b_sel = o_e == i_best
        w = tl.sum(tl.where(b_sel, b_s, 0.0), axis=0)
        b_wk = tl.where(o_k == j, w, b_wk)
        b_ik = tl.where(o_k == j, i_best.to(tl.int64), b_ik)
        b_c = tl.where(b_sel, float("-inf"), b_c)
    if NORM:
        b_wk = b_wk / (tl.sum(b_wk, axis=0) + 1e-6)
    b_wk = b_wk * scale
    m_k = o_k < TOP_K
    tl.store(p_wout + i_n * TOP_K + o_k, b_wk, mask=m_k)
    tl.store(p_iout + i_n * TOP_K + o_k, b_ik, mask=m_k)


def _tl_dtype(dtype: torch.dtype):
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def moe_route_triton(hidden, gate_weight, expert_bias, top_k, norm_topk_prob=True, routed_scaling_factor=1.0):
    """(topk_weights fp32 [N, k], topk_ids int64 [N, k]); see lfm_kernels.moe_route."""
    n_tokens, hidden_size = hidden.shape
    n_experts = gate_weight.shape[0]
    x = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    w = gate_weight.contiguous()
    weights = torch.empty(n_tokens, top_k, dtype=torch.float32, device=hidden.device)
    ids = torch.empty(n_tokens, top_k, dtype=torch.int64, device=hidden.device)
    if n_tokens == 0:
        return weights, ids
    cdt = hidden.dtype if expert_bias is None else torch.promote_types(hidden.dtype, expert_bias.dtype)
    block_e = triton.next_power_of_2(n_experts)
    block_h = max(16, min(triton.next_power_of_2(hidden_size), 8192 // block_e))
    _moe_route_kernel[(n_tokens,)](
        x, w, expert_bias if expert_bias is not None else w, weights, ids,
        n_experts, x.stride(0), w.stride(0), float(routed_scaling_factor),
        H=hidden_size, TOP_K=top_k, NORM=bool(norm_topk_prob), HAS_BIAS=expert_bias is not None,
        HDT=_tl_dtype(hidden.dtype), CDT=_tl_dtype(cdt),
        BLOCK_E=block_e, BLOCK_H=block_h, BLOCK_K=max(2, triton.next_power_of_2(top_k)),
    )
    return weights, ids


# ------------------------------------------------------------------------------------------------
# Experts


@triton.jit
def _moe_gate_up_kernel(
    p_x, p_w, p_act, p_sorted, p_bexp,
    P, s_xn, s_we,
    H: tl.constexpr, I: tl.constexpr, TOP_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    i_e = tl.load(p_bexp + i_m).to(tl.int64)
    if i_e < 0:
        return
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    b_pair = tl.load(p_sorted + o_m)
    m_m = b_pair < P
    b_tok = (b_pair // TOP_K).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < I
    p_we = p_w + i_e * s_we
    b_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    b_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < H
        b_x = tl.load(p_x + b_tok[:, None] * s_xn + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)
        m_w = m_k[:, None] & m_n[None, :]
        b_wg = tl.load(p_we + o_n[None, :].to(tl.int64) * H + o_k[:, None], mask=m_w, other=0.0)
        b_wu = tl.load(p_we + (I + o_n[None, :]).to(tl.int64) * H + o_k[:, None], mask=m_w, other=0.0)
        if UPCAST:
            b_x = b_x.to(tl.float32)
            b_wg = b_wg.to(tl.float32)
            b_wu = b_wu.to(tl.float32)
        b_gate = tl.dot(b_x, b_wg, b_gate, input_precision=PREC)
        b_up = tl.dot(b_x, b_wu, b_up, input_precision=PREC)
    b_act = b_gate * tl.sigmoid(b_gate) * b_up
    p_out = p_act + o_m[:, None].to(tl.int64) * I + o_n[None, :]
    tl.store(p_out, b_act.to(p_act.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _moe_down_kernel(
    p_act, p_w, p_tw, p_y, p_sorted, p_bexp,
    P, s_we,
    H: tl.constexpr, I: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    i_e = tl.load(p_bexp + i_m).to(tl.int64)
    if i_e < 0:
        return
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    b_pair = tl.load(p_sorted + o_m)
    m_m = b_pair < P
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < H
    p_we = p_w + i_e * s_we
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < I
        b_a = tl.load(p_act + o_m[:, None].to(tl.int64) * I + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_w = tl.load(p_we + o_n[None, :].to(tl.int64) * I + o_k[:, None], mask=m_k[:, None] & m_n[None, :], other=0.0)
        if UPCAST:
            b_a = b_a.to(tl.float32)
            b_w = b_w.to(tl.float32)
        b_acc = tl.dot(b_a, b_w, b_acc, input_precision=PREC)
    b_rw = tl.load(p_tw + b_pair, mask=m_m, other=0.0).to(tl.float32)
    b_acc = b_acc * b_rw[:, None]
    p_out = p_y + b_pair[:, None].to(tl.int64) * H + o_n[None, :]
    tl.store(p_out, b_acc, mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _moe_combine_kernel(p_y, p_out, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    i_n, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < H
    b_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for s in tl.static_range(TOP_K):  # fixed slot order: the sum does not depend on scheduling
        b_acc += tl.load(p_y + (i_n * TOP_K + s) * H + o_h, mask=m_h, other=0.0)
    # round to nearest even first: a plain bf16 cast truncates under the interpreter
    b_acc = _round_to(b_acc, p_out.dtype.element_ty)
    tl.store(p_out + i_n * H + o_h, b_acc.to(p_out.dtype.element_ty), mask=m_h)


_DEFAULTS = (
    # (max tokens, config): decode-sized calls use small row blocks so padding costs little
    (32, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)),
    (256, dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)),
    (None, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)),
)


@functools.lru_cache(maxsize=1)
def _config_table() -> dict:
    try:
        with open(_CONFIG_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def get_config(n_experts: int, inter: int, hidden_size: int, dtype: torch.dtype, n_tokens: int) -> dict:
    """Block sizes for one call: from moe_configs.json when it has this shape, else the defaults."""
    key = f"E={n_experts},N={inter},H={hidden_size},dtype={_DTYPE_NAME.get(dtype, 'fp32')}"
    buckets = _config_table().get(key)
    if buckets:
        sizes = sorted(int(b) for b in buckets)
        pick = next((b for b in sizes if b >= n_tokens), sizes[-1])
        return dict(buckets[str(pick)])
    for limit, cfg in _DEFAULTS:
        if limit is None or n_tokens <= limit:
            return dict(cfg)
    raise AssertionError("unreachable")


def moe_align(topk_ids: torch.Tensor, n_experts: int, block_m: int):
    """Pairs sorted by expert, each expert's run padded to block_m rows.

    Returns (sorted_pairs int32 [num_blocks * block_m], pair index or P for padding;
    block_expert int32 [num_blocks], the expert of each block or -1 past the last one).
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    n_pairs = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    start = torch.cumsum(counts, 0) - counts
    sorted_e = flat[order]
    dest = pad_start[sorted_e] + torch.arange(n_pairs, device=device) - start[sorted_e]
    # every expert's padding adds < block_m rows, and at most min(E, P) experts are active
    num_blocks = triton.cdiv(n_pairs, block_m) + min(n_experts, n_pairs)
    sorted_pairs = torch.full((num_blocks * block_m,), n_pairs, dtype=torch.int32, device=device)
    sorted_pairs[dest] = order.to(torch.int32)
    block_start = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(pad_end, block_start, right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert


def moe_experts_triton(hidden, gate_up_proj, down_proj, topk_ids, topk_weights, config: dict | None = None):
    """[N, H] in hidden's dtype; see lfm_kernels.moe_experts. `config` overrides the block sizes."""
    n_tokens, hidden_size = hidden.shape
    n_experts, two_inter, _ = gate_up_proj.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    out = torch.empty(n_tokens, hidden_size, dtype=hidden.dtype, device=hidden.device)
    if n_tokens == 0 or top_k == 0:
        return out.zero_()
    cfg = config or get_config(n_experts, inter, hidden_size, gate_up_proj.dtype, n_tokens)
    down_cfg = {**cfg, **cfg.get("down", {})}
    block_m = cfg["BLOCK_M"]
    x = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    gu, dn = gate_up_proj.contiguous(), down_proj.contiguous()
    tw = topk_weights.reshape(-1).to(torch.float32).contiguous()
    n_pairs = n_tokens * top_k
    sorted_pairs, block_expert = moe_align(topk_ids, n_experts, block_m)
    num_blocks = block_expert.numel()
    # tensor cores need both operands in one 16-bit dtype; mixed or fp32 inputs compute in fp32
    # (IEEE, not tf32, so fp32 meets its 1e-5 tolerance); the interpreter needs fp32 arithmetic
    upcast = _interpreted() or hidden.dtype != gu.dtype
    prec = "ieee" if upcast or gu.dtype == torch.float32 else "tf32"
    act_dtype = gu.dtype if not upcast and gu.dtype != torch.float32 else torch.float32
    act = torch.empty(num_blocks * block_m, inter, dtype=act_dtype, device=hidden.device)
    y = torch.empty(n_pairs, hidden_size, dtype=torch.float32, device=hidden.device)

    def launch_opts(c):
        return {} if _interpreted() else dict(num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 3))

    grid1 = (num_blocks, triton.cdiv(inter, cfg["BLOCK_N"]))
    _moe_gate_up_kernel[grid1](
        x, gu, act, sorted_pairs, block_expert,
        n_pairs, x.stride(0), gu.stride(0),
        H=hidden_size, I=inter, TOP_K=top_k, UPCAST=upcast, PREC=prec,
        BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], **launch_opts(cfg),
    )
    grid2 = (num_blocks, triton.cdiv(hidden_size, down_cfg["BLOCK_N"]))
    _moe_down_kernel[grid2](
        act, dn, tw, y, sorted_pairs, block_expert,
        n_pairs, dn.stride(0),
        H=hidden_size, I=inter, UPCAST=upcast, PREC=prec,
        BLOCK_M=block_m, BLOCK_N=down_cfg["BLOCK_N"], BLOCK_K=down_cfg["BLOCK_K"], **launch_opts(down_cfg),
    )
    block_h = min(1024, triton.next_power_of_2(hidden_size))
    _moe_combine_kernel[(n_tokens, triton.cdiv(hidden_size, block_h))](y, out, hidden_size, TOP_K=top_k, BLOCK_H=block_h)
    return out
