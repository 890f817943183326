"""patch() / unpatch(): point transformers' LFM2 classes, interfaces and model instances at our modules."""

from __future__ import annotations

import copy
import functools
from typing import Callable

import torch.nn as nn

from ._hooks import Hooks, load_hooks
from ._ledger import (
    IMPL_NAME,
    copy_config_records,
    mark_default_attention,
    record_attn_request,
    record_config,
    record_request,
    register,
    requested,
    set_class_attr,
    state,
    track,
    undo,
    unmark_default_attention,
)
from .attention import attention_forward, make_local_interface, mask_function
from .linear import KernelLinear
from .moe import experts_forward, make_router_forward
from .quant import alive_quantized, check_quantizable, quantize_model, resolve_mode
from .short_conv import make_short_conv_forward


class _InstanceForward:
    """The forward patch(model) sets on one module instance (a bound method that deep copies can follow:
    the copy of the module gets its own, and is recorded so that unpatch() restores it too)."""

    def __init__(self, func: Callable, module: nn.Module):
        self.func = func
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.func(self.module, *args, **kwargs)

    def __deepcopy__(self, memo):
        module = copy.deepcopy(self.module, memo)
        track(module)
        return _InstanceForward(self.func, module)


def _register_interfaces(hooks: Hooks) -> None:
    register(hooks.AttentionInterface._global_mapping, IMPL_NAME, attention_forward)
    register(hooks.AttentionMaskInterface._global_mapping, IMPL_NAME, mask_function)
    register(hooks.ExpertsInterface._global_mapping, IMPL_NAME, experts_forward)


def _install_attention(hooks: Hooks) -> None:
    """The LFM2 modeling modules' "sdpa" runs our entry for models left on the default (see attention.py),
    and set_attn_implementation() on their models counts as a request by name."""
    for mod, _conv_cls, _router_cls, base_cls, _experts_cls in hooks.modules.values():
        if not getattr(mod.ALL_ATTENTION_FUNCTIONS, "_lfm_kernels_local", False):
            set_class_attr(mod, "ALL_ATTENTION_FUNCTIONS", make_local_interface(hooks))
        if not getattr(base_cls.set_attn_implementation, "_lfm_kernels_original", None):
            set_class_attr(base_cls, "set_attn_implementation", _make_set_attn_implementation(base_cls.set_attn_implementation))


def _make_set_attn_implementation(original: Callable) -> Callable:
    @functools.wraps(original)
    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        result = original(self, attn_implementation, *args, **kwargs)
        # A dict without "" names sub-configs only (LFM2 has none): the model's own choice is unchanged.
        asked = attn_implementation.get("") if isinstance(attn_implementation, dict) else attn_implementation
        if asked is not None:
            for module in self.modules():
                config = getattr(module, "config", None)
                if config is not None and hasattr(module, "set_attn_implementation"):
                    unmark_default_attention(config)  # from now on "sdpa" means torch's SDPA
                    record_attn_request(config, asked)
        return result

    set_attn_implementation._lfm_kernels_original = original
    return set_attn_implementation


def _patch_classes(hooks: Hooks) -> None:
    for _mod, conv_cls, router_cls, base_cls, _experts_cls in hooks.modules.values():
        if not getattr(conv_cls.forward, "_lfm_kernels_original", None):
            set_class_attr(conv_cls, "forward", make_short_conv_forward(conv_cls.forward))
        if router_cls is not None and not getattr(router_cls.forward, "_lfm_kernels_original", None):
            set_class_attr(router_cls, "forward", make_router_forward(router_cls.forward))
        if not getattr(base_cls.post_init, "_lfm_kernels_original", None):
            set_class_attr(base_cls, "post_init", _make_post_init(base_cls.post_init))
        if not getattr(base_cls.__init__, "_lfm_kernels_original", None):
            set_class_attr(base_cls, "__init__", _make_init(base_cls.__init__))


