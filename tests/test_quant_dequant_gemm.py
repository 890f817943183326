"""Quantized weights through bf16 GEMMs (csrc/quant_dequant_gemm.cpp): the dequantization op against the
`gguf` package, and the many-row route of `linear` and the MoE experts against a bf16 model on the
dequantized weights.

Tolerances. Dequantization is exact: float32 equals gguf.quants.dequantize bit for bit and bfloat16 is
that value rounded to nearest even, on every path. The route's GEMMs take bf16 operands, accumulate
in fp32 and round the output to bf16 once, as F.linear on the bf16-rounded dequantized weight does;
the two may sum K in a different order, so an output may differ by one bf16 rounding step: relative
2^-8 of the element plus 2^-8 of the largest output (for sums that cancel). The experts round gate,
up, their SwiGLU product and the output to bf16 each (as a bf16 transformers model does), so one
rounding difference in act can move an output by a few steps: 2^-6 of the largest output.
"""

import contextlib

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lfm_kernels import _backend, _policy, linear, moe_experts, quantize, reference
from lfm_kernels._policy import kernel_policy

HAS_EXT = _backend._C is not None and hasattr(torch.ops.lfm_kernels_cpu, "quant_dequantize")
pytestmark = pytest.mark.skipif(not HAS_EXT, reason="CPU extension not built")

FORMATS = ["q8_0", "q4_0", "q4_k", "q5_k", "q6_k"]
K_FORMATS = ("q4_k", "q5_k", "q6_k")
PATHS = ["portable", "avx512bf16"]


@contextlib.contextmanager
def dequant_path(path):
    if path == "avx512bf16":
        if not (_backend._C.cpu_supports_avx512() and _backend._C.cpu_supports_avx512bf16()):
            pytest.skip("this CPU has no AVX512-BF16: the vector dequantization path cannot run here")
        yield
        return
    _backend._C.set_force_portable(True)
    try:
        yield
    finally:
        _backend._C.set_force_portable(False)


def _gguf_dequantize(qt) -> torch.Tensor:
    rows = qt.to_layout("rows").data.numpy().reshape(-1, qt.data.shape[-1])
    kind = getattr(gguf.GGMLQuantizationType, qt.format.upper())
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(rows, kind))).reshape(qt.shape)


def _weights(shape, fmt, layout="x8", seed=0):
    g = torch.Generator().manual_seed(seed)
    qt = quantize(torch.randn(*shape, generator=g) / shape[-1] ** 0.5, fmt)
    return qt.to_layout(layout) if layout == "x8" else qt


# ---------------------------------------------------------------------------------------------
# Dequantization


