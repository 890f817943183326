"""Parity and bad-input tests for lfm_kernels.moe_route / moe_experts / moe on the C++ (AVX2 and portable)
and Triton paths, and equality of the whole block with transformers' Lfm2MoeSparseMoeBlock."""

import json

import pytest
import torch

import lfm_kernels
import lfm_kernels.ops.moe as moe_mod
from lfm_kernels import _backend, reference
from lfm_kernels._policy import DEFAULT_POLICY, get_policy, kernel_policy
from conftest import HAS_TRITON, TOL, assert_close, call_triton, cpu_isa_path, dtype_id, num_threads, rel_err

NS = [1, 2, 7, 64, 513]
SMALL_H, SMALL_I = 76, 36  # neither a multiple of the 8-lane vectors nor of 16: tails everywhere


@pytest.fixture(autouse=True)
def _always_kernel():
    """Most tests here check the AVX2/portable kernel, so no expert goes to bf16 dot products (our
    AVX512-BF16 kernels or oneDNN); the tests of that path (test_bf16_*) choose their own routes."""
    with kernel_policy(kernel_only=True):
        yield


def _op(hidden, gate_up, down, ids, weights, routes):
    """The C++ experts op with explicit route thresholds (bf16_min_rows, outer_min_rows,
    outer_onednn_min_rows, dot_onednn_min_rows), as the policy passes them."""
    return torch.ops.lfm_kernels_cpu.moe_experts(hidden, gate_up, down, ids, weights, *routes)


def _min_rows(min_rows):
    """The default policy's thresholds with bf16_min_rows replaced."""
    return (min_rows, *DEFAULT_POLICY.moe_bf16_routes()[1:])


def _cpu_ctx(impl):
    return cpu_isa_path(impl)


def _router_inputs(n, e, h, dtype):
    """Inputs whose router logits are exact in any summation order (multiples of 1/1024 from small
    integers), so every implementation rounds the same logits and selections have no near-ties.
    The bias is a multiple of 1/32, large enough to change the selection."""
    hidden = (torch.randint(-4, 5, (n, h)) / 16).to(dtype)
    hidden[:, 0] = 0.25  # never an all-zero row
    gate_weight = (torch.randint(-8, 9, (e, h)) / 64).to(dtype)
    bias = torch.randint(-8, 9, (e,)) / 32
    return hidden, gate_weight, bias.float()


def _expert_weights(e, h, i, dtype, scale=0.1):
    gate_up = (torch.randn(e, 2 * i, h) * scale).to(dtype)
    down = (torch.randn(e, h, i) * scale).to(dtype)
    return gate_up, down


def _route(impl, *args):
    if impl == "triton":
        from lfm_kernels.triton.moe import moe_route_triton

        return call_triton(moe_route_triton, *args)
    with _cpu_ctx(impl):
        assert _backend.cpu_isa() == impl
        return lfm_kernels.moe_route(*args)


def _experts(impl, *args):
    if impl == "triton":
        from lfm_kernels.triton.moe import moe_experts_triton

        return call_triton(moe_experts_triton, *args)
    with _cpu_ctx(impl):
        assert _backend.cpu_isa() == impl
        return lfm_kernels.moe_experts(*args)


def _case_id(n, e, k, dtype):
    return f"N{n}-E{e}-k{k}-{dtype_id(dtype)}"


CASES = [(n, e, k, d) for d in (torch.float32, torch.bfloat16) for e in (8, 32) for k in (1, 2, 4) for n in NS]


# ---------------------------------------------------------------------------------------------
# router


@pytest.mark.parametrize("n,e,k,dtype", CASES, ids=[_case_id(*c) for c in CASES])
def test_route_matches_reference(n, e, k, dtype):
    hidden, gate_weight, bias = _router_inputs(n, e, SMALL_H, dtype)
    weights, ids = _route("avx2", hidden, gate_weight, bias, k, True, 1.0)
    ref_w, ref_ids = reference.moe_route(hidden, gate_weight, bias, k)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    assert_close(weights, ref_w, torch.float32 if dtype == torch.float32 else dtype, "topk_weights")


