"""The LFM2 / LFM2-MoE forward pass built from lfm_kernels ops, with preallocated decode state.

Batching and padding: prompts of different lengths are **right-padded**. Row b's tokens sit at cache
positions 0 .. len_b - 1, its RoPE positions are 0 .. len_b - 1, and each decode step writes row b's
new key/value at position seq_lens[b] and attends to [0, seq_lens[b] + 1). That is exactly the
contract of `lfm_kernels.decode_attention(q, k_cache, v_cache, seq_lens, scale)` (a prefix of the
cache per row), so decode needs no mask and no gather. In prefill the pads come after every real token,
so plain causal attention (and the causal conv) never lets a real token see a pad: no padding mask is
needed. The one thing pads would spoil is the conv state (the last L values of B*x before the next
token): for rows shorter than the batch it is rebuilt from that row's last real positions after the
prefill. Left padding (transformers' choice) would put pads inside the [0, seq_len) prefix that
decode_attention reads, which would need a per-row start offset the op does not have.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _backend, _memory, linear, moe, short_conv
from ..quant import _K_FORMATS, QuantizedTensor, _kernel_layout_on_huge_pages
from .config import ModelConfig
from .direct import DirectOps
from .weights import SplitWeight, Weights, _expert, _nbytes


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Lfm2MoeRMSNorm: normalise in fp32, round to x's dtype, then scale. weight is [D],
    or [R, D] for x [..., R, D] (per-head weights stacked)."""
    if (
        x.device.type == "cpu"
        and weight.dtype == x.dtype
        and not (x.requires_grad or weight.requires_grad)  # the op has no backward
        and _cpu_rms_norm() is not None
    ):
        # one C++ call instead of ~10 eager dispatches (55 per decode step); it differs from the eager
        # ops only in the order of the fp32 sum of squares
        return _cpu_rms_norm()(x, weight, eps)
    if _triton_norm(x, weight):
        return _triton_add_rms_norm(x, None, weight, eps)[1]
    # F.rms_norm normalises in fp32 and rounds once to x's dtype (bit-identical to transformers'
    # x.float() ... .to(dtype)).
    return weight * F.rms_norm(x, (x.shape[-1],), None, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + residual, rms_norm(x + residual, weight)): the residual add before each of the model's
    norms. On the CPU one C++ call (the same bits as the add and rms_norm above: the sum is rounded to
    x's dtype first, as the eager add rounds it); it saves a decode step 48 dispatches."""
    if (
        x.device.type == "cpu"
        and residual.shape == x.shape
        and weight.dtype == x.dtype == residual.dtype
        and not (x.requires_grad or residual.requires_grad or weight.requires_grad)
        and _cpu_add_rms_norm() is not None
    ):
        return _cpu_add_rms_norm()(x, residual, weight, eps)
    if residual.shape == x.shape and residual.dtype == x.dtype and _triton_norm(x, weight, residual):
        return _triton_add_rms_norm(x, residual, weight, eps)
    s = x + residual
    return s, rms_norm(s, weight, eps)


def _triton_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """Whether the norm (and add) run as one Triton kernel: CUDA tensors, no autograd (the kernel has
    no backward), not while torch.compile traces (it sees the eager ops), a shape the kernel takes."""
    if x.device.type != "cuda" or weight.device != x.device or x.requires_grad or weight.requires_grad:
        return False
    if residual is not None and residual.requires_grad:
        return False
    if not _backend.triton_available() or torch.compiler.is_compiling():
        return False
    from ..triton.rms_norm import supports  # Triton is imported only where it can run

    return supports(x, weight)


def _triton_add_rms_norm(x, residual, weight, eps):
    from ..triton.rms_norm import add_rms_norm_triton

    return add_rms_norm_triton(x, residual, weight, eps)


@functools.cache
def _cpu_add_rms_norm():
    """The compiled fused op, or None without the extension (or with one built before it existed)."""
    ops = torch.ops.lfm_kernels_cpu
    return ops.add_rms_norm.default if _backend._C is not None and hasattr(ops, "add_rms_norm") else None


@functools.cache
def _cpu_rope_cache_write():
    """The C++ op that rotates a decode step's q and k heads and writes k and v to the caches
    (csrc/rope_cache.cpp: the bits of apply_rope and the index writes), or None without it."""
    ops = torch.ops.lfm_kernels_cpu
    return ops.rope_cache_write.default if _backend._C is not None and hasattr(ops, "rope_cache_write") else None


@functools.cache
def _cpu_rms_norm():
    """The compiled RMSNorm op, or None without the extension (or with one built before it existed)."""
    ops = torch.ops.lfm_kernels_cpu
    return ops.rms_norm.default if _backend._C is not None and hasattr(ops, "rms_norm") else None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """transformers' x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1) written as
    roll(x, D/2) * cat(-sin1, sin2): the same products and sum (bit-identical), two ops fewer."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


@dataclass
class State:
    """Decode state for a batch: KV caches [B, H_kv, S_max, D] of the attention layers, conv states
    [B, H, L] of the conv layers, and seq_lens [B] (int64): tokens of each row already in the state,
    which is also the RoPE position and cache index of that row's next token."""

    batch: int
    max_len: int
    k_cache: dict[int, torch.Tensor]
    v_cache: dict[int, torch.Tensor]
    conv_state: dict[int, torch.Tensor]
    seq_lens: torch.Tensor

    def buffers(self) -> tuple:
        """Every tensor the decode steps read and write in place: seq_lens, the KV caches, the conv states
        (what a recorded or captured step holds; a grown state has new ones)."""
        return (self.seq_lens, *self.k_cache.values(), *self.v_cache.values(), *self.conv_state.values())

    def nbytes(self) -> int:
        ts = [*self.k_cache.values(), *self.v_cache.values(), *self.conv_state.values()]
        return sum(t.numel() * t.element_size() for t in ts)


class LfmModel:
    """LFM2-MoE / LFM2 for inference: `prefill`, `decode_step`, `forward` (all logits) and `generate`."""

    def __init__(self, config: ModelConfig, weights: Weights, dtype: torch.dtype, tokenizer=None, path=None):
        self.config = config
        self.weights = weights
        self.dtype = dtype
        self.device = weights.embed.device
        if weights.is_quantized() and self.device.type != "cpu":
            raise NotImplementedError(
                f"a quantized model runs on the CPU only (the quantized kernels are C++); its weights are on {self.device}"
            )
        _use_kernel_layouts(weights)
        self.tokenizer = tokenizer
        self.path = path
        self.generation_defaults: dict = {}
        self._rope = None  # (cos, sin): one tuple, swapped in one assignment (see _rope_tables)
        self._scale = config.head_dim**-0.5
        self._direct = DirectOps()  # decode_step's op calls (see direct.py)
        # generate()'s last decode state and stepper, kept for the next call (see generate.py)
        self._spare_decode = None
        self._spare_lock = threading.Lock()

    # ------------------------------------------------------------------ state and RoPE
    def new_state(self, batch: int, max_len: int) -> State:
        cfg = self.config
        if max_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_len {max_len} exceeds the model's max_position_embeddings ({cfg.max_position_embeddings})"
            )
        kv_shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        kw = dict(dtype=self.dtype, device=self.device)
        k = {i: torch.zeros(kv_shape, **kw) for i in cfg.attention_layers}
        v = {i: torch.zeros(kv_shape, **kw) for i in cfg.attention_layers}
        conv = {i: self._new_conv_state(batch) for i in cfg.conv_layers}
        self._rope_tables(max_len)
        seq_lens = torch.zeros(batch, dtype=torch.int64, device=self.device)
        return State(batch, max_len, k, v, conv, seq_lens)

    def _new_conv_state(self, batch: int) -> torch.Tensor:
        """A zero conv state [B, H, L] (transformers' shape). On the CPU its memory is [B, L, H], time
        major, so that the C++ conv moves it in whole vectors of channels (in [B, H, L] memory every
        channel's L values are one scalar load and store each: at a decode step, more than the conv)."""
        cfg = self.config
        kw = dict(dtype=self.dtype, device=self.device)
        if self.device.type == "cpu":
            return torch.zeros(batch, cfg.conv_L_cache, cfg.hidden_size, **kw).transpose(1, 2)
        return torch.zeros(batch, cfg.hidden_size, cfg.conv_L_cache, **kw)

    def _conv_taps(self, lw) -> torch.Tensor:
        """The conv taps [H, L] as the short conv takes them: on the CPU fp32 in [L, H] memory (the C++
        conv reads those rows in place instead of converting and transposing the taps every call; the
        values are the model dtype's, exactly), elsewhere lw.conv itself."""
        if self.device.type != "cpu":
            return lw.conv
        taps = getattr(lw, "_conv_taps", None)
        if taps is None or taps[0] is not lw.conv:
            taps = (lw.conv, lw.conv.float().t().contiguous().t())
            lw._conv_taps = taps
        return taps[1]

    def _rope_tables(self, length: int):
        """cos/sin [length, D] in the model dtype, computed once (grown when a longer state is made)
        exactly as transformers' Lfm2MoeRotaryEmbedding computes them. Safe when threads share the
        model: the pair is read once and replaced as one tuple, so a caller never sees a new cos with
        an old sin, and it returns the tables it checked (another thread may swap in others)."""
        tables = self._rope
        if tables is None or tables[0].shape[0] < length:
            D = self.config.head_dim
            inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float) / D))
            pos = torch.arange(length, dtype=torch.float)
            freqs = pos[:, None] * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos().to(device=self.device, dtype=self.dtype)
            sin = emb.sin().to(device=self.device, dtype=self.dtype)
            sin[:, : D // 2].neg_()  # signed for apply_rope's roll form
            tables = (cos, sin)
            self._rope = tables
        return tables

    # ------------------------------------------------------------------ building blocks
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The embedding rows of ids [...] -> [..., H] in the model dtype; from a quantized table only
        the looked-up rows are dequantized."""
        table = self.weights.embed
        if not isinstance(table, QuantizedTensor):
            return F.embedding(ids, table)
        if table._rows_op(self.dtype):
            return table._dequantize_rows(ids, self.dtype)
        return table._dequantize_rows(ids, torch.float32).to(self.dtype)  # float16: exact in fp32, rounded once

    def _ffn(self, lw, h: torch.Tensor, direct: DirectOps | None = None) -> torch.Tensor:
        cfg = self.config
        if lw.moe and not _fused_moe(lw.gate_up_proj, lw.down_proj):
            return _moe_quant(h, lw, cfg)
        if lw.moe and direct is not None:
            shape = h.shape
            return direct.moe(h.reshape(-1, shape[-1]), lw, cfg.num_experts_per_tok, cfg.norm_topk_prob,
                              cfg.routed_scaling_factor).view(shape)
        if lw.moe:
            shape = h.shape
            out = moe(
                h.reshape(-1, shape[-1]),
                lw.gate,
                lw.expert_bias,
                lw.gate_up_proj,
                lw.down_proj,
                cfg.num_experts_per_tok,
                cfg.norm_topk_prob,
                cfg.routed_scaling_factor,
            )
            return out.view(shape)
        inter = lw.w2.shape[1]
        lin = linear if direct is None else direct.linear
        g = _linear(h, lw.w13, lin=lin)
        return lin(F.silu(g[..., :inter]) * g[..., inter:], lw.w2)

    def _qkv(self, lw, h: torch.Tensor, lin=None):
        """qk [.., Hq + Hkv, D] (q heads, then k heads) with the per-head RMSNorm applied, and v
        [.., Hkv, D]. q and k are normalised in one op with the per-head weights stacked."""
        cfg = self.config
        Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv = _linear(h, lw.qkv, lin=lin)
        lead = qkv.shape[:-1]
        qk = qkv[..., : (Hq + Hkv) * D].view(*lead, Hq + Hkv, D)
        v = qkv[..., (Hq + Hkv) * D :].view(*lead, Hkv, D)
        return rms_norm(qk, self._qk_norm(lw), cfg.norm_eps), v

    def _qk_norm(self, lw) -> torch.Tensor:
        w = getattr(lw, "_qk_norm", None)
        if w is None:
            Hq, Hkv = self.config.num_attention_heads, self.config.num_key_value_heads
            w = torch.cat([lw.q_norm.expand(Hq, -1), lw.k_norm.expand(Hkv, -1)])
            lw._qk_norm = w
        return w

    # ------------------------------------------------------------------ prefill
    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, state: State, all_logits: bool = False):
        """Run right-padded prompts ids [B, T] (row b's real tokens are ids[b, :lengths[b]]) from an
        empty state; fills the caches and returns the logits of each row's last real token [B, V]
        (or of every position [B, T, V] with all_logits=True)."""
        cfg, w = self.config, self.weights
        B, T = ids.shape
        if B != state.batch:
            raise ValueError(f"ids has batch {B} but the state was made for {state.batch}")
        if T > state.max_len:
            raise ValueError(f"prompt length {T} exceeds the state's max_len {state.max_len}")
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device=self.device)
        if lengths.min().item() < 1 or lengths.max().item() > T:
            raise ValueError(f"lengths must be in 1..{T}, got {lengths.tolist()}")
        ragged = bool((lengths != T).any())
        Hq = cfg.num_attention_heads
        cos, sin = self._rope_tables(state.max_len)
        cos, sin = cos[:T], sin[:T]
        x = self._embed(ids)
        for i, lw in enumerate(w.layers):
            h = rms_norm(x, lw.operator_norm, cfg.norm_eps)
            if lw.attention:
                qk, v = self._qkv(lw, h)  # [B, T, heads, D]
                qk = apply_rope(qk.transpose(1, 2), cos, sin)
                q, k = qk[:, :Hq], qk[:, Hq:]
                v = v.transpose(1, 2)
                state.k_cache[i][:, :, :T] = k
                state.v_cache[i][:, :, :T] = v
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self._scale, enable_gqa=True)
                out = linear(o.transpose(1, 2).reshape(B, T, -1), lw.out_proj)
            else:
                bcx = linear(h, lw.in_proj, lw.in_proj_bias)
                st = state.conv_state[i]
                st.zero_()
                y = short_conv(bcx, self._conv_taps(lw), lw.conv_bias, st, None)
                if ragged:
                    self._fix_conv_state(st, bcx, lengths, T)
                out = linear(y, lw.conv_out, lw.conv_out_bias)
            x = x + out
            x = x + self._ffn(lw, rms_norm(x, lw.ffn_norm, cfg.norm_eps))
        state.seq_lens.copy_(lengths)
        if all_logits:
            return linear(rms_norm(x, w.final_norm, cfg.norm_eps), w.lm_head)
        last = x[torch.arange(B, device=x.device), lengths - 1]
        return linear(rms_norm(last, w.final_norm, cfg.norm_eps), w.lm_head)

    def _fix_conv_state(self, st: torch.Tensor, bcx: torch.Tensor, lengths: torch.Tensor, T: int) -> None:
        """Right padding put pad inputs into the conv state of short rows: rebuild it from each such
        row's last L real positions (B*x rounded to the model dtype, as the kernel stores it)."""
        H, L = self.config.hidden_size, self.config.conv_L_cache
        for b, n in enumerate(lengths.tolist()):
            if n == T:
                continue
            lo = max(n - L, 0)
            u = (bcx[b, lo:n, :H].float() * bcx[b, lo:n, 2 * H :].float()).to(st.dtype)  # [n - lo, H]
            st[b].zero_()
            st[b, :, L - (n - lo) :] = u.t()

    # ------------------------------------------------------------------ decode
    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor, state: State, *, check: bool = True) -> torch.Tensor:
        """One new token per row (tokens [B] int64) at position seq_lens[b]; returns logits [B, V].
        check=False skips the "state is full" check, a device sync, for loops that sized the state
        themselves (generate, the CUDA graph); nothing else in the step waits for the device."""
        if check and int(state.seq_lens.max()) >= state.max_len:
            raise ValueError(f"the state is full (max_len {state.max_len}); make a longer one")
        return self._decode_embedded(self._embed(tokens).unsqueeze(1), state)

    def _decode_embedded(self, x: torch.Tensor, state: State) -> torch.Tensor:
        """decode_step after the embedding lookup (x [B, 1, H]): everything in it depends on the
        tokens only through x, so the CPU graph (cpu_graph.py) records and replays this part."""
        cfg, w = self.config, self.weights
        B = x.shape[0]
        pos = state.seq_lens
        new_lens = pos + 1
        Hq = cfg.num_attention_heads
        cos_t, sin_t = self._rope_tables(state.max_len)
        cos = sin = None
        rope_write = _cpu_rope_cache_write() if x.device.type == "cpu" else None
        direct = self._direct
        direct.begin_step(x)
        lin = direct.linear
        layers, eps = w.layers, cfg.norm_eps
        h = rms_norm(x, layers[0].operator_norm if layers else w.final_norm, eps)
        for i, lw in enumerate(layers):
            if lw.attention:
                qk, v = self._qkv(lw, h[:, 0], lin)  # [B, heads, D]
                if rope_write is not None:  # the rotation and both cache writes in one C++ call
                    q = rope_write(qk, v, cos_t, sin_t, state.k_cache[i], state.v_cache[i], pos, Hq)
                else:
                    if cos is None:
                        cos, sin = cos_t[pos].unsqueeze(1), sin_t[pos].unsqueeze(1)  # [B, 1, D]: over heads
                    qk = apply_rope(qk, cos, sin)
                    q, k = qk[:, :Hq].contiguous(), qk[:, Hq:]
                    rows = torch.arange(B, device=self.device)
                    state.k_cache[i][rows, :, pos] = k
                    state.v_cache[i][rows, :, pos] = v
                # lengths come from the state (in [1, max_len]): no check, so no device sync
                o = direct.decode_attention(q, state.k_cache[i], state.v_cache[i], new_lens, self._scale)
                out = lin(o.reshape(B, 1, -1), lw.out_proj)
            else:
                bcx = lin(h, lw.in_proj, lw.in_proj_bias)
                y = direct.short_conv(bcx, self._conv_taps(lw), lw.conv_bias, state.conv_state[i])
                out = lin(y, lw.conv_out, lw.conv_out_bias)
            x, h = add_rms_norm(x, out, lw.ffn_norm, eps)
            # the residual add after the FFN comes with the next layer's first norm (the last: the final norm)
            x, h = add_rms_norm(x, self._ffn(lw, h, direct), layers[i + 1].operator_norm if i + 1 < len(layers)
                                else w.final_norm, eps)
        state.seq_lens.copy_(new_lens)
        return lin(h[:, 0], w.lm_head)

    # ------------------------------------------------------------------ conveniences
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of every position [B, T, V] for full-length prompts (no padding), like transformers'
        forward without a cache."""
        ids = torch.as_tensor(ids, dtype=torch.int64, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        state = self.new_state(ids.shape[0], ids.shape[1])
        lengths = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.int64)
        return self.prefill(ids, lengths, state, all_logits=True)

    def generate(self, inputs, max_new_tokens: int = 128, **kwargs):
        from .generate import generate

        return generate(self, inputs, max_new_tokens, **kwargs)

    def chat(self, messages, tools=None, max_new_tokens: int = 512, **kwargs):
        from .generate import chat

        return chat(self, messages, tools=tools, max_new_tokens=max_new_tokens, **kwargs)

    def weight_bytes(self) -> int:
        return self.weights.nbytes()

    def bytes_per_decoded_token(self, batch: int = 1) -> int:
        """Weight bytes one decode step reads (a quantized weight: its blocks): everything but the embedding table (one row per token)
        and the experts a token does not pick (top_k of E per MoE layer, for batch 1; for larger
        batches at most min(E, batch * top_k) experts)."""
        cfg, w = self.config, self.weights
        total = 0
        for name, t in w.tensors():
            nb = _nbytes(t)
            if name == "embed":
                # a quantized table: one row is its blocks, the same bytes per row as the whole
                nb = (batch + (cfg.vocab_size if cfg.tie_word_embeddings else 0)) * (nb // cfg.vocab_size)
            elif name.endswith("gate_up_proj") or name.endswith("down_proj"):
                nb = nb * min(cfg.num_experts, batch * cfg.num_experts_per_tok) // cfg.num_experts
            total += nb
        return total


def _use_kernel_layouts(w: Weights) -> None:
    """Puts every quantized weight (K-quants included), and each quantized part of a SplitWeight, into
    the layout its kernels run fastest on (quant._kernel_layout), tensor by tensor (memory peaks at one
    extra tensor). A tied embedding is converted once and stays shared: its row lookups read the x8
    layout directly."""
    tied = w.lm_head is w.embed
    w.embed = _kernel_layout_on_huge_pages(w.embed)
    w.lm_head = w.embed if tied else _kernel_layout_on_huge_pages(w.lm_head)
    for layer in w.layers:
        for name, value in vars(layer).items():
            if name.startswith("_"):
                continue
            if isinstance(value, QuantizedTensor):
                setattr(layer, name, _kernel_layout_on_huge_pages(value))
            elif isinstance(value, SplitWeight):
                # Q4_K_M's qkv (q, k in Q4_K, v in Q6_K) in some layers: left in the rows layout, its
                # two calls ran 5-8 GB/s in decode on a Zen 4 where the x8 parts beside it run ~20
                setattr(layer, name, SplitWeight(_kernel_layout_on_huge_pages(p) for p in value.parts))


# Formats the fused `moe` op takes (K-quants: gate_up and down each any of the three); other
# quantized experts run expert by expert.
_FUSED_MOE_FORMATS = ("q8_0", "q4_0", "q4_k", "q5_k", "q6_k")


def _fused_moe(gate_up, down) -> bool:
    """Whether the fused `moe` op takes these expert weights: both float tensors, or both QuantizedTensor
    in one format it has kernels for. Anything else (K-quants it does not take yet, gate/up parts of
    different formats, down in another format than gate/up) runs expert by expert (`_moe_quant`)."""
    if isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor):
        return True
    if not (isinstance(gate_up, QuantizedTensor) and isinstance(down, QuantizedTensor)):
        return False
    if gate_up.format in _K_FORMATS and down.format in _K_FORMATS:  # the K-quant op takes one format each
        return True
    return gate_up.format == down.format and gate_up.format in _FUSED_MOE_FORMATS and gate_up.layout == down.layout


def _linear(x: torch.Tensor, w, bias: torch.Tensor | None = None, lin=None) -> torch.Tensor:
    """`linear` (or `lin`, DirectOps.linear in a decode step) on any weight of ours: a SplitWeight (parts of
    different formats stacked along the output rows) is one call per part, outputs concatenated in row
    order."""
    lin = linear if lin is None else lin  # looked up per call: tests substitute the module's `linear`
    if not isinstance(w, SplitWeight):
        return lin(x, w, bias)
    outs, r0 = [], 0
    for p in w.parts:
        n = int(p.shape[-2])
        outs.append(lin(x, p, None if bias is None else bias[r0 : r0 + n]))
        r0 += n
    return torch.cat(outs, dim=-1)


def _moe_quant(h: torch.Tensor, lw, cfg: ModelConfig) -> torch.Tensor:
    """The MoE block on expert weights the fused op does not take: the router as `moe` has it, then each
    chosen expert through `linear` on its [2I, H] / [H, I] slice of the stacked weights (views, no
    copy; gate/up and down each in its own format, a SplitWeight part by part), accumulated in fp32
    like the fused kernel."""
    from .. import moe_route

    shape = h.shape
    x = h.reshape(-1, shape[-1])
    weights, ids = moe_route(x, lw.gate, lw.expert_bias, cfg.num_experts_per_tok, cfg.norm_topk_prob,
                             cfg.routed_scaling_factor)
    gu, down = lw.gate_up_proj, lw.down_proj
    inter = down.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        g = _linear(x[tok], _expert(gu, e))
        a = F.silu(g[:, :inter].float()) * g[:, inter:].float()
        y = _linear(a.to(x.dtype), _expert(down, e))
        out.index_add_(0, tok, y.float() * weights[tok, slot, None])
    return out.to(h.dtype).view(shape)
