"""Benchmark cases for the CPU linear at LFM2.5-8B-A1B's projection shapes (hidden 2048).

M = 1 is a decode step (bandwidth bound: bytes_moved is the weight plus x and out); M = 128 / 512 are
prefill chunks (compute bound: flops = 2*M*N*K). Baselines: torch's F.linear on the same weights
("torch_bf16" for bf16 weights) and on fp32 copies ("torch_fp32"), and "cpp_kernel", the C++ kernel
called directly: `linear` itself hands bf16 x bf16 products of >= 3 rows to torch on CPUs with AVX512-BF16 /
AMX (see ops/linear.py), where "cpp_kernel" still shows what the kernel does. CPU only: on CUDA the op
is torch's own F.linear, so there is nothing to compare. The "-wq8_0" / "-wq4_0" rows run the same
shapes on GGUF-quantized weights (int8 activations, integer dot products); the "-wq4_k" / "-wq5_k" /
"-wq6_k" rows on K-quant weights (random blocks: see `_random_kquant`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend, _memory
from ..ops import linear as linear_mod
from ..ops.linear import linear
from .. import quant as _quant
from .._policy import get_policy, kernel_policy
from ..quant import _BLOCK_BYTES, QK_K, QuantizedTensor, quantize
from .core import QUANT_CHECK_TOL, Case, forced_quant_paths

HIDDEN = 2048
# (name, N, K): the projections a token goes through in LFM2.5-8B-A1B
SHAPES = [
    ("in_proj", 3 * HIDDEN, HIDDEN),  # short conv in_proj (B, C, x)
    ("out_proj", HIDDEN, HIDDEN),  # short conv / attention out_proj
    ("ffn_up", 7168, HIDDEN),  # dense layers 0-1: w1 / w3
    ("ffn_down", HIDDEN, 7168),  # dense layers 0-1: w2
    ("lm_head", 128000, HIDDEN),  # decode only (prefill needs just the last position's logits)
]


def cases(device: str = "cpu", quick: bool = False) -> list[Case]:
    if not device.startswith("cpu"):
        return []
    rows = [1, 128] if quick else [1, 128, 512]
    shapes = SHAPES[:2] if quick else SHAPES
    out = []
    for w_dtype in (torch.bfloat16, torch.float32):
        for name, n, k in shapes:
            for m in rows:
                if name == "lm_head" and m > 1:
                    continue

                def make(m=m, n=n, k=k, w_dtype=w_dtype):
                    # on huge pages as the model keeps its weights (lfm_kernels/_memory.py), for every column
                    w = _memory.on_huge_pages((torch.randn(n, k) / k**0.5).to(w_dtype))
                    inp = {"x": torch.randn(m, k, dtype=torch.bfloat16), "weight": w}
                    # the fp32 baseline's weight copy is made here, outside the timed region
                    inp["weight_fp32"] = w if w_dtype == torch.float32 else _memory.on_huge_pages(w.float())
                    return inp

                wsize = torch.finfo(w_dtype).bits // 8
                baselines = {"torch_fp32": lambda i: F.linear(i["x"].float(), i["weight_fp32"])}
                if w_dtype == torch.bfloat16:
                    baselines = {"torch_bf16": lambda i: F.linear(i["x"], i["weight"]), **baselines}
                if _backend._C is not None:
                    # the C++ kernel on its AVX2 / portable path, whatever the policy would choose
                    baselines["cpp_kernel"] = lambda i: torch.ops.lfm_kernels_cpu.linear(i["x"], i["weight"], None, 0)
                x_probe = torch.empty(m, k, dtype=torch.bfloat16)
                backend = "torch-onednn" if linear_mod._use_torch_gemm(x_probe, torch.empty(0, dtype=w_dtype)) else ""
                out.append(
                    Case(
                        op="linear",
                        name=f"{name}-M{m}-N{n}-K{k}-w{'bf16' if w_dtype == torch.bfloat16 else 'fp32'}",
                        # activations and output are bf16 in every case (the weight dtype is in the
                        # name), so the check compares bf16 outputs with the bf16 tolerance
                        dtype=torch.bfloat16,
                        device=device,
                        make_inputs=make,
                        kernel=lambda i: linear(i["x"], i["weight"]),
                        baselines=baselines,
                        bytes_moved=n * k * wsize + m * (k + n) * 2,
                        flops=2 * m * n * k,
                        compute_bound=m > 1,
                        backend=backend or _backend.backend_for(torch.empty(0, device=device)),
                        path=_path,
                        paths=_paths(w_dtype, m),
                    )
                )
    out.extend(_quantized_cases(shapes, rows))
    return out


def _path(i: dict) -> str:
    """The path `linear` takes for these inputs (the policy's choice, see lfm_kernels/_policy.py)."""
    return linear_mod._linear_path(i["x"], i["weight"])


def _paths(w_dtype: torch.dtype, m: int) -> dict:
    """The valid paths by name (a baseline name: the same call, its time shared; or a callable):
    the AVX2 / portable kernel; the AVX-512 GEMV at 1-2 rows on CPUs with AVX-512; oneDNN only for
    bf16 x bf16 on CPUs with native bf16 dot products, and torch's fp32 GEMM for fp32 weights from 3 rows."""
    if _backend._C is None:
        return {}
    paths = {_backend.cpu_isa() if _backend.cpu_isa() != "avx512" else "avx2": "cpp_kernel"}
    if m <= linear_mod.AVX512_GEMV_MAX_ROWS and _backend._C.cpu_supports_avx512():
        # x is bf16 in every case: the AVX512-BF16 GEMV on bf16 weights, the FMA twin otherwise
        dot = w_dtype == torch.bfloat16 and _backend._C.cpu_supports_avx512bf16()
        paths["avx512-bf16dot" if dot else "avx512"] = lambda i: torch.ops.lfm_kernels_cpu.linear(
            i["x"], i["weight"], None, 2)
    if w_dtype == torch.bfloat16 and _backend.cpu_has_native_bf16_gemm():
        paths["onednn"] = "torch_bf16"
    if w_dtype == torch.float32 and m >= 3:  # the fp32 hand-off (from 3 rows, as the chooser times it)
        paths["torch-fp32"] = "torch_fp32"
    return paths


def _quant_backend() -> str:
    if _backend._C is None or not hasattr(torch.ops.lfm_kernels_cpu, "_quant_isa_info"):
        return "reference"
    return torch.ops.lfm_kernels_cpu._quant_isa_info()[0]


_KQUANT_SCALES = {"q4_k": ((0, 2e-4), (2, 1e-4)), "q5_k": ((0, 1e-4), (2, 5e-5)), "q6_k": ((208, 3e-4),)}


def _random_kquant(shape: tuple, fmt: str, seed: int = 0) -> QuantizedTensor:
    """A K-quant weight of random blocks: every q, sub-block scale and min uniform over its range, the
    fp16 super-block factors set so the weights have a std of about 0.02 (the model's scale). The
    K-quant search of `quantize` runs in numpy (minutes for the full-size shapes); the kernels' speed
    does not depend on where the bytes came from."""
    *lead, k = shape
    nb = k // QK_K
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (*lead, nb, _BLOCK_BYTES[fmt]), dtype=torch.uint8, generator=g)
    for off, val in _KQUANT_SCALES[fmt]:
        h = torch.tensor([val], dtype=torch.float16).view(torch.uint8)
        data[..., off] = h[0]
        data[..., off + 1] = h[1]
    return QuantizedTensor(data.reshape(*lead, nb * _BLOCK_BYTES[fmt]), fmt, tuple(shape))


