"""Triton kernels for the top-k MoE (GPU; run interpreted in the CPU tests).

Router: a program per (token, expert) computes one logit (fp32 accumulation, rounded to the hidden
dtype as transformers does), then a program per token rounds the sigmoid likewise, adds expert_bias
and picks the top k by repeated argmax (ties to the lower index), normalising the unbiased weights.

Experts:
  1. align: one single-program launch sorts the N*k (token, slot) pairs by expert (stable) and pads
     each expert's run to a multiple of BLOCK_M, so every BLOCK_M-row block belongs to one expert;
     blocks past the last expert are marked -1 and exit at once. The buffer size is a bound known
     without reading anything back, so a decode step never waits for the device and can be captured
     in a CUDA graph.
  2. gate_up: grouped GEMM over those blocks; each program computes the gate and up tiles of the
     same BLOCK_N intermediate columns and writes silu(gate) * up (SwiGLU fused in the epilogue).
  3. down: grouped GEMM that multiplies each row by its routing weight and writes y[pair, :].
  4. combine: out[n] = sum over slots s = 0..k-1 of y[n*k + s], in that order: deterministic, no atomics.
H and I are compile-time constants: they are fixed per model, and the loops over them then also run
under the Triton interpreter (which cannot loop to a runtime bound with this numpy).

Block sizes come from moe_configs.json next to this file when it has the shape (written by
bench/moe_tune.py), keyed "E={E},N={I},H={H},dtype={bf16|fp16|fp32}" -> {"<tokens>": {BLOCK_M,
BLOCK_N, BLOCK_K, num_warps, num_stages, optional "down": {BLOCK_N, BLOCK_K, num_warps,
num_stages}}}: the entry whose token count is nearest to the call's (on a log scale) is used when
it is within a factor of two of it; otherwise, and for shapes the file lacks, the built-in table
(small blocks for decode, larger ones for prefill; a smaller one where the dot runs on fp32
operands, whose tiles are twice the size).
"""

from __future__ import annotations

import functools
import json
import math
import os

import torch
import triton
import triton.language as tl

from ._common import interpreting, round_to, tl_dtype

_CONFIG_FILE = os.path.join(os.path.dirname(__file__), "moe_configs.json")
_DTYPE_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


# ------------------------------------------------------------------------------------------------
# Router


@triton.jit
def _moe_router_logits_kernel(
    p_x, p_w, p_logits,
    E, s_xn, s_we,
    H: tl.constexpr, HDT: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """logits[n, e] = x[n] . w[e], accumulated in fp32 and rounded to the model dtype."""
    i_n = tl.program_id(0).to(tl.int64)
    i_e = tl.program_id(1).to(tl.int64)
    b_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):  # one trip up to H = 8192
        o_h = h0 + tl.arange(0, BLOCK_H)
        m_h = o_h < H
        b_x = tl.load(p_x + i_n * s_xn + o_h, mask=m_h, other=0.0).to(tl.float32)
        b_w = tl.load(p_w + i_e * s_we + o_h, mask=m_h, other=0.0).to(tl.float32)
        b_acc += b_x * b_w
    # transformers computes the router in the model dtype: round where it rounds
    tl.store(p_logits + i_n * E + i_e, round_to(tl.sum(b_acc, axis=0), HDT))