@pytest.mark.parametrize("impl", ["portable", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("n,e,k", [(1, 8, 2), (7, 32, 4), (33, 8, 1)])
def test_route_other_paths(impl, n, e, k, dtype):
    if impl == "triton" and not HAS_TRITON:
        pytest.skip("triton not installed")
    hidden, gate_weight, bias = _router_inputs(n, e, 64, dtype)
    weights, ids = _route(impl, hidden, gate_weight, bias, k, True, 1.0)
    ref_w, ref_ids = reference.moe_route(hidden, gate_weight, bias, k)
    assert torch.equal(ids, ref_ids)
    assert_close(weights, ref_w, torch.float32 if dtype == torch.float32 else dtype, "topk_weights")


@pytest.mark.parametrize("norm,scale", [(False, 1.0), (True, 2.5), (False, 0.5)])
def test_route_options(norm, scale):
    hidden, gate_weight, bias = _router_inputs(9, 8, 40, torch.float32)
    for b in (bias, None):
        weights, ids = lfm_kernels.moe_route(hidden, gate_weight, b, 3, norm, scale)
        ref_w, ref_ids = reference.moe_route(hidden, gate_weight, b, 3, norm, scale)
        assert torch.equal(ids, ref_ids)
        assert_close(weights, ref_w)


def test_route_bias_changes_selection_and_ties():
    hidden, gate_weight, _ = _router_inputs(64, 8, 64, torch.float32)
    unbiased = reference.moe_route(hidden, gate_weight, None, 2)[1]
    bias = torch.zeros(8)
    bias[5] = 2.0  # dominates every sigmoid: expert 5 first for all tokens
    bias[2] = 1.0
    weights, ids = lfm_kernels.moe_route(hidden, gate_weight, bias, 2)
    assert not torch.equal(ids, unbiased)
    assert (ids[:, 0] == 5).all() and (ids[:, 1] == 2).all()
    # the weights are the unbiased sigmoids of the chosen experts, normalised
    sig = torch.sigmoid(hidden @ gate_weight.t())[:, [5, 2]]
    assert_close(weights, sig / (sig.sum(-1, keepdim=True) + 1e-6))
    # exact ties (identical router rows) go to the lower index, sorted like torch.topk
    tied = gate_weight.clone()
    tied[6] = tied[1]
    ids_t = lfm_kernels.moe_route(hidden, tied, None, 8)[1]
    pos = {int(e): j for j, e in enumerate(ids_t[0])}
    assert pos[1] < pos[6]
    assert torch.equal(ids_t, reference.moe_route(hidden, tied, None, 8)[1])


@pytest.mark.parametrize("impl", ["avx2", "portable", "triton"])
def test_route_nan_scores_like_reference(impl):
    """A NaN score ranks above every number, the lower index first among NaNs (the reference's stable
    descending sort): NaN biases pick their experts first with finite weights, a NaN router row picks
    its expert first and makes the normalised weights NaN."""
    if impl == "triton" and not HAS_TRITON:
        pytest.skip("triton not installed")
    hidden, gate_weight, bias = _router_inputs(6, 8, 64, torch.float32)
    bias[5] = bias[3] = float("nan")
    weights, ids = _route(impl, hidden, gate_weight, bias, 3, True, 1.0)
    ref_w, ref_ids = reference.moe_route(hidden, gate_weight, bias, 3)
    assert (ref_ids[:, :2] == torch.tensor([3, 5])).all()
    assert torch.equal(ids, ref_ids)
    assert_close(weights, ref_w, torch.float32, "topk_weights")
    nan_row = gate_weight.clone()
    nan_row[6, 7] = float("nan")
    weights, ids = _route(impl, hidden, nan_row, None, 2, True, 1.0)
    ref_w, ref_ids = reference.moe_route(hidden, nan_row, None, 2)
    assert (ref_ids[:, 0] == 6).all() and ref_w.isnan().all()
    assert torch.equal(ids, ref_ids)
    assert weights.isnan().all()


# ---------------------------------------------------------------------------------------------
# experts


@pytest.mark.parametrize("n,e,k,dtype", CASES, ids=[_case_id(*c) for c in CASES])
def test_experts_matches_reference(n, e, k, dtype):
    hidden = torch.randn(n, SMALL_H).to(dtype)
    gate_up, down = _expert_weights(e, SMALL_H, SMALL_I, dtype)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    weights = torch.rand(n, k) + 0.1
    out = _experts("avx2", hidden, gate_up, down, ids, weights)
    ref = reference.moe_experts(hidden, gate_up, down, ids, weights)
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("impl", ["portable", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("n,e,k", [(1, 8, 2), (7, 32, 4), (33, 8, 1)], ids=lambda v: str(v))
def test_experts_other_paths(impl, n, e, k, dtype):
    if impl == "triton" and not HAS_TRITON:
        pytest.skip("triton not installed")
    h, i = (64, 32) if impl == "triton" else (SMALL_H, SMALL_I)
    hidden = torch.randn(n, h).to(dtype)
    gate_up, down = _expert_weights(e, h, i, dtype)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    weights = torch.rand(n, k) + 0.1
    out = _experts(impl, hidden, gate_up, down, ids, weights)
    assert_close(out, reference.moe_experts(hidden, gate_up, down, ids, weights), dtype)


@pytest.mark.parametrize("impl", ["avx2", "portable", "triton"])
def test_unused_expert_never_read(impl):
    """An expert nobody chose may hold NaN: the output stays finite and right."""
    if impl == "triton" and not HAS_TRITON:
        pytest.skip("triton not installed")
    n, e, k = 9, 8, 2
    hidden = torch.randn(n, 64)
    gate_up, down = _expert_weights(e, 64, 32, torch.float32)
    ids = torch.stack([torch.randperm(e - 1)[:k] for _ in range(n)])
    ids[ids >= 3] += 1  # expert 3 unused
    gate_up[3] = float("nan")
    down[3] = float("nan")
    weights = torch.rand(n, k)
    out = _experts(impl, hidden, gate_up, down, ids, weights)
    assert torch.isfinite(out).all()
    assert_close(out, reference.moe_experts(hidden, gate_up, down, ids, weights))


@pytest.mark.parametrize("impl", ["avx2", "portable", "triton"])
@pytest.mark.parametrize("k", [1, 2])
def test_all_tokens_on_one_expert(impl, k):
    if impl == "triton" and not HAS_TRITON:
        pytest.skip("triton not installed")
    n, e = 70 if impl != "triton" else 37, 8
    hidden = torch.randn(n, 64).to(torch.bfloat16)
    gate_up, down = _expert_weights(e, 64, 32, torch.bfloat16)
    ids = torch.full((n, k), 6, dtype=torch.int64)
    if k == 2:
        ids[:, 1] = 6  # the same expert in both slots counts twice, as in transformers
    weights = torch.rand(n, k)
    out = _experts(impl, hidden, gate_up, down, ids, weights)
    assert_close(out, reference.moe_experts(hidden, gate_up, down, ids, weights), torch.bfloat16)


def test_experts_mixed_dtypes_strided_int32():
    """fp16 weights with a bf16 strided hidden, int32 ids, bf16 routing weights."""
    n, e, k = 11, 8, 3
    wide = torch.randn(n, 2 * SMALL_H).to(torch.bfloat16)
    hidden = wide[:, ::2]
    assert not hidden.is_contiguous()
    gate_up, down = _expert_weights(e, SMALL_H, SMALL_I, torch.float16)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)]).to(torch.int32)
    weights = torch.rand(n, k).to(torch.bfloat16)
    out = lfm_kernels.moe_experts(hidden, gate_up, down, ids, weights)
    assert_close(out, reference.moe_experts(hidden, gate_up, down, ids.long(), weights), torch.bfloat16)
    # and fp32 hidden with bf16 weights keeps fp32 accuracy on the fp32 path
    h32 = torch.randn(n, SMALL_H)
    gu16, dn16 = _expert_weights(e, SMALL_H, SMALL_I, torch.bfloat16)
    out32 = lfm_kernels.moe_experts(h32, gu16, dn16, ids, weights.float())
    assert_close(out32, reference.moe_experts(h32, gu16, dn16, ids.long(), weights.float()), torch.float32)


@pytest.mark.parametrize("n,e", [(1, 32), (1, 30), (5, 30), (40, 32)], ids=lambda v: str(v))
def test_route_deterministic_across_threads_and_matches_reference(n, e):
    # at H = 2048 the threads split a decode step's router rows (blocks of 4; E = 30 leaves a short
    # block): the same bits at any thread count, and the reference's choices
    hidden, gate_weight, bias = _router_inputs(n, e, 2048, torch.bfloat16)
    with num_threads(1):
        one = _route("avx2", hidden, gate_weight, bias, 4, True, 1.0)
    with num_threads(max(2, torch.get_num_threads())):
        many = _route("avx2", hidden, gate_weight, bias, 4, True, 1.0)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    ref_w, ref_ids = reference.moe_route(hidden, gate_weight, bias, 4)
    assert torch.equal(many[1], ref_ids)
    assert_close(many[0], ref_w, torch.bfloat16, "topk_weights")


def test_experts_deterministic_across_threads():
    n, e, k = 40, 8, 4
    hidden = torch.randn(n, SMALL_H)
    gate_up, down = _expert_weights(e, SMALL_H, SMALL_I, torch.float32)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    weights = torch.rand(n, k)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lfm_kernels.moe_experts(hidden, gate_up, down, ids, weights)
        torch.set_num_threads(max(2, threads))
        many = lfm_kernels.moe_experts(hidden, gate_up, down, ids, weights)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# ---------------------------------------------------------------------------------------------
# experts with many tokens on bf16 dot products (the default policy on CPUs with native bf16 dot products)

BF16_DOT_CASES = [(n, e, k, r) for n, e, k, r in [(1, 8, 1, 1), (7, 8, 2, 3), (64, 8, 4, 3), (64, 32, 4, 8),
                                            (513, 32, 4, 3), (513, 8, 2, 1000), (40, 8, 4, 1)]]


@pytest.mark.parametrize("impl", ["avx2", "portable"])
@pytest.mark.parametrize("n,e,k,min_rows", BF16_DOT_CASES, ids=[f"N{n}-E{e}-k{k}-min{r}" for n, e, k, r in BF16_DOT_CASES])
def test_bf16_dot_path_matches_reference(impl, n, e, k, min_rows):
    """The C++ op with bf16_min_rows set: experts with at least that many tokens run on bf16 dot
    products (avx2 impl on an AVX512-BF16 CPU: our kernels below 64 tokens, oneDNN from 64; portable
    impl: always oneDNN, which runs bf16 on any CPU, so that path is tested on every machine), the
    rest on the tiled AVX2/portable kernel, all in one call."""
    hidden = torch.randn(n, SMALL_H).to(torch.bfloat16)
    gate_up, down = _expert_weights(e, SMALL_H, SMALL_I, torch.bfloat16)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    ids[: n // 2, 0] = 1  # one crowded expert beside sparse ones: both paths in the same call
    weights = torch.rand(n, k) + 0.1
    with _cpu_ctx(impl):
        out = _op(hidden, gate_up, down, ids, weights, _min_rows(min_rows))
    assert out.dtype == torch.bfloat16
    assert_close(out, reference.moe_experts(hidden, gate_up, down, ids, weights), torch.bfloat16)


# Token counts that land on every bf16 route of the default policy on an AVX512-BF16 CPU: 1-2 (AVX2
# kernel), 3 (dot-product tile), 4-63 (outer product: an 8-lane last block up to 8, 9-16 one 16-lane
# block, then pairs of blocks with a narrow or a full last one) and 64+ (oneDNN).
ROUTE_COUNTS = [1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 24, 25, 31, 32, 33, 40, 41, 48, 63, 64, 70]
ROUTE_SHAPES = [(SMALL_H, SMALL_I), (78, 34), (64, 32), (75, 36), (76, 35)]  # the last two: odd, no pairs

# Route thresholds that send every expert to one route, and the default policy's mix. The AVX512-BF16
# routes need that ISA (without it the C++ op sends them to oneDNN); the others run on any CPU.
_NEVER = 1 << 40
FORCED_ROUTES = {
    "tiled": (0, 0, 0, 0),
    "onednn": (1, 1, 1, 1),
    "bf16-dot": (1, _NEVER, _NEVER, _NEVER),
    "bf16-outer": (1, 1, _NEVER, _NEVER),  # shapes with H or I odd have no pairs: the dot-product tile
    "policy-mix": DEFAULT_POLICY.moe_bf16_routes(),
}
_AVX512BF16_ROUTES = ("bf16-dot", "bf16-outer", "policy-mix")
# The forced portable path has no AVX512-BF16 kernels: there the policy's mix is tiled + oneDNN.
ROUTE_PARAMS = [(r, i) for r in ("tiled", "onednn", "policy-mix") for i in ("avx2", "portable")] + [
    ("bf16-dot", "avx2"), ("bf16-outer", "avx2")
]


def _needs_avx512bf16(route, impl):
    if impl == "avx2" and route in _AVX512BF16_ROUTES:
        if not (_backend._C is not None and _backend._C.cpu_supports_avx512bf16()):
            pytest.skip("needs AVX512-BF16")


def _route_inputs(h, i):
    """k = 2: each token's first expert has one of the ROUTE_COUNTS, its second is one of two busy ones."""
    counts = ROUTE_COUNTS
    e = len(counts) + 2
    first = torch.cat([torch.full((c,), x) for x, c in enumerate(counts)])
    n = first.numel()
    second = len(counts) + (torch.arange(n) % 2)  # experts e-2 and e-1: about n / 2 tokens each
    ids = torch.stack([first, second], 1)[torch.randperm(n)]
    hidden = torch.randn(n, h).to(torch.bfloat16)
    gate_up, down = _expert_weights(e, h, i, torch.bfloat16)
    weights = torch.rand(n, 2) + 0.1
    return hidden, gate_up, down, ids, weights


@pytest.mark.parametrize("route,impl", ROUTE_PARAMS, ids=[f"{r}-{i}" for r, i in ROUTE_PARAMS])
@pytest.mark.parametrize("h,i", ROUTE_SHAPES, ids=[f"H{h}-I{i}" for h, i in ROUTE_SHAPES])
def test_bf16_every_route(route, impl, h, i):
    """Experts with each of the token counts above in one call, all sent to one route (or the default
    policy's mix), each expert's rows checked against the reference."""
    _needs_avx512bf16(route, impl)
    hidden, gate_up, down, ids, weights = _route_inputs(h, i)
    with _cpu_ctx(impl):
        out = _op(hidden, gate_up, down, ids, weights, FORCED_ROUTES[route])
    ref = reference.moe_experts(hidden, gate_up, down, ids, weights)
    for x, count in enumerate(ROUTE_COUNTS):  # per expert, so one wrong route can't hide in the total
        rows = (ids[:, 0] == x).nonzero().squeeze(1)
        assert_close(out[rows], ref[rows], torch.bfloat16, f"expert with {count} tokens")


@pytest.mark.parametrize("impl", ["avx2", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("tokens", [1, 2, 3])
def test_decode_experts_wide_items(impl, dtype, tokens):
    """Decode (at most 3 tokens per expert) on our tiles streams each work item's gate rows, then its
    up rows, in chunks: an intermediate size of 300 gives items of several chunks and a short tail.
    Every expert's rows against the reference, and the same bits as the expert computed alone."""
    e, h, i = 4, 72, 300
    hidden = torch.randn(tokens * e, h).to(dtype)
    ids = torch.arange(tokens * e).remainder(e).unsqueeze(1)  # `tokens` tokens for each expert, k = 1
    weights = torch.rand(tokens * e, 1) + 0.1
    gate_up, down = _expert_weights(e, h, i, dtype)
    with _cpu_ctx(impl):
        out = _op(hidden, gate_up, down, ids, weights, FORCED_ROUTES["tiled"])
        first = (ids[:, 0] == 0).nonzero().squeeze(1)  # expert 0's tokens
        alone = _op(hidden[first], gate_up, down, ids[first], weights[first], FORCED_ROUTES["tiled"])
    ref = reference.moe_experts(hidden, gate_up, down, ids, weights)
    for x in range(e):
        rows = (ids[:, 0] == x).nonzero().squeeze(1)
        assert_close(out[rows], ref[rows], dtype, f"expert {x}")
    assert torch.equal(out[first], alone)


FP32_TORCH_CASES = [(1, 8, 2, 1), (40, 8, 2, 4), (64, 4, 4, 64), (130, 32, 4, 5)]


@pytest.mark.parametrize("impl", ["avx2", "portable"])
@pytest.mark.parametrize("hdt", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("n,e,k,min_rows", FP32_TORCH_CASES, ids=[f"N{n}-E{e}-k{k}-min{r}" for n, e, k, r in FP32_TORCH_CASES])
def test_fp32_torch_route_matches_reference(impl, hdt, n, e, k, min_rows):
    """fp32 experts with at least fp32_torch_min_rows tokens run on torch's fp32 GEMM: the same
    fp32 contract as the tiles (products and sums in fp32, output rounded once to hidden's dtype), the
    caller's tensors unchanged; the experts below the threshold stay on the tiles, bit for bit."""
    hidden = torch.randn(n, SMALL_H).to(hdt)
    gate_up, down = _expert_weights(e, SMALL_H, SMALL_I, torch.float32)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    weights = torch.rand(n, k) + 0.1
    saved = [t.clone() for t in (hidden, gate_up, down, ids, weights)]
    with _cpu_ctx(impl):
        tiled = _op(hidden, gate_up, down, ids, weights, (0, 0, 0, 0))
        mixed = torch.ops.lfm_kernels_cpu.moe_experts(hidden, gate_up, down, ids, weights, 0, 0, 0, 0, min_rows)
    ref = reference.moe_experts(hidden, gate_up, down, ids, weights)
    assert mixed.dtype == hdt
    assert_close(mixed, ref, hdt)
    counts = torch.bincount(ids.flatten(), minlength=e)
    on_tiles = counts[ids].lt(min_rows).all(1)  # tokens whose every expert stayed on the tiles
    assert torch.equal(mixed[on_tiles], tiled[on_tiles])
    if hdt == torch.float32 and counts.max() >= min_rows:
        assert not torch.equal(mixed, tiled)  # the route was taken (another summation order)
    for t, t0 in zip((hidden, gate_up, down, ids, weights), saved):
        assert torch.equal(t, t0)


def test_fp32_torch_route_follows_the_policy():
    """The public op passes the policy's moe_fp32_torch_min_rows for fp32 weights only, and none
    under kernel_only; a negative threshold is a clear error."""
    n, e, k = 64, 4, 2
    hidden = torch.randn(n, SMALL_H)
    gate_up, down = _expert_weights(e, SMALL_H, SMALL_I, torch.float32)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    weights = torch.rand(n, k)
    tiled = _op(hidden, gate_up, down, ids, weights, (0, 0, 0, 0))
    gemm = torch.ops.lfm_kernels_cpu.moe_experts(hidden, gate_up, down, ids, weights, 0, 0, 0, 0, 1)
    with kernel_policy(DEFAULT_POLICY, moe_fp32_torch_min_rows=2):
        assert moe_mod._fp32_torch_min_rows(hidden, gate_up, down) == 2
        assert moe_mod._fp32_torch_min_rows(hidden, gate_up.bfloat16(), down.bfloat16()) == 0
        assert torch.equal(lfm_kernels.moe_experts(hidden, gate_up, down, ids, weights), gemm)
    with kernel_policy(DEFAULT_POLICY, moe_fp32_torch_min_rows=2, kernel_only=True):
        assert torch.equal(lfm_kernels.moe_experts(hidden, gate_up, down, ids, weights), tiled)
    with kernel_policy(DEFAULT_POLICY):  # the default never hands fp32 experts off
        assert torch.equal(lfm_kernels.moe_experts(hidden, gate_up, down, ids, weights), tiled)
    with pytest.raises(RuntimeError, match="fp32_torch_min_rows"):
        torch.ops.lfm_kernels_cpu.moe_experts(hidden, gate_up, down, ids, weights, 0, 0, 0, 0, -1)


@pytest.mark.parametrize("impl", ["avx2", "portable"])
def test_bf16_forced_routes_take_effect(impl):
    """The thresholds really move experts: oneDNN rounds gate, up and the expert output to bf16 and the
    tiled path does not, so the two forced routes give different bits on the same call."""
    hidden, gate_up, down, ids, weights = _route_inputs(SMALL_H, SMALL_I)
    with _cpu_ctx(impl):
        tiled = _op(hidden, gate_up, down, ids, weights, FORCED_ROUTES["tiled"])
        onednn = _op(hidden, gate_up, down, ids, weights, FORCED_ROUTES["onednn"])
    assert not torch.equal(tiled, onednn)


def test_bf16_dot_only_for_bf16():
    """fp32 (and mixed) calls ignore the bf16 route thresholds: bit-identical to the kernel alone."""
    n, e, k = 30, 8, 2
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    weights = torch.rand(n, k)
    for hdt, wdt in [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]:
        hidden = torch.randn(n, SMALL_H).to(hdt)
        gate_up, down = _expert_weights(e, SMALL_H, SMALL_I, wdt)
        args = (hidden, gate_up, down, ids, weights)
        assert torch.equal(_op(*args, FORCED_ROUTES["onednn"]), _op(*args, FORCED_ROUTES["tiled"]))


def test_bf16_dot_tile_deterministic_across_threads():
    """Experts with 3..63 tokens on our AVX512-BF16 kernels: the same bits for 1 and 2 threads."""
    if _backend._C is None or not _backend._C.cpu_supports_avx512bf16():
        pytest.skip("needs AVX512-BF16 (without it those experts run on oneDNN, whose sums may split per thread count)")
    n, e, k = 80, 8, 2
    t = torch.arange(n)
    # expert 7 gets 3 tokens (the dot-product tile), experts 0..6 about 22 each (outer product)
    ids = torch.stack([torch.where(t < 3, 7, t % 7), torch.where(t < 3, t, (t % 7 + 3) % 7)], 1)
    hidden = torch.randn(n, SMALL_H).to(torch.bfloat16)
    gate_up, down = _expert_weights(e, SMALL_H, SMALL_I, torch.bfloat16)
    weights = torch.rand(n, k)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _op(hidden, gate_up, down, ids, weights, DEFAULT_POLICY.moe_bf16_routes())
        torch.set_num_threads(max(2, threads))
        many = _op(hidden, gate_up, down, ids, weights, DEFAULT_POLICY.moe_bf16_routes())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    assert_close(one, reference.moe_experts(hidden, gate_up, down, ids, weights), torch.bfloat16)


@pytest.mark.parametrize("n", [2, 3, 64])
def test_bf16_dot_auto_policy(n):
    """Default policy: bf16 x bf16 experts with >= moe_bf16_min_rows tokens go to bf16 dot products
    only on CPUs that have them natively; either way the answer is right."""
    with kernel_policy(DEFAULT_POLICY):
        _check_auto_policy(n)


def _check_auto_policy(n):
    e, k = 8, 4
    hidden = torch.randn(n, SMALL_H).to(torch.bfloat16)
    gate_up, down = _expert_weights(e, SMALL_H, SMALL_I, torch.bfloat16)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    weights = torch.rand(n, k)
    min_rows = get_policy().moe_bf16_min_rows
    routed = n >= min_rows and _backend.cpu_has_native_bf16_gemm()
    assert moe_mod._bf16_routes(hidden, gate_up) == (DEFAULT_POLICY.moe_bf16_routes() if routed else (0, 0, 0, 0))
    assert moe_mod._bf16_dot_min_rows(hidden, gate_up) == (min_rows if routed else 0)
    assert moe_mod._bf16_dot_min_rows(hidden.float(), gate_up) == 0
    out = lfm_kernels.moe_experts(hidden, gate_up, down, ids, weights)
    assert_close(out, reference.moe_experts(hidden, gate_up, down, ids, weights), torch.bfloat16)
    expected = _op(hidden, gate_up, down, ids, weights, DEFAULT_POLICY.moe_bf16_routes() if routed else (0, 0, 0, 0))
    assert torch.equal(out, expected)
    with kernel_policy(kernel_only=True):
        assert moe_mod._bf16_routes(hidden, gate_up) == (0, 0, 0, 0)


@pytest.fixture(scope="module")
def full_size_weights():
    """LFM2.5-8B-A1B's expert shapes in bf16 (704 MB), generated once for the module."""
    e, h, i = 32, 2048, 1792
    g = torch.Generator().manual_seed(1234)
    gate_up = torch.empty(e, 2 * i, h, dtype=torch.bfloat16)
    down = torch.empty(e, h, i, dtype=torch.bfloat16)
    for x in range(e):
        gate_up[x] = torch.randn(2 * i, h, generator=g) * 0.02
        down[x] = torch.randn(h, i, generator=g) * 0.02
    gate_weight = (torch.randn(e, h, generator=g) * 0.02).to(torch.bfloat16)
    return gate_weight, gate_up, down


@pytest.mark.slow
@pytest.mark.parametrize("kernel_only", [True, False], ids=["kernel", "auto"])
@pytest.mark.parametrize("n", [1, 40])
def test_full_size_block(full_size_weights, n, kernel_only):
    with kernel_policy(DEFAULT_POLICY, kernel_only=kernel_only):
        _check_full_size_block(full_size_weights, n)


def _check_full_size_block(full_size_weights, n):
    gate_weight, gate_up, down = full_size_weights
    hidden = torch.randn(n, 2048).to(torch.bfloat16)
    bias = torch.randn(32) * 0.01
    weights, ids = lfm_kernels.moe_route(hidden, gate_weight, bias, 4)
    ref_w, ref_ids = reference.moe_route(hidden, gate_weight, bias, 4)
    # random inputs may hold a near-tie; where the choice differs the scores must be (near-)equal
    if not torch.equal(ids, ref_ids):
        sig = torch.sigmoid((hidden.float() @ gate_weight.float().t()).bfloat16().float()) + bias
        gap = (sig.gather(1, ids) - sig.gather(1, ref_ids)).abs().max()
        assert gap < 1e-2, f"selections differ beyond a near-tie ({gap})"
    assert_close(weights, ref_w, torch.bfloat16, "topk_weights")
    out = lfm_kernels.moe_experts(hidden, gate_up, down, ref_ids, ref_w)
    assert_close(out, reference.moe_experts(hidden, gate_up, down, ref_ids, ref_w), torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# whole block vs transformers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("n", [1, 7, 64])
def test_block_matches_transformers(n, dtype):
    transformers = pytest.importorskip("transformers")
    from transformers.models.lfm2_moe import modeling_lfm2_moe as hf

    cfg = transformers.Lfm2MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, num_dense_layers=0,
        layer_types=["conv", "full_attention"],
    )
    block = hf.Lfm2MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    block = block.to(dtype)
    hidden, gate_weight, _ = _router_inputs(n, 8, 64, dtype)
    with torch.no_grad():
        block.gate.weight.copy_(gate_weight)
        block.expert_bias.data = torch.linspace(-0.5, 0.5, 8)  # float32, as transformers keeps it
        unbiased = reference.moe_route(hidden, gate_weight, None, 2)[1]
        biased = reference.moe_route(hidden, gate_weight, block.expert_bias, 2)[1]
        if n > 1:
            assert not torch.equal(unbiased, biased), "the bias must change the selection"
        theirs = block(hidden[None])[0]
        _, their_w, their_ids = block.gate(hidden, block.expert_bias)
    with torch.no_grad():  # the module's parameters require grad; the ops are inference-only
        ours = lfm_kernels.moe(
            hidden, block.gate.weight, block.expert_bias, block.experts.gate_up_proj, block.experts.down_proj, 2
        )
        weights, ids = lfm_kernels.moe_route(hidden, block.gate.weight, block.expert_bias, 2)
    assert torch.equal(ids, their_ids)
    assert_close(weights, their_w.float(), dtype, "topk_weights")
    assert_close(ours, theirs, dtype)


# ---------------------------------------------------------------------------------------------
# Triton specifics


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("block_m", [16, 32])
def test_triton_align(block_m):
    from lfm_kernels.triton.moe import moe_align

    n, e, k = 23, 8, 3
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    ids[ids == 4] = 5  # an unused expert
    sorted_pairs, block_expert = call_triton(moe_align, ids, e, block_m)
    flat = ids.reshape(-1)
    seen = []
    for b, ex in enumerate(block_expert.tolist()):
        rows = sorted_pairs[b * block_m : (b + 1) * block_m]
        real = rows[rows < flat.numel()]
        if ex < 0:
            assert real.numel() == 0
            continue
        assert (flat[real.long()] == ex).all()
        seen += real.tolist()
    assert sorted(seen) == list(range(flat.numel()))


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_config_table(tmp_path, monkeypatch):
    from lfm_kernels.triton import moe as tmoe

    cfg = {"E=8,N=32,H=64,dtype=fp32": {
        "4": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 2, "num_stages": 2},
        "64": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2,
               "down": {"BLOCK_N": 16, "BLOCK_K": 16}},
    }}
    path = tmp_path / "moe_configs.json"
    path.write_text(json.dumps(cfg))
    monkeypatch.setattr(tmoe, "_CONFIG_FILE", str(path))
    tmoe._config_table.cache_clear()
    try:
        assert tmoe.get_config(8, 32, 64, torch.float32, 3)["BLOCK_N"] == 16
        # the nearest tuned count on a log scale, if within a factor of two
        assert tmoe.get_config(8, 32, 64, torch.float32, 40)["BLOCK_M"] == 32
        assert tmoe.get_config(8, 32, 64, torch.float32, 128)["BLOCK_M"] == 32
        # far from every tuned count (and for shapes the file lacks): the built-in table
        assert tmoe.get_config(8, 32, 64, torch.float32, 9) == tmoe._DEFAULTS_FP32[0][1]
        assert tmoe.get_config(8, 32, 64, torch.float32, 1000) == tmoe._DEFAULTS_FP32[-1][1]
        assert tmoe.get_config(8, 32, 128, torch.float32, 1)["BLOCK_M"] == 16  # default table
        n, e, k = 9, 8, 2
        hidden = torch.randn(n, 64)
        gate_up, down = _expert_weights(e, 64, 32, torch.float32)
        ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
        weights = torch.rand(n, k)
        out = call_triton(tmoe.moe_experts_triton, hidden, gate_up, down, ids, weights)
        assert_close(out, reference.moe_experts(hidden, gate_up, down, ids, weights))
    finally:
        monkeypatch.undo()
        tmoe._config_table.cache_clear()


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_config_decode_table_not_used_for_prefill(tmp_path, monkeypatch):
    """A table tuned only for decode-sized calls must not hand its small blocks to a 512-token
    prefill (it once did: the lookup fell back to the largest key)."""
    from lfm_kernels.triton import moe as tmoe

    small = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4}
    cfg = {"E=32,N=1792,H=2048,dtype=bf16": {str(m): small for m in (1, 4, 16)}}
    path = tmp_path / "moe_configs.json"
    path.write_text(json.dumps(cfg))
    monkeypatch.setattr(tmoe, "_CONFIG_FILE", str(path))
    tmoe._config_table.cache_clear()
    try:
        assert tmoe.get_config(32, 1792, 2048, torch.bfloat16, 1) == small
        assert tmoe.get_config(32, 1792, 2048, torch.bfloat16, 24) == small
        assert tmoe.get_config(32, 1792, 2048, torch.bfloat16, 512) == tmoe._DEFAULTS[-1][1]
        assert tmoe.get_config(32, 1792, 2048, torch.bfloat16, 512)["BLOCK_M"] == 64
    finally:
        monkeypatch.undo()
        tmoe._config_table.cache_clear()


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_fp32_prefill_config():
    """fp32 dots (fp32 weights or mixed dtypes) get their own, smaller prefill tiles: the 16-bit ones
    spill on the GPU (checked by tools/triton_aot_check.py)."""
    from lfm_kernels.triton import moe as tmoe

    fp32 = tmoe.get_config(32, 1792, 2048, torch.float32, 512)
    bf16 = tmoe.get_config(32, 1792, 2048, torch.bfloat16, 512)
    assert fp32 != bf16
    assert fp32["BLOCK_M"] * fp32["BLOCK_N"] < bf16["BLOCK_M"] * bf16["BLOCK_N"]


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("n,e,k,block_m", [(1, 32, 4, 16), (64, 32, 4, 16), (300, 8, 2, 32), (97, 40, 3, 64)])
def test_triton_align_layout(n, e, k, block_m, monkeypatch):
    """The one-launch align gives exactly the stable sort by expert, each run padded to block_m, and
    every block's expert (-1 past the last run); every slot is written (the buffers start poisoned)."""
    from lfm_kernels.triton import moe as tmoe

    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(-7))
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    if n > 1:
        ids[ids == 1] = 0  # an unused expert and an uneven load
    sorted_pairs, block_expert = call_triton(tmoe.moe_align, ids, e, block_m)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=e)
    want_pairs, want_blocks = [], []
    pos = 0
    for x in range(e):
        run = order[pos : pos + int(counts[x])].tolist()
        pos += int(counts[x])
        padded = -(-len(run) // block_m) * block_m
        want_pairs += run + [flat.numel()] * (padded - len(run))
        want_blocks += [x] * (padded // block_m)
    nb = block_expert.numel()
    assert nb == tmoe.align_blocks(flat.numel(), e, block_m)
    want_blocks += [-1] * (nb - len(want_blocks))
    want_pairs += [flat.numel()] * (nb * block_m - len(want_pairs))
    assert block_expert.tolist() == want_blocks
    assert sorted_pairs.tolist() == want_pairs


# ---------------------------------------------------------------------------------------------
# custom ops and bad input


def test_opcheck():
    hidden, gate_weight, bias = _router_inputs(5, 8, 40, torch.float32)
    torch.library.opcheck(torch.ops.lfm_kernels.moe_route.default, (hidden, gate_weight, bias, 2, True, 1.0))
    torch.library.opcheck(torch.ops.lfm_kernels.moe_route.default, (hidden, gate_weight, None, 3, False, 2.0))
    gate_up, down = _expert_weights(8, 40, 24, torch.float32)
    weights, ids = reference.moe_route(hidden, gate_weight, bias, 2)
    torch.library.opcheck(torch.ops.lfm_kernels.moe_experts.default, (hidden, gate_up, down, ids, weights))


def test_compiles():
    hidden, gate_weight, bias = _router_inputs(6, 8, 40, torch.float32)
    gate_up, down = _expert_weights(8, 40, 24, torch.float32)
    fn = torch.compile(lfm_kernels.moe, fullgraph=True, backend="eager")
    out = fn(hidden, gate_weight, bias, gate_up, down, 2)
    assert_close(out, reference.moe(hidden, gate_weight, bias, gate_up, down, 2))


def test_experts_compile_fullgraph_and_export():
    """moe_experts on caller-given ids has no host read of them (no data-dependent branch), so it
    traces whole; a bad id is still a ValueError naming topk_ids, raised inside the compiled op."""
    torch._dynamo.reset()  # a fresh trace, not one cached by another test
    hidden = torch.randn(6, 40)
    gate_up, down = _expert_weights(8, 40, 24, torch.float32)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(6)])
    weights = torch.rand(6, 2)
    fn = torch.compile(lfm_kernels.moe_experts, fullgraph=True, backend="eager")
    ref = reference.moe_experts(hidden, gate_up, down, ids, weights)
    assert_close(fn(hidden, gate_up, down, ids, weights), ref)
    bad = ids.clone()
    bad[4, 1] = 8
    with pytest.raises(ValueError, match=r"topk_ids .*\[0, E=8\).* got 8"):
        fn(hidden, gate_up, down, bad, weights)

    class Experts(torch.nn.Module):
        def forward(self, h, gu, dn, i, w):
            return lfm_kernels.moe_experts(h, gu, dn, i, w)

    exported = torch.export.export(Experts(), (hidden, gate_up, down, ids, weights))
    assert_close(exported.module()(hidden, gate_up, down, ids, weights), ref)


