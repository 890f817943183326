"""`Lfm2MoeTopKRouter` (its forward runs `lfm_kernels.moe_route`) and `Lfm2MoeExperts` (an ExpertsInterface
entry that runs `lfm_kernels.moe_experts`)."""

from __future__ import annotations

import functools
from typing import Callable

import torch.nn.functional as F

from . import _hooks
from ._common import KERNEL_DTYPES, kernel, kernel_device, no_grad_needed
from ._ledger import IMPL_NAME, previous_impl


def _router_logits_wanted() -> bool:
    """True when transformers is recording router logits (output_router_logits) in this forward."""
    hooks = _hooks.loaded()
    collector = hooks.active_collector if hooks is not None else None
    if collector is None:
        return True
    try:
        active = collector.get()
    except Exception:  # noqa: BLE001 - unknown recorder state: compute the logits to be safe
        return True
    return active is not None and "router_logits" in active


def make_router_forward(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(self, hidden_states, expert_bias=None):
        bias = expert_bias if self.use_expert_bias else None
        if (
            hidden_states.dim() != 2
            or hidden_states.dtype not in KERNEL_DTYPES
            or not kernel_device(hidden_states)
            or (self.use_expert_bias and expert_bias is None)
            or not no_grad_needed(hidden_states, self.weight)
        ):
            return original(self, hidden_states, expert_bias)
        weights, ids = kernel("moe_route")(
            hidden_states, self.weight, bias, self.top_k, self.norm_topk_prob, self.routed_scaling_factor
        )
        logits = F.linear(hidden_states, self.weight) if _router_logits_wanted() else None
        return logits, weights, ids

    forward._lfm_kernels_original = original
    return forward


def experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """ExpertsInterface entry "lfm_kernels": fused top-k SwiGLU experts; the previous implementation otherwise."""
    if (
        hidden_states.dim() == 2
        and hidden_states.dtype in KERNEL_DTYPES
        and kernel_device(hidden_states)
        and self.gate_up_proj.dtype == hidden_states.dtype
        and getattr(self, "is_concatenated", True)
        and not getattr(self, "is_transposed", False)
        and not getattr(self, "has_bias", False)
        and getattr(self, "has_gate", True)
        and not getattr(self, "has_post_expert_norm", False)
        and not getattr(self, "_is_expert_parallel", False)
        and getattr(self, "act_fn", F.silu) is F.silu
        and no_grad_needed(hidden_states, self.gate_up_proj, self.down_proj, top_k_weights)
    ):
        return kernel("moe_experts")(hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights)
    return _base_experts(self)(self, hidden_states, top_k_index, top_k_weights)


def _base_experts(module) -> Callable:
    hooks = _hooks.load_hooks()
    before = previous_impl(getattr(module, "config", None), "experts")
    if before not in (None, "eager", IMPL_NAME) and before in hooks.all_experts:
        return hooks.all_experts[before]
    # transformers' eager loop: the class forward under the @use_experts_implementation dispatcher
    forward = type(module).forward
    return getattr(forward, "__wrapped__", forward)
