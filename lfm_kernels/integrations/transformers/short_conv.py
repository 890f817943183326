"""`Lfm2ShortConv` / `Lfm2MoeShortConv`: in_proj -> `lfm_kernels.short_conv` on transformers' conv cache -> out_proj."""

from __future__ import annotations

import functools
from typing import Callable

from ._common import KERNEL_DTYPES, kernel, kernel_device, no_grad_needed
from ._hooks import load_hooks


def _short_conv_fast(self, hidden_states, cache, attention_mask):
    """in_proj -> fused short conv on transformers' conv cache -> out_proj; None when transformers must run."""
    weight = self.conv.weight  # [D, 1, L]
    if (
        hidden_states.dim() != 3
        or hidden_states.dtype not in KERNEL_DTYPES
        or weight.dtype != hidden_states.dtype
        or not kernel_device(hidden_states)
        or weight.device != hidden_states.device
        or not 2 <= weight.shape[-1] <= 4
        or not no_grad_needed(hidden_states, weight, self.conv.bias, getattr(self.in_proj, "weight", None))
        # accelerate offload: the parent forward must fire the conv's hook (transformers' forward does)
        or getattr(self.conv, "_hf_hook", None) is not None
    ):
        return None
    batch, seqlen, dim = hidden_states.shape
    width = weight.shape[-1]
    idx = self.layer_idx
    state = None
    if cache is not None:
        hooks = load_hooks()
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
    y = kernel("short_conv")(bcx, weight.view(dim, width), self.conv.bias, state, kernel_mask)
    return self.out_proj(y)


def make_short_conv_forward(original: Callable) -> Callable:
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