@pytest.mark.parametrize("impl", ["avx2", "portable"])
def test_bad_id_error_comes_from_the_kernel(impl):
    """The C++ op itself raises the ValueError naming topk_ids, the value and its position."""
    hidden = torch.randn(3, 16)
    gate_up, down = _expert_weights(4, 16, 8, torch.float32)
    ids = torch.tensor([[0, 1], [2, 3], [1, -2]])
    with _cpu_ctx(impl), pytest.raises(ValueError, match=r"topk_ids .* got -2 at topk_ids\[2, 1\]"):
        _op(hidden, gate_up, down, ids, torch.rand(3, 2), (0, 0, 0, 0))


def test_reference_fallback_checks_ids(monkeypatch):
    """Without the extension the CPU reference runs, with the same ValueError naming topk_ids."""
    monkeypatch.setattr(_backend, "_C", None)
    monkeypatch.setattr(_backend, "_warned", {"cpu"})
    hidden = torch.randn(3, 16)
    gate_up, down = _expert_weights(4, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="topk_ids"):
        lfm_kernels.moe_experts(hidden, gate_up, down, torch.full((3, 2), 4), torch.rand(3, 2))


def test_meta_tensors():
    """Meta tensors get shapes from the ops' fake implementations (no data is read)."""
    meta = lambda *shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype, device="meta")  # noqa: E731
    hidden, gate_weight, bias = meta(5, 16), meta(8, 16), meta(8)
    gate_up, down = meta(8, 24, 16, dtype=torch.bfloat16), meta(8, 16, 12, dtype=torch.bfloat16)
    weights, ids = lfm_kernels.moe_route(hidden, gate_weight, bias, 2)
    assert weights.device.type == ids.device.type == "meta"
    assert weights.shape == ids.shape == (5, 2) and weights.dtype == torch.float32 and ids.dtype == torch.int64
    out = lfm_kernels.moe_experts(hidden, gate_up, down, ids, weights)
    assert out.device.type == "meta" and out.shape == (5, 16) and out.dtype == torch.float32
    out = lfm_kernels.moe(hidden.bfloat16(), gate_weight.bfloat16(), bias, gate_up, down, 2)
    assert out.device.type == "meta" and out.shape == (5, 16) and out.dtype == torch.bfloat16