def _shapes(fmt):
    if fmt in K_FORMATS:  # N % 8 != 0: the x8 layout's last rows stay in row layout
        return [(8, 256), (13, 512), (3, 11, 256)]
    return [(8, 32), (24, 96), (3, 16, 64)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["rows", "x8"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_equals_gguf(fmt, layout, path):
    for shape in _shapes(fmt):
        qt = _weights(shape, fmt, layout, seed=len(shape))
        ref = _gguf_dequantize(qt)
        with dequant_path(path):
            got32 = qt.dequantize(torch.float32)
            got16 = qt.dequantize(torch.bfloat16)
        assert got32.shape == qt.shape and got16.dtype == torch.bfloat16
        assert torch.equal(got32, ref), f"{fmt} {layout} {shape}: float32 differs from gguf"
        assert torch.equal(got16, ref.bfloat16()), f"{fmt} {layout} {shape}: bfloat16 is not gguf's value rounded"


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_equals_torch_reference(fmt):
    # random bytes, not just quantizer output: every code and scale pattern (fp16 scales kept finite)
    shape = (16, 512)
    qt = _weights(shape, fmt, "rows")
    g = torch.Generator().manual_seed(5)
    raw = torch.randint(0, 256, qt.data.shape, generator=g, dtype=torch.uint8)
    blocks = raw.view(-1, {"q8_0": 34, "q4_0": 18, "q4_k": 144, "q5_k": 176, "q6_k": 210}[fmt])
    for off in ((0,) if fmt in ("q8_0", "q4_0") else (208,) if fmt == "q6_k" else (0, 2)):
        blocks[:, off + 1] &= 0x3B  # fp16 exponent < 31: finite scales
    qt = type(qt)(raw, fmt, shape)
    for layout in ("rows", "x8"):
        q = qt.to_layout(layout)
        assert torch.equal(q.dequantize(), qt._dequantize_torch()), f"{fmt} {layout}"


def test_dequantize_bad_input():
    qt = _weights((8, 64), "q8_0", "rows")
    op = torch.ops.lfm_kernels_cpu.quant_dequantize
    with pytest.raises(ValueError, match="format"):
        op(qt.data, "q3_k", "rows", 1, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="layout"):
        op(qt.data, "q8_0", "x16", 1, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="bytes"):
        op(qt.data[:-1], "q8_0", "rows", 1, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="multiple of 32"):
        op(qt.data, "q8_0", "rows", 1, 8, 48, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        op(qt.data, "q8_0", "rows", 1, 8, 64, torch.float16)


# ---------------------------------------------------------------------------------------------
# linear: the route against F.linear on the dequantized bf16 weight


def _assert_bf16_gemm_close(got, ref, what):
    got, ref = got.float(), ref.float()
    tol = 2.0 ** -8 * ref.abs() + 2.0 ** -8 * ref.abs().max()
    bad = (got - ref).abs() > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off, max {float((got - ref).abs().max())}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["rows", "x8"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 37, 130], ids=lambda m: f"M{m}")
def test_linear_route_matches_bf16_model(fmt, layout, path, m):
    n, k = (40, 512) if fmt in K_FORMATS else (48, 96)
    qt = _weights((n, k), fmt, layout)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    w16 = qt.dequantize().bfloat16()
    with dequant_path(path):
        got = torch.ops.lfm_kernels_cpu.linear_quant_dequant_gemm(x, qt.data, fmt, layout, n, k, None)
        got_b = torch.ops.lfm_kernels_cpu.linear_quant_dequant_gemm(x, qt.data, fmt, layout, n, k, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    _assert_bf16_gemm_close(got, F.linear(x, w16), f"{fmt} {layout} M{m}")
    _assert_bf16_gemm_close(got_b, F.linear(x, w16, bias), f"{fmt} {layout} M{m} + bias")


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_linear_route_under_inference_mode(mode):
    # the model runs under inference_mode; the route's worker threads write the output
    qt = _weights((256, 96), "q4_0")
    x = torch.randn(80, 96).bfloat16()
    ref = torch.ops.lfm_kernels_cpu.linear_quant_dequant_gemm(x, qt.data, "q4_0", "x8", 256, 96, None)
    with getattr(torch, mode)():
        got = torch.ops.lfm_kernels_cpu.linear_quant_dequant_gemm(x, qt.data, "q4_0", "x8", 256, 96, None)
        gu, dn, hidden, ids, w, args = _experts_args("q4_0", "x8")
        moe = _experts_op("q4_0", "x8")(*args, 1)
    assert torch.equal(got, ref)
    assert torch.equal(moe, _experts_op("q4_0", "x8")(*args, 1))


def test_linear_route_bad_input():
    qt = _weights((16, 64), "q4_0", "rows")
    op = torch.ops.lfm_kernels_cpu.linear_quant_dequant_gemm
    with pytest.raises(ValueError, match="x must be bfloat16"):
        op(torch.randn(4, 64), qt.data, "q4_0", "rows", 16, 64, None)
    with pytest.raises(ValueError, match="x must be bfloat16"):
        op(torch.randn(4, 32).bfloat16(), qt.data, "q4_0", "rows", 16, 64, None)
    with pytest.raises(ValueError, match="bytes"):
        op(torch.randn(4, 64).bfloat16(), qt.data[:-1], "q4_0", "rows", 16, 64, None)
    with pytest.raises(ValueError, match="bias"):
        op(torch.randn(4, 64).bfloat16(), qt.data, "q4_0", "rows", 16, 64, torch.zeros(15).bfloat16())
    with pytest.raises(ValueError, match="N a multiple of 8"):
        op(torch.randn(4, 64).bfloat16(), torch.zeros(12 * 36, dtype=torch.uint8), "q4_0", "x8", 12, 64, None)


# ---------------------------------------------------------------------------------------------
# MoE experts: the route per expert, from a token count on


def _experts_op(fmt, layout):
    name = ("moe_experts_kquant" if fmt in K_FORMATS else "moe_experts_quant") + ("_x8" if layout == "x8" else "")
    return getattr(torch.ops.lfm_kernels_cpu, name)


def _experts_args(fmt, layout, e=6, h=512, i=256, n=40, k=2, seed=0):
    down_fmt = "q6_k" if fmt == "q4_k" else fmt  # Q4_K_M's pairing; the others: one format for both
    gu = _weights((e, 2 * i, h), fmt, layout, seed)
    dn = _weights((e, h, i), down_fmt, layout, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    hidden = torch.randn(n, h, generator=g).bfloat16()
    # uneven loads: expert 0 takes most tokens, some experts none
    ids = torch.stack([torch.tensor([0, 1 + int(t) % (e - 2)]) if t % 3 else torch.randperm(e, generator=g)[:k]
                       for t in range(n)])
    w = torch.rand(n, k, generator=g)
    fmts = (fmt, down_fmt) if fmt in K_FORMATS else (fmt,)
    return gu, dn, hidden, ids, w, (hidden, gu.data, dn.data, *fmts, e, i, ids, w)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["rows", "x8"])
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k", "q5_k"])
def test_moe_route_matches_bf16_model(fmt, layout, path):
    gu, dn, hidden, ids, w, args = _experts_args(fmt, layout)
    op = _experts_op(fmt, layout)
    with dequant_path(path):
        got = op(*args, 1)
    ref = reference.moe_experts(hidden, gu.dequantize().bfloat16(), dn.dequantize().bfloat16(), ids, w).float()
    err = (got.float() - ref).abs().max()
    assert err <= 2.0 ** -6 * ref.abs().max(), f"{fmt} {layout}: max error {float(err)}"


@pytest.mark.parametrize("fmt", ["q4_0", "q4_k"])
def test_moe_route_per_expert_threshold(fmt):
    # k = 1: each output row is one expert's; experts with >= min_rows tokens must give the route's
    # rows bit for bit, the others the integer kernels' rows
    gu, dn, hidden, _, _, _ = _experts_args(fmt, "x8")
    n, e = hidden.shape[0], gu.shape[0]
    ids = torch.tensor([0 if t < 20 else 1 + t % 3 for t in range(n)]).view(n, 1)  # expert 0: 20 tokens, others 6-7
    w = torch.ones(n, 1)
    fmts = (fmt, "q6_k") if fmt in K_FORMATS else (fmt,)
    args = (hidden, gu.data, dn.data, *fmts, e, gu.shape[1] // 2, ids, w)
    op = _experts_op(fmt, "x8")
    route, integer, mixed = op(*args, 1), op(*args, 0), op(*args, 10)
    many = ids.view(-1) == 0
    assert torch.equal(mixed[many], route[many])
    assert torch.equal(mixed[~many], integer[~many])
    assert not torch.equal(route[many], integer[many])  # the two routes differ: the check above means something


def _amx_bf16_usable() -> bool:
    return bool(_backend._C.cpu_supports_amx() and _backend._C.cpu_supports_avx512bf16())


@pytest.mark.skipif(HAS_EXT and not _amx_bf16_usable(),
                    reason="this CPU (or its OS) offers no AMX-BF16 tiles: the route's AMX implementation cannot run here")
@pytest.mark.parametrize("fmts", [("q4_k", "q6_k"), ("q5_k", "q4_k"), ("q6_k", "q5_k"), ("q8_0", "q8_0"),
                                  ("q4_0", "q4_0")], ids=lambda f: "+".join(f))
def test_moe_route_amx_bf16_tiles(fmts):
    """On AMX, experts in x8 take the route on AMX-BF16 tiles: the weights dequantized exactly and
    rounded to bf16, every sum in fp32, gate and up kept in fp32, act = bf16(silu(gate) * up). Against
    that computed here in fp32, only the order of the fp32 sums differs (and, through it, an act value
    may round to the neighbouring bf16 now and then): 2^-8 of each output (its own bf16 rounding) plus
    2^-10 of the largest. Expert loads of 0, 1, 16, 17 and 33 tokens cover the 16-token tiles' edges."""
    e, h, i = 5, 512, 256
    gu = _weights((e, 2 * i, h), fmts[0], "x8", 3)
    dn = _weights((e, h, i), fmts[1], "x8", 4)
    loads = [17, 0, 33, 16, 1]
    ids = torch.tensor([x for x, n in enumerate(loads) for _ in range(n)]).view(-1, 1)
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]
    n = ids.shape[0]
    hidden = torch.randn(n, h, generator=torch.Generator().manual_seed(1)).bfloat16()
    w = torch.rand(n, 1, generator=torch.Generator().manual_seed(2))
    kq = fmts[0] in K_FORMATS
    formats, thresholds = (fmts, (1,)) if kq else (fmts[:1], (1, 0))  # Q8_0 / Q4_0: not the AMX-INT8 route
    got = _experts_op(fmts[0], "x8")(hidden, gu.data, dn.data, *formats, e, i, ids, w, *thresholds).float()
    wg, wd = gu.dequantize().bfloat16().float(), dn.dequantize().bfloat16().float()
    x = hidden.float()
    ref = torch.empty(n, h)
    for t in range(n):
        x_e = int(ids[t, 0])
        gate, up = wg[x_e, :i] @ x[t], wg[x_e, i:] @ x[t]
        act = (F.silu(gate) * up).bfloat16().float()
        ref[t] = w[t, 0] * (wd[x_e] @ act)
    tol = 2.0 ** -8 * ref.abs() + 2.0 ** -10 * ref.abs().max()
    bad = (got - ref).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} outputs off, max error {float((got - ref).abs().max())}"
    # the oneDNN implementation of the route rounds gate and up to bf16: the tiles' results are closer to fp32
    exact = torch.empty(n, h)
    for t in range(n):
        x_e = int(ids[t, 0])
        act = F.silu(wg[x_e, :i] @ x[t]) * (wg[x_e, i:] @ x[t])
        exact[t] = w[t, 0] * (wd[x_e] @ act)
    assert (got - exact).abs().max() <= 2.0 ** -7 * exact.abs().max()


@pytest.mark.skipif(HAS_EXT and not _amx_bf16_usable(),
                    reason="this CPU (or its OS) offers no AMX-BF16 tiles: the route's AMX implementation cannot run here")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 15, 16, 17, 33, 130], ids=lambda m: f"M{m}")
