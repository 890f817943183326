"""How many 8-row groups the x8 integer tiles stream at once (KernelPolicy.quant_x8_one_stream_max_rows):
one group at a time or several interleaved changes only the pace, never a bit. Checked on every
quantized-kernel path (visible skips where the CPU lacks one), for `linear` at 1-2 rows and the
experts at one token per expert, and that the policy's value reaches the extension."""

import pytest
import torch

from conftest import quant_isa_path
from lfm_kernels import _backend, linear, moe_experts, quantize
from lfm_kernels._policy import DEFAULT_POLICY, kernel_policy

HAS_EXT = _backend._C is not None and hasattr(_backend._C, "set_x8_one_stream_max_rows")
pytestmark = pytest.mark.skipif(not HAS_EXT, reason="CPU extension not built")

ISAS = ["portable", "avx2", "avxvnni", "avx512vnni"]
SETTINGS = [0, 1, 2]


def _x8(shape, fmt, seed):
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(*shape, generator=g) / shape[-1] ** 0.5, fmt).to_layout("x8")


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k", "q5_k", "q6_k"])
@pytest.mark.parametrize("isa", ISAS)
def test_linear_bits_do_not_depend_on_the_streams(isa, fmt, m):
    # 19 groups: the four- and two-group tiles, their remainders and a partial last task all run
    w = _x8((8 * 19, 512), fmt, seed=m)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    outs = []
    with quant_isa_path(isa):
        for rows in SETTINGS:
            with kernel_policy(DEFAULT_POLICY, quant_x8_one_stream_max_rows=rows):
                outs.append(linear(x, w))
                assert _backend._C.x8_one_stream_max_rows() == rows  # the policy reached the tiles
    assert all(torch.equal(o, outs[0]) for o in outs[1:]), f"{isa} {fmt} M={m}"
    assert outs[0].isfinite().all()


@pytest.mark.parametrize("fmts", [("q4_0", "q4_0"), ("q8_0", "q8_0"), ("q4_k", "q6_k")], ids="+".join)
@pytest.mark.parametrize("isa", ISAS)
def test_experts_bits_do_not_depend_on_the_streams(isa, fmts):
    e, h, inter, k, tokens = 6, 512, 256, 2, 3  # one token per chosen expert: the decode tiles
    gu, dn = _x8((e, 2 * inter, h), fmts[0], seed=1), _x8((e, h, inter), fmts[1], seed=2)
    x = torch.randn(tokens, h, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    wts = torch.rand(tokens, k, generator=torch.Generator().manual_seed(4))
    outs = []
    with quant_isa_path(isa):
        for rows in SETTINGS:
            with kernel_policy(DEFAULT_POLICY, quant_x8_one_stream_max_rows=rows):
                linear(x[:1], _x8((8, h), fmts[0], seed=5))  # a quantized call hands the policy over
                outs.append(moe_experts(x, gu, dn, ids, wts))
    assert all(torch.equal(o, outs[0]) for o in outs[1:]), f"{isa} {fmts}"


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="quant_x8_one_stream_max_rows"):
        with kernel_policy(DEFAULT_POLICY, quant_x8_one_stream_max_rows=-1):
            pass
    with pytest.raises(TypeError, match="quant_x8_one_stream_max_rows"):
        with kernel_policy(DEFAULT_POLICY, quant_x8_one_stream_max_rows=1.0):
            pass
    with pytest.raises(ValueError, match="x8_one_stream_max_rows must be >= 0"):
        _backend._C.set_x8_one_stream_max_rows(-1)


def test_the_bench_names_the_streams_and_times_the_other():
    from lfm_kernels.benchmark import linear as bench_linear

    qw = quantize(torch.randn(64, 256) / 16, "q4_0")
    i = {"x": torch.randn(1, 256).to(torch.bfloat16), "qweight": qw.to_layout("x8"), "qweight_rows": qw}
    paths = bench_linear._quant_paths("q4_0", 1)
    assert {"x8", "x8-1stream", "rows"} <= set(paths)
    assert torch.equal(paths["x8"](i), paths["x8-1stream"](i))
    with kernel_policy(DEFAULT_POLICY, quant_x8_one_stream_max_rows=1):
        assert bench_linear._quant_path(i) == "x8-1stream"
        assert bench_linear._quant_path({**i, "x": torch.randn(2, 256).to(torch.bfloat16)}) == "x8"
    with kernel_policy(DEFAULT_POLICY):
        assert bench_linear._quant_path(i) == "x8"
    assert "x8-1stream" not in bench_linear._quant_paths("q4_0", 16)