def _make_init(original: Callable) -> Callable:
    """Sees the config before transformers replaces an unset attention / experts choice by its default."""

    @functools.wraps(original)
    def __init__(self, config, *args, **kwargs):
        record_request(config)
        original(self, config, *args, **kwargs)

    __init__._lfm_kernels_original = original
    return __init__


def _config_deepcopy(self, memo):
    """copy.deepcopy of a config we switched (as deepcopy of a patched model does): the default deep copy,
    and the copy joins the ledger so that unpatch() switches it back too."""
    cls = type(self)
    twin = cls.__new__(cls)
    memo[id(self)] = twin
    twin.__dict__.update(copy.deepcopy(self.__dict__, memo))
    copy_config_records(self, twin)
    return twin


def _hook_config_copies(config) -> None:
    cls = type(config)
    if cls.__dict__.get("__deepcopy__") is not _config_deepcopy and "__deepcopy__" not in cls.__dict__:
        set_class_attr(cls, "__deepcopy__", _config_deepcopy)


def _default_chosen(config, kind: str) -> bool:
    """True when the model runs the implementation transformers picked by default (ours may replace it).

    An implementation the user asked for (`attn_implementation=` in from_pretrained or the config,
    `set_attn_implementation()` while patched, a config set to "eager", `output_attentions`) is kept.
    For a model built before patch(), where the request was not seen, "sdpa" / "grouped_mm" count as
    the default: they are what transformers picks for these models, and an explicit request for them
    can no longer be told apart.
    """
    if kind == "attn":
        if config._attn_implementation != "sdpa" or getattr(config, "output_attentions", False):
            return False
        known, asked = requested(config, kind)
        return not known or asked is None
    current = config._experts_implementation
    known, asked = requested(config, kind)
    if known:
        if asked is not None and asked != IMPL_NAME:
            return False
        return current in ("grouped_mm", "eager", "batched_mm")
    return current == "grouped_mm"


def _make_post_init(original: Callable) -> Callable:
    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        _patch_model(self, load_hooks(), instance_forwards=False)
        return result

    post_init._lfm_kernels_original = original
    return post_init


def _patch_model(model, hooks: Hooks, instance_forwards: bool) -> None:
    """Point one model (and its submodules) at our implementations."""
    known = {cls for _, conv, router, _, _ in hooks.modules.values() for cls in (conv, router) if cls is not None}
    experts_classes = tuple(e for *_, e in hooks.modules.values() if e is not None)
    has_experts = False
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = KernelLinear
            state.modules.add(module)
        elif instance_forwards and type(module) in known and "forward" not in module.__dict__:
            class_forward = type(module).forward
            if not getattr(class_forward, "_lfm_kernels_original", None):  # class not patched: patch the instance
                maker = make_short_conv_forward if hasattr(module, "conv") else make_router_forward
                module.forward = _InstanceForward(maker(class_forward), module)
                state.modules.add(module)
        if experts_classes and isinstance(module, experts_classes):
            has_experts = True

    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        return
    record_config(config, config._attn_implementation, config._experts_implementation)
    _hook_config_copies(config)
    if _default_chosen(config, "attn"):
        # The config keeps transformers' "sdpa"; the LFM2 modules' "sdpa" runs our entry for it.
        mark_default_attention(config)
    if has_experts and _default_chosen(config, "experts"):
        model.set_experts_implementation(IMPL_NAME)


