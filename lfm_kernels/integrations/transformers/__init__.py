"""Route transformers' LFM2 and LFM2-MoE models through lfm_kernels: `patch()`, `patch(model)`, `unpatch()`.

What gets routed, and through which of transformers' own extension points:

- the gated short conv (`Lfm2ShortConv` / `Lfm2MoeShortConv`): its forward is replaced by in_proj ->
  `lfm_kernels.short_conv` (reading and updating transformers' conv cache in place) -> out_proj;
- the MoE router (`Lfm2MoeTopKRouter`): its forward runs the fused `lfm_kernels.moe_route`;
- the experts (`Lfm2MoeExperts`): an implementation named "lfm_kernels" registered in transformers'
  `ExpertsInterface` and selected on the model's config (`lfm_kernels.moe_experts`);
- attention: an implementation named "lfm_kernels" registered in `AttentionInterface` (with a mask
  function in `AttentionMaskInterface`) that sends one-token decode steps to
  `lfm_kernels.decode_attention` and everything else to the implementation the model had before. A
  model left on its default keeps transformers' name for it, `config._attn_implementation == "sdpa"`,
  and runs our entry (the LFM2 modeling modules get an AttentionInterface of their own whose "sdpa"
  does that for such models only). An implementation asked for by name is honoured exactly: "sdpa"
  (in from_pretrained, on the config, or `set_attn_implementation("sdpa")` after loading) is torch's
  SDPA, "eager" is eager, "lfm_kernels" is ours and reported as such. For a model built before
  patch() the request was not seen, so its "sdpa" counts as the default. `attention_implementation(model)`
  says which one runs;
- every `nn.Linear` of a patched model: `lfm_kernels.linear` for CPU bf16/fp32 inference;
- with `patch(model, quant="q8_0" | "q4_0")` the Linear and experts weights quantized in place
  (`QuantizedLinear`, `QuantizedExperts`: the quantized `linear` / `moe_experts` kernels, CPU, inference only).

Each piece checks per call whether our kernel covers the case (device, dtype, shapes, gradients
needed, accelerate offload hooks, a cache recording its past for rollback) and otherwise runs
transformers' own code, so a patched model computes what it computed before, only faster.

`patch()` patches the classes (and every model built afterwards, through `post_init`);
`patch(model)` patches one existing model's modules and returns it; `unpatch()` puts back every
original function, interface entry, module-level name, config setting and module class it changed
(deep copies of a patched model included); what it knows about configs (which "sdpa" is a default)
lives in its ledger, never on the config, so saved config.json files and config equality are unaffected.

Modules: `_hooks` (what the installed transformers offers), `_ledger` (the undo record), one module
per replaced transformers piece (`short_conv`, `moe`, `attention`, `linear`), `quant` (quantized
modules), `patch`.
"""

from ._hooks import SUPPORTED_RANGE
from ._ledger import IMPL_NAME, is_patched
from .attention import attention_implementation
from .linear import KernelLinear
from .patch import patch, unpatch
from .quant import QuantizedExperts, QuantizedLinear

__all__ = [
    "IMPL_NAME",
    "SUPPORTED_RANGE",
    "KernelLinear",
    "QuantizedExperts",
    "QuantizedLinear",
    "attention_implementation",
    "is_patched",
    "patch",
    "unpatch",
]
