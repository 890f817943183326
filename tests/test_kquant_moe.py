"""MoE experts on K-quant weights (GGUF Q4_K / Q5_K / Q6_K): lfm_kernels.moe_experts / moe with
QuantizedTensor gate_up_proj [E, 2I, H] and down_proj [E, H, I], each in its own K format (a Q4_K_M
file holds gate / up in Q4_K and down in Q6_K in some layers), on every kernel path.

Reference: lfm_kernels.ops.moe._moe_experts_kquant_reference, in float64: the weights dequantized
exactly (QuantizedTensor.dequantize, equal to gguf's), the tokens and the fp32 SwiGLU product act
quantized per 256 as the kernels do, exact products and sums. A sub-block dot product and its
scale-weighted sum are exact integers on every path, so the kernels differ only by their fp32 steps
per super-block, the fp32 sum over super-blocks and the fp32 combine: per output row (token) a
relative error below ROW_TOL = 2e-6. One more, rare, difference: where the kernel's fp32 act and the
float64 one fall on two sides of an int8 rounding boundary, that act value moves by one step (1/127 of
its super-block's largest act), which moves the token's output by about 1e-3: every row below
ROW_TOL, except at most max(2, N / 50) rows, each below FLIP_TOL = 1e-2. A wrong block, scale, min,
tile tail or expert breaks many rows, or one row by far more. bf16 outputs: the house tolerance (1e-2).
Portable and AVX2 (plain tiles and packed panels alike) compute the same integers and the same fused
fp32 steps: their outputs are bit-equal, for 1 and 2 threads, and a token alone equals it in a batch.
"""


import pytest
import torch

from conftest import assert_close, assert_row_parity, case_seed, dtype_id, num_threads, quant_isa_path, rel_err
from lfm_kernels import QuantizedTensor, _backend, moe, moe_experts, moe_route, quantize
from lfm_kernels import reference
from lfm_kernels.ops.moe import _moe_experts_kquant_reference

HAS_EXT = _backend._C is not None and hasattr(torch.ops.lfm_kernels_cpu, "moe_experts_kquant")
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="CPU extension (with moe_experts_kquant) not built")

FORMATS = ["q4_k", "q5_k", "q6_k"]
# (gate_up, down): one format for both, and Q4_K_M's mix
PAIRS = [(f, f) for f in FORMATS] + [("q4_k", "q6_k"), ("q6_k", "q5_k")]
BLOCK_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}
ISAS = ["portable", "avx2", "avxvnni", "avx512vnni"]
ROW_TOL = 2e-6
FLIP_TOL = 1e-2
TOKENS = [1, 2, 3, 7, 64, 300]


