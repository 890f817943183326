"""Route transformers' LFM2 and LFM2-MoE models through lfm_kernels: `patch()`, `patch(model)`, `unpatch()`.

What gets routed, and through which of transformers' own extension points:

- the gated short conv (`Lfm2ShortConv` / `Lfm2MoeShortConv`): its forward is replaced by in_proj ->
  `lfm_kernels.short_conv` (reading and updating transformers' conv cache in place) -> out_proj;
- the MoE router (`Lfm2MoeTopKRouter`): its forward runs the fused `lfm_kernels.moe_route`;
- the experts (`Lfm2MoeExperts`): an implementation named "lfm_kernels" registered in transformers'
  `ExpertsInterface` and selected on the model's config (`lfm_kernels.moe_experts`);
- attention: an implementation named "lfm_kernels" registered in `AttentionInterface` (with a mask
  function in `AttentionMaskInterface`) that sends one-token decode steps to
  `lfm_kernels.decode_attention` and everything else to the implementation the model had before;
- every `nn.Linear` of a patched model: `lfm_kernels.linear` for CPU bf16/fp32 inference.

Each piece checks per call whether our kernel covers the case (device, dtype, shapes, gradients
needed, accelerate offload hooks, a cache recording its past for rollback) and otherwise runs
transformers' own code, so a patched model computes what it computed before, only faster.

`patch()` patches the classes (and every model built afterwards, through `post_init`);
`patch(model)` patches one existing model's modules and returns it; `unpatch()` puts back every
original function, interface entry, config setting and module class it changed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import lfm_kernels

IMPL_NAME = "lfm_kernels"
SUPPORTED_RANGE = ">=5.24,<6"  # the range this integration is tested on; other 5.x with the same hooks should work
_TESTED_MAJOR = 5
_TESTED_MIN = (5, 24)

# Head sizes the decode-attention kernels are built for (issue 4); other sizes take the model's own path.
_DECODE_HEAD_DIMS = (64, 128)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LINEAR_DTYPES = (torch.float32, torch.bfloat16)
_KERNEL_DEVICES = ("cpu", "cuda")

_MODEL_MODULES = {
    # modeling module: (short conv class, router class or None, pretrained base class, experts class or None)
    "transformers.models.lfm2_moe.modeling_lfm2_moe": (
        "Lfm2MoeShortConv",
        "Lfm2MoeTopKRouter",
        "Lfm2MoePreTrainedModel",
        "Lfm2MoeExperts",
    ),
    "transformers.models.lfm2.modeling_lfm2": ("Lfm2ShortConv", None, "Lfm2PreTrainedModel", None),
}


# --------------------------------------------------------------------------------------------------
# What the installed transformers offers
# --------------------------------------------------------------------------------------------------


@dataclass
class _Hooks:
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


_hooks: _Hooks | None = None


def _unsupported(found: str, missing: list[str]) -> RuntimeError:
    return RuntimeError(
        f"lfm_kernels.patch() supports transformers {SUPPORTED_RANGE} (it needs AttentionInterface, "
        f"AttentionMaskInterface, ExpertsInterface, linear-attention conv caches and the LFM2 / LFM2-MoE "
        f"models); the installed transformers {found} lacks: {', '.join(missing)}. "
        f"Install a supported version, e.g. `pip install 'transformers{SUPPORTED_RANGE}'`."
    )


def _load_hooks() -> _Hooks:
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
    for module_name, (conv_name, router_name, base_name, experts_name) in _MODEL_MODULES.items():
        try:
            mod = importlib.import_module(module_name)
        except ImportError:
            missing.append(module_name)
            continue
        classes = [getattr(mod, n, None) if n else None for n in (conv_name, router_name, base_name, experts_name)]
        for name, cls in zip((conv_name, router_name, base_name, experts_name), classes):
            if name and cls is None:
                missing.append(f"{module_name}.{name}")
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

    _hooks = _Hooks(
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


# --------------------------------------------------------------------------------------------------
# Patch bookkeeping: everything we change, so unpatch() can put it back exactly
# --------------------------------------------------------------------------------------------------

_MISSING = object()


@dataclass
class _State:
    class_attrs: dict = field(default_factory=dict)  # (owner, name) -> original value in owner.__dict__ or _MISSING
    registry: dict = field(default_factory=dict)  # (mapping dict id) -> (mapping, previous value or _MISSING)
    configs: dict = field(default_factory=dict)  # id(config) -> (weakref(config), attn before, experts before)
    modules: "weakref.WeakSet" = field(default_factory=weakref.WeakSet)  # instances with a patched forward/class


_state = _State()


def _set_class_attr(owner: type, name: str, value) -> None:
    key = (owner, name)
    if key not in _state.class_attrs:
        _state.class_attrs[key] = owner.__dict__.get(name, _MISSING)
    setattr(owner, name, value)


def _register(mapping: dict, key: str, value) -> None:
    """Add key to one of transformers' interface mappings (the class-wide `_global_mapping`)."""
    slot = (id(mapping), key)
    if slot not in _state.registry:
        _state.registry[slot] = (mapping, mapping.get(key, _MISSING))
    mapping[key] = value


