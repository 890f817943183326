"""The wrapper's decode step calls the C++ ops directly.

A decode step of the full-size model makes about 100 op calls. Through the public ops each also pays
its argument checks, its route lookup (policy and chooser) and, for `moe`, a second round of them for
the router: about 10-15 us per call with warm caches, and measured at 30-60 us per call inside a real
decode step, whose weight streams have just evicted the interpreter's working set from L2 (about 2 ms
of a 48 ms Q4_0 token on a 2-core Xeon). The model checked its weights when it was built, its state
is shaped by `new_state`, and a quantized weight's route depends only on its shape class, the row
count and the policy, so `DirectOps` asks each class for its route once per step and then calls the
op itself. These are the C++ entry points the public ops end in, with the same arguments, so the
outputs are bit-identical (the C++ ops keep their own checks of shapes, dtypes and aliasing). Whatever
it does not cover goes through the public op unchanged: float weights (their route is decided inside
the C++ `linear`), GGUF's "rows" layout, a route other than the integer tiles, tensors not on the CPU,
tracing by torch.compile, or no compiled extension.
"""

from __future__ import annotations

import torch

from .. import _backend, _policy, decode_attention, linear, moe, short_conv
from ..quant import _K_FORMATS, QuantizedTensor, _linear_route


class DirectOps:
    """`linear` and the MoE block on quantized weights, `short_conv` and `decode_attention`, for one
    decode step; `begin_step()` before each step forgets the routes asked in the previous one (the
    policy may have changed in between)."""

    def __init__(self) -> None:
        self._routes: dict = {}
        self._on = False

    def begin_step(self, x: torch.Tensor) -> None:
        self._routes.clear()
        self._on = x.device.type == "cpu" and _backend._C is not None and not torch.compiler.is_compiling()

    def linear(self, x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not (self._on and isinstance(w, QuantizedTensor) and w.layout == "x8"):
            return linear(x, w, bias)
        n, k = w.shape
        x2 = x.reshape(-1, k)
        key = (w.format, n, k, x2.shape[0], x2.dtype)
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = _linear_route(x2, w)
        if route != "x8":
            return linear(x, w, bias)
        ops = torch.ops.lfm_kernels_cpu
        if w.format in _K_FORMATS:
            out = ops.linear_kquant_x8.default(x2, w.data, w.format, n, k, bias)
        else:
            out = ops.linear_quant_x8.default(x2, w.data, w.format, n, k, bias, 0)
        return out.view(*x.shape[:-1], n)

    def moe(self, h: torch.Tensor, lw, top_k: int, norm_topk_prob: bool, scaling: float) -> torch.Tensor:
        """The sparse block on h [T, H] with x8 expert weights of one format (Q8_0 / Q4_0), or a K-quant
        pair; `moe` for anything else."""
        gu, dn = lw.gate_up_proj, lw.down_proj
        if not (
            self._on
            and isinstance(gu, QuantizedTensor)
            and isinstance(dn, QuantizedTensor)
            and gu.layout == "x8"
            and dn.layout == "x8"
            and (gu.format in _K_FORMATS) == (dn.format in _K_FORMATS)
            and (gu.format in _K_FORMATS or gu.format == dn.format)
        ):
            return moe(h, lw.gate, lw.expert_bias, gu, dn, top_k, norm_topk_prob, scaling)
        key = ("moe", gu.format, dn.format, tuple(gu.shape), h.shape[0], h.dtype)
        routes = self._routes.get(key)
        if routes is None:
            routes = self._routes[key] = _policy.quant_routes("moe", h, gu, dn)
        gemm_rows, amx_rows = routes
        ops = torch.ops.lfm_kernels_cpu
        weights, ids = ops.moe_route.default(h, lw.gate, lw.expert_bias, top_k, bool(norm_topk_prob), float(scaling))
        E, I = gu.shape[0], gu.shape[1] // 2
        if gu.format in _K_FORMATS:
            return ops.moe_experts_kquant_x8.default(h, gu.data, dn.data, gu.format, dn.format, E, I, ids, weights,
                                                     gemm_rows)
        return ops.moe_experts_quant_x8.default(h, gu.data, dn.data, gu.format, E, I, ids, weights, gemm_rows,
                                                amx_rows)

    def short_conv(self, bcx: torch.Tensor, weight: torch.Tensor, bias, conv_state: torch.Tensor) -> torch.Tensor:
        """short_conv's decode step (the C++ op checks the state's shape, dtype and aliasing itself)."""
        if not self._on:
            return short_conv(bcx, weight, bias, conv_state, None)
        return torch.ops.lfm_kernels_cpu.short_conv.default(bcx, weight, bias, conv_state, None, None)

    def decode_attention(self, q, k_cache, v_cache, seq_lens, scale: float) -> torch.Tensor:
        """decode_attention with check_lengths=False: the caller built seq_lens in range."""
        if not self._on:
            return decode_attention(q, k_cache, v_cache, seq_lens, scale, check_lengths=False)
        return torch.ops.lfm_kernels_cpu.decode_attention.default(q, k_cache, v_cache, seq_lens, scale)
