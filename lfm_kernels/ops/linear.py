"""Linear layer for the CPU: out = x @ weight.T (+ bias) with bf16 or fp32 weights.

On CPUs without native bf16 instructions (AVX2-only), PyTorch's many-row bf16 GEMM is several times
slower than the same GEMM on fp32 weights (~20 GFLOP/s on 2 cores), which makes prefill slow. The C++
kernel (csrc/linear.cpp) streams the weight once for a few rows (decode) and, for many rows
(prefill), packs fp32 panels of the weight into L2 and reuses them across all rows through a
register-blocked micro-kernel, so bf16 weights run at fp32-GEMM speed.

One exception: on CPUs with native bf16 dot-product instructions (AVX512-BF16 or AMX), bf16 x bf16
calls with enough rows go to torch's oneDNN GEMM, which does twice the work per instruction there;
the kernel-choice policy decides (lfm_kernels/_policy.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend, _policy
from .. import quant as _quant
from ..quant import QuantizedTensor
from .._backend import cpu_has_native_bf16_gemm
from .._chooser import AVX512_GEMV_MAX_ROWS
from ._checks import FLOAT_DTYPES, check_no_grad, check_same_device, check_tensor

_WEIGHT_DTYPES = (torch.bfloat16, torch.float32, torch.float16)


def _use_torch_gemm(x: torch.Tensor, weight: torch.Tensor, policy: _policy.KernelPolicy | None = None) -> bool:
    """Whether the policy hands this call to torch's GEMM (x already [M, K]): bf16 x bf16 to oneDNN on
    CPUs with native bf16 dot products, fp32 weights (any x dtype) to torch's fp32 GEMM, each from its
    threshold on."""
    if policy is None:
        policy = _policy._policy_for_linear(x, weight)
    if policy.kernel_only:
        return False
    if weight.dtype == torch.float32:
        return x.shape[0] >= policy.linear_fp32_torch_min_rows
    return (
        x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.shape[0] >= policy.linear_onednn_min_rows
        and cpu_has_native_bf16_gemm()
    )


def _linear_path(x: torch.Tensor, weight: torch.Tensor) -> str:
    """The code a CPU call of these shapes and dtypes runs now (x [M, K]): "onednn", "torch-fp32"
    (torch's fp32 GEMM for fp32 weights), "avx512-bf16dot"
    (AVX512-BF16 GEMV), "avx512", "avx2", "portable" or "reference" (for the bench and its tests)."""
    if not _backend.cpu_extension_available():
        return "reference"
    policy = _policy._policy_for_linear(x, weight)
    if _use_torch_gemm(x, weight, policy):
        return "torch-fp32" if weight.dtype == torch.float32 else "onednn"
    isa = _backend.cpu_isa()  # "avx512" where the CPU has it and nothing pins AVX2
    rows = 0 if policy.kernel_only else min(policy.linear_avx512_max_rows, AVX512_GEMV_MAX_ROWS)
    if isa != "avx512":
        return isa
    if x.shape[0] <= rows and x.dtype == weight.dtype == torch.bfloat16 and _backend._C.cpu_supports_avx512bf16():
        return "avx512-bf16dot"
    return "avx512" if x.shape[0] <= rows else "avx2"


def _torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """torch's own linear, with weight and bias cast to x's dtype when they differ (F.linear needs one dtype)."""
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return F.linear(x, weight, bias)


def _linear_route(x: torch.Tensor, weight: torch.Tensor) -> int | None:
    """The kernel's AVX-512 row limit (its last argument) when the C++ kernel takes this call (x
    [M, K] on the CPU), None when torch's GEMM does (the policy's choice, `_use_torch_gemm`, or no CPU
    extension). A pure function of the shapes, dtypes and policy: a decode step asks it once per shape."""
    if x.device.type != "cpu" or not _backend.cpu_extension_available():
        return None
    policy = _policy._policy_for_linear(x, weight)
    if _use_torch_gemm(x, weight, policy):
        return None
    return 0 if policy.kernel_only else policy.linear_avx512_max_rows


def _linear_on_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, avx512_rows: int | None):
    if avx512_rows is not None:
        return torch.ops.lfm_kernels_cpu.linear.default(x, weight, bias, avx512_rows)
    if x.device.type == "cpu" and weight.dtype == torch.float32 and _backend.cpu_extension_available():
        # the kernel's contract kept: products and sums in fp32, the output rounded to x's dtype once
        b = bias.float() if bias is not None else None
        return F.linear(x.float(), weight, b).to(x.dtype)
    # CUDA: cuBLAS behind F.linear already runs bf16 GEMMs and GEMVs at the hardware's speed, so there
    # is no Triton kernel for this op. CPU with native bf16 GEMM instructions (bf16 x bf16, many rows):
    # oneDNN's GEMM is the faster one. CPU without the extension: F.linear after the one warning.
    return _torch_linear(x, weight, bias)


def _linear_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _linear_on_route(x, weight, bias, _linear_route(x, weight))


_linear_op = torch.library.custom_op("lfm_kernels::linear", _linear_impl, mutates_args=())


@_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """out = x @ weight.T (+ bias), like torch.nn.functional.linear, fast on the CPU.

    Args:
        x: [..., K] float32 / bfloat16 / float16; any leading dimensions (flattened to M rows).
            Any row stride is used as is; a last dimension that is not contiguous is copied.
        weight: [N, K] bfloat16 / float32 / float16 (pass it contiguous: a non-contiguous weight is
            copied on every call). Its dtype may differ from x's (e.g. fp32 activations on bf16 weights).
        bias: optional [N], any float dtype.
    Returns:
        [..., N] in x's dtype. Products and sums are float32 (bf16 weights are widened exactly).

    On the CPU the compiled kernel runs: for M <= 4 rows it streams the weight once near the memory
    bandwidth; for more rows it is a blocked GEMM that runs bf16 weights as fast as fp32 ones (except
    bf16 x bf16 with enough rows on CPUs with AVX512-BF16/AMX, and fp32 weights with enough rows where
    the chooser measured torch's fp32 GEMM faster: there torch's GEMM runs; see lfm_kernels/_policy.py). On CUDA this is torch's F.linear (cuBLAS is already the right kernel
    there), with weight and bias cast to x's dtype if they differ. Without the compiled extension it is F.linear after one warning.

    weight may also be a `lfm_kernels.QuantizedTensor` [N, K] (GGUF Q8_0 / Q4_0 blocks): x is then
    quantized per block of 32 to int8 and the products are integer (see lfm_kernels/quant.py); CPU only.
    """
    check_no_grad("linear", x=x, weight=weight, bias=bias)
    if isinstance(weight, QuantizedTensor):
        return _quant._linear(x, weight, bias)
    check_tensor("x", x, dtypes=FLOAT_DTYPES, shape_hint="[..., K]")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., K], got a 0-d tensor")
    check_tensor("weight", weight, ndim=2, dtypes=_WEIGHT_DTYPES, shape_hint="[N, K]")
    k = x.shape[-1]
    if weight.shape[1] != k:
        raise ValueError(
            f"weight must have shape [N, K={k}] (K = x's last dimension), got {tuple(weight.shape)}"
        )
    n = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, shape_hint=f"[N={n}]")
        if bias.shape[0] != n:
            raise ValueError(f"bias must have shape [N={n}] (N = weight's first dimension), got {tuple(bias.shape)}")
    check_same_device("x", x, weight=weight, bias=bias)

    flat = x.dim() == 2  # [M, K] as the kernel takes it: no reshape either way (about 3 us each)
    x2 = x if flat else x.reshape(x.shape[:-1].numel(), k)
    if k > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    if not weight.is_contiguous():
        weight = weight.contiguous()
    op = _linear_impl if _backend.eager_cpu_fast_path(x2) else _linear_op
    out = op(x2, weight, bias)
    return out if flat else out.reshape(*x.shape[:-1], n)