@triton.jit
def _moe_route_topk_kernel(
    p_logits, p_bias, p_wout, p_iout,
    E, scale,
    TOP_K: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    HDT: tl.constexpr, CDT: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    o_e = tl.arange(0, BLOCK_E)
    m_e = o_e < E
    b_l = tl.load(p_logits + i_n * E + o_e, mask=m_e, other=0.0)
    b_s = round_to(tl.sigmoid(b_l), HDT)
    b_c = b_s
    if HAS_BIAS:
        b_c = round_to(b_s + tl.load(p_bias + o_e, mask=m_e, other=0.0).to(tl.float32), CDT)
    b_c = tl.where(m_e, b_c, float("-inf"))
    o_k = tl.arange(0, BLOCK_K)
    b_wk = tl.zeros([BLOCK_K], dtype=tl.float32)
    b_ik = tl.zeros([BLOCK_K], dtype=tl.int64)
    for j in tl.static_range(TOP_K):
        # tl.max skips NaN; the reference ranks a NaN score above every number (lowest index first)
        i_nan = tl.min(tl.where(b_c != b_c, o_e, BLOCK_E), axis=0)
        b_max = tl.max(b_c, axis=0)
        i_best = tl.min(tl.where(b_c == b_max, o_e, BLOCK_E), axis=0)
        i_best = tl.where(i_nan < BLOCK_E, i_nan, i_best)
        i_best = tl.minimum(i_best, E - 1)  # never an out-of-range id
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


def moe_route_triton(hidden, gate_weight, expert_bias, top_k, norm_topk_prob=True, routed_scaling_factor=1.0):
    """(topk_weights fp32 [N, k], topk_ids int64 [N, k]); see lfm_kernels.moe_route.

    Two kernels: the router logits with a program per (token, expert), then the selection with a
    program per token. One program per token that also walked the [E, H] weight (the first version)
    read it as one serial stream: about 30 us a call at batch 1 on an H200, more than the experts'
    own kernels, since a lone program cannot keep enough loads in flight."""
    n_tokens, hidden_size = hidden.shape
    n_experts = gate_weight.shape[0]
    x = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    w = gate_weight.contiguous()
    weights = torch.empty(n_tokens, top_k, dtype=torch.float32, device=hidden.device)
    ids = torch.empty(n_tokens, top_k, dtype=torch.int64, device=hidden.device)
    if n_tokens == 0:
        return weights, ids
    logits = torch.empty(n_tokens, n_experts, dtype=torch.float32, device=hidden.device)
    _moe_router_logits_kernel[(n_tokens, n_experts)](
        x, w, logits, n_experts, x.stride(0), w.stride(0),
        H=hidden_size, HDT=tl_dtype(hidden.dtype), BLOCK_H=min(triton.next_power_of_2(hidden_size), 8192),
    )
    cdt = hidden.dtype if expert_bias is None else torch.promote_types(hidden.dtype, expert_bias.dtype)
    _moe_route_topk_kernel[(n_tokens,)](
        logits, expert_bias if expert_bias is not None else logits, weights, ids,
        n_experts, float(routed_scaling_factor),
        TOP_K=top_k, NORM=bool(norm_topk_prob), HAS_BIAS=expert_bias is not None,
        HDT=tl_dtype(hidden.dtype), CDT=tl_dtype(cdt),
        BLOCK_E=triton.next_power_of_2(n_experts), BLOCK_K=max(2, triton.next_power_of_2(top_k)),
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
    b_acc = round_to(b_acc, p_out.dtype.element_ty)
    tl.store(p_out + i_n * H + o_h, b_acc.to(p_out.dtype.element_ty), mask=m_h)


@triton.jit
def _moe_align_kernel(
    p_ids, p_sorted, p_bexp,
    P, E, NUM_BLOCKS,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr,
    P_TRIPS: tl.constexpr, B_TRIPS: tl.constexpr,  # loop trip counts under the interpreter, else 0
):
    """One program: counts the P pairs per expert, lays the experts' runs out back to back, each padded
    to a multiple of BLOCK_M, scatters every pair to its slot (in pair order within an expert: the
    result is the stable sort) and writes each block's expert (-1 past the last run). Every slot and
    block entry is written exactly once, so the buffers need no fill and no barrier."""
    o_e = tl.arange(0, BLOCK_E)
    o_p = tl.arange(0, BLOCK_P)
    m_e = o_e < E
    # pass 1: pairs per expert (an id outside [0, E) matches no expert and is dropped)
    b_cnt = tl.zeros([BLOCK_E], dtype=tl.int32)
    for i in range(0, P_TRIPS if P_TRIPS > 0 else tl.cdiv(P, BLOCK_P)):
        o_pair = i * BLOCK_P + o_p
        b_id = tl.load(p_ids + o_pair, mask=o_pair < P, other=-1).to(tl.int32)
        b_cnt += tl.sum((b_id[:, None] == o_e[None, :]).to(tl.int32), axis=0)
    b_pad = (b_cnt + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    b_end = tl.cumsum(b_pad, axis=0)
    b_start = b_end - b_pad
    # the padding rows at the end of each expert's last block
    o_j = tl.arange(0, BLOCK_M)
    m_fill = m_e[:, None] & (o_j[None, :] < (b_pad - b_cnt)[:, None])
    b_fill = tl.full([BLOCK_E, BLOCK_M], 0, tl.int32) + P
    tl.store(p_sorted + (b_start + b_cnt)[:, None] + o_j[None, :], b_fill, mask=m_fill)
    # pass 2: slot = start of the expert's run + pairs of that expert seen before this one
    b_seen = tl.zeros([BLOCK_E], dtype=tl.int32)
    for i in range(0, P_TRIPS if P_TRIPS > 0 else tl.cdiv(P, BLOCK_P)):
        o_pair = i * BLOCK_P + o_p
        m_pair = o_pair < P
        b_id = tl.load(p_ids + o_pair, mask=m_pair, other=-1).to(tl.int32)
        b_hot = (b_id[:, None] == o_e[None, :]).to(tl.int32)  # [BLOCK_P, BLOCK_E]
        b_rank = tl.cumsum(b_hot, axis=0) - b_hot  # earlier pairs of the same expert in this chunk
        b_slot = tl.sum(b_hot * (b_rank + (b_start + b_seen)[None, :]), axis=1)
        m_ok = m_pair & (b_id >= 0) & (b_id < E)
        tl.store(p_sorted + b_slot, o_pair, mask=m_ok)
        b_seen += tl.sum(b_hot, axis=0)
    # each block's expert: the number of runs that end at or before the block's first slot
    o_b = tl.arange(0, BLOCK_B)
    b_end_m = tl.where(m_e, b_end, 2147483647)
    for i in range(0, B_TRIPS if B_TRIPS > 0 else tl.cdiv(NUM_BLOCKS, BLOCK_B)):
        o_blk = i * BLOCK_B + o_b
        m_blk = o_blk < NUM_BLOCKS
        b_exp = tl.sum((b_end_m[None, :] <= (o_blk * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        past = b_exp >= E
        tl.store(p_bexp + o_blk, tl.where(past, -1, b_exp), mask=m_blk)
        # blocks past the last run hold only padding
        b_tail = tl.full([BLOCK_B, BLOCK_M], 0, tl.int32) + P
        tl.store(p_sorted + (o_blk * BLOCK_M)[:, None] + o_j[None, :], b_tail, mask=(m_blk & past)[:, None])


# (max tokens, config): decode-sized calls use small row blocks so padding costs little
_DEFAULTS = (
    (32, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)),
    (256, dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)),
    (None, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)),
)
# fp32 operands (fp32 weights, or mixed dtypes upcast in the kernel) take twice the registers and
# shared memory per tile: the 16-bit prefill tiles spill there (about 14 KB per thread for the
# gate_up kernel's two accumulators), so prefill gets half-width tiles and two stages.
_DEFAULTS_FP32 = (
    (32, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)),
    (None, dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)),
)


@functools.lru_cache(maxsize=1)
def _config_table() -> dict:
    try:
        with open(_CONFIG_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def get_config(n_experts: int, inter: int, hidden_size: int, dtype: torch.dtype, n_tokens: int) -> dict:
    """Block sizes for one call. dtype is the dtype the dots run in (float32 when the kernel upcasts).

    A tuned entry (moe_configs.json) is used when its token count is the nearest to n_tokens on a log
    scale and within a factor of two of it: a table tuned only for decode never hands its small
    blocks to a 512-token prefill. Otherwise the built-in table for the dtype."""
    key = f"E={n_experts},N={inter},H={hidden_size},dtype={_DTYPE_NAME.get(dtype, 'fp32')}"
    buckets = _config_table().get(key)
    n = max(1, n_tokens)
    if buckets:
        sizes = sorted(int(b) for b in buckets)
        pick = min(sizes, key=lambda b: (abs(math.log2(b / n)), b))
        if pick <= 2 * n and n <= 2 * pick:
            return dict(buckets[str(pick)])
    for limit, cfg in _DEFAULTS_FP32 if dtype == torch.float32 else _DEFAULTS:
        if limit is None or n <= limit:
            return dict(cfg)
    raise AssertionError("unreachable")


def align_blocks(n_pairs: int, n_experts: int, block_m: int) -> int:
    """Blocks moe_align lays out for n_pairs pairs: each expert's padding adds < block_m rows and at
    most min(E, P) experts are active, so this bound needs no look at the ids."""
    return triton.cdiv(n_pairs, block_m) + min(n_experts, n_pairs)


def moe_align(topk_ids: torch.Tensor, n_experts: int, block_m: int):
    """Pairs sorted by expert, each expert's run padded to block_m rows; one launch, no host sync.

    Returns (sorted_pairs int32 [num_blocks * block_m], pair index or P for padding;
    block_expert int32 [num_blocks], the expert of each block or -1 past the last one).
    """
    flat = topk_ids.reshape(-1)
    if flat.stride(0) != 1:
        flat = flat.contiguous()
    n_pairs = flat.numel()
    num_blocks = align_blocks(n_pairs, n_experts, block_m)
    sorted_pairs = torch.empty(num_blocks * block_m, dtype=torch.int32, device=flat.device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=flat.device)
    if num_blocks == 0:
        return sorted_pairs, block_expert
    block_e = max(16, triton.next_power_of_2(n_experts))
    block_p = 256 if n_pairs > 128 else max(16, triton.next_power_of_2(n_pairs))
    block_b = 64
    interp = interpreting()
    _moe_align_kernel[(1,)](
        flat, sorted_pairs, block_expert,
        n_pairs, n_experts, num_blocks,
        BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_P=block_p, BLOCK_B=block_b,
        P_TRIPS=triton.cdiv(n_pairs, block_p) if interp else 0,
        B_TRIPS=triton.cdiv(num_blocks, block_b) if interp else 0,
        **({} if interp else dict(num_warps=4)),
    )
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
    # tensor cores need both operands in one 16-bit dtype; mixed or fp32 inputs compute in fp32
    # (IEEE, not tf32, so fp32 meets its 1e-5 tolerance); the interpreter needs fp32 arithmetic
    upcast = interpreting() or hidden.dtype != gate_up_proj.dtype
    # the block sizes follow what the compiled kernel multiplies (fp32 also for mixed dtypes), not
    # the interpreter's upcast, so interpreted tests run the configs a GPU would
    dot_dtype = gate_up_proj.dtype if hidden.dtype == gate_up_proj.dtype else torch.float32
    cfg = config or get_config(n_experts, inter, hidden_size, dot_dtype, n_tokens)
    down_cfg = {**cfg, **cfg.get("down", {})}
    block_m = cfg["BLOCK_M"]
    x = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    gu, dn = gate_up_proj.contiguous(), down_proj.contiguous()
    tw = topk_weights.reshape(-1).to(torch.float32).contiguous()
    n_pairs = n_tokens * top_k
    sorted_pairs, block_expert = moe_align(topk_ids, n_experts, block_m)
    num_blocks = block_expert.numel()
    prec = "ieee" if upcast or gu.dtype == torch.float32 else "tf32"
    act_dtype = gu.dtype if not upcast and gu.dtype != torch.float32 else torch.float32
    act = torch.empty(num_blocks * block_m, inter, dtype=act_dtype, device=hidden.device)
    y = torch.empty(n_pairs, hidden_size, dtype=torch.float32, device=hidden.device)

    def launch_opts(c):
        return {} if interpreting() else dict(num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 3))

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
