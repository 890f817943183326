"""Top-k MoE routing and expert dispatch, reading only the experts the tokens chose.

`moe_route` is LFM2-MoE's sigmoid router with a selection bias; `moe_experts` runs the chosen
SwiGLU experts on transformers' fused weight layout and sums them with the routing weights;
`moe` is the whole sparse block (what `Lfm2MoeSparseMoeBlock` computes on [N, H] tokens).

On the CPU every expert runs in the C++ kernel (csrc/moe.cpp). With bf16 tokens and bf16 weights on a
CPU with native bf16 dot products (AVX512-BF16 or AMX) an expert chosen by at least
`BF16_DOT_MIN_ROWS` tokens of the call (prefill) runs on bf16 dot products, which do twice the
multiply-adds per instruction of the AVX2 fp32 path. With AVX512-BF16: 4 to 63 tokens on our
outer-product kernel (tokens in the vector lanes, each weight read once per 16 tokens), 3 tokens on our
dot-product tile (3 to 31 when H or I is odd, then oneDNN); in both, gate and up stay fp32 and the
SwiGLU product is rounded to bf16 once for the second projection, bit-identical for any thread count.
From 64 tokens (and on CPUs with AMX but no AVX512-BF16) as two torch (oneDNN) bf16 GEMMs, which are
faster there once their weight-packing pass is paid off (they round gate, up, the product and the
expert output to bf16, as a bf16 transformers model does; oneDNN may split its sums differently for
another thread count).
Set `lfm_kernels.ops.moe.POLICY = "kernel"` to keep every expert on the AVX2 path (not an environment
variable, on purpose: nothing outside the program silently changes which code runs).
"""

from __future__ import annotations

import torch

from .. import _backend, reference
from .._backend import cpu_has_native_bf16_gemm
from ._checks import FLOAT_DTYPES, check_no_grad, check_same_device, check_same_dtype, check_tensor

_ID_DTYPES = (torch.int64, torch.int32)

# "auto": experts with >= BF16_DOT_MIN_ROWS tokens use native bf16 dot products where the CPU has
# them (see the module docstring); "kernel": every expert on the AVX2 path.
POLICY = "auto"
# Measured on an AVX512-BF16 CPU (2 Zen 4 threads, one expert at the real shape, weights from DRAM):
# the AVX2 path is faster at 1 token (0.83 vs 1.22 ms for oneDNN) and even at 2; from 3 tokens bf16 dot
# products win (1.3x at 3, 1.7x at 16, 2.3x at 64 tokens).
BF16_DOT_MIN_ROWS = 3


def _bf16_dot_min_rows(hidden: torch.Tensor, gate_up_proj: torch.Tensor) -> int:
    """0 (never) or the token count from which an expert runs on bf16 dot products; see POLICY."""
    if (
        POLICY == "auto"
        and hidden.dtype == torch.bfloat16
        and gate_up_proj.dtype == torch.bfloat16
        and hidden.shape[0] >= BF16_DOT_MIN_ROWS
        and cpu_has_native_bf16_gemm()
    ):
        return BF16_DOT_MIN_ROWS
    return 0


