"""Which transformers is installed, and the extension points of it this integration uses.

Looked up once, on the first patch(); a missing piece is one clear error naming the supported range.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable

SUPPORTED_RANGE = ">=5.24,<6"  # the range this integration is tested on; other 5.x with the same hooks should work
_TESTED_MAJOR = 5
_TESTED_MIN = (5, 24)

MODEL_MODULES = {
    # modeling module: (short conv class, router class or None, pretrained base class, experts class or None)
    "transformers.models.lfm2_moe.modeling_lfm2_moe": (
        "Lfm2MoeShortConv",
        "Lfm2MoeTopKRouter",
        "Lfm2MoePreTrainedModel",
        "Lfm2MoeExperts",
    ),
    "transformers.models.lfm2.modeling_lfm2": ("Lfm2ShortConv", None, "Lfm2PreTrainedModel", None),
}


@dataclass
class Hooks:
    """transformers' extension points this integration uses, looked up once at run time."""

    version: str
    AttentionInterface: type
    AttentionMaskInterface: type
    ExpertsInterface: type
    all_attention: Any
    all_masks: Any
    all_experts: Any
    sdpa_attention_forward: Callable
    LinearAttentionCacheLayerMixin: type
    modules: dict  # modeling module name -> (module, short conv cls, router cls, pretrained cls, experts cls)
    active_collector: Any = None  # transformers' output-capturing context variable, when present


_hooks: Hooks | None = None


def loaded() -> Hooks | None:
    """The hooks when load_hooks() has run, else None (for code that must not trigger the lookup)."""
    return _hooks


def _unsupported(found: str, missing: list[str]) -> RuntimeError:
    return RuntimeError(
        f"lfm_kernels.patch() supports transformers {SUPPORTED_RANGE} (it needs AttentionInterface, "
        f"AttentionMaskInterface, ExpertsInterface, linear-attention conv caches and the LFM2 / LFM2-MoE "
        f"models); the installed transformers {found} lacks: {', '.join(missing)}. "
        f"Install a supported version, e.g. `pip install 'transformers{SUPPORTED_RANGE}'`."
    )


def load_hooks() -> Hooks:
    """Find transformers' extension points; a clear error naming the supported range when any is missing."""
    global _hooks
    if _hooks is not None:
        return _hooks
    try:
        import transformers
    except ImportError as exc:
        raise RuntimeError(f"lfm_kernels.patch() needs transformers {SUPPORTED_RANGE}: {exc}") from exc
    version = getattr(transformers, "__version__", "unknown")
    missing: list[str] = []

    def get(module_name: str, attr: str):
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{attr}")
            return None

    attention_iface = get("transformers.modeling_utils", "AttentionInterface")
    all_attention = get("transformers.modeling_utils", "ALL_ATTENTION_FUNCTIONS")
    mask_iface = get("transformers.masking_utils", "AttentionMaskInterface")
    all_masks = get("transformers.masking_utils", "ALL_MASK_ATTENTION_FUNCTIONS")
    get("transformers.masking_utils", "create_recurrent_attention_mask")
    experts_iface = get("transformers.integrations.moe", "ExpertsInterface")
    all_experts = get("transformers.integrations.moe", "ALL_EXPERTS_FUNCTIONS")
    sdpa_forward = get("transformers.integrations.sdpa_attention", "sdpa_attention_forward")
    linear_layer = get("transformers.cache_utils", "LinearAttentionCacheLayerMixin")
    cache_cls = get("transformers.cache_utils", "Cache")
    for method in ("get_conv_state", "update_conv_state", "is_recording_past"):
        if cache_cls is not None and not hasattr(cache_cls, method):
            missing.append(f"transformers.cache_utils.Cache.{method}")
    linear_impl = get("transformers.cache_utils", "LinearAttentionLayer")
    if linear_impl is not None:
        params = inspect.signature(linear_impl.update_conv_state).parameters
        if "conv_kernel_size" not in params:  # the first prefill allocates the state through it
            missing.append("transformers.cache_utils.LinearAttentionLayer.update_conv_state(conv_kernel_size=)")
    pretrained = get("transformers.modeling_utils", "PreTrainedModel")
    for method in ("set_attn_implementation", "set_experts_implementation", "post_init"):
        if pretrained is not None and not hasattr(pretrained, method):
            missing.append(f"transformers.PreTrainedModel.{method}")

    modules = {}
    for module_name, (conv_name, router_name, base_name, experts_name) in MODEL_MODULES.items():
        try:
            mod = importlib.import_module(module_name)
        except ImportError:
            missing.append(module_name)
            continue
        classes = [getattr(mod, n, None) if n else None for n in (conv_name, router_name, base_name, experts_name)]
        for name, cls in zip((conv_name, router_name, base_name, experts_name), classes):
            if name and cls is None:
                missing.append(f"{module_name}.{name}")
        # The attention layers look their function up through this module-level name (the patch's "sdpa").
        if not hasattr(mod, "ALL_ATTENTION_FUNCTIONS"):
            missing.append(f"{module_name}.ALL_ATTENTION_FUNCTIONS")
        modules[module_name] = (mod, *classes)
    if missing:
        raise _unsupported(version, missing)

    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
        if parts[0] != _TESTED_MAJOR or parts < _TESTED_MIN:
            warnings.warn(
                f"lfm_kernels.patch() is tested with transformers {SUPPORTED_RANGE}; found {version}. "
                "The extension points it needs are present, so it goes ahead.",
                RuntimeWarning,
                stacklevel=3,
            )
    except ValueError:
        pass

    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        _active_collector = None

    _hooks = Hooks(
        version=version,
        AttentionInterface=attention_iface,
        AttentionMaskInterface=mask_iface,
        ExpertsInterface=experts_iface,
        all_attention=all_attention,
        all_masks=all_masks,
        all_experts=all_experts,
        sdpa_attention_forward=sdpa_forward,
        LinearAttentionCacheLayerMixin=linear_layer,
        modules=modules,
        active_collector=_active_collector,
    )
    return _hooks
