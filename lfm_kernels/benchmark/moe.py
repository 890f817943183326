"""Benchmark cases for the MoE experts at LFM2.5-8B-A1B's shape (H 2048, I 1792, E 32, top-4).

The kernel (`lfm_kernels.moe_experts`) runs against transformers' own `Lfm2MoeExperts` holding the
same weight tensors, once with its eager per-expert loop ("hf_eager") and once with its
`grouped_mm` experts implementation ("hf_grouped_mm", when the installed transformers has it).
Decode (N = 1) and N = 16 are judged by the bytes of the experts they must read; N = 128 (the
end-to-end runs' prompt) and N = 512 by flops.
"""

from __future__ import annotations

import torch

from .. import _backend, _memory, reference
from ..ops import moe as moe_ops
from ..ops.moe import moe_experts
from ..quant import QuantizedTensor
from .core import QUANT_CHECK_TOL, Case, forced_quant_paths

HIDDEN, INTER, EXPERTS, TOP_K = 2048, 1792, 32, 4

_weights: dict = {}  # one set of expert weights (per dtype/device), shared by the cases of that dtype


def _expert_weights(dtype: torch.dtype, device: str):
    key = (dtype, device)
    if key not in _weights:
        _weights.clear()  # keep one dtype's 0.7-1.4 GB at a time
        # on huge pages where the model keeps its weights (lfm_kernels/_memory.py), for every column
        gate_up = _memory.empty(EXPERTS, 2 * INTER, HIDDEN, dtype=dtype, device=device)
        down = _memory.empty(EXPERTS, HIDDEN, INTER, dtype=dtype, device=device)
        for e in range(EXPERTS):  # one expert at a time: no fp32 temporary of the whole tensor
            gate_up[e].copy_(torch.randn(2 * INTER, HIDDEN, device=device) * 0.02)
            down[e].copy_(torch.randn(HIDDEN, INTER, device=device) * 0.02)
        _weights[key] = (gate_up, down)
    return _weights[key]


def _hf_experts(implementation: str, gate_up: torch.Tensor, down: torch.Tensor):
    """transformers' Lfm2MoeExperts sharing our weight tensors, set to one experts implementation."""
    from transformers import Lfm2MoeConfig
    from transformers.models.lfm2_moe.modeling_lfm2_moe import Lfm2MoeExperts

    cfg = Lfm2MoeConfig(
        hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=EXPERTS, num_experts_per_tok=TOP_K
    )
    cfg._experts_implementation = implementation
    with torch.device("meta"):  # no 2 GB of placeholder parameters
        module = Lfm2MoeExperts(cfg)
    module.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    module.down_proj = torch.nn.Parameter(down, requires_grad=False)
    return module.eval()


def _has_grouped_mm() -> bool:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return False
    return "grouped_mm" in ALL_EXPERTS_FUNCTIONS


def _baselines(has_transformers: bool) -> dict:
    out = {
        "reference": lambda i: reference.moe_experts(i["hidden"], i["gate_up_proj"], i["down_proj"], i["ids"], i["weights"])
    }
    if not has_transformers:
        return out

    def run(name):
        def fn(i):
            with torch.no_grad():
                return i[name](i["hidden"], i["ids"], i["weights"])

        return fn

    out["eager"] = run("hf_eager")  # transformers' eager experts loop
    if _has_grouped_mm():
        out["hf_grouped_mm"] = run("hf_grouped_mm")
    return out


def _label(n: int, dtype: torch.dtype, device: str) -> str:
    """The backend, plus "+bf16dot" where experts with enough tokens run on native bf16 dot products
    (our AVX512-BF16 kernels below 64 tokens per expert, oneDNN from 64; see lfm_kernels.ops.moe)."""
    base = _backend.backend_for(torch.empty(0, device=device))
    if device == "cpu" and base in ("avx2", "portable"):
        probe = torch.empty(n, 1, dtype=dtype)
        if moe_ops._bf16_dot_min_rows(probe, probe) > 0:
            return base + "+bf16dot"
    return base


