"""Route transformers' LFM2 and LFM2-MoE models through lfm_kernels: `patch()`, `patch(model)`, `unpatch()`.

What gets routed, and through which of transformers' own extension points:

- the gated short conv (`Lfm2ShortConv` / `Lfm2MoeShortConv`): its forward is replaced by in_proj ->
  `lfm_kernels.short_conv` (reading and updating transformers' conv cache in place) -> out_proj;
- the MoE router (`Lfm2MoeTopKRouter`): its forward runs the fused `lfm_kernels.moe_route`;
- the experts (`Lfm2MoeExperts`): an implementation named "lfm_kernels" registered in transformers'
  `ExpertsInterface` and selected on the model's config (`lfm_kernels.moe_experts`);
- attention: an implementation named "lfm_kernels" registered in `AttentionInterface` (with a mask
  function in `AttentionMaskInterface`) that sends one-token decode steps to
  `lfm_kernels.decode_attention` and everything else to the implementation the model had before; it is
  set only on models left on their default implementation (one the user asked for is kept);
- every `nn.Linear` of a patched model: `lfm_kernels.linear` for CPU bf16/fp32 inference;
- with `patch(model, quant="q8_0" | "q4_0")` the Linear and experts weights quantized in place
  (`QuantizedLinear`, `QuantizedExperts`: the quantized `linear` / `moe_experts` kernels, CPU, inference only).

Each piece checks per call whether our kernel covers the case (device, dtype, shapes, gradients
needed, accelerate offload hooks, a cache recording its past for rollback) and otherwise runs
transformers' own code, so a patched model computes what it computed before, only faster.

`patch()` patches the classes (and every model built afterwards, through `post_init`);
`patch(model)` patches one existing model's modules and returns it; `unpatch()` puts back every
original function, interface entry, config setting and module class it changed (deep copies of a
patched model included).

Modules: `_hooks` (what the installed transformers offers), `_ledger` (the undo record), one module
per replaced transformers piece (`short_conv`, `moe`, `attention`, `linear`), `quant` (quantized
modules), `patch`.
"""

from ._hooks import SUPPORTED_RANGE
from ._ledger import IMPL_NAME, is_patched
from .linear import KernelLinear
from .patch import patch, unpatch
from .quant import QuantizedExperts, QuantizedLinear

__all__ = [
    "IMPL_NAME",
    "SUPPORTED_RANGE",
    "KernelLinear",
    "QuantizedExperts",
    "QuantizedLinear",
    "is_patched",
    "patch",
    "unpatch",
]
