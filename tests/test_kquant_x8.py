"""K-quant weights (Q4_K / Q5_K / Q6_K) in the x8 layout: QuantizedTensor(layout="x8").

The layout is a shuffle of 2- and 4-byte pieces of the GGUF blocks (lfm_kernels/quant.py's module
docstring): it is checked against that description written out element by element, round-trips
exactly through the C++ op and the torch reference, and dequantizes / looks rows up as "rows" does.

The kernels on it (linear_kquant_x8, moe_experts_kquant_x8) compute, per (row, activation row,
super-block), the same exact integers and fused fp32 steps as the row-layout kernels, in the same
order: their outputs are compared with the row layout's bit for bit (torch.equal), on the portable
and AVX2 paths, 1 and 2 threads, decode (M <= 4: the x8 tiles) and prefill (packed panels made
from x8 groups) alike, and against the float64 reference with the K-quant tests' bounds (fp32:
relative error < 2e-6; the MoE: per-token bounds of tests/test_kquant_moe.py).
"""

import pytest
import torch

from conftest import case_seed, num_threads, quant_isa_path, rel_err
from lfm_kernels import QuantizedTensor, _backend, linear, moe_experts, quantize
from lfm_kernels.ops.moe import _moe_experts_kquant_reference
from lfm_kernels.quant import _kernel_layout, _krelayout_reference, _linear_reference
from test_kquant_kernels import _act, _weight
from test_kquant_moe import _assert_parity, _case

HAS_EXT = _backend._C is not None and hasattr(torch.ops.lfm_kernels_cpu, "linear_kquant_x8")
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="CPU extension (with the K-quant x8 ops) not built")

FORMATS = ["q4_k", "q5_k", "q6_k"]
BLOCK_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}
# (byte offset, length, piece) of each field of a block, in block order
FIELDS = {
    "q4_k": [(0, 2, 2), (2, 2, 2), (4, 12, 4), (16, 128, 4)],
    "q5_k": [(0, 2, 2), (2, 2, 2), (4, 12, 4), (16, 32, 4), (48, 128, 4)],
    "q6_k": [(0, 128, 4), (128, 64, 4), (192, 16, 4), (208, 2, 2)],
}
FP32_TOL = 2e-6
ISAS = ["portable", "avx2", "avxvnni", "avx512vnni"]
M_DECODE = [1, 2, 3, 4, 5, 7]

_QT = {}


def _qt(fmt: str, n: int, k: int) -> QuantizedTensor:
    key = (fmt, n, k)
    if key not in _QT:
        torch.manual_seed(case_seed(*key))
        _QT[key] = quantize(_weight(n, k), fmt)
    return _QT[key]