def _bad_cases():
    h = torch.randn(4, 16)
    gw = torch.randn(8, 16)
    b = torch.randn(8)
    gu = torch.randn(8, 24, 16)
    dn = torch.randn(8, 16, 12)
    ids = torch.randint(0, 8, (4, 2))
    w = torch.rand(4, 2)
    r = lfm_kernels.moe_route
    x = lfm_kernels.moe_experts
    m = lfm_kernels.moe
    return [
        ("route-hidden-rank", lambda: r(h[0], gw, b, 2), ValueError, "hidden"),
        ("route-hidden-type", lambda: r(h.numpy(), gw, b, 2), TypeError, "hidden"),
        ("route-hidden-int", lambda: r(h.long(), gw, b, 2), TypeError, "hidden"),
        ("route-gate-H", lambda: r(h, gw[:, :8], b, 2), ValueError, "gate_weight"),
        ("route-bias-E", lambda: r(h, gw, b[:5], 2), ValueError, "expert_bias"),
        ("route-topk-big", lambda: r(h, gw, b, 9), ValueError, "top_k"),
        ("route-topk-zero", lambda: r(h, gw, b, 0), ValueError, "top_k"),
        ("route-topk-float", lambda: r(h, gw, b, 2.0), TypeError, "top_k"),
        ("experts-id-high", lambda: x(h, gu, dn, torch.full((4, 2), 8), w), ValueError, "topk_ids"),
        ("experts-id-neg", lambda: x(h, gu, dn, torch.full((4, 2), -1), w), ValueError, "topk_ids"),
        ("experts-id-float", lambda: x(h, gu, dn, ids.float(), w), TypeError, "topk_ids"),
        ("experts-ids-N", lambda: x(h, gu, dn, ids[:3], w[:3]), ValueError, "topk_ids"),
        ("experts-weights-shape", lambda: x(h, gu, dn, ids, w[:, :1]), ValueError, "topk_weights"),
        ("experts-gu-H", lambda: x(h, gu[:, :, :8], dn, ids, w), ValueError, "gate_up_proj"),
        ("experts-gu-odd", lambda: x(h, gu[:, :23], dn, ids, w), ValueError, "gate_up_proj"),
        ("experts-gu-rank", lambda: x(h, gu[0], dn, ids, w), ValueError, "gate_up_proj"),
        ("experts-dn-I", lambda: x(h, gu, dn[:, :, :6], ids, w), ValueError, "down_proj"),
        ("experts-dn-E", lambda: x(h, gu, dn[:4], ids, w), ValueError, "down_proj"),
        ("experts-dn-dtype", lambda: x(h, gu, dn.bfloat16(), ids, w), TypeError, "down_proj"),
        ("block-E", lambda: m(h, gw[:4], b[:4], gu, dn, 2), ValueError, "gate_up_proj"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input(case):
    _, fn, exc, name = case
    with pytest.raises(exc, match=name):
        fn()


def test_zero_tokens():
    h = torch.randn(0, 16)
    w, ids = lfm_kernels.moe_route(h, torch.randn(8, 16), None, 2)
    assert w.shape == (0, 2) and ids.shape == (0, 2)
    out = lfm_kernels.moe_experts(h, torch.randn(8, 24, 16), torch.randn(8, 16, 12), ids, w)
    assert out.shape == (0, 16)


def test_rel_err_guard():
    # the helper itself: NaN never passes
    assert rel_err(torch.tensor([float("nan")]), torch.tensor([1.0])) == float("inf")
    assert TOL[torch.float32] == 1e-5


def test_benchmark_cases_structure():
    """The benchmark module builds its cases without allocating the 0.7 GB of weights up front."""
    from lfm_kernels.benchmark import moe as bench

    cases = bench.cases("cpu", quick=True)
    names = {(c.name, c.dtype) for c in cases}
    assert len(names) == len(cases) == 6
    decode = next(c for c in cases if c.name.startswith("decode") and c.dtype == torch.bfloat16)
    assert decode.bytes_moved >= 4 * 3 * 2048 * 1792 * 2  # the 4 active experts' weights
    assert "eager" in decode.baselines or pytest.importorskip("transformers") is None


# Decode: at most 2 tokens per expert, so each route streams every row once in the larger decode work
# items (I > 128 units and H > 256 rows: several items per expert, the last one partial).
DECODE_SHAPES = [(300, 260), (75, 36), (2048 + 17, 130)]


@pytest.mark.parametrize("route,impl", [("tiled", "avx2"), ("tiled", "portable"), ("bf16-dot", "avx2")],
                         ids=["tiled-avx2", "tiled-portable", "bf16-dot-avx2"])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("h,i", DECODE_SHAPES, ids=[f"H{h}-I{i}" for h, i in DECODE_SHAPES])
def test_bf16_decode_routes(route, impl, n, h, i):
    _needs_avx512bf16(route, impl)
    e, k = 6, 4
    hidden = torch.randn(n, h).to(torch.bfloat16)
    gate_up, down = _expert_weights(e, h, i, torch.bfloat16)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    weights = torch.rand(n, k) + 0.1
    with _cpu_ctx(impl):
        out = _op(hidden, gate_up, down, ids, weights, FORCED_ROUTES[route])
    assert_close(out, reference.moe_experts(hidden, gate_up, down, ids, weights), torch.bfloat16)
