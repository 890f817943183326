"""Top-k MoE routing and expert dispatch (placeholder: runs the reference until the kernels land)."""

from __future__ import annotations

import torch

from .. import reference


def moe_route(hidden, gate_weight, expert_bias, top_k, norm_topk_prob=True, routed_scaling_factor=1.0):
    return reference.moe_route(hidden, gate_weight, expert_bias, top_k, norm_topk_prob, routed_scaling_factor)


def moe_experts(hidden, gate_up_proj, down_proj, topk_ids, topk_weights):
    return reference.moe_experts(hidden, gate_up_proj, down_proj, topk_ids, topk_weights)


def moe(hidden, gate_weight, expert_bias, gate_up_proj, down_proj, top_k, norm_topk_prob=True,
        routed_scaling_factor=1.0) -> torch.Tensor:
    weights, ids = moe_route(hidden, gate_weight, expert_bias, top_k, norm_topk_prob, routed_scaling_factor)
    return moe_experts(hidden, gate_up_proj, down_proj, ids, weights)