def test_linear_route_amx_bf16_tiles(fmt, m):
    """On AMX, `linear`'s route on x8 weights with N a multiple of 32 runs on AMX-BF16 tiles: strips of
    32 rows dequantized exactly and rounded to bf16, fp32 sums over all of K, the output rounded to bf16
    once. Against those sums computed here in fp32, only their order differs: 2^-8 of each output (its
    own bf16 rounding) plus 2^-12 of the largest. M around the 16-row tiles' edges; a bias joins the
    fp32 sums before their one rounding."""
    n, k = (96, 512) if fmt in K_FORMATS else (64, 96)
    qt = _weights((n, k), fmt, "x8", 7)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    op = torch.ops.lfm_kernels_cpu.linear_quant_dequant_gemm
    got = op(x, qt.data, fmt, "x8", n, k, None)
    ref = x.float() @ qt.dequantize().bfloat16().float().t()
    got_b = op(x, qt.data, fmt, "x8", n, k, bias)
    for out, want in ((got, ref), (got_b, ref + bias.float())):
        tol = 2.0 ** -8 * want.abs() + 2.0 ** -12 * want.abs().max()
        bad = (out.float() - want).abs() > tol
        assert not bad.any(), f"{int(bad.sum())} outputs off, max error {float((out.float() - want).abs().max())}"