def _x8_by_definition(data: torch.Tensor, fmt: str, n: int, k: int) -> torch.Tensor:
    """The x8 bytes of a [n, k] matrix, one piece at a time, exactly as the docstring states."""
    bb, nsb = BLOCK_BYTES[fmt], k // 256
    src = data.reshape(n, nsb, bb)
    out = data.reshape(n, nsb * bb).clone()
    flat = out.reshape(-1)
    for g in range(n // 8):
        for b in range(nsb):
            base = g * 8 * nsb * bb + b * 8 * bb
            for o, length, p in FIELDS[fmt]:
                for r in range(8):
                    for j in range(length // p):
                        dst = base + 8 * o + 8 * p * j + p * r
                        flat[dst : dst + p] = src[8 * g + r, b, o + p * j : o + p * j + p]
    return out.reshape(data.shape)


@pytest.mark.parametrize("fmt", FORMATS)
def test_layout_is_as_documented(fmt):
    qt = _qt(fmt, 19, 512)  # two groups and a tail of 3 rows, 2 super-blocks
    want = _x8_by_definition(qt.data, fmt, 19, 512)
    assert torch.equal(_krelayout_reference(qt.data, fmt, 1, 19, 512, "x8"), want)
    x8 = qt.to_layout("x8")
    assert x8.layout == "x8" and x8.nbytes == qt.nbytes and torch.equal(x8.data, want)
    assert torch.equal(x8.data[16:], qt.data[16:])  # the tail stays in rows


@pytest.mark.parametrize("shape", [(8, 256), (19, 512), (2051, 256), (3, 13, 768), (2, 5, 256)], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_dequantize_and_row_lookup(fmt, shape):
    torch.manual_seed(1)
    mats, n, k = (shape[0] if len(shape) == 3 else 1), shape[-2], shape[-1]
    qt = quantize(_weight(mats * n, k).reshape(shape), fmt)
    x8 = qt.to_layout("x8")
    assert x8.to_layout("x8") is x8
    assert torch.equal(x8.data, _krelayout_reference(qt.data, fmt, mats, n, k, "x8"))
    back = x8.to_layout("rows")
    assert back.layout == "rows" and torch.equal(back.data, qt.data)
    assert torch.equal(_krelayout_reference(x8.data, fmt, mats, n, k, "rows"), qt.data)
    assert torch.equal(x8.dequantize(), qt.dequantize())
    if len(shape) == 2:
        ids = torch.tensor([0, n - 1, 7 % n, 8 % n, n // 2, n // 2, 3 % n])
        assert torch.equal(x8._row_blocks(ids), qt.data.index_select(0, ids))
        full = qt.dequantize()
        for one in (torch.tensor([0]), torch.tensor([n - 1])):  # a decode step's lookup
            assert torch.equal(x8._dequantize_rows(one), full.index_select(0, one))
        assert torch.equal(x8._dequantize_rows(ids), full.index_select(0, ids))
    # what the model wrapper does at load: every K-quant weight on the CPU goes to x8
    assert _kernel_layout(qt).layout == "x8"


def test_layout_bad_input():
    qt = _qt("q4_k", 16, 256)
    with pytest.raises(ValueError, match="layout must be one of"):
        qt.to_layout("x16")
    with pytest.raises(ValueError, match="data must have shape"):
        QuantizedTensor(qt.data[:, :100], "q4_k", (16, 256), "x8")
    if HAS_EXT:
        op = torch.ops.lfm_kernels_cpu.kquant_relayout
        with pytest.raises(ValueError, match="data must be uint8 holding"):
            op(qt.data[:8], "q4_k", 1, 16, 256, "x8")
        with pytest.raises(ValueError, match="to must be"):
            op(qt.data, "q4_k", 1, 16, 256, "x4")
        with pytest.raises(ValueError, match="format must be"):
            op(qt.data, "q4_0", 1, 16, 256, "x8")


@needs_ext
@pytest.mark.parametrize("m", M_DECODE)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", ISAS)
def test_linear_x8_parity(isa, fmt, m):
    n, k = 2051, 768  # 256 groups and a tail of 3 rows
    qt = _qt(fmt, n, k)
    x8 = qt.to_layout("x8")
    x = _act(m, k)
    bias = torch.randn(n)
    with quant_isa_path(isa):
        rows = linear(x, qt, bias)
        out = torch.full((m, n), float("nan"))
        out.copy_(linear(x, x8, bias))
    assert torch.isfinite(out).all()
    assert rel_err(out, _linear_reference(x, qt, bias)) < FP32_TOL
    assert torch.equal(out, rows), f"{isa} {fmt} M={m}: x8 differs from the row layout"


@needs_ext
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_x8_bits_equal_across_paths_threads_and_batch(fmt):
    """Every path (portable, AVX2, each VNNI the CPU has) the same, 1 thread == 2 threads, a row alone
    (decode tile) == itself in a prefill batch (packed panels made from x8 groups), x8 == rows: one set
    of bits everywhere."""
    n, k = 203, 512
    qt = _qt(fmt, n, k)
    x8 = qt.to_layout("x8")
    x = _act(37, k)
    results = {}
    for isa in ISAS:
        if isa != "portable" and isa not in torch.ops.lfm_kernels_cpu._quant_isa_info()[1:]:
            continue  # skipped visibly in test_linear_x8_parity
        with quant_isa_path(isa):
            with num_threads(1):
                one = linear(x, x8)
                alone = [linear(x[i : i + 1], x8) for i in (0, 5, 36)]
                pair = linear(x[3:5], x8)
            with num_threads(2):
                two = linear(x, x8)
            rows = linear(x, qt)
        assert torch.equal(one, two), isa
        assert torch.equal(one, rows), isa
        for i, a in zip((0, 5, 36), alone):
            assert torch.equal(a, one[i : i + 1]), (isa, i)
        assert torch.equal(pair, one[3:5]), isa
        results[isa] = one
    for isa, out in results.items():
        assert torch.equal(out, results["portable"]), isa


@needs_ext
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_x8_small_n_is_all_tail(fmt):
    qt = _qt(fmt, 5, 256)
    x8 = qt.to_layout("x8")
    assert torch.equal(x8.data, qt.data)  # fewer than 8 rows: nothing to interleave
    x = _act(2, 256)
    assert torch.equal(linear(x, x8), linear(x, qt))


@needs_ext
def test_linear_x8_bad_input():
    qt = _qt("q6_k", 16, 256)
    op = torch.ops.lfm_kernels_cpu.linear_kquant_x8
    x = torch.randn(2, 256)
    with pytest.raises(ValueError, match="qweight must hold"):
        op(x, qt.data[:8], "q6_k", 16, 256, None)
    with pytest.raises(ValueError, match="x must be"):
        op(torch.randn(2, 512), qt.data, "q6_k", 16, 256, None)
    with pytest.raises(ValueError, match="format must be"):
        op(x, qt.data, "q8_0", 16, 256, None)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., K=256\]"):
        linear(torch.randn(2, 128), qt.to_layout("x8"))


PAIRS = [("q4_k", "q4_k"), ("q5_k", "q5_k"), ("q6_k", "q6_k"), ("q4_k", "q6_k"), ("q6_k", "q5_k")]


def _x8(gu, dn):
    return gu.to_layout("x8"), dn.to_layout("x8")


@needs_ext
@pytest.mark.parametrize("n", [1, 2, 3, 5, 64])
@pytest.mark.parametrize("pair", PAIRS, ids="-".join)
@pytest.mark.parametrize("isa", ISAS)
def test_moe_x8_parity(isa, pair, n):
    hidden, gu, dn, ids, weights = _case(n, *pair)
    gx, dx = _x8(gu, dn)
    ref = _moe_experts_kquant_reference(hidden, gu, dn, ids, weights)
    with quant_isa_path(isa):
        rows = moe_experts(hidden, gu, dn, ids, weights)
        out = moe_experts(hidden, gx, dx, ids, weights)
    _assert_parity(out, ref, f"{isa} {pair} N={n} x8")
    assert torch.equal(out, rows), f"{isa} {pair} N={n}: x8 differs from the row layout"


@needs_ext
@pytest.mark.parametrize("pair", [("q4_k", "q6_k"), ("q5_k", "q5_k")], ids="-".join)
def test_moe_x8_bits_equal_across_paths_threads_and_batch(pair):
    hidden, gu, dn, ids, weights = _case(70, *pair, e=5, k=2, h=512, i=256)
    gx, dx = _x8(gu, dn)
    results = {}
    for isa in ISAS:
        if isa != "portable" and isa not in torch.ops.lfm_kernels_cpu._quant_isa_info()[1:]:
            continue  # skipped visibly in test_moe_x8_parity
        with quant_isa_path(isa):
            with num_threads(1):
                one = moe_experts(hidden, gx, dx, ids, weights)
                alone = moe_experts(hidden[5:6], gx, dx, ids[5:6], weights[5:6])
                few = moe_experts(hidden[:9], gx, dx, ids[:9], weights[:9])
            with num_threads(2):
                two = moe_experts(hidden, gx, dx, ids, weights)
        assert torch.equal(one, two), isa
        assert torch.equal(alone, one[5:6]) and torch.equal(few, one[:9]), isa
        results[isa] = one
    for isa, out in results.items():
        assert torch.equal(out, results["portable"]), isa


@needs_ext
@pytest.mark.parametrize("n", [1, 2])
def test_moe_x8_model_sizes(n):
    """H = 2048, I = 1792 (the model's) in Q4_K_M's mix: decode through the x8 tiles."""
    hidden, gu, dn, ids, weights = _case(n, "q4_k", "q6_k", e=3, k=2, h=2048, i=1792)
    gx, dx = _x8(gu, dn)
    out = moe_experts(hidden, gx, dx, ids, weights)
    assert torch.equal(out, moe_experts(hidden, gu, dn, ids, weights))
    _assert_parity(out, _moe_experts_kquant_reference(hidden, gu, dn, ids, weights), f"N={n} model sizes x8")


@needs_ext
def test_moe_x8_bad_input():
    hidden, gu, dn, ids, weights = _case(2, "q4_k", "q6_k")
    gx, dx = _x8(gu, dn)
    with pytest.raises(ValueError, match="down_proj must be in gate_up_proj's layout"):
        moe_experts(hidden, gx, dn, ids, weights)
    op = torch.ops.lfm_kernels_cpu.moe_experts_kquant_x8
    with pytest.raises(ValueError, match="gate_up_q must be uint8 holding"):
        op(hidden, gx.data[:1], dx.data, "q4_k", "q6_k", 7, 256, ids, weights)
    with pytest.raises(ValueError, match="down_format must be"):
        op(hidden, gx.data, dx.data, "q4_k", "q4_0", 7, 256, ids, weights)


@needs_ext
def test_opcheck():
    qt = _qt("q4_k", 24, 256).to_layout("x8")
    x = torch.randn(2, 256)
    torch.library.opcheck(torch.ops.lfm_kernels.linear_quant_x8, (x, qt.data, qt.format, 24, 256, None))
    hidden, gu, dn, ids, weights = _case(3, "q4_k", "q6_k")
    gx, dx = _x8(gu, dn)
    torch.library.opcheck(torch.ops.lfm_kernels.moe_experts_kquant_x8,
                          (hidden, gx.data, dx.data, "q4_k", "q6_k", 7, 256, ids, weights))
