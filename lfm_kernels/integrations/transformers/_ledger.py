"""The undo ledger: everything patch() changes, recorded so that unpatch() can put it back exactly."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch.nn as nn

IMPL_NAME = "lfm_kernels"  # our entry in transformers' attention / mask / experts interfaces

MISSING = object()


@dataclass
class _State:
    class_attrs: dict = field(default_factory=dict)  # (owner, name) -> original value in owner.__dict__ or MISSING
    registry: dict = field(default_factory=dict)  # (mapping dict id, key) -> (mapping, previous value or MISSING)
    configs: dict = field(default_factory=dict)  # id(config) -> (weakref(config), attn before, experts before)
    modules: "weakref.WeakSet" = field(default_factory=weakref.WeakSet)  # instances with a patched forward/class
    # id(config) -> (weakref(config), attention asked for, experts asked for) as the config stood when the
    # first model was built from it while the classes were patched (None: the user left the default)
    requested: dict = field(default_factory=dict)
    # id(config) -> (weakref(config),): configs whose "sdpa" is transformers' default, not a request. Kept
    # here rather than on the config so that it never reaches config.json, to_dict() or config equality.
    default_attn: dict = field(default_factory=dict)
    # modules patch(model, quant=...) quantized: their float weights are gone, so unpatch() refuses while any lives
    quantized: "weakref.WeakSet" = field(default_factory=weakref.WeakSet)


state = _State()


def set_class_attr(owner: type, name: str, value) -> None:
    key = (owner, name)
    if key not in state.class_attrs:
        state.class_attrs[key] = owner.__dict__.get(name, MISSING)
    setattr(owner, name, value)


def register(mapping: dict, key: str, value) -> None:
    """Add key to one of transformers' interface mappings (the class-wide `_global_mapping`)."""
    slot = (id(mapping), key)
    if slot not in state.registry:
        state.registry[slot] = (mapping, mapping.get(key, MISSING))
    mapping[key] = value


def record_config(config, attn_before, experts_before) -> None:
    """Remember a config's implementations before we switch it to ours (first record wins)."""
    entry = state.configs.get(id(config))
    if entry is None or entry[0]() is not config:
        state.configs[id(config)] = (weakref.ref(config), attn_before, experts_before)


def record_request(config) -> None:
    """Remember what a config asked for before transformers resolves its default (first record wins)."""
    entry = state.requested.get(id(config))
    if entry is None or entry[0]() is not config:
        state.requested[id(config)] = (
            weakref.ref(config),
            getattr(config, "_attn_implementation", None),
            getattr(config, "_experts_implementation", None),
        )


def record_attn_request(config, name) -> None:
    """An attention implementation asked for by name after the model was built (set_attn_implementation)."""
    entry = state.requested.get(id(config))
    experts = entry[2] if entry is not None and entry[0]() is config else MISSING
    state.requested[id(config)] = (weakref.ref(config), name, experts)


def requested(config, kind: str):
    """(known, value): what the config asked for ("attn" or "experts"), when a patched __init__ (or, for
    attention, a patched set_attn_implementation) saw it."""
    entry = state.requested.get(id(config))
    if entry is None or entry[0]() is not config:
        return False, None
    value = entry[1] if kind == "attn" else entry[2]
    if value is MISSING:
        return False, None
    return True, value


def mark_default_attention(config) -> None:
    """Record that config's "sdpa" is the implementation transformers chose by default."""
    state.default_attn[id(config)] = (weakref.ref(config),)


def unmark_default_attention(config) -> None:
    """An implementation was asked for by name: config's "sdpa" (if it is one) now means torch's SDPA."""
    entry = state.default_attn.get(id(config))
    if entry is not None and entry[0]() is config:
        del state.default_attn[id(config)]


def default_attention(config) -> bool:
    """True when config is on "sdpa" because nobody asked for an implementation (ours may run instead)."""
    entry = state.default_attn.get(id(config))
    return entry is not None and entry[0]() is config and config._attn_implementation == "sdpa"


def copy_config_records(source, copy) -> None:
    """A copy of a recorded config gets the same records, so unpatch() restores the copy too."""
    for table in (state.configs, state.requested, state.default_attn):
        entry = table.get(id(source))
        if entry is not None and entry[0]() is source:
            table[id(copy)] = (weakref.ref(copy), *entry[1:])


def previous_impl(config, kind: str):
    """The attention ("attn") or experts implementation a config had before we set ours."""
    if config is None:
        return None
    entry = state.configs.get(id(config))
    if entry is not None and entry[0]() is config:
        return entry[1] if kind == "attn" else entry[2]
    return "sdpa" if kind == "attn" else None


def undo() -> None:
    """Put back every config setting, module class/forward, class attribute and interface entry recorded."""
    from .linear import KernelLinear

    # Models first, while our interface entries still exist for transformers' own checks.
    for ref, attn, experts in list(state.configs.values()):
        config = ref()
        if config is None:
            continue
        # A model created with attn_implementation="lfm_kernels" goes back to what is always available.
        if config._attn_implementation == IMPL_NAME:
            config._attn_implementation_internal = "sdpa" if attn in (None, IMPL_NAME) else attn
        if config._experts_implementation == IMPL_NAME:
            config._experts_implementation_internal = "eager" if experts in (None, IMPL_NAME) else experts
    state.configs.clear()
    state.requested.clear()
    state.default_attn.clear()
    for module in list(state.modules):
        if type(module) is KernelLinear:
            module.__class__ = nn.Linear
        module.__dict__.pop("forward", None)
    state.modules = weakref.WeakSet()
    for (owner, name), original in list(state.class_attrs.items()):
        if original is MISSING:
            if name in owner.__dict__:
                delattr(owner, name)
        else:
            setattr(owner, name, original)
    state.class_attrs.clear()
    for (_, key), (mapping, previous) in list(state.registry.items()):
        if previous is MISSING:
            mapping.pop(key, None)
        else:
            mapping[key] = previous
    state.registry.clear()


def is_patched() -> bool:
    """True while any patch() is in effect."""
    return bool(state.class_attrs or state.registry or state.configs)


def track(module) -> None:
    """Record a module patch() changed (or a copy of one), so unpatch() turns it back."""
    if is_patched():
        state.modules.add(module)