def test_moe_route_bad_threshold():
    _, _, _, _, _, args = _experts_args("q4_0", "rows")
    with pytest.raises(ValueError, match="dequant_gemm_min_rows"):
        _experts_op("q4_0", "rows")(*args, -1)


# ---------------------------------------------------------------------------------------------
# The policy: where the public ops take the route


def test_policy_gates_the_routes():
    x16, x32 = torch.zeros(4, 64).bfloat16(), torch.zeros(4, 64)
    q8, qk = _weights((8, 256), "q8_0"), _weights((8, 256), "q4_k")
    fixed = dict(linear_quant_gemm_min_rows=5, linear_kquant_gemm_min_rows=6, linear_quant_amx_min_rows=7,
                 moe_quant_gemm_min_rows=8, moe_kquant_gemm_min_rows=9, moe_quant_amx_min_rows=10)
    with kernel_policy(**fixed):
        if _backend.cpu_has_native_bf16_gemm():  # AMX or AVX512-BF16: the bf16 GEMM route
            amx = _backend.cpu_has_amx()  # the AMX-INT8 tiles: only with usable AMX
            assert _policy.quant_routes("linear", x16, q8) == (5, 7 if amx else 0)
            assert _policy.quant_routes("linear", x16, qk) == (6, 0)  # no AMX-INT8 tiles for K-quants
            assert _policy.quant_routes("moe", x16, q8, q8) == (8, 10 if amx else 0)
            assert _policy.quant_routes("moe", x16, qk, qk) == (9, 0)
            assert _policy.quant_routes("linear", x32, q8) == (0, 7 if amx else 0)  # the GEMM route needs bf16 x
        else:
            for op in ("linear", "moe"):
                for w in (q8, qk):
                    assert _policy.quant_routes(op, x16, w, w) == (0, 0)
    with kernel_policy(kernel_only=True):
        assert _policy.quant_routes("linear", x16, q8) == (0, 0)
        assert _policy.quant_routes("moe", x16, qk, qk) == (0, 0)


