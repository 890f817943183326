"""The x8 layout of Q8_0 / Q4_0 weights (rows interleaved in groups of 8): exact conversion both
ways, and the kernels on it against the same float64 reference as the GGUF-layout ("rows") kernels.

Tolerance: the reference dequantizes the weight and quantizes x exactly as the kernels do, then sums
exact products in float64; a kernel's block dots are exact integers, so the only difference is its
fp32 sum over K / 32 scaled blocks: relative error < 2e-6 (fp32 outputs), and x8 against rows within
the same bound (two fp32 sums of the same exact terms). The x8 kernels promise more, checked bit for
bit: every path (portable, AVX2, VNNI) computes each element as the same fma chain, so the paths,
the thread counts, a row's position in the batch and the decode / prefill split give equal bits.
"""


import pytest
import torch

from conftest import num_threads, quant_isa_path, rel_err
from lfm_kernels import QuantizedTensor, _backend, linear, quantize
from lfm_kernels.quant import _kernel_layout, _linear_reference, _relayout_reference

HAS_EXT = _backend._C is not None
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="CPU extension not built")

FORMATS = ["q8_0", "q4_0"]
FP32_TOL = 2e-6
ISAS = ["portable", "avx2", "avxvnni", "avx512vnni"]


def _random_qt(shape, fmt) -> QuantizedTensor:
    return quantize(torch.randn(*shape) / shape[-1] ** 0.5, fmt)


