"""Attention: an AttentionInterface entry "lfm_kernels" that sends one-token decode steps to
`lfm_kernels.decode_attention` and everything else to the implementation the model had before, an
AttentionMaskInterface entry that builds that implementation's mask, and the "sdpa" seen by the LFM2
modeling modules, which runs that same entry for models left on transformers' default.

A model nobody asked an implementation of keeps transformers' name for it, "sdpa" (so code and tests
that read `config._attn_implementation` see what they see without the patch), yet runs our entry. The
LFM2 modeling modules look their attention function up in a module-level `ALL_ATTENTION_FUNCTIONS`; the
patch points that name at an AttentionInterface of its own whose local "sdpa" asks, per call, whether
the module's config is on the unrequested default (a record in the ledger, never on the config) and
otherwise runs transformers' global "sdpa", so an explicit "sdpa" is torch's SDPA. Other models,
which look up transformers' own ALL_ATTENTION_FUNCTIONS, never see it."""

from __future__ import annotations

import importlib

import torch

from ...ops.decode_attention import _tuned_head_dim
from ._common import KERNEL_DTYPES, kernel, kernel_device, no_grad_needed
from ._hooks import load_hooks
from ._ledger import IMPL_NAME, default_attention, is_patched, previous_impl


def _base_attention_name(config) -> str:
    before = previous_impl(config, "attn")
    return before if before not in (None, IMPL_NAME) else "sdpa"


def mask_function(*args, config=None, **kwargs):
    """AttentionMaskInterface entry: the mask the model's previous implementation builds (sdpa by default)."""
    hooks = load_hooks()
    return hooks.all_masks[_base_attention_name(config)](*args, config=config, **kwargs)


def _kept_positions(attention_mask, batch: int, kv_len: int):
    """(order, counts) from a decode step's mask, or None when the mask is not one we can read.

    Without a host read (so the decode step stays free of device syncs and traceable by torch.compile /
    torch.export), any set of kept cache positions becomes a prefix: `order` [B, S] lists each row's kept
    positions first, in cache order, and `counts` [B] says how many there are. Softmax attention does not
    depend on the order of its keys, so attending to the first counts[b] positions of the reordered cache
    is attending to exactly the kept ones.
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        return None
    if attention_mask.shape[1] != 1 or attention_mask.shape[2] != 1 or attention_mask.shape[-1] < kv_len:
        return None
    if attention_mask.shape[0] not in (1, batch):
        return None
    mask = attention_mask[:, 0, 0, :kv_len]
    keep = mask if mask.dtype == torch.bool else mask == 0  # eager masks are additive: 0 keeps, min drops
    keep = keep.expand(batch, kv_len)
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices
    # A row with no kept position (transformers never builds one for a decode step) reads position order[0].
    counts = keep.sum(-1, dtype=torch.int32).clamp_(min=1)
    return order, counts


def _decode_fast(module, query, key, value, attention_mask, dropout, scaling, kwargs):
    if query.dim() != 4 or query.shape[2] != 1 or key.dim() != 4 or key.shape[2] < 1:
        return None
    batch, n_q, _, head_dim = query.shape
    n_kv, kv_len = key.shape[1], key.shape[2]
    if (
        not _tuned_head_dim(head_dim)
        or n_q % n_kv != 0
        or key.shape[0] != batch
        or query.dtype not in KERNEL_DTYPES
        or key.dtype != query.dtype
        or value.dtype != query.dtype
        or tuple(value.shape) != tuple(key.shape)
        or not kernel_device(query)
        or (dropout and module.training)
        or not no_grad_needed(query, key, value)
        or any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux", "sinks"))
    ):
        return None
    if attention_mask is None:
        lens = torch.full((batch,), kv_len, dtype=torch.int32, device=query.device)  # a fill, no host copy
    else:
        kept = _kept_positions(attention_mask, batch, kv_len)
        if kept is None:
            return None
        order, lens = kept
        # Padded or max-length (static) caches: gather the kept positions to the front of a copy.
        index = order[:, None, :, None].expand(batch, n_kv, kv_len, head_dim)
        key, value = key.gather(2, index), value.gather(2, index)
    scale = float(scaling) if scaling is not None else head_dim**-0.5
    q = query[:, :, 0, :].contiguous()
    # lens are built here, each in [1, S]: no need for the op to check them (a device sync on CUDA).
    out = kernel("decode_attention")(q, key, value, lens, scale, check_lengths=False)
    return out.unsqueeze(1)  # [B, 1, Hq, D]: the layout transformers' attention functions return


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """AttentionInterface entry "lfm_kernels": decode steps on our kernel, the rest on the previous implementation."""
    out = _decode_fast(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    if out is not None:
        return out, None
    hooks = load_hooks()
    name = _base_attention_name(getattr(module, "config", None))
    if name == "eager":
        fn = getattr(importlib.import_module(type(module).__module__), "eager_attention_forward", None)
    else:
        fn = hooks.all_attention.get(name)
    if fn is None:
        fn = hooks.sdpa_attention_forward
    return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def default_sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    """The LFM2 modules' "sdpa": our entry for a model left on the default, transformers' sdpa otherwise."""
    if default_attention(getattr(module, "config", None)):
        return attention_forward(module, query, key, value, attention_mask, **kwargs)
    # Looked up per call: a "sdpa" registered globally after patch() is what an explicit request gets.
    return load_hooks().AttentionInterface._global_mapping["sdpa"](module, query, key, value, attention_mask, **kwargs)


def make_local_interface(hooks):
    """The AttentionInterface the LFM2 modeling modules get: transformers' entries, "sdpa" overridden."""
    interface = hooks.AttentionInterface()
    interface["sdpa"] = default_sdpa_forward  # a local entry: transformers' global mapping is untouched
    interface._lfm_kernels_local = True
    return interface


def _head_dim(config) -> int | None:
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    try:
        return int(config.hidden_size) // int(config.num_attention_heads)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None


def attention_implementation(model) -> str:
    """Which attention implementation a transformers model runs right now.

    "lfm_kernels" when the patch routes it through our entry (one-token decode steps on
    `lfm_kernels.decode_attention`, everything else on the implementation named before ours): the model
    was left on transformers' default while patched, even though `config._attn_implementation` says
    "sdpa", or it asked for "lfm_kernels" by name. Otherwise the name transformers runs: "sdpa" (torch's
    SDPA), "eager", ... A model whose head size our kernel does not take reports the implementation our
    entry falls back to, since that is what runs. Each call can still fall back for a case the kernel
    does not cover (gradients needed, an unsupported dtype or device, sliding window).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise TypeError(f"model must be a transformers model (with a .config), got {type(model).__name__}")
    name = config._attn_implementation
    if not is_patched() or not (name == IMPL_NAME or default_attention(config)):
        return name
    head_dim = _head_dim(config)
    if head_dim is None or not _tuned_head_dim(head_dim):
        return _base_attention_name(config)
    return IMPL_NAME
