"""patch(model, quant=...): a transformers model's projections and experts quantized in place (GGUF Q8_0 /
Q4_0 blocks) and run by the quantized CPU kernels.

`QuantizedLinear` replaces an `nn.Linear` (same instance, its class swapped, so every reference to it
and its hooks stay valid) and `QuantizedExperts` replaces `Lfm2MoeExperts` the same way. Each keeps its
blocks as a persistent uint8 buffer (`weight_blocks`; `gate_up_proj_blocks` / `down_proj_blocks`), so
`state_dict()` saves them and `load_state_dict()` into a model quantized the same way restores them,
and builds the `lfm_kernels.QuantizedTensor` the ops take from that buffer.

The blocks are GGUF's, in the layout the CPU kernels decode fastest from (`weight_layout`: "x8", rows
interleaved by 8, where the row count is a multiple of 8, else "rows"; the same bytes either way, see
`QuantizedTensor.to_layout`): `module.qweight.to_layout("rows").data` is GGUF's row order.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...quant import BLOCK, QuantizedTensor, _kernel_layout_on_huge_pages, quantize
from . import _ledger
from ._common import kernel

QUANT_MODES = ("q8_0", "q4_0")
# The output matrix (lm_head) in Q8_0 for both modes, as lfm_kernels.model's loader and llama.cpp do.
OUTPUT_FORMAT = "q8_0"

_INFERENCE_ONLY = (
    "{what} holds weights quantized by lfm_kernels.patch(model, quant={mode!r}): the model is inference only "
    "(gradients cannot flow into quantized weights), but {names} requires grad; run it under torch.no_grad() "
    "or torch.inference_mode(), or pass detached inputs"
)


def _refuse_grad(module: nn.Module, what: str, **tensors) -> None:
    if not torch.is_grad_enabled():
        return
    names = [n for n, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    if names:
        raise RuntimeError(_INFERENCE_ONLY.format(what=what, mode=module.quant_mode, names=", ".join(names)))


def _cached_qt(module: nn.Module, slot: str, buffer_name: str, fmt: str, shape, layout: str) -> QuantizedTensor:
    """The QuantizedTensor view of a blocks buffer, rebuilt only when the buffer object changed
    (`module.to(...)`, `load_state_dict` with assign=True): building it validates shapes, per call that is
    measurable on a decode step."""
    data = module._buffers[buffer_name]
    qt = module.__dict__.get(slot)
    if qt is None or qt.data is not data:
        qt = QuantizedTensor(data, fmt, shape, layout)
        module.__dict__[slot] = qt
    return qt


class QuantizedLinear(nn.Module):
    """An `nn.Linear` whose weight was quantized by `patch(model, quant=...)`: `lfm_kernels.linear` on the
    QuantizedTensor `qweight` (CPU, int8 activations), the float bias kept. Inference only.

    Attributes: in_features, out_features, weight_format ("q8_0" / "q4_0"), weight_layout ("x8" / "rows"),
    quant_mode (the patch's mode), weight_blocks (uint8 buffer [out_features, in_features // 32 * block
    bytes], in weight_layout), bias. A tied
    lm_head also keeps `weight`, the embedding's float Parameter it shares (no memory of its own), so
    that transformers' weight tying still finds it; it is not used to compute.
    """

    in_features: int
    out_features: int

    @property
    def qweight(self) -> QuantizedTensor:
        shape = (self.out_features, self.in_features)
        return _cached_qt(self, "_qweight", "weight_blocks", self.weight_format, shape, self.weight_layout)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's argument name
        _refuse_grad(self, "this Linear", input=input, bias=self.bias)
        return kernel("linear")(input, self.qweight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight_format={self.weight_format!r}"
        )

    def __setstate__(self, state):
        # copy.deepcopy of a quantized model rebuilds its modules through here: the copy is quantized too
        super().__setstate__(state)
        self.__dict__.pop("_qweight", None)
        _ledger.state.quantized.add(self)


class QuantizedExperts(nn.Module):
    """`Lfm2MoeExperts` whose `gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I] were quantized by
    `patch(model, quant=...)`: its forward is `lfm_kernels.moe_experts` on the quantized stacked weights
    (only the routed experts' blocks are read). Inference only."""

    num_experts: int
    hidden_dim: int
    intermediate_dim: int

    @property
    def q_gate_up_proj(self) -> QuantizedTensor:
        shape = (self.num_experts, 2 * self.intermediate_dim, self.hidden_dim)
        return _cached_qt(self, "_q_gate_up", "gate_up_proj_blocks", self.weight_format, shape, self.weight_layout)

    @property
    def q_down_proj(self) -> QuantizedTensor:
        shape = (self.num_experts, self.hidden_dim, self.intermediate_dim)
        return _cached_qt(self, "_q_down", "down_proj_blocks", self.weight_format, shape, self.weight_layout)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        _refuse_grad(self, "this MoE experts module", hidden_states=hidden_states, top_k_weights=top_k_weights)
        return kernel("moe_experts")(hidden_states, self.q_gate_up_proj, self.q_down_proj, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
            f"intermediate_dim={self.intermediate_dim}, weight_format={self.weight_format!r}"
        )

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.pop("_q_gate_up", None)
        self.__dict__.pop("_q_down", None)
        _ledger.state.quantized.add(self)


def resolve_mode(quant) -> str:
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES} (or None for float weights), got {quant!r}")
    return quant


def current_mode(model: nn.Module) -> str | None:
    """The mode a model was quantized with by patch(model, quant=...), or None."""
    for module in model.modules():
        if isinstance(module, (QuantizedLinear, QuantizedExperts)):
            return module.quant_mode
    return None


def check_quantizable(model: nn.Module, mode: str) -> None:
    """Everything that refuses patch(model, quant=mode), checked before anything is changed."""
    done = current_mode(model)
    if done is not None and done != mode:
        raise ValueError(
            f"quant={mode!r}: this model was already quantized to {done!r} by lfm_kernels.patch(model, "
            f"quant={done!r}) and its float weights were freed; it cannot be quantized again to another "
            "format. Load the model again for another format"
        )
    for kind, tensors in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in tensors:
            if t.device.type != "cpu":
                raise ValueError(
                    f"quant={mode!r} needs a model on the CPU (the Q8_0 / Q4_0 kernels are C++, CPU only), but "
                    f"{kind} {name!r} is on device {str(t.device)!r}; move the model with model.to('cpu') first"
                )


def _float_weight(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.bfloat16, torch.float16)


def _experts_fit(module) -> bool:
    """True when moe_experts computes what this experts module computes (LFM2-MoE's layout) and both
    weights' K (H for gate_up_proj, I for down_proj) is a multiple of 32."""
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (_float_weight(gu) and _float_weight(dn) and gu.dim() == 3 and dn.dim() == 3):
        return False
    e, two_i, h = gu.shape
    return (
        two_i % 2 == 0
        and tuple(dn.shape) == (e, h, two_i // 2)
        and h % BLOCK == 0
        and (two_i // 2) % BLOCK == 0
        and getattr(module, "is_concatenated", True)
        and not getattr(module, "is_transposed", False)
        and not getattr(module, "has_bias", False)
        and getattr(module, "has_gate", True)
        and not getattr(module, "has_post_expert_norm", False)
        and not getattr(module, "_is_expert_parallel", False)
        and getattr(module, "act_fn", F.silu) is F.silu
    )


def _quantize_linear(module: nn.Linear, fmt: str, mode: str, keep_weight: bool) -> None:
    qt = _kernel_layout_on_huge_pages(quantize(module.weight.detach(), fmt))
    module.__class__ = QuantizedLinear
    if not keep_weight:
        del module.weight  # the module held the only reference: the float storage is released here
    module.register_buffer("weight_blocks", qt.data)
    module.weight_format = fmt
    module.weight_layout = qt.layout
    module.quant_mode = mode
    _ledger.state.quantized.add(module)


def _quantize_experts(module: nn.Module, mode: str) -> None:
    gu = _kernel_layout_on_huge_pages(quantize(module.gate_up_proj.detach(), mode))
    dn = _kernel_layout_on_huge_pages(quantize(module.down_proj.detach(), mode))
    if gu.layout != dn.layout:  # the fused experts op takes one layout for both
        gu, dn = gu.to_layout("rows"), dn.to_layout("rows")
    e, two_i, h = module.gate_up_proj.shape
    module.__class__ = QuantizedExperts
    del module.gate_up_proj
    del module.down_proj
    module.num_experts, module.hidden_dim, module.intermediate_dim = e, h, two_i // 2
    module.register_buffer("gate_up_proj_blocks", gu.data)
    module.register_buffer("down_proj_blocks", dn.data)
    module.weight_format = mode
    module.weight_layout = gu.layout
    module.quant_mode = mode
    _ledger.state.quantized.add(module)


def quantize_model(model: nn.Module, mode: str, linear_classes: tuple, experts_classes: tuple) -> None:
    """Quantize every eligible Linear / experts module of `model` in place (see lfm_kernels.patch)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    input_weight = getattr(inputs, "weight", None)
    for module in list(model.modules()):
        if type(module) in linear_classes:
            weight = module.weight
            if not _float_weight(weight) or weight.shape[1] % BLOCK:
                continue
            tied = input_weight is not None and weight is input_weight
            fmt = OUTPUT_FORMAT if module is output else mode
            _quantize_linear(module, fmt, mode, keep_weight=tied)
            del weight
        elif experts_classes and isinstance(module, experts_classes) and _experts_fit(module):
            _quantize_experts(module, mode)
    # Inference only: nothing left needs grad, so a forward with grad mode on (model(ids) outside no_grad)
    # runs the kernels; an input that requires grad is refused by the quantized modules.
    for p in model.parameters():
        p.requires_grad_(False)


def alive_quantized() -> int:
    """How many modules quantized by patch(model, quant=...) still exist (unreachable ones collected first)."""
    if len(_ledger.state.quantized):
        import gc

        gc.collect()  # a model dropped by its owner may still sit in a reference cycle
    return len(_ledger.state.quantized)