def _quant_paths(fmt: str, m: int) -> dict:
    """The quantized runner-ups: the integer-dot kernels on x8 (what the AMX / bf16 GEMM routes
    replace for many rows; kernel_only keeps them; at 1-2 rows with several 8-row groups streamed at
    once, "x8", and with one, "x8-1stream") and on GGUF's rows layout, and each other route this CPU
    has, forced (`forced_quant_paths`)."""

    def integer(i, key="qweight", **streams):
        # kernel_only: the integer kernels themselves, and no chooser class for the rows layout, whose
        # timings would enter the thresholds of the x8 weights the kernel column runs
        with kernel_policy(kernel_only=True, **streams):
            return linear(i["x"], i[key])

    out = {"rows": lambda i: integer(i, "qweight_rows")}
    if m <= _STREAM_ROWS:
        out["x8"] = lambda i: integer(i, quant_x8_one_stream_max_rows=0)
        out["x8-1stream"] = lambda i: integer(i, quant_x8_one_stream_max_rows=_STREAM_ROWS)
    else:
        out["x8"] = integer
    out.update(forced_quant_paths("linear", fmt, lambda i: linear(i["x"], i["qweight"])))
    return out


# Rows up to which the x8 tiles have a several-groups-at-once variant (csrc/linear_quant_x8.cpp)
_STREAM_ROWS = 2