@pytest.mark.skipif(not (_backend._C is not None and _backend.cpu_has_native_bf16_gemm()),
                    reason="neither AMX nor AVX512-BF16 on this CPU: the public ops never take the bf16 GEMM route here")
def test_public_ops_take_the_gemm_route():
    qt = _weights((48, 96), "q4_0")
    x = torch.randn(70, 96).bfloat16()
    direct = torch.ops.lfm_kernels_cpu.linear_quant_dequant_gemm(x, qt.data, "q4_0", "x8", 48, 96, None)
    with kernel_policy(linear_quant_gemm_min_rows=70):
        assert torch.equal(linear(x, qt), direct)
    with kernel_policy(linear_quant_gemm_min_rows=71):
        assert not torch.equal(linear(x, qt), direct)
    gu, dn, hidden, ids, w, args = _experts_args("q4_0", "x8")
    with kernel_policy(moe_quant_gemm_min_rows=1):
        assert torch.equal(moe_experts(hidden, gu, dn, ids, w), _experts_op("q4_0", "x8")(*args, 1))
    with kernel_policy(kernel_only=True):
        assert torch.equal(moe_experts(hidden, gu, dn, ids, w), _experts_op("q4_0", "x8")(*args, 0))


# ---------------------------------------------------------------------------------------------
# AMX-INT8 tiles: the integer kernels' contract, bit for bit


needs_amx = pytest.mark.skipif(not (_backend._C is not None and _backend.cpu_has_amx()),
                               reason="no usable AMX on this CPU (or the OS does not grant the tile state): "
                                      "the AMX-INT8 tiles cannot run here")


@needs_amx
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("m", [1, 15, 16, 17, 40, 130], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("n", [8, 16, 24, 136], ids=lambda n: f"N{n}")
def test_linear_amx_equals_integer_kernels(fmt, m, n):
    k = 96 if n < 100 else 2048
    qt = _weights((n, k), fmt)
    g = torch.Generator().manual_seed(m * n)
    op = torch.ops.lfm_kernels_cpu.linear_quant_x8
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(m, k, generator=g).to(dtype)
        bias = torch.randn(n, generator=g)
        ref = op(x, qt.data, fmt, n, k, bias, 0)
        got = op(x, qt.data, fmt, n, k, bias, 1)
        assert torch.equal(got, ref), f"{fmt} M{m} N{n} {dtype}"
        # and from a threshold: below it the integer kernels, at it the tiles (same bits either way)
        assert torch.equal(op(x, qt.data, fmt, n, k, None, m + 1), op(x, qt.data, fmt, n, k, None, m))


@needs_amx
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("n_tokens", [3, 40, 150])
def test_moe_amx_equals_integer_kernels(fmt, n_tokens):
    gu, dn, hidden, ids, w, args = _experts_args(fmt, "x8", n=n_tokens)
    op = _experts_op(fmt, "x8")
    ref = op(*args, 0, 0)
    for amx in (1, 8, 10_000):
        assert torch.equal(op(*args, 0, amx), ref), f"{fmt} N{n_tokens} amx_min_rows={amx}"


@needs_amx
def test_public_linear_with_amx_threshold_keeps_the_integer_bits():
    # the same bits by contract, so the test checks that the threshold reaches the op: the tiles are
    # only distinguishable by time. With the threshold at the row count, the op must give the integer
    # kernels' bits; with kernel_only the same.
    qt = _weights((48, 96), "q8_0")
    x = torch.randn(40, 96)
    ref = torch.ops.lfm_kernels_cpu.linear_quant_x8(x, qt.data, "q8_0", 48, 96, None, 0)
    with kernel_policy(linear_quant_amx_min_rows=40):
        assert torch.equal(linear(x, qt), ref)


def test_amx_threshold_bad_input():
    qt = _weights((16, 64), "q8_0")
    with pytest.raises(ValueError, match="amx_min_rows"):
        torch.ops.lfm_kernels_cpu.linear_quant_x8(torch.randn(4, 64), qt.data, "q8_0", 16, 64, None, -1)
    _, _, _, _, _, args = _experts_args("q4_0", "x8")
    with pytest.raises(ValueError, match="amx_min_rows"):
        _experts_op("q4_0", "x8")(*args, 0, -1)
