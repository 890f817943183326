"""The wrapper's decode step skips the public ops' argument checks and asks each route once.

A decode step of the full-size model makes about 100 op calls. Through the public ops each also pays
its argument checks, its route lookup (policy and chooser) and, for `moe`, a second round of them for
the router: about 10-15 us per call with warm caches, and measured at 30-60 us per call inside a real
decode step, whose weight streams have just evicted the interpreter's working set from L2 (about 2 ms
of a 48 ms Q4_0 token on a 2-core Xeon). The model checked its weights when it was built, its state
is shaped by `new_state`, and a quantized weight's route depends only on its shape class, the row
count and the policy, so `DirectOps` asks each class for its route once per step (quantized
`linear`: once per policy state, from the public op's own cache) and then makes the call the public
op makes after its checks (`quant._eager_linear_call`, `ops.moe._quant_experts_call`, the ops'
`_impl` bodies): the same route, the same kernels, bit-identical outputs (the C++ ops keep their
own checks of shapes, dtypes and aliasing). Float weights too: `linear` asks its route (C++ kernel
with its AVX-512 row limit, or torch's GEMM) once per shape and step, and the MoE block runs the
router's body and the experts' C++ op with the policy's thresholds, asked once per shape class and
step (`ops.moe._cpu_experts_call`). Everything goes through the public ops when the step is not eager
on the CPU (tensors elsewhere, tracing by torch.compile, no compiled extension).

Why it matters more than the 10-15 us suggest: on a server core the decode step's weight streams
evict the interpreter's and the dispatcher's working set from L2 (and, for long streams, from the
L3), so each public op's checks run cold. Measured on a 2-core Xeon, bf16 `linear` at M = 1 on a
2048 x 2048 weight, calls interleaved with other work: 324 us through the public op, 260 us through
its body, 232 us through the raw C++ op; a tiny 8 x 2048 weight with warm caches: 13 / 6 / 3.5 us.
"""

from __future__ import annotations

import torch

from .. import _backend, _policy, decode_attention, linear, moe, short_conv
from ..ops.decode_attention import _decode_attention_impl
from ..ops.linear import _linear_on_route as _float_linear_on_route
from ..ops.linear import _linear_route as _float_linear_route
from ..ops.moe import _cpu_experts_call, _moe_route_impl, _quant_experts_call
from ..ops.short_conv import _short_conv_impl
from ..quant import QuantizedTensor, _eager_linear_call


class DirectOps:
    """`linear` and the MoE block on quantized weights, `short_conv` and `decode_attention`, for one
    decode step; `begin_step()` before each step forgets the routes asked in the previous one (the
    policy may have changed in between)."""

    def __init__(self) -> None:
        self._routes: dict = {}
        self._on = False

    def begin_step(self, x: torch.Tensor) -> None:
        self._routes.clear()
        self._on = _backend.eager_cpu_fast_path(x)

    def linear(self, x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self._on:
            return linear(x, w, bias)
        n, k = w.shape
        x2 = x.reshape(-1, k)
        if k > 1 and x2.stride(1) != 1:
            x2 = x2.contiguous()  # as the public ops do: the kernels read rows with unit stride
        if isinstance(w, QuantizedTensor):  # the public op's call, from its route cache
            return _eager_linear_call(x2, w)(x2, w.data, bias).view(*x.shape[:-1], n)
        key = ("linear", w.dtype, n, k, x2.shape[0], x2.dtype)
        if key not in self._routes:
            self._routes[key] = _float_linear_route(x2, w)
        return _float_linear_on_route(x2, w, bias, self._routes[key]).view(*x.shape[:-1], n)

    def moe(self, h: torch.Tensor, lw, top_k: int, norm_topk_prob: bool, scaling: float) -> torch.Tensor:
        """The sparse block on h [T, H], for expert weights the fused `moe` op takes (the model's
        `_fused_moe`)."""
        gu, dn = lw.gate_up_proj, lw.down_proj
        if not self._on:
            return moe(h, lw.gate, lw.expert_bias, gu, dn, top_k, norm_topk_prob, scaling)
        weights, ids = _moe_route_impl(h, lw.gate, lw.expert_bias, top_k, bool(norm_topk_prob), float(scaling))
        if not isinstance(gu, QuantizedTensor):
            key = ("moe", gu.dtype, dn.dtype, tuple(gu.shape), tuple(dn.shape), h.shape[0], h.dtype)
            call = self._routes.get(key)
            if call is None:
                call = self._routes[key] = _cpu_experts_call(h, gu, dn)
            return call(h, gu, dn, ids, weights)
        key = ("moe", gu.format, dn.format, gu.layout, tuple(gu.shape), h.shape[0], h.dtype)
        call = self._routes.get(key)
        if call is None:
            call = self._routes[key] = _quant_experts_call(gu, dn, _policy.quant_routes("moe", h, gu, dn), True)
        return call(h, gu.data, dn.data, ids, weights)

    def short_conv(self, bcx: torch.Tensor, weight: torch.Tensor, bias, conv_state: torch.Tensor) -> torch.Tensor:
        """short_conv's decode step (the C++ op checks the state's shape, dtype and aliasing itself)."""
        if not self._on:
            return short_conv(bcx, weight, bias, conv_state, None)
        return _short_conv_impl(bcx, weight, bias, conv_state, None)

    def decode_attention(self, q, k_cache, v_cache, seq_lens, scale: float) -> torch.Tensor:
        """decode_attention with check_lengths=False: the caller built seq_lens in range."""
        if not self._on:
            return decode_attention(q, k_cache, v_cache, seq_lens, scale, check_lengths=False)
        return _decode_attention_impl(q, k_cache, v_cache, seq_lens, scale)