def _original(owner: type, name: str):
    """The function transformers had before patch() (or the current one when the class isn't patched)."""
    saved = _state.class_attrs.get((owner, name), _MISSING)
    if saved is not _MISSING:
        return saved
    for klass in owner.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    raise AttributeError(name)


# --------------------------------------------------------------------------------------------------
# Kernel selection (and a private hook to force the Triton implementations, for tests)
# --------------------------------------------------------------------------------------------------

_FORCE_TRITON = False
_TRITON_NAMES = {
    "short_conv": ("short_conv", "short_conv_triton"),
    "moe_route": ("moe", "moe_route_triton"),
    "moe_experts": ("moe", "moe_experts_triton"),
    "decode_attention": ("decode_attention", "decode_attention_triton"),
}
_triton_used: set[str] = set()


def _kernel(op: str) -> Callable:
    """The public op, or (inside `_force_triton()`) its Triton entry point called directly on any device."""
    if _FORCE_TRITON:
        module_name, fn_name = _TRITON_NAMES[op]
        try:
            fn = getattr(importlib.import_module(f"lfm_kernels.triton.{module_name}"), fn_name)
        except (ImportError, AttributeError):
            fn = None
        if fn is not None:
            _triton_used.add(op)
            return fn
    return getattr(lfm_kernels, op)


@contextlib.contextmanager
def _force_triton():
    """Inside the block the patched modules call the Triton kernels directly, whatever the tensors' device.

    For tests on machines without a GPU (with TRITON_INTERPRET=1 set before triton is imported). Yields
    the set of op names that actually ran through Triton (ops without a Triton kernel use the public op).
    """
    global _FORCE_TRITON
    previous = _FORCE_TRITON
    _FORCE_TRITON = True
    _triton_used.clear()
    try:
        yield _triton_used
    finally:
        _FORCE_TRITON = previous


def _no_grad_needed(*tensors) -> bool:
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


def _kernel_device(t: torch.Tensor) -> bool:
    return t.device.type in _KERNEL_DEVICES or _FORCE_TRITON


# --------------------------------------------------------------------------------------------------
# Short conv
# --------------------------------------------------------------------------------------------------


def _short_conv_fast(self, hidden_states, cache, attention_mask):
    """in_proj -> fused short conv on transformers' conv cache -> out_proj; None when transformers must run."""
    weight = self.conv.weight  # [D, 1, L]
    if (
        hidden_states.dim() != 3
        or hidden_states.dtype not in _KERNEL_DTYPES
        or weight.dtype != hidden_states.dtype
        or not _kernel_device(hidden_states)
        or weight.device != hidden_states.device
        or not 2 <= weight.shape[-1] <= 4
        or not _no_grad_needed(hidden_states, weight, self.conv.bias, self.in_proj.weight)
        # accelerate offload: the parent forward must fire the conv's hook (transformers' forward does)
        or getattr(self.conv, "_hf_hook", None) is not None
    ):
        return None
    batch, seqlen, dim = hidden_states.shape
    width = weight.shape[-1]
    idx = self.layer_idx
    state = None
    if cache is not None:
        hooks = _load_hooks()
        layers = getattr(cache, "layers", None)
        if layers is None or idx >= len(layers) or not isinstance(layers[idx], hooks.LinearAttentionCacheLayerMixin):
            return None
        if cache.is_recording_past(idx):  # rollback recording keeps growing states: transformers' path
            return None
        state = cache.get_conv_state(idx)
        if state is not None and (
            tuple(state.shape) != (batch, dim, width)
            or state.dtype != hidden_states.dtype
            or state.device != hidden_states.device
            or not state.is_contiguous()
        ):
            return None
        if state is None:
            # First forward of a sequence: the cache allocates (or, after reset(), reuses) its zeroed [B, D, L]
            # state through its public update, which is exactly the zero history transformers' prefill assumes.
            cache.update_conv_state(hidden_states.new_zeros(batch, dim, width), idx, conv_kernel_size=width)
            state = cache.get_conv_state(idx)
            if (
                state is None
                or tuple(state.shape) != (batch, dim, width)
                or state.dtype != hidden_states.dtype
                or not state.is_contiguous()
            ):
                return None  # transformers' path continues correctly from the zero state just stored

    kernel_mask = attention_mask
    if attention_mask is not None and self.in_proj.bias is not None:
        # With an in_proj bias a padded position is not zero after in_proj: mask before it, as transformers does.
        hidden_states = (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)
        kernel_mask = None
    bcx = self.in_proj(hidden_states)
    y = _kernel("short_conv")(bcx, weight.view(dim, width), self.conv.bias, state, kernel_mask)
    return self.out_proj(y)


