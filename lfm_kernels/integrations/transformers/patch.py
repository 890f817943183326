"""patch() / unpatch(): point transformers' LFM2 classes, interfaces and model instances at our modules."""

from __future__ import annotations

import functools
import types
from typing import Callable

import torch.nn as nn

from ._hooks import Hooks, load_hooks
from ._ledger import IMPL_NAME, record_config, register, set_class_attr, state, undo
from .attention import attention_forward, mask_function
from .linear import KernelLinear
from .moe import experts_forward, make_router_forward
from .short_conv import make_short_conv_forward


def _register_interfaces(hooks: Hooks) -> None:
    register(hooks.AttentionInterface._global_mapping, IMPL_NAME, attention_forward)
    register(hooks.AttentionMaskInterface._global_mapping, IMPL_NAME, mask_function)
    register(hooks.ExpertsInterface._global_mapping, IMPL_NAME, experts_forward)


def _patch_classes(hooks: Hooks) -> None:
    for _mod, conv_cls, router_cls, base_cls, _experts_cls in hooks.modules.values():
        if not getattr(conv_cls.forward, "_lfm_kernels_original", None):
            set_class_attr(conv_cls, "forward", make_short_conv_forward(conv_cls.forward))
        if router_cls is not None and not getattr(router_cls.forward, "_lfm_kernels_original", None):
            set_class_attr(router_cls, "forward", make_router_forward(router_cls.forward))
        if not getattr(base_cls.post_init, "_lfm_kernels_original", None):
            set_class_attr(base_cls, "post_init", _make_post_init(base_cls.post_init))


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
                module.forward = types.MethodType(maker(class_forward), module)
                state.modules.add(module)
        if experts_classes and isinstance(module, experts_classes):
            has_experts = True

    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        return
    record_config(config, config._attn_implementation, config._experts_implementation)
    if config._attn_implementation in (None, "sdpa", "eager"):
        model.set_attn_implementation(IMPL_NAME)
    if has_experts and config._experts_implementation in (None, "eager", "grouped_mm", "batched_mm"):
        model.set_experts_implementation(IMPL_NAME)


def patch(model=None):
    """Route transformers' LFM2 / LFM2-MoE through lfm_kernels.

    patch(): patch the classes, so every model built afterwards (from_pretrained included) and the short
    conv / router of existing models use our kernels. patch(model): patch that model's modules and
    settings only, and return it. Calling either twice is harmless; unpatch() undoes both.
    """
    hooks = load_hooks()
    _register_interfaces(hooks)
    if model is None:
        _patch_classes(hooks)
        return None
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers PreTrainedModel (an nn.Module), got {type(model).__name__}")
    _patch_model(model, hooks, instance_forwards=True)
    return model


def unpatch() -> None:
    """Undo every patch(): original class functions, interface entries, model settings and Linear classes."""
    undo()