# ---------------------------------------------------------------------------------------------
# The layout


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(8, 32), (24, 96), (3, 16, 64), (5, 8, 2048)], ids=str)
def test_to_layout_round_trip(fmt, shape):
    qt = _random_qt(shape, fmt)
    # random bytes as well: the conversion moves bytes, whatever they mean
    raw = QuantizedTensor(torch.randint(0, 256, qt.data.shape, dtype=torch.uint8), fmt, shape)
    for t in (qt, raw):
        x8 = t.to_layout("x8")
        assert x8.layout == "x8" and t.layout == "rows"
        assert x8.shape == t.shape and x8.nbytes == t.nbytes and x8.data.shape == t.data.shape
        assert not torch.equal(x8.data, t.data)
        back = x8.to_layout("rows")
        assert torch.equal(back.data, t.data)
        rows = t.shape[:-1].numel()
        ref = _relayout_reference(t.data, fmt, rows, shape[-1], "x8")
        assert torch.equal(x8.data, ref)
        assert torch.equal(_relayout_reference(ref, fmt, rows, shape[-1], "rows"), t.data)
        assert x8.to_layout("x8") is x8
    assert torch.equal(qt.to_layout("x8").dequantize(), qt.dequantize())
    assert "layout='x8'" in repr(qt.to_layout("x8")) and "layout='rows'" in repr(qt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_x8_bytes_are_the_documented_ones(fmt):
    """One group, one block, spelled out: scales first, then vector j lane r = row r's bytes 4j..4j+3."""
    qt = _random_qt((8, 32), fmt)
    x8 = qt.to_layout("x8").data.reshape(-1)
    rows = qt.data  # [8, block_bytes]
    for r in range(8):
        assert torch.equal(x8[2 * r : 2 * r + 2], rows[r, :2])
        for j in range((rows.shape[1] - 2) // 4):
            assert torch.equal(x8[16 + 32 * j + 4 * r : 16 + 32 * j + 4 * r + 4], rows[r, 2 + 4 * j : 6 + 4 * j])


def test_x8_refused_where_it_does_not_apply():
    qt = _random_qt((12, 64), "q8_0")
    with pytest.raises(ValueError, match="multiple of 8"):
        qt.to_layout("x8")
    with pytest.raises(ValueError, match="multiple of 8"):
        QuantizedTensor(qt.data, "q8_0", (12, 64), "x8")
    with pytest.raises(ValueError, match="layout must be one of"):
        qt.to_layout("x4")
    assert _kernel_layout(qt) is qt  # the model wrapper keeps "rows" where x8 is refused
    kq = quantize(torch.randn(12, 256), "q4_k")
    assert _kernel_layout(kq).layout == "x8"  # K-quants take x8 at any N (tests/test_kquant_x8.py)
    ok = _random_qt((16, 64), "q4_0")
    assert _kernel_layout(ok).layout == "x8"


@pytest.mark.parametrize("fmt", FORMATS)
def test_row_lookup_on_x8(fmt):
    qt = _random_qt((40, 96), fmt)
    ids = torch.tensor([0, 39, 7, 8, 21, 21, 3])
    for t in (qt, qt.to_layout("x8")):
        assert torch.equal(t._row_blocks(ids), qt.data.index_select(0, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])  # float16: not the C++ op's
@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantized_row_lookup(fmt, dtype):
    # the embedding lookup: one id (a decode step's) and several, of any shape, in both layouts
    qt = _random_qt((40, 96), fmt)
    full = qt.dequantize(dtype)
    for t in (qt, qt.to_layout("x8")):
        for ids in (torch.tensor([0]), torch.tensor([39]), torch.tensor([13]), torch.tensor([0, 39, 7, 8, 21, 21]),
                    torch.tensor([[3, 39], [8, 0]])):
            got = t._dequantize_rows(ids, dtype)
            assert got.dtype == dtype and torch.equal(got, full[ids])
        for bad in (torch.tensor([40]), torch.tensor([-1]), torch.tensor([3, 40])):
            with pytest.raises(IndexError):
                t._dequantize_rows(bad)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k", "q5_k", "q6_k"])
def test_quant_embedding_op(fmt, dtype):
    """The model's quantized embedding lookup (one C++ op, recordable in a CPU graph): rows of
    dequantize() for ids of any shape, both layouts (a K-quant with N % 8 rows in its row tail)."""
    k = 512 if fmt.endswith("_k") else 96
    qt = quantize(torch.randn(43, k) / k**0.5, fmt) if fmt.endswith("_k") else _random_qt((40, k), fmt)
    n = qt.shape[0]
    full = qt.dequantize(torch.float32).to(dtype)
    op = torch.ops.lfm_kernels_cpu.quant_embedding
    for t in (qt, qt.to_layout("x8")):
        for ids in (torch.tensor([n - 1]), torch.tensor([0, n - 1, 7, 8, 21, 21]), torch.tensor([[3, 42 % n], [n - 2, 0]])):
            got = op(t.data, ids, fmt, t.layout, n, k, dtype)
            assert got.shape == (*ids.shape, k) and got.dtype == dtype
            assert torch.equal(got, full[ids])
        for bad in (torch.tensor([n]), torch.tensor([-1]), torch.tensor([3, n])):
            with pytest.raises(IndexError, match=f"out of range for a table of {n} rows"):
                op(t.data, bad, fmt, t.layout, n, k, dtype)


# ---------------------------------------------------------------------------------------------
# linear on x8

# (M, N, K): M 1..4 is the decode GEMV, >= 5 the panel GEMM (4-row tiles: 7 and 300 leave tails);
# N / 8 odd leaves a group tail in the 2-group tiles.
SHAPES = [(m, 40, 32) for m in (1, 2, 3, 7, 64, 300)]
SHAPES += [(m, 72, 2048) for m in (1, 2, 3, 7, 64, 300)]
SHAPES += [(m, 24, 7168) for m in (1, 2, 3, 7, 64, 300)]


def _x(m, k):
    x = torch.randn(m, k) * torch.logspace(-2, 2, m).unsqueeze(1)
    x[0, :32] = 0  # a zero activation block: d = 0
    return x


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-N{}-K{}".format(*s))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", ISAS)
def test_linear_x8_parity(isa, fmt, shape):
    m, n, k = shape
    qt = _random_qt((n, k), fmt)
    x8 = qt.to_layout("x8")
    x = _x(m, k)
    ref = _linear_reference(x, qt)
    with quant_isa_path(isa):
        out_rows = linear(x, qt)
        out = linear(x, x8)
    assert out.dtype == torch.float32 and out.shape == (m, n) and not out.isnan().any()
    err = rel_err(out, ref)
    assert err < FP32_TOL, f"{isa} {fmt} M{m} N{n} K{k}: relative error {err:.3g} >= {FP32_TOL:g}"
    assert rel_err(out, out_rows) < FP32_TOL
    # every path gives the portable path's bits
    if isa != "portable":
        with quant_isa_path("portable"):
            assert torch.equal(linear(x, x8), out)


def _raw_block_qt(n, k, fmt, seed) -> QuantizedTensor:
    """Blocks no quantizer makes: every quant byte uniform over 0..255 (Q8_0's -128 included, every
    nibble), scales fp16 in [0.5, 2)."""
    g = torch.Generator().manual_seed(seed)
    bb = {"q8_0": 34, "q4_0": 18}[fmt]
    data = torch.randint(0, 256, (n, k // 32, bb), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, k // 32, generator=g) * 1.5 + 0.5).half()
    data[..., :2] = scales.view(torch.uint8).view(n, k // 32, 2)
    return QuantizedTensor(data.view(n, -1), fmt, (n, k))


@needs_ext
@pytest.mark.parametrize("m", [1, 2, 4, 7])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", ISAS)
def test_linear_x8_full_byte_range(isa, fmt, m):
    # The SIMD tiles offset or sign-split the operands of an unsigned x signed product (Q8_0's
    # -128 is where |w| and w + 128 differ from naive tricks): the exact integers must survive
    # every byte value, and activations at the int8 extremes.
    n, k = 24, 256
    qt = _raw_block_qt(n, k, fmt, seed=m)
    x = torch.randn(m, k)
    x[:, ::7] = 50.0  # each block's max: quantizes to +127
    x[:, 3::7] = -50.0  # and -127
    ref = _linear_reference(x, qt)
    with quant_isa_path(isa):
        out = linear(x, qt.to_layout("x8"))
    assert rel_err(out, ref) < FP32_TOL, f"{isa} {fmt} M{m}: {rel_err(out, ref):.3g}"
    if isa != "portable":
        with quant_isa_path("portable"):
            assert torch.equal(linear(x, qt.to_layout("x8")), out)


@needs_ext
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_x8_bits_independent_of_threads_batch_and_path(fmt):
    k, n, m = 2048, 296, 70
    x8 = _random_qt((n, k), fmt).to_layout("x8")
    x = torch.randn(m, k)
    with num_threads(1):
        one = linear(x, x8)
        row = linear(x[5:6], x8)
        rows4 = linear(x[4:8], x8)
        rows3 = linear(x[4:7], x8)
    with num_threads(2):
        two = linear(x, x8)
        row2 = linear(x[5:6], x8)
    assert torch.equal(one, two) and torch.equal(row, row2)
    assert torch.equal(row, rows4[1:2]) and torch.equal(row, rows3[1:2])
    assert torch.equal(row, one[5:6])  # decode GEMV and prefill GEMM: the same sum, the same bits


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 4, 9])
def test_linear_x8_low_precision_bias_leading_dims(dtype, m):
    k, n = 256, 48
    qt = _random_qt((n, k), "q4_0")
    x = torch.randn(2, m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    out = linear(x, qt.to_layout("x8"), bias)
    assert out.dtype == dtype and out.shape == (2, m, n)
    ref = _linear_reference(x.reshape(-1, k), qt, bias).reshape(2, m, n)
    assert rel_err(out, ref) < 1e-2


@needs_ext
def test_linear_x8_op_checks_bytes():
    x8 = _random_qt((16, 64), "q8_0").to_layout("x8")
    with pytest.raises(ValueError, match="qweight must hold"):
        torch.ops.lfm_kernels_cpu.linear_quant_x8(torch.randn(1, 64), x8.data.reshape(-1)[:-1], "q8_0", 16, 64, None)
    with pytest.raises(ValueError, match="multiple of 8"):
        torch.ops.lfm_kernels_cpu.linear_quant_x8(torch.randn(1, 64), x8.data[:12], "q8_0", 12, 64, None)
    with pytest.raises(ValueError, match="'q8_0' or 'q4_0'"):
        torch.ops.lfm_kernels_cpu.linear_quant_x8(torch.randn(1, 64), x8.data, "q4_k", 16, 64, None)


# ---------------------------------------------------------------------------------------------
# moe_experts on x8


def _experts(e, h, i, fmt, seed=0):
    g = torch.Generator().manual_seed(seed)
    gu = quantize(torch.randn(e, 2 * i, h, generator=g) / h**0.5, fmt)
    dn = quantize(torch.randn(e, h, i, generator=g) / i**0.5, fmt)
    return gu, dn


@needs_ext
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 9, 40])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", ISAS)
def test_moe_experts_x8(isa, fmt, tokens):
    from lfm_kernels import moe_experts, reference

    e, h, i, k = 5, 96, 64, 2
    gu, dn = _experts(e, h, i, fmt)
    x = torch.randn(tokens, h)
    g = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)])
    wts = torch.rand(tokens, k, generator=g)
    ref = reference.moe_experts_quant(x, gu, dn, ids, wts)
    with quant_isa_path(isa):
        rows = moe_experts(x, gu, dn, ids, wts)
        out = moe_experts(x, gu.to_layout("x8"), dn.to_layout("x8"), ids, wts)
        with num_threads(1):
            one = moe_experts(x, gu.to_layout("x8"), dn.to_layout("x8"), ids, wts)
    assert out.shape == x.shape and not out.isnan().any()
    assert torch.equal(out, one)
    # the SwiGLU product is re-quantized to int8 between the two projections: a fp32 rounding
    # difference in it can move one element across a rounding boundary (one int8 step of its block)
    assert rel_err(out, ref) < 1e-4, f"{isa} {fmt} {tokens} tokens: {rel_err(out, ref):.3g}"
    assert rel_err(out, rows) < 1e-4
    if isa != "portable":
        with quant_isa_path("portable"):
            assert torch.equal(moe_experts(x, gu.to_layout("x8"), dn.to_layout("x8"), ids, wts), out)