def _make_short_conv_forward(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        if cache is None and "past_key_values" in kwargs:  # the older name transformers still accepts
            cache = kwargs.pop("past_key_values")
        out = _short_conv_fast(self, hidden_states, cache, attention_mask)
        if out is not None:
            return out
        return original(self, hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)

    forward._lfm_kernels_original = original
    return forward


# --------------------------------------------------------------------------------------------------
# MoE router and experts
# --------------------------------------------------------------------------------------------------


def _router_logits_wanted() -> bool:
    """True when transformers is recording router logits (output_router_logits) in this forward."""
    collector = _hooks.active_collector if _hooks is not None else None
    if collector is None:
        return True
    try:
        active = collector.get()
    except Exception:  # noqa: BLE001 - unknown recorder state: compute the logits to be safe
        return True
    return active is not None and "router_logits" in active


def _make_router_forward(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(self, hidden_states, expert_bias=None):
        bias = expert_bias if self.use_expert_bias else None
        if (
            hidden_states.dim() != 2
            or hidden_states.dtype not in _KERNEL_DTYPES
            or not _kernel_device(hidden_states)
            or (self.use_expert_bias and expert_bias is None)
            or not _no_grad_needed(hidden_states, self.weight)
        ):
            return original(self, hidden_states, expert_bias)
        weights, ids = _kernel("moe_route")(
            hidden_states, self.weight, bias, self.top_k, self.norm_topk_prob, self.routed_scaling_factor
        )
        logits = F.linear(hidden_states, self.weight) if _router_logits_wanted() else None
        return logits, weights, ids

    forward._lfm_kernels_original = original
    return forward


def _experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """ExpertsInterface entry "lfm_kernels": fused top-k SwiGLU experts; the previous implementation otherwise."""
    if (
        hidden_states.dim() == 2
        and hidden_states.dtype in _KERNEL_DTYPES
        and _kernel_device(hidden_states)
        and self.gate_up_proj.dtype == hidden_states.dtype
        and getattr(self, "is_concatenated", True)
        and not getattr(self, "is_transposed", False)
        and not getattr(self, "has_bias", False)
        and getattr(self, "has_gate", True)
        and not getattr(self, "has_post_expert_norm", False)
        and not getattr(self, "_is_expert_parallel", False)
        and getattr(self, "act_fn", F.silu) is F.silu
        and _no_grad_needed(hidden_states, self.gate_up_proj, self.down_proj, top_k_weights)
    ):
        return _kernel("moe_experts")(hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights)
    return _base_experts(self)(self, hidden_states, top_k_index, top_k_weights)


def _base_experts(module) -> Callable:
    hooks = _load_hooks()
    before = _previous_impl(getattr(module, "config", None), "experts")
    if before not in (None, "eager", IMPL_NAME) and before in hooks.all_experts:
        return hooks.all_experts[before]
    # transformers' eager loop: the class forward under the @use_experts_implementation dispatcher
    forward = type(module).forward
    return getattr(forward, "__wrapped__", forward)


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


def _previous_impl(config, kind: str):
    """The attention ("attn") or experts implementation a config had before we set ours."""
    if config is None:
        return None
    entry = _state.configs.get(id(config))
    if entry is not None and entry[0]() is config:
        return entry[1] if kind == "attn" else entry[2]
    return "sdpa" if kind == "attn" else None


def _base_attention_name(config) -> str:
    before = _previous_impl(config, "attn")
    return before if before not in (None, IMPL_NAME) else "sdpa"


def _mask_function(*args, config=None, **kwargs):
    """AttentionMaskInterface entry: the mask the model's previous implementation builds (sdpa by default)."""
    hooks = _load_hooks()
    return hooks.all_masks[_base_attention_name(config)](*args, config=config, **kwargs)


def _keep_ranges(attention_mask, batch: int, kv_len: int):
    """[(start, length)] per row when each row attends to one contiguous run of cache positions, else None."""
    if attention_mask is None:
        return [(0, kv_len)] * batch
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        return None
    if attention_mask.shape[1] != 1 or attention_mask.shape[2] != 1 or attention_mask.shape[-1] < kv_len:
        return None
    mask = attention_mask[:, 0, 0, :kv_len]
    keep = mask if mask.dtype == torch.bool else mask == 0  # eager masks are additive: 0 keeps, min drops
    if keep.shape[0] != batch:
        if keep.shape[0] != 1:
            return None
        keep = keep.expand(batch, kv_len)
    keep_i = keep.to(torch.int32)
    count = keep_i.sum(-1)
    first = keep_i.argmax(-1)
    last = kv_len - 1 - keep_i.flip(-1).argmax(-1)
    stats = torch.stack([first, count, last - first + 1]).tolist()
    ranges = []
    for start, n, span in zip(*stats):
        if n == 0 or n != span:
            return None
        ranges.append((start, n))
    return ranges


def _decode_fast(module, query, key, value, attention_mask, dropout, scaling, kwargs):
    if query.dim() != 4 or query.shape[2] != 1 or key.dim() != 4 or key.shape[2] < 1:
        return None
    batch, n_q, _, head_dim = query.shape
    n_kv, kv_len = key.shape[1], key.shape[2]
    if (
        head_dim not in _DECODE_HEAD_DIMS
        or n_q % n_kv != 0
        or key.shape[0] != batch
        or query.dtype not in _KERNEL_DTYPES
        or key.dtype != query.dtype
        or value.dtype != query.dtype
        or tuple(value.shape) != tuple(key.shape)
        or not _kernel_device(query)
        or (dropout and module.training)
        or not _no_grad_needed(query, key, value)
        or any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux", "sinks"))
    ):
        return None
    ranges = _keep_ranges(attention_mask, batch, kv_len)
    if ranges is None:
        return None
    scale = float(scaling) if scaling is not None else head_dim**-0.5
    q = query[:, :, 0, :].contiguous()
    attend = _kernel("decode_attention")
    if all(start == 0 for start, _ in ranges):
        if all(n == kv_len for _, n in ranges):  # no padding: a fill on the device, no host-to-device copy
            lens = torch.full((batch,), kv_len, dtype=torch.int32, device=query.device)
        else:
            lens = torch.tensor([n for _, n in ranges], dtype=torch.int32, device=query.device)
        out = attend(q, key, value, lens, scale)
    else:
        # Left padding: each row's run starts elsewhere, so each row reads its own window of the cache.
        rows = []
        for b, (start, n) in enumerate(ranges):
            lens = torch.tensor([n], dtype=torch.int32, device=query.device)
            rows.append(attend(q[b : b + 1], key[b : b + 1, :, start:], value[b : b + 1, :, start:], lens, scale))
        out = torch.cat(rows, dim=0)
    return out.unsqueeze(1)  # [B, 1, Hq, D]: the layout transformers' attention functions return


def _attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """AttentionInterface entry "lfm_kernels": decode steps on our kernel, the rest on the previous implementation."""
    out = _decode_fast(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    if out is not None:
        return out, None
    hooks = _load_hooks()
    name = _base_attention_name(getattr(module, "config", None))
    if name == "eager":
        fn = getattr(importlib.import_module(type(module).__module__), "eager_attention_forward", None)
    else:
        fn = hooks.all_attention.get(name)
    if fn is None:
        fn = hooks.sdpa_attention_forward
    return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


# --------------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------------


class KernelLinear(nn.Linear):
    """nn.Linear whose CPU bf16/fp32 inference runs `lfm_kernels.linear` (set on instances by patch)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's argument name
        weight = self.weight
        if (
            input.device.type == "cpu"
            and weight.device.type == "cpu"
            and weight.dtype in _LINEAR_DTYPES
            and input.dtype == weight.dtype
            and input.dim() >= 1
            and _no_grad_needed(input, weight, self.bias)
        ):
            out = lfm_kernels.linear(input.reshape(-1, input.shape[-1]), weight, self.bias)
            return out.view(*input.shape[:-1], weight.shape[0])
        return F.linear(input, weight, self.bias)


# --------------------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------------------


def _register_interfaces(hooks: _Hooks) -> None:
    _register(hooks.AttentionInterface._global_mapping, IMPL_NAME, _attention_forward)
    _register(hooks.AttentionMaskInterface._global_mapping, IMPL_NAME, _mask_function)
    _register(hooks.ExpertsInterface._global_mapping, IMPL_NAME, _experts_forward)


def _patch_classes(hooks: _Hooks) -> None:
    for mod, conv_cls, router_cls, base_cls, _experts_cls in hooks.modules.values():
        if not getattr(conv_cls.forward, "_lfm_kernels_original", None):
            _set_class_attr(conv_cls, "forward", _make_short_conv_forward(conv_cls.forward))
        if router_cls is not None and not getattr(router_cls.forward, "_lfm_kernels_original", None):
            _set_class_attr(router_cls, "forward", _make_router_forward(router_cls.forward))
        if not getattr(base_cls.post_init, "_lfm_kernels_original", None):
            _set_class_attr(base_cls, "post_init", _make_post_init(base_cls.post_init))


def _make_post_init(original: Callable) -> Callable:
    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        _patch_model(self, _load_hooks(), instance_forwards=False)
        return result

    post_init._lfm_kernels_original = original
    return post_init


def _patch_model(model, hooks: _Hooks, instance_forwards: bool) -> None:
    """Point one model (and its submodules) at our implementations."""
    known = {cls for _, conv, router, _, _ in hooks.modules.values() for cls in (conv, router) if cls is not None}
    experts_classes = tuple(e for *_, e in hooks.modules.values() if e is not None)
    has_experts = False
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = KernelLinear
            _state.modules.add(module)
        elif instance_forwards and type(module) in known and "forward" not in module.__dict__:
            class_forward = type(module).forward
            if not getattr(class_forward, "_lfm_kernels_original", None):  # class not patched: patch the instance
                maker = _make_short_conv_forward if hasattr(module, "conv") else _make_router_forward
                module.forward = types.MethodType(maker(class_forward), module)
                _state.modules.add(module)
        if experts_classes and isinstance(module, experts_classes):
            has_experts = True

    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        return
    entry = _state.configs.get(id(config))
    if entry is None or entry[0]() is not config:
        _state.configs[id(config)] = (weakref.ref(config), config._attn_implementation, config._experts_implementation)
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
    hooks = _load_hooks()
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
    # Models first, while our interface entries still exist for transformers' own checks.
    for ref, attn, experts in list(_state.configs.values()):
        config = ref()
        if config is None:
            continue
        # A model created with attn_implementation="lfm_kernels" goes back to what is always available.
        if config._attn_implementation == IMPL_NAME:
            config._attn_implementation_internal = "sdpa" if attn in (None, IMPL_NAME) else attn
        if config._experts_implementation == IMPL_NAME:
            config._experts_implementation_internal = "eager" if experts in (None, IMPL_NAME) else experts
    _state.configs.clear()
    for module in list(_state.modules):
        if type(module) is KernelLinear:
            module.__class__ = nn.Linear
        module.__dict__.pop("forward", None)
    _state.modules = weakref.WeakSet()
    for (owner, name), original in list(_state.class_attrs.items()):
        if original is _MISSING:
            if name in owner.__dict__:
                delattr(owner, name)
        else:
            setattr(owner, name, original)
    _state.class_attrs.clear()
    for (_, key), (mapping, previous) in list(_state.registry.items()):
        if previous is _MISSING:
            mapping.pop(key, None)
        else:
            mapping[key] = previous
    _state.registry.clear()


def is_patched() -> bool:
    """True while any patch() is in effect."""
    return bool(_state.class_attrs or _state.registry or _state.configs)