def patch(model=None, quant=None):
    """Route transformers' LFM2 / LFM2-MoE through lfm_kernels.

    patch(): patch the classes, so every model built afterwards (from_pretrained included) and the short
    conv / router of existing models use our kernels. patch(model): patch that model's modules and
    settings only, and return it (both also register our interface entries and give the LFM2 modeling
    modules their attention lookup, which change nothing for a model that is not patched). Calling
    either twice is harmless; unpatch() undoes both.

    A model left on its default attention keeps reporting transformers' "sdpa" and runs our entry; one
    asked for by name (from_pretrained, the config, set_attn_implementation) runs exactly that:
    `attention_implementation(model)` says which.

    patch(model, quant="q8_0" | "q4_0"): patch(model), and quantize the model's weights in place to GGUF's
    Q8_0 / Q4_0 blocks, run by the quantized CPU kernels (int8 activations, integer dot products):

    - every `nn.Linear` (attention q/k/v/out_proj, short-conv in_proj/out_proj, dense MLP w1/w2/w3)
      becomes a `QuantizedLinear` in the chosen format, and every LFM2-MoE experts module a
      `QuantizedExperts` (`lfm_kernels.moe_experts` on the quantized stacked gate_up_proj / down_proj);
      the float weights are freed (the modules drop them; memory goes back unless the caller itself
      still holds a reference to one of those tensors);
    - lm_head in Q8_0 for both modes (llama.cpp too keeps its output matrix above Q4_0's precision,
      as `lfm_kernels.model.from_pretrained(quant=...)` does). A tied lm_head gets its own Q8_0 copy
      (about 1.06 bytes per weight more memory) and keeps sharing the embedding's float Parameter as
      `lm_head.weight`, so weight tying keeps working; the embedding lookup stays float;
    - the embedding, norms, router (`gate`), expert bias, conv taps and biases stay float, and so does
      any weight whose K (input features; H and I for experts) is not a multiple of 32 (it keeps
      running `lfm_kernels.linear` / the experts on float weights);
    - the model becomes inference only: every remaining parameter gets requires_grad=False (so a plain
      forward with grad mode on runs the kernels), and a quantized module given an input that requires
      grad while grad mode is on raises RuntimeError (gradients cannot flow into quantized weights);
    - state_dict() holds the float tensors left plus each quantized weight's blocks as a uint8 buffer
      (`<linear>.weight_blocks`, `<experts>.gate_up_proj_blocks` / `.down_proj_blocks`) instead of its
      float `weight` / `gate_up_proj` / `down_proj`: it loads back into a model patched with the same
      quant, not into a float one. named_parameters() lists only the float parameters left.

    CPU only: a model with a parameter or buffer on another device is a ValueError naming the device
    (before anything is changed). Calling it again with the same quant is a no-op; another format is a
    ValueError (the float weights are gone). unpatch() cannot restore freed weights: while a model
    quantized this way exists it raises RuntimeError and changes nothing (the model stays patched and
    working). quant without a model is a ValueError: there are no weights to quantize globally.
    """
    if quant is not None:
        quant = resolve_mode(quant)
        if model is None:
            raise ValueError(
                f"quant={quant!r} needs a model: patch(model, quant=...) quantizes that model's weights in place; "
                "patch() without a model only patches classes and has no weights to quantize"
            )
    hooks = load_hooks()
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers PreTrainedModel (an nn.Module), got {type(model).__name__}")
    if quant is not None:
        check_quantizable(model, quant)
    _register_interfaces(hooks)
    _install_attention(hooks)
    if model is None:
        _patch_classes(hooks)
        return None
    _patch_model(model, hooks, instance_forwards=True)
    if quant is not None:
        experts_classes = tuple(e for *_, e in hooks.modules.values() if e is not None)
        quantize_model(model, quant, (nn.Linear, KernelLinear), experts_classes)
    return model


def unpatch() -> None:
    """Undo every patch(): original class functions, interface entries, model settings and Linear classes.

    Raises RuntimeError, changing nothing, while a model quantized by patch(model, quant=...) exists: its
    float weights were freed and cannot be restored (delete the model first, or keep it patched).
    """
    alive = alive_quantized()
    if alive:
        raise RuntimeError(
            f"unpatch() cannot restore the float weights that patch(model, quant=...) quantized and freed "
            f"({alive} quantized modules still exist); nothing was changed: the quantized model stays patched and "
            "working. Delete the quantized model (every reference to it) before unpatch(), or load a fresh float "
            "model if you need the original weights"
        )
    undo()
