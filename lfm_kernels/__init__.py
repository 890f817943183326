"""lfm-kernels: fused CPU (C++/AVX2) and GPU (Triton) kernels for LFM2 / LFM2.5 MoE hybrid models.

Public ops (torch.library custom ops in the `lfm_kernels` namespace):
    short_conv, moe_route, moe_experts, moe, decode_attention, linear
Quantized weights (GGUF Q8_0 / Q4_0 blocks, CPU): quantize(weight, "q4_0") -> QuantizedTensor, for linear
Integration: patch(model=None, quant=None) / unpatch() for transformers; lfm_kernels.model for our own wrapper.
"""

from ._backend import backend_info
from .ops.decode_attention import decode_attention
from .ops.linear import linear
from .ops.moe import moe, moe_experts, moe_route
from .ops.short_conv import short_conv
from .quant import QuantizedTensor, quantize

__version__ = "0.1.0"

__all__ = [
    "backend_info",
    "decode_attention",
    "linear",
    "moe",
    "moe_experts",
    "moe_route",
    "patch",
    "QuantizedTensor",
    "quantize",
    "short_conv",
    "unpatch",
]


def patch(model=None, quant=None):
    """Route transformers' LFM2 / LFM2-MoE models through lfm_kernels; patch(model, quant="q8_0" | "q4_0")
    also quantizes that model's weights in place (see lfm_kernels.integrations.transformers.patch)."""
    from .integrations.transformers import patch as _patch

    return _patch(model, quant=quant)


def unpatch():
    """Restore transformers exactly as it was before patch()."""
    from .integrations.transformers import unpatch as _unpatch

    return _unpatch()
