"""Top-k MoE routing and expert dispatch, reading only the experts the tokens chose.

`moe_route` is LFM2-MoE's sigmoid router with a selection bias; `moe_experts` runs the chosen
SwiGLU experts on transformers' fused weight layout and sums them with the routing weights;
`moe` is the whole sparse block (what `Lfm2MoeSparseMoeBlock` computes on [N, H] tokens).

On the CPU every expert runs in the C++ kernels (csrc/moe_route.cpp, csrc/moe_experts.cpp). Which
kernel an expert takes (AVX2 tiles, our AVX512-BF16 kernels or oneDNN, for bf16 calls on CPUs with
native bf16 dot products) is the kernel-choice policy's decision: see lfm_kernels/_policy.py.
"""

from __future__ import annotations

import torch

from .. import _backend, _policy, reference
from .._backend import cpu_has_native_bf16_gemm
from ..quant import _BLOCK_BYTES, _BLOCK_SIZE, _K_FORMATS, QuantizedTensor
from ._checks import FLOAT_DTYPES, check_no_grad, check_same_device, check_same_dtype, check_tensor

_ID_DTYPES = (torch.int64, torch.int32)

_NO_BF16_ROUTES = (0, 0, 0, 0)


def _bf16_routes(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor | None = None,
                 policy=None) -> tuple[int, int, int, int]:
    """The policy's bf16 thresholds for the C++ experts kernel, or zeros (every expert on the AVX2
    tiles) when the call is not bf16 x bf16, the CPU has no native bf16 dot products, or the policy
    says kernel_only. policy: the one for this call when the caller has it already."""
    if policy is None:
        policy = _policy._policy_for_moe(hidden, gate_up_proj, down_proj)
    if (
        not policy.kernel_only
        and hidden.dtype == torch.bfloat16
        and gate_up_proj.dtype == torch.bfloat16
        and hidden.shape[0] >= policy.moe_bf16_min_rows
        and cpu_has_native_bf16_gemm()
    ):
        return policy.moe_bf16_routes()
    return _NO_BF16_ROUTES


def _fp32_torch_min_rows(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor | None = None,
                         policy=None) -> int:
    """The C++ experts kernel's fp32_torch_min_rows: tokens per expert from which fp32 experts take
    torch's fp32 GEMM; 0 (never) for other weights or under kernel_only. policy: as for _bf16_routes."""
    if gate_up_proj.dtype != torch.float32:
        return 0
    if policy is None:
        policy = _policy._policy_for_moe(hidden, gate_up_proj, down_proj)
    return 0 if policy.kernel_only else policy.moe_fp32_torch_min_rows