def _quant_path(i: dict) -> str:
    """The route of a quantized call (`_linear_route`); the integer kernels on x8 at 1-2 rows are
    "x8-1stream" where the policy has them read one 8-row group at a time."""
    route = _quant._linear_route(i["x"], i["qweight"])
    m = i["x"].shape[0]
    if route == "x8" and m <= min(_STREAM_ROWS, get_policy().quant_x8_one_stream_max_rows):
        return "x8-1stream"
    return route


def _quantized_cases(shapes, rows) -> list[Case]:
    """The same shapes with GGUF Q8_0 / Q4_0 / Q4_K / Q5_K / Q6_K weights (bytes_moved counts the
    quantized blocks, so GB/s against the bandwidth floor stays honest). The kernel runs on the x8
    layout the model wrapper and the patch store (`QuantizedTensor.to_layout("x8")`); the path column
    names the route it took (integer-dot "x8", "amx-int8" or "bf16-gemm", see `_linear_route`) and the
    runner-up among the other routes, each forced (`_quant_paths`). Baseline "linear_bf16": our bf16 `linear`
    on the dequantized weight (the check, and the A/B against bf16 on the same shape)."""
    out = []
    for fmt in ("q8_0", "q4_0", "q4_k", "q5_k", "q6_k"):
        for name, n, k in shapes:
            for m in rows:
                if name == "lm_head" and m > 1:
                    continue

                def make(m=m, n=n, k=k, fmt=fmt):
                    if fmt in _KQUANT_SCALES:
                        qweight = _random_kquant((n, k), fmt)
                    else:
                        qweight = quantize(torch.randn(n, k) / k**0.5, fmt)
                    x = torch.randn(m, k, dtype=torch.bfloat16)
                    # every column's weight on huge pages as the model keeps them (lfm_kernels/_memory.py)
                    return {"x": x, "qweight": _memory.on_huge_pages(qweight.to_layout("x8")),
                            "qweight_rows": _memory.on_huge_pages(qweight),
                            "weight_bf16": _memory.on_huge_pages(qweight.dequantize(torch.bfloat16))}

                out.append(
                    Case(
                        op="linear",
                        name=f"{name}-M{m}-N{n}-K{k}-w{fmt}",
                        dtype=torch.bfloat16,
                        device="cpu",
                        make_inputs=make,
                        kernel=lambda i: linear(i["x"], i["qweight"]),
                        baselines={"linear_bf16": lambda i: linear(i["x"], i["weight_bf16"])},
                        bytes_moved=n * k * _BLOCK_BYTES[fmt] // (QK_K if fmt in _KQUANT_SCALES else 32) + m * (k + n) * 2,
                        flops=2 * m * n * k,
                        compute_bound=m > 1,
                        backend=_quant_backend(),
                        path=_quant_path,
                        paths=_quant_paths(fmt, m),
                        check_tol=QUANT_CHECK_TOL,
                    )
                )
    return out