def _path(i: dict) -> str:
    """The routes these inputs' experts take under the kernel-choice policy (see lfm_kernels/_policy.py),
    joined by "+" in the order of their row counts."""
    from .._chooser import MOE_ROUTES, moe_route

    hidden, gate_up = i["hidden"], i["gate_up_proj"]
    if hidden.device.type != "cpu" or _backend._C is None:
        return ""
    counts = torch.bincount(i["ids"].flatten().cpu(), minlength=gate_up.shape[0]).tolist()
    if gate_up.dtype == torch.float32:
        t = moe_ops._fp32_torch_min_rows(hidden, gate_up)
        used = {"torch" if 0 < t <= n else "tiled" for n in counts if n > 0}
        return "+".join(r for r in ("tiled", "torch") if r in used)
    thresholds = moe_ops._bf16_routes(hidden, gate_up)
    if thresholds[0] == 0:
        return "tiled"
    own = bool(_backend._C.cpu_supports_avx512bf16()) and not moe_ops._policy.get_policy().portable
    pairs_fit = gate_up.shape[2] % 2 == 0 and (gate_up.shape[1] // 2) % 2 == 0
    used = {moe_route(n, *thresholds, own, pairs_fit) for n in counts if n > 0}
    return "+".join(r for r in MOE_ROUTES if r in used)


def _paths(dtype: torch.dtype, device: str) -> dict:
    """Every expert on one route, for each route valid for these experts on this CPU (bf16: ours and
    oneDNN's; fp32: our tiles and torch's fp32 GEMM; none to choose from: empty)."""
    from .._chooser import _FORCE_MOE, _FORCE_MOE_FP32

    if device != "cpu" or _backend._C is None:
        return {}
    if dtype == torch.float32:  # our fp32 tiles or torch's fp32 GEMM for every expert
        force, routes = _FORCE_MOE_FP32, ["tiled", "torch"]
    elif dtype == torch.bfloat16 and _backend.cpu_has_native_bf16_gemm():
        force = _FORCE_MOE
        routes = ["tiled", "dot", "outer", "onednn"] if _backend._C.cpu_supports_avx512bf16() else ["tiled", "onednn"]
    else:
        return {}

    def forced(route):
        return lambda i: torch.ops.lfm_kernels_cpu.moe_experts(
            i["hidden"], i["gate_up_proj"], i["down_proj"], i["ids"], i["weights"], *force[route])

    return {r: forced(r) for r in routes}


def cases(device: str = "cpu", quick: bool = False) -> list[Case]:
    try:
        import transformers  # noqa: F401

        has_transformers = True
    except ImportError:
        has_transformers = False
    dtypes = [torch.bfloat16] if device.startswith("cuda") else [torch.bfloat16, torch.float32]
    # 128: the prompt length of the end-to-end runs (about 16 tokens per expert)
    sizes = [("decode", 1), ("prefill", 16), ("prefill", 128)] + ([] if quick else [("prefill", 512)])
    out = []
    for dtype in dtypes:
        for kind, n in sizes:

            def make(n=n, dtype=dtype):
                gate_up, down = _expert_weights(dtype, device)
                # distinct experts per token, as the router gives; fresh choices and weights per call
                ids = torch.stack([torch.randperm(EXPERTS)[:TOP_K] for _ in range(n)]).to(device)
                weights = torch.rand(n, TOP_K, device=device) + 0.05
                weights = weights / weights.sum(-1, keepdim=True)
                inputs = {
                    "hidden": torch.randn(n, HIDDEN, device=device).to(dtype),
                    "gate_up_proj": gate_up,
                    "down_proj": down,
                    "ids": ids,
                    "weights": weights,
                }
                if has_transformers:
                    inputs["hf_eager"] = _hf_experts("eager", gate_up, down)
                    if _has_grouped_mm():
                        inputs["hf_grouped_mm"] = _hf_experts("grouped_mm", gate_up, down)
                return inputs

            size = torch.finfo(dtype).bits // 8
            expert_bytes = 3 * HIDDEN * INTER * size
            # expected number of distinct experts among n tokens choosing TOP_K of EXPERTS each
            active = EXPERTS * (1 - (1 - TOP_K / EXPERTS) ** n)
            moved = int(round(active * expert_bytes)) + 2 * n * HIDDEN * size
            out.append(
                Case(
                    op="moe",
                    name=f"{kind}-N{n}-H{HIDDEN}-I{INTER}-E{EXPERTS}-k{TOP_K}",
                    dtype=dtype,
                    device=device,
                    make_inputs=make,
                    kernel=lambda i: moe_experts(i["hidden"], i["gate_up_proj"], i["down_proj"], i["ids"], i["weights"]),
                    baselines=_baselines(has_transformers),
                    host_sync=frozenset({"eager"}),  # transformers' loop asks which experts were hit
                    bytes_moved=moved,
                    flops=n * TOP_K * 6 * HIDDEN * INTER,
                    compute_bound=n >= 128,
                    backend=_label(n, dtype, device),
                    path=_path if device == "cpu" else None,
                    paths=_paths(dtype, device),
                )
            )
    if device == "cpu" and not quick:  # quantizing the experts takes a while: the full run only
        out.extend(_quantized_cases(sizes[:3]))
    return out


# ------------------------------------------------------------------------------------------------
# Quantized experts (GGUF Q8_0 / Q4_0 blocks)

_qweights: dict = {}  # one format's quantized experts and their bf16 dequantization at a time


def _quantized_expert_weights(fmt: str):
    """fmt: one format for both weights ("q8_0"), or "gate_up/down" ("q4_k/q6_k": Q4_K_M's mix). The
    quantized experts come in the x8 layout, as the model wrapper and the patch store them. Every
    format quantizes the same kind of weights, Gaussian at the model's scale (0.02), expert by
    expert (no fp32 copy of the whole tensor). Random K-quant blocks would time the same, but their
    sub-block mins give each row a mean, the outputs of one token then cancel to a few percent of the
    terms, and the int8 rounding of the activations (per 256 for K-quants) becomes a large share
    of what is left: a check against bf16 would fail on a correct kernel."""
    if fmt not in _qweights:
        from ..quant import quantize

        _qweights.clear()
        fg, fd = fmt.split("/") if "/" in fmt else (fmt, fmt)
        gate_up = _memory.empty(EXPERTS, 2 * INTER, HIDDEN, dtype=torch.bfloat16)
        down = _memory.empty(EXPERTS, HIDDEN, INTER, dtype=torch.bfloat16)
        gu_blocks, dn_blocks = [], []
        for e in range(EXPERTS):
            g = quantize(torch.randn(2 * INTER, HIDDEN) * 0.02, fg)
            d = quantize(torch.randn(HIDDEN, INTER) * 0.02, fd)
            gate_up[e].copy_(g.dequantize(torch.bfloat16))
            down[e].copy_(d.dequantize(torch.bfloat16))
            gu_blocks.append(g.data)
            dn_blocks.append(d.data)
        q_gate_up = QuantizedTensor(torch.stack(gu_blocks), fg, (EXPERTS, 2 * INTER, HIDDEN))
        q_down = QuantizedTensor(torch.stack(dn_blocks), fd, (EXPERTS, HIDDEN, INTER))
        # the quantized blocks on huge pages as the model keeps them (lfm_kernels/_memory.py)
        _qweights[fmt] = (_memory.on_huge_pages(q_gate_up.to_layout("x8")),
                          _memory.on_huge_pages(q_down.to_layout("x8")), gate_up, down)
    return _qweights[fmt]


def _quant_backend() -> str:
    if _backend._C is None or not hasattr(torch.ops.lfm_kernels_cpu, "moe_experts_quant"):
        return "reference"
    return torch.ops.lfm_kernels_cpu._quant_isa_info()[0]


def _integer_experts(i: dict):
    """The quantized experts on the integer-dot kernels only (what the AMX / bf16 GEMM routes replace
    for experts with many tokens; kernel_only keeps them): the runner-up."""
    with moe_ops._policy.kernel_policy(kernel_only=True):
        return moe_experts(i["hidden"], i["q_gate_up"], i["q_down"], i["ids"], i["weights"])


def _forced_quant_experts(fmt: str) -> dict:
    """The quantized experts' routes, each forced for every expert, that exist on this CPU for this
    format (the runner-ups): the integer-dot kernels always, and `forced_quant_paths`."""
    out = {"x8": _integer_experts}
    out.update(forced_quant_paths(
        "moe", fmt, lambda i: moe_experts(i["hidden"], i["q_gate_up"], i["q_down"], i["ids"], i["weights"])))
    return out


def _quantized_cases(sizes) -> list[Case]:
    """The experts with Q8_0 / Q4_0 / K-quant (Q4_K, and Q4_K_M's Q4_K gate_up with Q6_K down) weights
    and bf16 tokens. bytes_moved counts the quantized blocks
    of the experts the tokens choose (so GB/s and the share of the bandwidth floor stay honest).
    Baseline "moe_bf16": our experts on the same weights dequantized to bf16, in the same run (the
    A/B against bf16; it reads 3.6x / 1.9x the bytes of Q4_0 / Q8_0)."""
    from ..quant import _BLOCK_BYTES

    out = []
    for fmt in ("q8_0", "q4_0", "q4_k", "q4_k/q6_k"):
        fg, fd = fmt.split("/") if "/" in fmt else (fmt, fmt)
        for kind, n in sizes:

            def make(n=n, fmt=fmt):
                q_gate_up, q_down, gate_up, down = _quantized_expert_weights(fmt)
                ids = torch.stack([torch.randperm(EXPERTS)[:TOP_K] for _ in range(n)])
                weights = torch.rand(n, TOP_K) + 0.05
                return {
                    "hidden": torch.randn(n, HIDDEN).to(torch.bfloat16),
                    "q_gate_up": q_gate_up,
                    "q_down": q_down,
                    "gate_up_bf16": gate_up,
                    "down_bf16": down,
                    "ids": ids,
                    "weights": weights / weights.sum(-1, keepdim=True),
                }

            bs = 256 if fg.endswith("_k") else 32
            expert_bytes = HIDDEN * INTER // bs * (2 * _BLOCK_BYTES[fg] + _BLOCK_BYTES[fd])
            active = EXPERTS * (1 - (1 - TOP_K / EXPERTS) ** n)
            out.append(
                Case(
                    op="moe",
                    name=f"{kind}-N{n}-H{HIDDEN}-I{INTER}-E{EXPERTS}-k{TOP_K}-w{fmt.replace('/', '+')}",
                    dtype=torch.bfloat16,
                    device="cpu",
                    make_inputs=make,
                    kernel=lambda i: moe_experts(i["hidden"], i["q_gate_up"], i["q_down"], i["ids"], i["weights"]),
                    baselines={
                        "moe_bf16": lambda i: moe_experts(
                            i["hidden"], i["gate_up_bf16"], i["down_bf16"], i["ids"], i["weights"]
                        )
                    },
                    bytes_moved=int(round(active * expert_bytes)) + 2 * n * HIDDEN * 2,
                    flops=n * TOP_K * 6 * HIDDEN * INTER,
                    compute_bound=n >= 128,
                    backend=_quant_backend(),
                    path=lambda i: moe_ops._quant_routes_used(i["hidden"], i["q_gate_up"], i["q_down"], i["ids"]),
                    paths=_forced_quant_experts(fg),
                    check_tol=QUANT_CHECK_TOL,
                )
            )
    return out