def _moe_route_impl(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    expert_bias: torch.Tensor | None,
    top_k: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if hidden.device.type == "cuda" and _backend.triton_available():
        from ..triton.moe import moe_route_triton

        return moe_route_triton(hidden, gate_weight, expert_bias, top_k, norm_topk_prob, routed_scaling_factor)
    if hidden.device.type == "cpu" and _backend.cpu_extension_available():
        return torch.ops.lfm_kernels_cpu.moe_route(
            hidden, gate_weight, expert_bias, top_k, norm_topk_prob, routed_scaling_factor
        )
    weights, ids = reference.moe_route(hidden, gate_weight, expert_bias, top_k, norm_topk_prob, routed_scaling_factor)
    return weights.contiguous(), ids.contiguous()


_moe_route_op = torch.library.custom_op("lfm_kernels::moe_route", _moe_route_impl, mutates_args=())


@_moe_route_op.register_fake
def _(hidden, gate_weight, expert_bias, top_k, norm_topk_prob, routed_scaling_factor):
    n = hidden.shape[0]
    return hidden.new_empty(n, top_k, dtype=torch.float32), hidden.new_empty(n, top_k, dtype=torch.int64)


def _moe_experts_impl(
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    if hidden.device.type == "cuda" and _backend.triton_available():
        from ..triton.moe import moe_experts_triton

        return moe_experts_triton(hidden, gate_up_proj, down_proj, topk_ids, topk_weights)
    if hidden.device.type == "cpu" and _backend.cpu_extension_available():
        return torch.ops.lfm_kernels_cpu.moe_experts(
            hidden, gate_up_proj, down_proj, topk_ids, topk_weights, _bf16_dot_min_rows(hidden, gate_up_proj)
        )
    return reference.moe_experts(hidden, gate_up_proj, down_proj, topk_ids, topk_weights)


_moe_experts_op = torch.library.custom_op("lfm_kernels::moe_experts", _moe_experts_impl, mutates_args=())


@_moe_experts_op.register_fake
def _(hidden, gate_up_proj, down_proj, topk_ids, topk_weights):
    return hidden.new_empty(hidden.shape).contiguous()


# Eager CPU calls run the ops' bodies directly (see _backend.eager_cpu_fast_path); everything else
# (CUDA, torch.compile, no extension) goes through the registered custom ops.
def _route(hidden, *args):
    return (_moe_route_impl if _backend.eager_cpu_fast_path(hidden) else _moe_route_op)(hidden, *args)


def _experts(hidden, *args):
    return (_moe_experts_impl if _backend.eager_cpu_fast_path(hidden) else _moe_experts_op)(hidden, *args)


def _check_route_args(hidden, gate_weight, expert_bias, top_k):
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES, shape_hint="[N, H]")
    check_tensor("gate_weight", gate_weight, ndim=2, dtypes=FLOAT_DTYPES, shape_hint="[E, H]")
    n_experts, hidden_size = gate_weight.shape
    if hidden_size != hidden.shape[1]:
        raise ValueError(
            f"gate_weight must have shape [E, H={hidden.shape[1]}] (H from hidden), got {tuple(gate_weight.shape)}"
        )
    if n_experts == 0:
        raise ValueError("gate_weight must have at least one expert row [E >= 1, H]")
    if expert_bias is not None:
        check_tensor("expert_bias", expert_bias, ndim=1, dtypes=FLOAT_DTYPES, shape_hint="[E]")
        if expert_bias.shape[0] != n_experts:
            raise ValueError(f"expert_bias must have shape [E={n_experts}], got {tuple(expert_bias.shape)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k must be in [1, E={n_experts}], got {top_k}")
    check_same_device("hidden", hidden, gate_weight=gate_weight, expert_bias=expert_bias)
    return n_experts


def _check_expert_weights(hidden, gate_up_proj, down_proj):
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES, shape_hint="[N, H]")
    check_tensor("gate_up_proj", gate_up_proj, ndim=3, dtypes=FLOAT_DTYPES, shape_hint="[E, 2I, H]")
    check_tensor("down_proj", down_proj, ndim=3, dtypes=FLOAT_DTYPES, shape_hint="[E, H, I]")
    n_experts, two_inter, hidden_size = gate_up_proj.shape
    if hidden_size != hidden.shape[1] or two_inter % 2 != 0 or two_inter == 0:
        raise ValueError(
            f"gate_up_proj must have shape [E, 2I, H={hidden.shape[1]}] with gate rows then up rows, "
            f"got {tuple(gate_up_proj.shape)}"
        )
    inter = two_inter // 2
    if tuple(down_proj.shape) != (n_experts, hidden_size, inter):
        raise ValueError(
            f"down_proj must have shape [E={n_experts}, H={hidden_size}, I={inter}] (from gate_up_proj), "
            f"got {tuple(down_proj.shape)}"
        )
    check_same_dtype("gate_up_proj", gate_up_proj, down_proj=down_proj)
    check_same_device("hidden", hidden, gate_up_proj=gate_up_proj, down_proj=down_proj)
    return n_experts