@needs_ext
def test_moe_experts_x8_layouts_must_match():
    from lfm_kernels import moe_experts

    gu, dn = _experts(3, 64, 32, "q4_0")
    x = torch.randn(2, 64)
    ids = torch.tensor([[0, 1], [2, 0]])
    with pytest.raises(ValueError, match="layout"):
        moe_experts(x, gu.to_layout("x8"), dn, ids, torch.rand(2, 2))


# ---------------------------------------------------------------------------------------------
# The model wrapper


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    """A small LFM2-MoE checkpoint (tied embedding, vocab a multiple of 8 so the table goes x8)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Lfm2MoeConfig(
        vocab_size=104, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, num_dense_layers=1,
        layer_types=["conv", "full_attention", "conv", "full_attention"], initializer_range=0.02,
        attn_implementation="eager", experts_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.Lfm2MoeForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_x8")
    model.save_pretrained(path)
    return str(path)


@needs_ext
@pytest.mark.parametrize("fmt", FORMATS)
def test_model_runs_x8_and_matches_rows(fmt, tiny_path, monkeypatch):
    """LfmModel puts every eligible Q8_0 / Q4_0 weight in x8 (a tied embedding included: its lookups
    read x8); logits match the same model kept in GGUF's layout within fp32 rounding (the int8
    re-quantization between layers can turn a rounding difference into one int8 step: 1e-3)."""
    import dataclasses

    from lfm_kernels.model import LfmModel, from_pretrained
    from lfm_kernels import quant as quant_mod

    base = from_pretrained(tiny_path, dtype=torch.float32, quant=fmt, progress=False, tokenizer=False)
    w = base.weights
    assert w.lm_head is w.embed and w.embed.layout == "x8"
    qts = [v for lw in w.layers for v in vars(lw).values() if isinstance(v, QuantizedTensor)]
    assert qts and all(v.layout == "x8" for v in qts)

    def to_rows(v):
        return v.to_layout("rows") if isinstance(v, QuantizedTensor) else v

    layers = [dataclasses.replace(lw, **{f.name: to_rows(getattr(lw, f.name)) for f in dataclasses.fields(lw)})
              for lw in w.layers]
    emb = to_rows(w.embed)
    monkeypatch.setattr(quant_mod, "_wants_x8", lambda v: False)
    rows_model = LfmModel(base.config, type(w)(emb, w.final_norm, emb, layers), torch.float32)
    assert rows_model.weights.embed.layout == "rows"
    assert base.bytes_per_decoded_token() == rows_model.bytes_per_decoded_token()
    ids = torch.randint(0, 104, (2, 11), generator=torch.Generator().manual_seed(2))
    assert rel_err(base.forward(ids), rows_model.forward(ids)) < 1e-3
    st, st2 = base.new_state(2, 16), rows_model.new_state(2, 16)
    lengths = torch.tensor([11, 7])
    assert rel_err(base.prefill(ids, lengths, st), rows_model.prefill(ids, lengths, st2)) < 1e-3
    for t in range(3):
        tok = ids[:, t]
        assert rel_err(base.decode_step(tok, st), rows_model.decode_step(tok, st2)) < 1e-3