def _assert_parity(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Per-token relative error: all rows below ROW_TOL but a few one-step act flips (see the module doc)."""
    assert_row_parity(out, ref, what, ROW_TOL, FLIP_TOL)


_WEIGHTS = {}


def _experts(e: int, h: int, i: int, fg: str, fd: str):
    """Quantized experts (cached per shape and formats: the K-quant search runs in numpy)."""
    key = (e, h, i, fg, fd)
    if key not in _WEIGHTS:
        g = torch.Generator().manual_seed(case_seed(*key))
        # the real model's scale (std ~ 0.02-0.05) with rows of different magnitude
        row_scale = torch.logspace(-0.5, 0.5, 2 * i).unsqueeze(1)
        gu = torch.randn(e, 2 * i, h, generator=g) * 0.05 * row_scale
        dn = torch.randn(e, h, i, generator=g) * 0.05
        _WEIGHTS[key] = (quantize(gu, fg), quantize(dn, fd))
    return _WEIGHTS[key]


def _routing(n: int, k: int, used: list[int]):
    """Random top-k ids (distinct per token) among `used` experts, and positive fp32 weights."""
    used_t = torch.tensor(used)
    ids = torch.stack([used_t[torch.randperm(len(used))[:k]] for _ in range(n)]) if n else torch.empty(0, k, dtype=torch.long)
    return ids, torch.rand(n, k) + 0.1


def _case(n: int, fg: str, fd: str, *, e: int = 7, k: int = 3, h: int = 512, i: int = 256, dtype=torch.float32):
    gu, dn = _experts(e, h, i, fg, fd)
    hidden = torch.randn(n, h)
    if n > 2:
        hidden[1, :256] = 0  # a zero super-block
        hidden[2, 5] = 50.0  # an outlier
    # experts 1 and 4 are never chosen: their blocks must not matter
    ids, weights = _routing(n, k, [0, 2, 3, 5, 6] if e == 7 else list(range(e)))
    return hidden.to(dtype), gu, dn, ids, weights


@needs_ext
@pytest.mark.parametrize("n", TOKENS)
@pytest.mark.parametrize("pair", PAIRS, ids="-".join)
@pytest.mark.parametrize("isa", ISAS)
def test_parity(isa, pair, n):
    hidden, gu, dn, ids, weights = _case(n, *pair)
    ref = _moe_experts_kquant_reference(hidden, gu, dn, ids, weights)
    with quant_isa_path(isa):
        out = moe_experts(hidden, gu, dn, ids, weights)
    assert out.dtype == torch.float32
    _assert_parity(out, ref, f"{isa} {pair} N={n}")
    # and the quantized experts stand for the float ones on the dequantized weights (but for the
    # outlier token, whose super-block's int8 step is 50 / 127)
    flt = reference.moe_experts(hidden, gu.dequantize(), dn.dequantize(), ids, weights)
    # The int8 rounding of hidden and of the
    # SwiGLU product is the whole difference: over 60 seeds at N=1 (q6_k both) its relative error had
    # median 2.2% and maximum 3.1%, so the bound is 4.5e-2 (a weight-format bug is far larger).
    keep = [r for r in range(n) if r != 2]
    assert rel_err(out[keep], flt[keep]) < 4.5e-2


@needs_ext
@pytest.mark.parametrize("isa", ["portable", "avx2"])
@pytest.mark.parametrize("n", [2, 40])
def test_parity_model_sizes(isa, n):
    """H = 2048 and I = 1792 (the model's: 8 and 7 super-blocks) in Q4_K_M's mix, few experts."""
    hidden, gu, dn, ids, weights = _case(n, "q4_k", "q6_k", e=3, k=2, h=2048, i=1792)
    ref = _moe_experts_kquant_reference(hidden, gu, dn, ids, weights)
    with quant_isa_path(isa):
        out = moe_experts(hidden, gu, dn, ids, weights)
    _assert_parity(out, ref, f"{isa} N={n} model sizes")


@needs_ext
@pytest.mark.parametrize("isa", ["portable", "avx2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_low_precision_hidden(isa, dtype):
    hidden, gu, dn, ids, weights = _case(9, "q4_k", "q6_k", dtype=dtype)
    ref = _moe_experts_kquant_reference(hidden, gu, dn, ids, weights)
    with quant_isa_path(isa):
        out = moe_experts(hidden, gu, dn, ids, weights.to(dtype))
    assert out.dtype == dtype
    assert_close(out, ref.to(dtype), dtype, what=f"{isa} {dtype}")


@needs_ext
@pytest.mark.parametrize("pair", PAIRS, ids="-".join)
def test_bits_equal_across_paths_threads_and_batch(pair):
    """Same integers and fused fp32 steps on every path, packed or plain: portable == AVX2, 1 thread ==
    2 threads, and a token alone (plain tiles) equals itself in a batch of 70 (packed panels)."""
    hidden, gu, dn, ids, weights = _case(70, *pair, e=5, k=2, h=512, i=256)
    results = {}
    for isa in ("portable", "avx2"):
        if isa == "avx2" and "avx2" not in torch.ops.lfm_kernels_cpu._quant_isa_info()[1:]:
            continue  # skipped visibly in test_parity
        with quant_isa_path(isa):
            with num_threads(1):
                one = moe_experts(hidden, gu, dn, ids, weights)
                alone = moe_experts(hidden[5:6], gu, dn, ids[5:6], weights[5:6])
                few = moe_experts(hidden[:9], gu, dn, ids[:9], weights[:9])
            with num_threads(2):
                two = moe_experts(hidden, gu, dn, ids, weights)
                alone2 = moe_experts(hidden[5:6], gu, dn, ids[5:6], weights[5:6])
        assert torch.equal(one, two), isa
        assert torch.equal(alone, alone2) and torch.equal(alone, one[5:6]) and torch.equal(few, one[:9]), isa
        results[isa] = one
    if "avx2" in results:
        assert torch.equal(results["avx2"], results["portable"])


@needs_ext
@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_moe_block(isa):
    """moe() with K-quant experts: our router, then the K-quant experts."""
    n, h, i, e, k = 19, 256, 256, 5, 2
    hidden = torch.randn(n, h)
    gate = torch.randn(e, h) * 0.1
    bias = torch.randn(e) * 0.01
    gu, dn = _experts(e, h, i, "q4_k", "q6_k")
    with quant_isa_path(isa):
        out = moe(hidden, gate, bias, gu, dn, k)
        weights, ids = moe_route(hidden, gate, bias, k)
    _assert_parity(out, _moe_experts_kquant_reference(hidden, gu, dn, ids, weights), f"{isa} moe")


@needs_ext
def test_non_finite_token_poisons_only_itself():
    hidden, gu, dn, ids, weights = _case(8, "q4_k", "q4_k")
    hidden[3, 100] = float("nan")
    out = moe_experts(hidden, gu, dn, ids, weights)
    assert out[3].isnan().all()
    assert torch.isfinite(torch.cat([out[:3], out[4:]])).all()


@needs_ext
def test_empty():
    _, gu, dn, _, _ = _case(1, "q5_k", "q5_k")
    out = moe_experts(torch.randn(0, 512), gu, dn, torch.empty(0, 3, dtype=torch.long), torch.empty(0, 3))
    assert out.shape == (0, 512)


@needs_ext
def test_bad_input():
    hidden, gu, dn, ids, weights = _case(4, "q4_k", "q6_k")
    with pytest.raises(ValueError, match="down_proj must be in gate_up_proj's format 'q4_k'"):
        moe_experts(hidden, gu, quantize(torch.randn(7, 512, 256), "q8_0"), ids, weights)
    with pytest.raises(ValueError, match="down_proj must be in gate_up_proj's format 'q8_0'"):
        moe_experts(hidden, quantize(torch.randn(7, 512, 512), "q8_0"), dn, ids, weights)
    with pytest.raises(TypeError, match="down_proj must be a QuantizedTensor"):
        moe_experts(hidden, gu, dn.dequantize(), ids, weights)
    with pytest.raises(ValueError, match="gate_up_proj must have shape"):
        moe_experts(torch.randn(4, 768), gu, dn, ids, weights)  # H mismatch
    with pytest.raises(ValueError, match="down_proj must have shape"):
        moe_experts(hidden, gu, quantize(torch.randn(6, 512, 256) * 0.05, "q6_k"), ids, weights)  # E mismatch
    # K (I) not a multiple of 256: I = 384 / 2 ... a q8_0 down would take it, a K-quant cannot
    gu_odd = QuantizedTensor(torch.zeros(7, 2 * 128, 2 * BLOCK_BYTES["q4_k"], dtype=torch.uint8), "q4_k", (7, 256, 512))
    with pytest.raises(ValueError, match="I .* must be a multiple of 256 for q4_k"):
        moe_experts(hidden, gu_odd, dn, ids, weights)
    # bytes that no longer match the logical shape (QuantizedTensor's fields are plain attributes)
    bad = QuantizedTensor(dn.data.clone(), "q6_k", tuple(dn.shape))
    bad.data = bad.data.reshape(-1)[:-1]
    with pytest.raises(ValueError, match=r"down_proj.data must be uint8 holding \d+ bytes \(q6_k blocks"):
        moe_experts(hidden, gu, bad, ids, weights)
    with pytest.raises(ValueError, match="topk_ids must be in"):
        moe_experts(hidden, gu, dn, torch.full_like(ids, 7), weights)


@needs_ext
def test_cpp_op_bad_input():
    hidden, gu, dn, ids, weights = _case(4, "q4_k", "q6_k")
    op = torch.ops.lfm_kernels_cpu.moe_experts_kquant
    with pytest.raises(ValueError, match="down_q must be uint8 holding"):
        op(hidden, gu.data, dn.data, "q4_k", "q4_k", 7, 256, ids, weights)  # wrong down format for its bytes
    with pytest.raises(ValueError, match="gate_up_q must be uint8 holding"):
        op(hidden, gu.data.reshape(-1)[:-1], dn.data, "q4_k", "q6_k", 7, 256, ids, weights)
    with pytest.raises(ValueError, match="gate_up_format must be 'q4_k', 'q5_k' or 'q6_k', got 'q8_0'"):
        op(hidden, gu.data, dn.data, "q8_0", "q6_k", 7, 256, ids, weights)
    with pytest.raises(ValueError, match="down_format must be"):
        op(hidden, gu.data, dn.data, "q4_k", "q3_k", 7, 256, ids, weights)
    with pytest.raises(ValueError, match="I must be a positive multiple of 256"):
        op(hidden, gu.data, dn.data, "q4_k", "q6_k", 7, 128, ids, weights)
    with pytest.raises(ValueError, match="H .* must be a positive multiple of 256"):
        op(torch.randn(4, 96), gu.data, dn.data, "q4_k", "q6_k", 7, 256, ids, weights)


@needs_ext
def test_opcheck():
    hidden, gu, dn, ids, weights = _case(5, "q4_k", "q6_k", e=3, k=2, h=256, i=256)
    args = (hidden, gu.data, dn.data, "q4_k", "q6_k", 3, 256, ids, weights)
    torch.library.opcheck(torch.ops.lfm_kernels.moe_experts_kquant.default, args)
    torch.library.opcheck(torch.ops.lfm_kernels_cpu.moe_experts_kquant.default, args)