def _bf16_dot_min_rows(hidden: torch.Tensor, gate_up_proj: torch.Tensor) -> int:
    """0 (never) or the token count from which an expert runs on bf16 dot products (the benchmark's label)."""
    return _bf16_routes(hidden, gate_up_proj)[0]


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
        return torch.ops.lfm_kernels_cpu.moe_route.default(
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
        return _cpu_experts_call(hidden, gate_up_proj, down_proj)(hidden, gate_up_proj, down_proj, topk_ids, topk_weights)
    if topk_ids.device.type == "cpu":
        _check_ids_in_range(topk_ids, gate_up_proj.shape[0])
    return reference.moe_experts(hidden, gate_up_proj, down_proj, topk_ids, topk_weights)


def _cpu_experts_call(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor):
    """The C++ experts op with the policy's thresholds for calls like this one (float weights, CPU,
    extension loaded) bound: a function (hidden, gate_up_proj, down_proj, topk_ids, topk_weights) -> out.
    The model's decode step asks it once per shape class and step (model/direct.py)."""
    policy = _policy._policy_for_moe(hidden, gate_up_proj, down_proj)  # one lookup for both
    thresholds = (*_bf16_routes(hidden, gate_up_proj, down_proj, policy),
                  _fp32_torch_min_rows(hidden, gate_up_proj, down_proj, policy))
    op = torch.ops.lfm_kernels_cpu.moe_experts.default
    return lambda h, gu, dn, ids, weights: op(h, gu, dn, ids, weights, *thresholds)


def _check_ids_in_range(topk_ids: torch.Tensor, n_experts: int) -> None:
    """The C++ op's id check, for the reference fallback on CPU tensors (host data: no sync)."""
    if topk_ids.numel() > 0:
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= n_experts:
            raise ValueError(f"topk_ids must hold expert ids in [0, E={n_experts}), got values in [{lo}, {hi}]")


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


def _check_routing(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
    """Shapes, dtypes and device of a call's routing (float and quantized experts alike); the id range
    is checked where the ids are read."""
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
        topk_ids: [N, k] int64 / int32 expert ids in [0, E) (checked where they are read: the CPU kernel
            raises a ValueError naming topk_ids; the CUDA kernel does not read them back to check).
        topk_weights: [N, k] float routing weights.
    Each expert is down @ (silu(gate @ h) * (up @ h)); everything accumulates in float32. Only the
    experts that appear in topk_ids are read.

    gate_up_proj and down_proj may both be `lfm_kernels.QuantizedTensor` (CPU only): GGUF Q8_0 or Q4_0
    blocks in one format for both (H and I multiples of 32; the tokens and the SwiGLU product are then
    quantized per block of 32 to int8), or K-quants Q4_K / Q5_K / Q6_K, each weight in any of the three
    (H and I multiples of 256; activations quantized per 256 with per-16 sums). The dot products are
    integer (see `_moe_experts_quantized`).
    """
    check_no_grad("moe_experts", hidden=hidden, gate_up_proj=gate_up_proj, down_proj=down_proj, topk_weights=topk_weights)
    if isinstance(gate_up_proj, QuantizedTensor) or isinstance(down_proj, QuantizedTensor):
        return _moe_experts_quantized(hidden, gate_up_proj, down_proj, topk_ids, topk_weights)
    n_experts = _check_expert_weights(hidden, gate_up_proj, down_proj)
    _check_routing(hidden, topk_ids, topk_weights)
    # The id range is checked where the ids are read (the C++ op, the CPU reference fallback), never
    # here: reading them on the host would sync CUDA and break torch.compile(fullgraph=True).
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
    if isinstance(gate_up_proj, QuantizedTensor) or isinstance(down_proj, QuantizedTensor):
        return _moe_quantized(
            hidden, gate_weight, expert_bias, gate_up_proj, down_proj, top_k, norm_topk_prob, routed_scaling_factor
        )
    n_experts = _check_route_args(hidden, gate_weight, expert_bias, top_k)
    if _check_expert_weights(hidden, gate_up_proj, down_proj) != n_experts:
        raise ValueError(
            f"gate_up_proj has {gate_up_proj.shape[0]} experts but gate_weight has E={n_experts} rows; they must match"
        )
    weights, ids = _route(hidden, gate_weight, expert_bias, top_k, bool(norm_topk_prob), float(routed_scaling_factor))
    return _experts(hidden, gate_up_proj, down_proj, ids, weights)


# ------------------------------------------------------------------------------------------------
# Experts on quantized weights (GGUF Q8_0 / Q4_0 blocks; csrc/moe_experts.cpp's quantized pass).


def _run_quant_experts(layout, hidden, gate_up_q, down_q, format, num_experts, intermediate, topk_ids, topk_weights,
                       dequant_gemm_min_rows=0, amx_min_rows=0):
    """The C++ op for this weight layout ("rows": moe_experts_quant, "x8": moe_experts_quant_x8), or without
    the compiled extension the float64 reference (after the one warning) on the weights in rows."""
    if hidden.device.type != "cpu":
        raise NotImplementedError(
            f"quantized MoE experts ({format}) run on the CPU only (C++ kernels); hidden is on {hidden.device}"
        )
    name = "moe_experts_quant" if layout == "rows" else "moe_experts_quant_x8"
    if _backend.cpu_extension_available() and hasattr(torch.ops.lfm_kernels_cpu, name):
        return getattr(torch.ops.lfm_kernels_cpu, name).default(
            hidden, gate_up_q, down_q, format, num_experts, intermediate, topk_ids, topk_weights, dequant_gemm_min_rows,
            amx_min_rows
        )
    h = hidden.shape[1]
    gu = QuantizedTensor(gate_up_q.reshape(num_experts, 2 * intermediate, -1), format,
                         (num_experts, 2 * intermediate, h), layout)
    dn = QuantizedTensor(down_q.reshape(num_experts, h, -1), format, (num_experts, h, intermediate), layout)
    return reference.moe_experts_quant(hidden, gu.to_layout("rows"), dn.to_layout("rows"), topk_ids,
                                       topk_weights).to(hidden.dtype)


def _experts_fake(hidden, *args, **kwargs):
    return hidden.new_empty(hidden.shape).contiguous()


def _register_experts_op(name: str, impl):
    """lfm_kernels::<name> as a custom op running impl, and the shape of both it and the C++ op
    lfm_kernels_cpu::<name> (for tracing either directly; skipped for an extension built without it)."""
    op = torch.library.custom_op(f"lfm_kernels::{name}", impl, mutates_args=())
    op.register_fake(_experts_fake)
    if _backend._C is not None and hasattr(torch.ops.lfm_kernels_cpu, name):
        torch.library.register_fake(f"lfm_kernels_cpu::{name}")(_experts_fake)
    return op


def _quant_experts_impl(layout: str):
    """The body of the Q8_0 / Q4_0 experts' custom op on weights in this layout ("rows": GGUF's, "x8":
    lfm_kernels/quant.py); its annotations are the op's schema."""

    def impl(
        hidden: torch.Tensor,
        gate_up_q: torch.Tensor,
        down_q: torch.Tensor,
        format: str,
        num_experts: int,
        intermediate: int,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        dequant_gemm_min_rows: int = 0,
        amx_min_rows: int = 0,
    ) -> torch.Tensor:
        return _run_quant_experts(layout, hidden, gate_up_q, down_q, format, num_experts, intermediate, topk_ids,
                                  topk_weights, dequant_gemm_min_rows, amx_min_rows)

    return impl


_moe_experts_quant_impl = _quant_experts_impl("rows")
_moe_experts_quant_x8_impl = _quant_experts_impl("x8")
_moe_experts_quant_op = _register_experts_op("moe_experts_quant", _moe_experts_quant_impl)
_moe_experts_quant_x8_op = _register_experts_op("moe_experts_quant_x8", _moe_experts_quant_x8_impl)


# K-quant experts (Q4_K / Q5_K / Q6_K, gate_up and down each in its own format;
# csrc/moe_experts_kquant.cpp).


def _moe_experts_kquant_reference(hidden, gate_up_proj, down_proj, topk_ids, topk_weights) -> torch.Tensor:
    """What the K-quant experts compute, in float64 ([N, H]): the weights dequantized exactly, the tokens
    and the fp32 SwiGLU product quantized per 256 as the kernels do (per-256 int8, scale max|x| / 127),
    exact products and sums. A kernel differs from this by its fp32 sums only (and where its fp32 act
    lands on the other side of an int8 rounding boundary: one step of a single act value)."""
    from ..quant import QK_K, _quantize_activations

    def dequant_act(x: torch.Tensor) -> torch.Tensor:
        q, d = _quantize_activations(x, QK_K)
        m, k = x.shape
        return (q.double().reshape(m, k // QK_K, QK_K) * d.double().unsqueeze(-1)).reshape(m, k)

    gate_up_proj, down_proj = gate_up_proj.to_layout("rows"), down_proj.to_layout("rows")
    n_tokens, hidden_size = hidden.shape
    inter = gate_up_proj.shape[1] // 2
    h = dequant_act(hidden.float())
    out = torch.zeros(n_tokens, hidden_size, dtype=torch.float64, device=hidden.device)
    for expert in torch.unique(topk_ids).tolist():
        token, slot = torch.where(topk_ids == expert)
        gu = QuantizedTensor(gate_up_proj.data[expert], gate_up_proj.format, gate_up_proj.shape[1:])
        dn = QuantizedTensor(down_proj.data[expert], down_proj.format, down_proj.shape[1:])
        gate_up = h[token] @ gu.dequantize(torch.float64).t()
        act = (torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]).float()
        down = dequant_act(act) @ dn.dequantize(torch.float64).t()
        out.index_add_(0, token, down * topk_weights[token, slot, None].double())
    return out


def _run_kquant_experts(layout, hidden, gate_up_q, down_q, gate_up_format, down_format, num_experts, intermediate,
                        topk_ids, topk_weights, dequant_gemm_min_rows=0):
    """The C++ op for this weight layout ("rows": moe_experts_kquant, "x8": moe_experts_kquant_x8), or without
    the extension the float64 reference (after the one warning)."""
    if hidden.device.type != "cpu":
        raise NotImplementedError(
            f"quantized MoE experts ({gate_up_format}) run on the CPU only (C++ kernels); hidden is on {hidden.device}"
        )
    name = "moe_experts_kquant" if layout == "rows" else "moe_experts_kquant_x8"
    if _backend.cpu_extension_available() and hasattr(torch.ops.lfm_kernels_cpu, name):
        return getattr(torch.ops.lfm_kernels_cpu, name).default(
            hidden, gate_up_q, down_q, gate_up_format, down_format, num_experts, intermediate, topk_ids, topk_weights,
            dequant_gemm_min_rows
        )
    h = hidden.shape[1]
    gu = QuantizedTensor(gate_up_q.reshape(num_experts, 2 * intermediate, -1), gate_up_format,
                         (num_experts, 2 * intermediate, h), layout)
    dn = QuantizedTensor(down_q.reshape(num_experts, h, -1), down_format, (num_experts, h, intermediate), layout)
    return _moe_experts_kquant_reference(hidden, gu, dn, topk_ids, topk_weights).to(hidden.dtype)


def _kquant_experts_impl(layout: str):
    """The body of the K-quant experts' custom op on weights in this layout (as _quant_experts_impl)."""

    def impl(
        hidden: torch.Tensor,
        gate_up_q: torch.Tensor,
        down_q: torch.Tensor,
        gate_up_format: str,
        down_format: str,
        num_experts: int,
        intermediate: int,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        dequant_gemm_min_rows: int = 0,
    ) -> torch.Tensor:
        return _run_kquant_experts(layout, hidden, gate_up_q, down_q, gate_up_format, down_format, num_experts,
                                   intermediate, topk_ids, topk_weights, dequant_gemm_min_rows)

    return impl


_moe_experts_kquant_impl = _kquant_experts_impl("rows")
_moe_experts_kquant_x8_impl = _kquant_experts_impl("x8")
_moe_experts_kquant_op = _register_experts_op("moe_experts_kquant", _moe_experts_kquant_impl)
_moe_experts_kquant_x8_op = _register_experts_op("moe_experts_kquant_x8", _moe_experts_kquant_x8_impl)


def _check_quant_expert_weights(hidden, gate_up_proj, down_proj) -> int:
    """Validates quantized expert weights against hidden [N, H]; returns E."""
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES, shape_hint="[N, H]")
    for name, w in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if not isinstance(w, QuantizedTensor):
            raise TypeError(
                f"{name} must be a QuantizedTensor when the other expert weight is one (both quantized in one "
                f"format, or both float tensors), got {type(w).__name__}"
            )
    kquant = gate_up_proj.format in _K_FORMATS
    if down_proj.format != gate_up_proj.format and not (kquant and down_proj.format in _K_FORMATS):
        raise ValueError(
            f"down_proj must be in gate_up_proj's format {gate_up_proj.format!r} (Q8_0 / Q4_0: one format for "
            f"both; K-quants: any of {_K_FORMATS} each), got {down_proj.format!r}"
        )
    if down_proj.layout != gate_up_proj.layout:
        raise ValueError(
            f"down_proj must be in gate_up_proj's layout {gate_up_proj.layout!r} (one layout for both; "
            f"QuantizedTensor.to_layout converts), got {down_proj.layout!r}"
        )
    block = _BLOCK_SIZE[gate_up_proj.format]
    hidden_size = hidden.shape[1]
    if len(gate_up_proj.shape) != 3:
        raise ValueError(f"gate_up_proj must have shape [E, 2I, H={hidden_size}], got {list(gate_up_proj.shape)}")
    n_experts, two_inter, h = gate_up_proj.shape
    if h != hidden_size or two_inter % 2 != 0:
        raise ValueError(
            f"gate_up_proj must have shape [E, 2I, H={hidden_size}] with gate rows then up rows, "
            f"got {list(gate_up_proj.shape)}"
        )
    inter = two_inter // 2
    if inter % block != 0:
        raise ValueError(
            f"gate_up_proj's I (half of its second dimension, {inter}) must be a multiple of {block} for "
            f"{gate_up_proj.format} experts (down_proj's blocks run along I), got shape {list(gate_up_proj.shape)}"
        )
    if tuple(down_proj.shape) != (n_experts, hidden_size, inter):
        raise ValueError(
            f"down_proj must have shape [E={n_experts}, H={hidden_size}, I={inter}] (from gate_up_proj), "
            f"got {list(down_proj.shape)}"
        )
    for name, w, rows, k in (
        ("gate_up_proj", gate_up_proj, n_experts * two_inter, hidden_size),
        ("down_proj", down_proj, n_experts * hidden_size, inter),
    ):
        if k % block != 0:
            raise ValueError(
                f"{name}'s K ({k}, its last dimension) must be a multiple of {block} for {w.format} blocks, "
                f"got shape {list(w.shape)}"
            )
        expected = rows * (k // block) * _BLOCK_BYTES[w.format]
        if not isinstance(w.data, torch.Tensor) or w.data.dtype != torch.uint8 or w.data.numel() != expected:
            got = f"{w.data.dtype} with {w.data.numel()} bytes" if isinstance(w.data, torch.Tensor) else type(w.data).__name__
            raise ValueError(
                f"{name}.data must be uint8 holding {expected} bytes ({w.format} blocks of shape {list(w.shape)}, "
                f"layout {w.layout!r}), got {got}"
            )
        if w.data.device != hidden.device:
            raise ValueError(f"{name} is on {w.data.device} but hidden is on {hidden.device}; put them on one device")
    if hidden.device.type != "cpu":
        raise NotImplementedError(
            f"quantized MoE experts ({gate_up_proj.format}) run on the CPU only (C++ kernels); hidden is on {hidden.device}"
        )
    return n_experts


def _quant_experts(hidden, gate_up_proj, down_proj, topk_ids, topk_weights):
    """The experts on checked QuantizedTensor weights."""
    routes = _policy.quant_routes("moe", hidden, gate_up_proj, down_proj)
    call = _quant_experts_call(gate_up_proj, down_proj, routes, _backend.eager_cpu_fast_path(hidden))
    return call(hidden, gate_up_proj.data, down_proj.data, topk_ids, topk_weights)


def _quant_experts_call(gate_up_proj, down_proj, routes, eager: bool):
    """The call `_quant_experts` makes for expert weights of these formats, layout and shapes on these
    routes (`_policy.quant_routes("moe", ...)`): a function (hidden, gate_up blocks, down blocks,
    topk_ids, topk_weights) -> out. The model's decode step asks it once per shape class and step and
    calls it for every MoE layer of that class (model/direct.py). eager: run the custom ops' bodies
    instead of the registered ops (which torch.compile must see)."""
    gemm_rows, amx_rows = routes
    E, I = gate_up_proj.shape[0], gate_up_proj.shape[1] // 2
    x8 = gate_up_proj.layout == "x8"
    if gate_up_proj.format in _K_FORMATS:
        if x8:
            op = _moe_experts_kquant_x8_impl if eager else _moe_experts_kquant_x8_op
        else:
            op = _moe_experts_kquant_impl if eager else _moe_experts_kquant_op
        formats, thresholds = (gate_up_proj.format, down_proj.format), (gemm_rows,)
    else:
        if x8:
            op = _moe_experts_quant_x8_impl if eager else _moe_experts_quant_x8_op
        else:
            op = _moe_experts_quant_impl if eager else _moe_experts_quant_op
        formats, thresholds = (gate_up_proj.format,), (gemm_rows, amx_rows)

    def call(hidden, data_gu, data_dn, topk_ids, topk_weights):
        if not data_gu.is_contiguous():
            data_gu = data_gu.contiguous()
        if not data_dn.is_contiguous():
            data_dn = data_dn.contiguous()
        return op(hidden, data_gu, data_dn, *formats, E, I, topk_ids, topk_weights, *thresholds)

    return call


def _quant_routes_used(hidden, gate_up_proj, down_proj, topk_ids) -> str:
    """The routes the experts of a quantized call take now, for the bench: "bf16-gemm", "amx-int8"
    and the integer-dot kernels ("x8" / "rows", the weights' layout), joined by "+" (fewest tokens
    last)."""
    gemm_rows, amx_rows = _policy.quant_routes("moe", hidden, gate_up_proj, down_proj)
    counts = torch.bincount(topk_ids.flatten().cpu(), minlength=gate_up_proj.shape[0]).tolist()
    used = set()
    for n in counts:
        if n == 0:
            continue
        if gemm_rows and n >= gemm_rows:
            used.add("bf16-gemm")
        elif amx_rows and n >= amx_rows and gate_up_proj.layout == "x8":
            used.add("amx-int8")
        else:
            used.add(gate_up_proj.layout)
    return "+".join(r for r in ("bf16-gemm", "amx-int8", "x8", "rows") if r in used)


def _moe_experts_quantized(hidden, gate_up_proj, down_proj, topk_ids, topk_weights):
    """`moe_experts` on QuantizedTensor weights [E, 2I, H] / [E, H, I] (Q8_0 or Q4_0, the same for both;
    or Q4_K / Q5_K / Q6_K, each its own, with 256-blocks for the activations instead of 32-blocks).

    Only the chosen experts' blocks are read. hidden is quantized once per token and 32-block to int8
    (fp32 scale); the SwiGLU product act, kept in fp32, is quantized the same way per (token, expert)
    for the down projection; block dot products are exact integers, summed in fp32, and the expert
    outputs are combined with the routing weights in fp32; the output has hidden's dtype. Bits do not
    depend on the thread count. CPU only (a CUDA tensor raises NotImplementedError).
    """
    _check_quant_expert_weights(hidden, gate_up_proj, down_proj)
    _check_routing(hidden, topk_ids, topk_weights)
    # expert ids out of [0, E) are rejected by the C++ op (ValueError) without a host-side pass here
    return _quant_experts(hidden, gate_up_proj, down_proj, topk_ids, topk_weights)


def _moe_quantized(hidden, gate_weight, expert_bias, gate_up_proj, down_proj, top_k, norm_topk_prob,
                   routed_scaling_factor):
    """`moe` with QuantizedTensor expert weights: the router as usual, then `_moe_experts_quantized`."""
    n_experts = _check_route_args(hidden, gate_weight, expert_bias, top_k)
    if _check_quant_expert_weights(hidden, gate_up_proj, down_proj) != n_experts:
        raise ValueError(
            f"gate_up_proj has {gate_up_proj.shape[0]} experts but gate_weight has E={n_experts} rows; they must match"
        )
    weights, ids = _route(hidden, gate_weight, expert_bias, top_k, bool(norm_topk_prob), float(routed_scaling_factor))
    return _quant_experts(hidden, gate_up_proj, down_proj, ids, weights)
