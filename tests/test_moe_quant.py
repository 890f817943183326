"""MoE experts on quantized weights (GGUF Q8_0 / Q4_0 blocks): lfm_kernels.moe_experts / moe with
QuantizedTensor gate_up_proj [E, 2I, H] and down_proj [E, H, I], on every kernel path.

Reference: lfm_kernels.reference.moe_experts_quant, in float64, dequantizes the weights exactly and
quantizes the tokens and the fp32 SwiGLU product act per 32-block exactly as the kernels do. A block
dot product is an exact integer on every path, so the kernels differ only by their fp32 sums over
blocks and the fp32 combine: per output row (token) a relative error below ROW_TOL = 2e-6 (measured
1e-7 to 4e-7). One more, rare, difference: where the kernel's fp32 act (itself an fp32 sum) and the
float64 one fall on two sides of an int8 rounding boundary, that act value moves by one step d_act
(1/127 of its block's largest act), which moves the token's output by about d_act / ||act||:
1e-3 to 3e-3 here (measured; 1 or 2 tokens of 300, about one act value in 10^5). So the check is:
every row below ROW_TOL, except at most max(2, N / 50) rows, each below FLIP_TOL = 1e-2. A wrong
block, scale, tile tail or expert breaks many rows, or one row by far more. bf16 / fp16 outputs: the
house tolerance (1e-2) on the whole output.
"""


import pytest
import torch

from conftest import assert_close, assert_row_parity, dtype_id, num_threads, quant_isa_path, rel_err
from lfm_kernels import QuantizedTensor, _backend, moe, moe_experts, moe_route, quantize
from lfm_kernels import reference

HAS_EXT = _backend._C is not None and hasattr(torch.ops.lfm_kernels_cpu, "moe_experts_quant")
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="CPU extension (with moe_experts_quant) not built")

FORMATS = ["q8_0", "q4_0"]
ISAS = ["portable", "avx2", "avxvnni", "avx512vnni"]
ROW_TOL = 2e-6
FLIP_TOL = 1e-2
TOKENS = [1, 2, 3, 7, 64, 300]