def moe_route(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    expert_bias: torch.Tensor | None,
    top_k: int,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LFM2-MoE's router: returns (topk_weights float32 [N, k], topk_ids int64 [N, k]).

    Args:
        hidden: [N, H] float32 / bfloat16 / float16 tokens.
        gate_weight: [E, H] router weight.
        expert_bias: optional [E] selection bias (float32 in transformers): experts are chosen on
            sigmoid(logits) + expert_bias, sorted by that score, largest first (ties: lower index).
        top_k: experts per token, 1..E.
        norm_topk_prob: divide the chosen (unbiased) sigmoids by their sum + 1e-6.
        routed_scaling_factor: multiplies the weights at the end.
    Logits, sigmoid and weights are computed in float32.
    """
    check_no_grad("moe_route", hidden=hidden, gate_weight=gate_weight, expert_bias=expert_bias)
    _check_route_args(hidden, gate_weight, expert_bias, top_k)
    return _route(hidden, gate_weight, expert_bias, top_k, bool(norm_topk_prob), float(routed_scaling_factor))


def moe_experts(
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """sum_s topk_weights[n, s] * expert_{topk_ids[n, s]}(hidden[n]) as [N, H] in hidden's dtype.

    Args:
        hidden: [N, H] float32 / bfloat16 / float16.
        gate_up_proj: [E, 2I, H] (gate rows first, then up rows), transformers' fused layout.
        down_proj: [E, H, I], same dtype as gate_up_proj.
        topk_ids: [N, k] int64 / int32 expert ids in [0, E).
        topk_weights: [N, k] float routing weights.
    Each expert is down @ (silu(gate @ h) * (up @ h)); everything accumulates in float32. Only the
    experts that appear in topk_ids are read.
    """
    check_no_grad("moe_experts", hidden=hidden, gate_up_proj=gate_up_proj, down_proj=down_proj, topk_weights=topk_weights)
    n_experts = _check_expert_weights(hidden, gate_up_proj, down_proj)
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=_ID_DTYPES, shape_hint="[N, k]")
    if topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"topk_ids must have shape [N={hidden.shape[0]}, k], got {tuple(topk_ids.shape)}")
    check_tensor("topk_weights", topk_weights, ndim=2, dtypes=FLOAT_DTYPES, shape_hint="[N, k]")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights must have shape [N, k] = {tuple(topk_ids.shape)} (that of topk_ids), "
            f"got {tuple(topk_weights.shape)}"
        )
    check_same_device("hidden", hidden, topk_ids=topk_ids, topk_weights=topk_weights)
    if topk_ids.numel() > 0:
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= n_experts:
            raise ValueError(f"topk_ids must hold expert ids in [0, E={n_experts}), got values in [{lo}, {hi}]")
    return _experts(hidden, gate_up_proj, down_proj, topk_ids, topk_weights)


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
    """The whole sparse MoE block on hidden [N, H] (router, then experts): [N, H] in hidden's dtype.

    Same arguments as `moe_route` and `moe_experts`; this is what transformers'
    `Lfm2MoeSparseMoeBlock` computes on its flattened tokens.
    """
    check_no_grad("moe", hidden=hidden, gate_weight=gate_weight, expert_bias=expert_bias, gate_up_proj=gate_up_proj, down_proj=down_proj)
    n_experts = _check_route_args(hidden, gate_weight, expert_bias, top_k)
    if _check_expert_weights(hidden, gate_up_proj, down_proj) != n_experts:
        raise ValueError(
            f"gate_up_proj has {gate_up_proj.shape[0]} experts but gate_weight has E={n_experts} rows; they must match"
        )
    weights, ids = _route(hidden, gate_weight, expert_bias, top_k, bool(norm_topk_prob), float(routed_scaling_factor))
    # ids come from our own router, so they are in range: skip moe_experts' host-side range check
    return _experts(hidden, gate_up_proj, down_proj, ids, weights)
