"""Eager PyTorch references: the parity oracle for every kernel.

Each function computes what transformers' LFM2-MoE modules compute (`Lfm2MoeShortConv`,
`Lfm2MoeTopKRouter` + `Lfm2MoeExperts`, eager attention with `repeat_kv`), in float32 from the
same inputs, and returns the caller's dtype. Where transformers rounds a value that is *stored*
(the conv state holds B*x in the model dtype), the reference rounds it the same way, so states
compare bit-exactly; intermediate values that are never stored stay in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def short_conv(
    bcx: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    conv_state: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = C * causal_depthwise_conv(B * x), from the in_proj output `bcx` [B, T, 3D] (chunks B, C, x).

    weight [D, L]; conv_state [B, D, L] holds the last L values of B*x before the first token (zeros
    for a fresh sequence) and is overwritten with the last L values after the last token. Positions
    where attention_mask [B, T] is 0 are treated as zero input (transformers zeroes the hidden state
    there before in_proj, which has no bias in LFM2).
    """
    batch, seqlen, d3 = bcx.shape
    dim = d3 // 3
    width = weight.shape[1]
    dtype = bcx.dtype
    if attention_mask is not None:
        bcx = bcx * attention_mask[:, :, None].to(dtype)
    b, c, x = bcx.float().split(dim, dim=-1)
    u = (b * x).to(dtype).float().transpose(1, 2)  # [B, D, T], rounded like transformers' B*x
    if conv_state is not None:
        history = conv_state.float()
    else:
        history = u.new_zeros(batch, dim, width)
    full = torch.cat([history[:, :, 1:], u], dim=-1)  # [B, D, T + L - 1]
    out = F.conv1d(full, weight.float().unsqueeze(1), None if bias is None else bias.float(), groups=dim)
    y = c * out.transpose(1, 2)
    if conv_state is not None:
        conv_state.copy_(torch.cat([history, u], dim=-1)[:, :, -width:].to(conv_state.dtype))
    return y.to(dtype)


def moe_route(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    expert_bias: torch.Tensor | None,
    top_k: int,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid router with selection bias: returns (topk_weights fp32 [N, k], topk_ids int64 [N, k]).

    Experts are chosen on sigmoid(logits) + expert_bias, sorted by that score (largest first, like
    torch.topk); their weights are the *unbiased* sigmoids, divided by (sum + 1e-6) when
    norm_topk_prob, times routed_scaling_factor. Logits and sigmoid are rounded to hidden's dtype
    as transformers computes them in it (so bf16 selections match transformers'), and so is the biased
    score when expert_bias has a low-precision dtype. Exact ties go to the lower expert index.
    """
    # transformers runs the router in the model dtype: logits and sigmoid are rounded to it. The
    # selection is discrete, so the reference (and every kernel) rounds at the same two points to pick
    # the same experts as transformers in bf16; everything else stays float32.
    logits = (hidden.float() @ gate_weight.float().t()).to(hidden.dtype)
    sig = logits.float().sigmoid().to(hidden.dtype)
    # the biased score is rounded to torch's promoted dtype of (sig, expert_bias), as transformers adds them
    choice = sig if expert_bias is None else (sig + expert_bias)
    scores = sig.float()
    # a stable descending sort breaks exact ties toward the lower expert index (torch.topk leaves it unspecified)
    ids = torch.sort(choice.float(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)
    return weights * routed_scaling_factor, ids


def moe_experts(
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """sum_k w[n,k] * down[e] @ (silu(gate[e] @ h) * (up[e] @ h)) for e = ids[n,k]: [N, H] in hidden's dtype.

    gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]: transformers' fused layout.
    """
    n_tokens, hidden_size = hidden.shape
    inter = gate_up_proj.shape[1] // 2
    out = torch.zeros(n_tokens, hidden_size, dtype=torch.float32, device=hidden.device)
    h = hidden.float()
    for expert in torch.unique(topk_ids).tolist():
        token, slot = torch.where(topk_ids == expert)
        gate_up = h[token] @ gate_up_proj[expert].float().t()
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        down = act @ down_proj[expert].float().t()
        out.index_add_(0, token, down * topk_weights[token, slot, None].float())
    return out.to(hidden.dtype)


def moe(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    expert_bias: torch.Tensor | None,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k: int,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> torch.Tensor:
    """The whole sparse MoE block (router, then experts) on hidden [N, H]."""
    weights, ids = moe_route(hidden, gate_weight, expert_bias, top_k, norm_topk_prob, routed_scaling_factor)
    return moe_experts(hidden, gate_up_proj, down_proj, ids, weights)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence against GQA caches: q [B, Hq, D], caches [B, H_kv, S, D].

    Sequence b attends to cache positions [0, seq_lens[b]); query head h reads KV head
    h // (Hq // H_kv), as transformers' repeat_kv does. Softmax in float32.
    """
    batch, n_q, head_dim = q.shape
    n_kv = k_cache.shape[1]
    group = n_q // n_kv
    out = torch.empty(batch, n_q, head_dim, dtype=torch.float32, device=q.device)
    for b in range(batch):
        length = int(seq_lens[b])
        k = k_cache[b, :, :length].float()  # [H_kv, L, D]
        v = v_cache[b, :, :length].float()
        qb = q[b].float().view(n_kv, group, head_dim)
        scores = torch.einsum("hgd,hld->hgl", qb, k) * scale
        probs = scores.softmax(dim=-1)
        out[b] = torch.einsum("hgl,hld->hgd", probs, v).reshape(n_q, head_dim)
    return out.to(q.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) in float32, returned in x's dtype."""
    out = x.float() @ weight.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def moe_experts_quant(
    hidden: torch.Tensor,
    gate_up_proj,
    down_proj,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """What the quantized experts compute, in float64: [N, H] float64.

    gate_up_proj / down_proj are `lfm_kernels.QuantizedTensor` [E, 2I, H] / [E, H, I] (one format, any
    layout).
    The weights are dequantized exactly; the tokens are quantized per 32-block as the kernels do;
    act = silu(gate) * up is rounded to float32 (the kernels keep it in fp32) and quantized the same
    way for the down projection; products, sums and the weighted combine are float64. So a kernel
    differs from this only by its fp32 sums (their order), and where its fp32 act lands on the other
    side of an int8 rounding boundary than the float64 one (a one-step change of a single act value).
    """
    from .quant import BLOCK, QuantizedTensor, _quantize_activations

    def dequant_act(x: torch.Tensor) -> torch.Tensor:
        q, d = _quantize_activations(x)
        m, k = x.shape
        return (q.double().reshape(m, k // BLOCK, BLOCK) * d.double().unsqueeze(-1)).reshape(m, k)

    gate_up_proj, down_proj = gate_up_proj.to_layout("rows"), down_proj.to_layout("rows")
    n_tokens, hidden_size = hidden.shape
    inter = gate_up_proj.shape[1] // 2
    h = dequant_act(hidden)
    out = torch.zeros(n_tokens, hidden_size, dtype=torch.float64, device=hidden.device)
    for expert in torch.unique(topk_ids).tolist():
        token, slot = torch.where(topk_ids == expert)
        gu = QuantizedTensor(gate_up_proj.data[expert], gate_up_proj.format, gate_up_proj.shape[1:])
        dn = QuantizedTensor(down_proj.data[expert], down_proj.format, down_proj.shape[1:])
        gate_up = h[token] @ gu.dequantize(torch.float64).t()
        act = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]).float()
        down = dequant_act(act) @ dn.dequantize(torch.float64).t()
        out.index_add_(0, token, down * topk_weights[token, slot, None].double())
    return out