def _assert_parity(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Per-token relative error: all rows below ROW_TOL but a few one-step act flips (see the module doc)."""
    assert_row_parity(out, ref, what, ROW_TOL, FLIP_TOL)


def _experts(e: int, h: int, i: int, fmt: str):
    # weights of the real model's scale (std ~ 0.02), so act and the outputs are O(0.1)-O(1)
    gu = quantize(torch.randn(e, 2 * i, h) * 0.05, fmt)
    dn = quantize(torch.randn(e, h, i) * 0.05, fmt)
    return gu, dn


def _routing(n: int, k: int, used: list[int]):
    """Random top-k ids (distinct per token) among `used` experts, and positive fp32 weights."""
    used_t = torch.tensor(used)
    ids = torch.stack([used_t[torch.randperm(len(used))[:k]] for _ in range(n)]) if n else torch.empty(0, k, dtype=torch.long)
    weights = torch.rand(n, k) + 0.1
    return ids, weights


def _case(n: int, fmt: str, *, e: int = 7, k: int = 3, h: int = 128, i: int = 96, dtype=torch.float32):
    gu, dn = _experts(e, h, i, fmt)
    hidden = torch.randn(n, h).to(dtype)
    # experts 1 and 4 are never chosen: their blocks must not matter
    ids, weights = _routing(n, k, [0, 2, 3, 5, 6][:e] if e == 7 else list(range(e)))
    return hidden, gu, dn, ids, weights


@needs_ext
@pytest.mark.parametrize("n", TOKENS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", ISAS)
def test_parity(isa, fmt, n):
    hidden, gu, dn, ids, weights = _case(n, fmt)
    # the unused experts' blocks are garbage (NaN scales): reading them would poison the output
    for qt in (gu, dn):
        qt.data[1].view(-1, 34 if fmt == "q8_0" else 18)[:, :2] = torch.tensor([0xFF, 0x7F], dtype=torch.uint8)
        qt.data[4].view(-1, 34 if fmt == "q8_0" else 18)[:, :2] = torch.tensor([0xFF, 0x7F], dtype=torch.uint8)
    ref = reference.moe_experts_quant(hidden, gu, dn, ids, weights)
    with quant_isa_path(isa):
        out = moe_experts(hidden, gu, dn, ids, weights)
    assert out.dtype == torch.float32
    _assert_parity(out, ref, f"{isa} {fmt} N={n}")


@needs_ext
@pytest.mark.parametrize("n", [1, 2, 16])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", ISAS)
def test_parity_real_hidden_size(isa, fmt, n):
    """H = 2048 (the model's) and I = 224: many blocks per row, row tiles with tails."""
    hidden, gu, dn, ids, weights = _case(n, fmt, e=5, k=4, h=2048, i=224)
    ref = reference.moe_experts_quant(hidden, gu, dn, ids, weights)
    with quant_isa_path(isa):
        out = moe_experts(hidden, gu, dn, ids, weights)
    _assert_parity(out, ref, f"{isa} {fmt} N={n} H=2048")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_low_precision_hidden(isa, fmt, dtype):
    """bf16 / fp16 tokens: quantized from their exact fp32 values, output rounded once to their dtype."""
    hidden, gu, dn, ids, weights = _case(37, fmt, dtype=dtype)
    ref = reference.moe_experts_quant(hidden, gu, dn, ids, weights)
    with quant_isa_path(isa):
        out = moe_experts(hidden, gu, dn, ids, weights.to(dtype))
    assert out.dtype == dtype
    assert_close(out, ref.to(dtype), dtype, what=f"{isa} {fmt} {dtype}")


@needs_ext
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", ISAS)
def test_bits_independent_of_threads_and_batch(isa, fmt):
    """1 and 2 threads give identical bits: every result is one fixed-order sum of its own weight row
    and token. Among experts with few tokens (plain tiles) a token also gives the same bits alone as
    in a batch; an expert with many tokens (packed panels on the SIMD paths) sums in another order."""
    hidden, gu, dn, ids, weights = _case(70, fmt, e=5, k=2, h=256, i=128)
    with quant_isa_path(isa):
        with num_threads(1):
            one = moe_experts(hidden, gu, dn, ids, weights)
            alone = moe_experts(hidden[5:6], gu, dn, ids[5:6], weights[5:6])
            few = moe_experts(hidden[:2], gu, dn, ids[:2], weights[:2])
        with num_threads(2):
            two = moe_experts(hidden, gu, dn, ids, weights)
            alone2 = moe_experts(hidden[5:6], gu, dn, ids[5:6], weights[5:6])
            few2 = moe_experts(hidden[:2], gu, dn, ids[:2], weights[:2])
            first = moe_experts(hidden[:1], gu, dn, ids[:1], weights[:1])
    assert torch.equal(one, two)
    assert torch.equal(alone, alone2) and torch.equal(few, few2)
    assert torch.equal(first, few[:1])
    _assert_parity(alone, one[5:6], f"{isa} {fmt} alone vs in a batch")


@needs_ext
@pytest.mark.parametrize("fmt", FORMATS)
def test_simd_paths_agree_with_portable(fmt):
    hidden, gu, dn, ids, weights = _case(40, fmt)
    with quant_isa_path("portable"):
        ref = moe_experts(hidden, gu, dn, ids, weights)
    for isa in torch.ops.lfm_kernels_cpu._quant_isa_info()[1:]:
        if isa == "portable":
            continue
        with quant_isa_path(isa):
            out = moe_experts(hidden, gu, dn, ids, weights)
        _assert_parity(out, ref, f"{isa} vs portable")


@needs_ext
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_moe_block(isa, fmt):
    """moe() with quantized experts: our router, then the quantized experts."""
    n, h, i, e, k = 19, 96, 64, 5, 2
    hidden = torch.randn(n, h)
    gate = torch.randn(e, h) * 0.1
    bias = torch.randn(e) * 0.01
    gu, dn = _experts(e, h, i, fmt)
    with quant_isa_path(isa):
        out = moe(hidden, gate, bias, gu, dn, k)
        weights, ids = moe_route(hidden, gate, bias, k)
    ref = reference.moe_experts_quant(hidden, gu, dn, ids, weights)
    _assert_parity(out, ref, f"{isa} {fmt} moe")


@needs_ext
def test_close_to_float_experts():
    """Sanity of the whole scheme: Q8_0 experts are close to the float experts on the dequantized weights."""
    hidden, gu, dn, ids, weights = _case(9, "q8_0")
    out = moe_experts(hidden, gu, dn, ids, weights)
    ref = reference.moe_experts(hidden, gu.dequantize(), dn.dequantize(), ids, weights)
    assert rel_err(out, ref) < 2e-2


@needs_ext
def test_empty_and_zero_k():
    _, gu, dn, _, _ = _case(1, "q4_0")
    out = moe_experts(torch.randn(0, 128), gu, dn, torch.empty(0, 3, dtype=torch.long), torch.empty(0, 3))
    assert out.shape == (0, 128)


# ---------------------------------------------------------------------------------------------
# Bad input


@needs_ext
def test_bad_input():
    hidden, gu, dn, ids, weights = _case(4, "q8_0")
    _, gu4, dn4 = _case(1, "q4_0")[:3]
    with pytest.raises(ValueError, match="down_proj must be in gate_up_proj's format"):
        moe_experts(hidden, gu, dn4, ids, weights)
    with pytest.raises(TypeError, match="down_proj must be a QuantizedTensor"):
        moe_experts(hidden, gu, dn.dequantize(), ids, weights)
    with pytest.raises(TypeError, match="gate_up_proj must be a QuantizedTensor"):
        moe_experts(hidden, gu.dequantize(), dn, ids, weights)
    with pytest.raises(ValueError, match="gate_up_proj must have shape"):
        moe_experts(torch.randn(4, 160), gu, dn, ids, weights)  # H mismatch
    with pytest.raises(ValueError, match="down_proj must have shape"):
        moe_experts(hidden, gu, quantize(torch.randn(7, 128, 64), "q8_0"), ids, weights)  # I mismatch
    with pytest.raises(ValueError, match="down_proj must have shape"):
        moe_experts(hidden, gu, quantize(torch.randn(6, 128, 96), "q8_0"), ids, weights)  # E mismatch
    with pytest.raises(ValueError, match="I .* must be a multiple of 32"):
        moe_experts(hidden, quantize(torch.randn(7, 2 * 48, 128), "q8_0"), quantize(torch.randn(7, 128, 64), "q8_0"), ids, weights)
    with pytest.raises(ValueError, match="gate_up_proj must have shape"):
        moe_experts(hidden, quantize(torch.randn(7, 128), "q8_0"), dn, ids, weights)  # 2-d
    # bytes that no longer match the logical shape (QuantizedTensor's fields are plain attributes)
    bad = QuantizedTensor(gu.data.clone(), "q8_0", gu.shape)
    bad.data = bad.data[:, :-1]
    with pytest.raises(ValueError, match="gate_up_proj.data must be uint8 holding"):
        moe_experts(hidden, bad, dn, ids, weights)
    with pytest.raises(ValueError, match="topk_ids must have shape"):
        moe_experts(hidden, gu, dn, ids[:3], weights[:3])
    with pytest.raises(ValueError, match="topk_weights must have shape"):
        moe_experts(hidden, gu, dn, ids, weights[:, :2])
    with pytest.raises(TypeError, match="topk_ids must have dtype"):
        moe_experts(hidden, gu, dn, ids.float(), weights)
    with pytest.raises(ValueError, match=r"topk_ids must be in \[0, 7\)"):
        moe_experts(hidden, gu, dn, torch.full_like(ids, 7), weights)
    with pytest.raises(ValueError, match="gate_weight has E=6"):
        moe(hidden, torch.randn(6, 128), None, gu, dn, 2)


@needs_ext
def test_cpp_op_checks_bytes_and_format():
    """The C++ op checks what a direct call could get wrong (memory safety): byte counts, format, H / I."""
    hidden, gu, dn, ids, weights = _case(2, "q4_0")
    op = torch.ops.lfm_kernels_cpu.moe_experts_quant
    with pytest.raises(ValueError, match="gate_up_q must be uint8 holding"):
        op(hidden, gu.data.flatten()[:-1], dn.data, "q4_0", 7, 96, ids, weights)
    with pytest.raises(ValueError, match="down_q must be uint8 holding"):
        op(hidden, gu.data, dn.data.flatten()[:-18], "q4_0", 7, 96, ids, weights)
    with pytest.raises(ValueError, match="gate_up_q must be uint8 holding"):
        op(hidden, gu.data, dn.data, "q8_0", 7, 96, ids, weights)  # the q4_0 bytes read as q8_0
    with pytest.raises(ValueError, match="format must be"):
        op(hidden, gu.data, dn.data, "q4_1", 7, 96, ids, weights)
    with pytest.raises(ValueError, match="I must be a positive multiple of 32"):
        op(hidden, gu.data, dn.data, "q4_0", 7, 48, ids, weights)
    with pytest.raises(ValueError, match="H .* must be a positive multiple of 32"):
        op(torch.randn(2, 100), gu.data, dn.data, "q4_0", 7, 96, ids, weights)
    with pytest.raises(ValueError, match="topk_ids must be in"):
        op(hidden, gu.data, dn.data, "q4_0", 7, 96, ids - 10, weights)


def test_not_cpu_is_a_clear_error():
    """Quantized experts are C++ only: a tensor on another device is refused by name (meta stands in
    for CUDA here, which this machine may not have; the check is the same)."""
    hidden, gu, dn, ids, weights = _case(2, "q8_0")
    dev = "meta"
    with pytest.raises(NotImplementedError, match="run on the CPU only"):
        moe_experts(hidden.to(dev), gu.to(dev), dn.to(dev), ids.to(dev), weights.to(dev))
    with pytest.raises(ValueError, match="gate_up_proj is on meta but hidden is on cpu"):
        moe_experts(hidden, gu.to(dev), dn.to(dev), ids, weights)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to check the CUDA error itself")
def test_cuda_is_a_clear_error():
    hidden, gu, dn, ids, weights = _case(2, "q8_0")
    with pytest.raises(NotImplementedError, match="run on the CPU only"):
        moe_experts(hidden.cuda(), gu.to("cuda"), dn.to("cuda"), ids.cuda(), weights.cuda())


# ---------------------------------------------------------------------------------------------
# torch.library


@needs_ext
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [1, 5])
def test_opcheck(fmt, n):
    hidden, gu, dn, ids, weights = _case(n, fmt, e=3, k=2, h=64, i=32)
    args = (hidden, gu.data, dn.data, fmt, 3, 32, ids, weights)
    torch.library.opcheck(torch.ops.lfm_kernels.moe_experts_quant.default, args)
    torch.library.opcheck(torch.ops.lfm_kernels_cpu.moe_experts_quant.default, args)


@needs_ext
def test_torch_compile():
    hidden, gu, dn, ids, weights = _case(6, "q4_0")

    def f(x, i, w):
        return moe_experts(x * 2, gu, dn, i, w)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(hidden, ids, weights), f(hidden, ids, weights))
