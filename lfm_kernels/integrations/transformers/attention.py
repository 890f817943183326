"""Attention: an AttentionInterface entry "lfm_kernels" that sends one-token decode steps to
`lfm_kernels.decode_attention` and everything else to the implementation the model had before, and
an AttentionMaskInterface entry that builds that implementation's mask."""

from __future__ import annotations

import importlib

import torch

from ...ops.decode_attention import _tuned_head_dim
from ._common import KERNEL_DTYPES, kernel, kernel_device, no_grad_needed
from ._hooks import load_hooks
from ._ledger import IMPL_NAME, previous_impl


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
