"""How far ahead the bf16 / fp32 weight streams prefetch (csrc/common.h, stream_ahead): a per-vendor
default (4 KiB on Intel, 1 KiB elsewhere), reported by backend_info; any distance changes only the
pace, never a bit (checked on the decode GEMVs at one and two rows, bf16 and fp32 weights, and the MoE
decode routes that stream rows), and bad distances are refused. The same for the K-quant x8 tiles'
own distance (kquant_ahead: 8 KiB on Intel, 4 KiB elsewhere), on `linear` and the MoE experts."""

import contextlib

import pytest
import torch

from lfm_kernels import _backend, backend_info, linear, moe_experts, quantize
from lfm_kernels._policy import DEFAULT_POLICY, kernel_policy

HAS_EXT = _backend._C is not None and hasattr(_backend._C, "set_stream_ahead")
pytestmark = pytest.mark.skipif(not HAS_EXT, reason="CPU extension not built")

DISTANCES = [0, 64, 1024, 4096, 65536]


@contextlib.contextmanager
def _stream_ahead(nbytes, which="stream"):
    get, set_ = getattr(_backend._C, f"{which}_ahead"), getattr(_backend._C, f"set_{which}_ahead")
    before = get()
    set_(nbytes)
    try:
        yield
    finally:
        set_(before)


def _vendor():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), None)
    except OSError:
        return None


def test_default_per_vendor_and_reported():
    vendor = _vendor()
    if vendor is None:
        pytest.skip("no vendor_id in /proc/cpuinfo to check the default against")
    intel = vendor == "GenuineIntel"
    assert _backend._C.default_stream_ahead() == (4096 if intel else 1024), vendor
    assert _backend._C.default_kquant_ahead() == (8192 if intel else 4096), vendor
    info = backend_info()
    assert info["weight_stream_prefetch_bytes"] == _backend._C.stream_ahead()
    assert info["kquant_prefetch_bytes"] == _backend._C.kquant_ahead()


@pytest.mark.parametrize("which", ["stream", "kquant"])
@pytest.mark.parametrize("bad", [-64, 1, 100, 65536 + 64])
def test_bad_distances_are_refused(bad, which):
    get = getattr(_backend._C, f"{which}_ahead")
    before = get()
    with pytest.raises(ValueError, match=f"{which}_ahead must be a multiple of 64"):
        getattr(_backend._C, f"set_{which}_ahead")(bad)
    assert get() == before


# linear at 1-2 rows on the AVX2 GEMV (the one that streams a row with prefetch), K with a tail past
# the 64-element steps; the portable path is the control
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32], ids=["wbf16", "wfp32"])
def test_linear_bits_do_not_depend_on_the_distance(wdtype, m):
    if not _backend._C.cpu_supports_avx2():
        pytest.skip("the CPU lacks AVX2+FMA: only the portable GEMV, which does not prefetch")
    g = torch.Generator().manual_seed(m)
    w = (torch.randn(136, 1000, generator=g) / 32).to(wdtype)
    x = torch.randn(m, 1000, generator=g).to(torch.bfloat16)
    outs = []
    with kernel_policy(DEFAULT_POLICY, linear_avx512_max_rows=0, linear_onednn_min_rows=3):
        for d in DISTANCES:
            with _stream_ahead(d):
                outs.append(linear(x, w))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    ref = (x.float() @ w.float().t()).to(torch.bfloat16)
    assert (outs[0].float() - ref.float()).abs().max() <= 0.02 * ref.float().abs().max()


# the MoE decode routes that stream weight rows: the AVX2 tiles ("tiled") and the AVX512-BF16 row dots ("dot")
@pytest.mark.parametrize("route", ["tiled", "dot"])
def test_experts_bits_do_not_depend_on_the_distance(route):
    if not _backend._C.cpu_supports_avx2():
        pytest.skip("the CPU lacks AVX2+FMA: the experts run the portable path, which does not prefetch")
    if route == "dot" and not _backend._C.cpu_supports_avx512bf16():
        pytest.skip("the CPU lacks AVX512-BF16: no row-dot route")
    fixed = {"tiled": dict(moe_bf16_min_rows=2), "dot": dict(moe_bf16_min_rows=1)}[route]
    e, h, inter = 4, 384, 160
    g = torch.Generator().manual_seed(3)
    gu = (torch.randn(e, 2 * inter, h, generator=g) / 20).to(torch.bfloat16)
    dn = (torch.randn(e, h, inter, generator=g) / 12).to(torch.bfloat16)
    x = torch.randn(1, h, generator=g).to(torch.bfloat16)
    ids, wts = torch.tensor([[0, 3]]), torch.tensor([[0.75, 0.25]])
    outs = []
    with kernel_policy(DEFAULT_POLICY, **fixed):
        for d in DISTANCES:
            with _stream_ahead(d):
                outs.append(moe_experts(x, gu, dn, ids, wts))
    assert all(torch.equal(o, outs[0]) for o in outs[1:]), route
    assert outs[0].isfinite().all() and outs[0].abs().max() > 0


# The K-quant x8 tiles at one and two rows (one and two 8-row groups per tile, a tile ahead, the next
# tile's blocks, none past the end), `linear` and the MoE decode experts, with K of 8 super-blocks:
# 0 and 64 bytes prefetch one step ahead, 65536 runs past every tile.
@pytest.mark.parametrize("fmt", ["q4_k", "q6_k"])
def test_kquant_bits_do_not_depend_on_the_distance(fmt):
    g = torch.Generator().manual_seed(5)
    w = quantize(torch.randn(72, 2048, generator=g) / 32, fmt).to_layout("x8")
    e, h, inter = 4, 512, 256
    gu = quantize(torch.randn(e, 2 * inter, h, generator=g) / 20, fmt).to_layout("x8")
    dn = quantize(torch.randn(e, h, inter, generator=g) / 12, fmt).to_layout("x8")
    xe = torch.randn(1, h, generator=g).to(torch.bfloat16)
    ids, wts = torch.tensor([[0, 3]]), torch.tensor([[0.75, 0.25]])
    outs = []
    with kernel_policy(kernel_only=True):
        for d in [0, 64, 4096, 8192, 65536]:
            with _stream_ahead(d, "kquant"):
                outs.append([linear(torch.randn(m, 2048, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16), w)
                             for m in (1, 2)] + [moe_experts(xe, gu, dn, ids, wts)])
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(o, outs[0])), fmt
    assert all(t.isfinite().all() and t.abs().max() > 0 for t in outs[0])
