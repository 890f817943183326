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
    ranges = _keep_ranges(attention_mask, batch, kv_len)
    if ranges is None:
        return None
    scale = float(scaling) if scaling is not None else head_dim**-0.5
    q = query[:, :, 0, :].contiguous()
    attend = kernel("decode_attention")
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
