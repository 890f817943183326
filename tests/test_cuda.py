"""The compiled Triton kernels on a CUDA device at LFM2.5-8B-A1B's real shapes, against the references,
and the wrapper's CUDA-graph decode step against the eager one. Every test here is marked `cuda`
(`pytest -m cuda` or `-k cuda` selects them) and skips, saying so, without a CUDA device.

Outputs start as NaN (the launchers' buffers are poisoned through torch.empty), KV caches hold NaN
past each row's length, inputs are fresh random values, strided where the model passes views.
"""

from __future__ import annotations

import pytest
import torch

from conftest import HAS_CUDA, HAS_TRITON, assert_close, dtype_id, rel_err

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (these are the GPU parity tests; none here)"),
    pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"),
]

H, E, I, TOP_K = 2048, 32, 1792, 4
HQ, HKV, HEAD_D = 32, 8, 64
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled float tensors (and -7-filled integer ones) while the test runs,
    so an element a kernel forgets to write cannot pass."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-7)
        return t

    monkeypatch.setattr(torch, "empty", poisoned)


# ------------------------------------------------------------------------------------------ short conv


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("batch,seqlen", [(1, 1), (64, 1), (1, 512), (64, 512), (3, 4099)])
def test_cuda_short_conv(batch, seqlen, dtype):
    from lfm_kernels import reference
    from lfm_kernels.triton.short_conv import short_conv_triton

    D = H
    wide = torch.randn(batch, seqlen, 3 * D + 64, device="cuda").to(dtype)
    bcx = wide[:, :, 32 : 32 + 3 * D]  # a view, as when bcx comes out of a fused projection
    w = (torch.randn(D, 3, device="cuda") * 0.5).to(dtype)
    state = torch.randn(batch, D, 3, device="cuda").to(dtype)
    ref_state = state.clone()
    out = torch.full((batch, seqlen, D), float("nan"), dtype=dtype, device="cuda")
    short_conv_triton(bcx, w, None, state, None, out=out)
    ref = reference.short_conv(bcx, w, None, ref_state, None)
    assert_close(out, ref, dtype, "y")
    assert torch.equal(state, ref_state), "conv state must match the reference bit for bit"


# ------------------------------------------------------------------------------------------------ MoE


def _router_inputs(n, dtype):
    """Logits exact in any summation order (small integers / 1024), so selections have no near-ties."""
    hidden = (torch.randint(-4, 5, (n, H), device="cuda") / 16).to(dtype)
    hidden[:, 0] = 0.25
    gate = (torch.randint(-8, 9, (E, H), device="cuda") / 64).to(dtype)
    bias = (torch.randint(-8, 9, (E,), device="cuda") / 32).float()
    return hidden, gate, bias


def _experts(dtype):
    gate_up = (torch.randn(E, 2 * I, H, device="cuda") * H**-0.5).to(dtype)
    down = (torch.randn(E, H, I, device="cuda") * I**-0.5).to(dtype)
    return gate_up, down


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", [1, 64, 512])
def test_cuda_moe_route(n, dtype, poisoned_empty):
    from lfm_kernels import reference
    from lfm_kernels.triton.moe import moe_route_triton

    hidden, gate, bias = _router_inputs(n, dtype)
    weights, ids = moe_route_triton(hidden, gate, bias, TOP_K)
    ref_w, ref_ids = reference.moe_route(hidden, gate, bias, TOP_K)
    assert torch.equal(ids, ref_ids)
    assert_close(weights, ref_w.float(), dtype, "topk_weights")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", [1, 16, 64, 512, 777])
def test_cuda_moe_experts_and_combine(n, dtype, poisoned_empty):
    from lfm_kernels import reference
    from lfm_kernels.triton.moe import moe_experts_triton

    hidden = torch.randn(n, H, device="cuda").to(dtype)
    gate_up, down = _experts(dtype)
    scores = torch.rand(n, E, device="cuda")
    weights, ids = scores.topk(TOP_K, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).float()
    out = moe_experts_triton(hidden, gate_up, down, ids, weights)
    ref = reference.moe_experts(hidden, gate_up, down, ids, weights)
    assert_close(out, ref, dtype, "experts + combine")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", [1, 64])
def test_cuda_moe_block(n, dtype):
    import lfm_kernels
    from lfm_kernels import reference

    hidden, gate, bias = _router_inputs(n, dtype)
    gate_up, down = _experts(dtype)
    out = lfm_kernels.moe(hidden, gate, bias, gate_up, down, TOP_K)
    w, ids = reference.moe_route(hidden, gate, bias, TOP_K)
    ref = reference.moe_experts(hidden, gate_up, down, ids, w)
    assert_close(out, ref, dtype, "moe block")


@pytest.mark.parametrize("n", [1, 64])
def test_cuda_moe_block_capturable(n):
    """Router, align, experts and combine run inside a CUDA graph capture (no host sync, fixed
    shapes) and the replay equals the eager call."""
    import lfm_kernels

    hidden, gate, bias = _router_inputs(n, torch.bfloat16)
    gate_up, down = _experts(torch.bfloat16)
    eager = lfm_kernels.moe(hidden, gate, bias, gate_up, down, TOP_K)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = lfm_kernels.moe(hidden, gate, bias, gate_up, down, TOP_K)
    hidden.copy_(hidden.flip(0))  # new tokens in the same buffer: the replay must route them afresh
    g.replay()
    assert_close(out, lfm_kernels.moe(hidden, gate, bias, gate_up, down, TOP_K), torch.bfloat16, "replayed moe")
    assert eager.shape == out.shape


# ----------------------------------------------------------------------------------- decode attention


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("batch,ctx", [(1, 1024), (64, 1024), (1, 32768), (64, 32768), (1, 131072), (64, 131072)])
def test_cuda_decode_attention(batch, ctx, dtype, poisoned_empty):
    from lfm_kernels import reference
    from lfm_kernels.triton.decode_attention import decode_attention_triton

    q = torch.randn(batch, HQ, HEAD_D, device="cuda").to(dtype)
    k = torch.randn(batch, HKV, ctx, HEAD_D, device="cuda", dtype=dtype)
    v = torch.randn(batch, HKV, ctx, HEAD_D, device="cuda", dtype=dtype)
    lens = torch.randint(1, ctx + 1, (batch,), device="cuda")
    lens[0] = ctx  # one full row
    for b, n in enumerate(lens.tolist()):  # positions past a row's length may hold anything
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    out = decode_attention_triton(q, k, v, lens, HEAD_D**-0.5)
    # the reference one row at a time (a [64, 8, 128k, 64] fp32 copy would not be small)
    ref = torch.cat([
        reference.decode_attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], lens[b : b + 1], HEAD_D**-0.5)
        for b, n in enumerate(lens.tolist())
    ])
    assert_close(out, ref, dtype, f"decode attention, lengths {lens.tolist()[:4]}...")


def test_cuda_decode_attention_no_sync_with_opt_out():
    """check_lengths=False issues no device-to-host copy: it runs inside a CUDA graph capture."""
    import lfm_kernels

    q = torch.randn(2, HQ, HEAD_D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, HKV, 256, HEAD_D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lens = torch.tensor([256, 17], device="cuda")
    eager = lfm_kernels.decode_attention(q, k, v, lens, 0.125, check_lengths=False)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = lfm_kernels.decode_attention(q, k, v, lens, 0.125, check_lengths=False)
    g.replay()
    assert torch.equal(out, eager)


# ----------------------------------------------------------------------------------- the CUDA graph


def _clone_state(state):
    from lfm_kernels.model import State

    return State(
        state.batch, state.max_len,
        {i: t.clone() for i, t in state.k_cache.items()},
        {i: t.clone() for i, t in state.v_cache.items()},
        {i: t.clone() for i, t in state.conv_state.items()},
        state.seq_lens.clone(),
    )


@pytest.fixture(scope="module")
def cuda_model():
    from lfm_kernels.model import default_model

    # every kind of layer at the real widths: dense FFN, conv, attention (index 2), MoE
    return default_model(num_layers=6, vocab_size=32768, device="cuda", progress=False)


@pytest.mark.parametrize("batch", [1, 64])
def test_cuda_graph_decode_step_equals_eager(cuda_model, batch):
    from lfm_kernels.model.cuda_graph import DecodeGraph

    model = cuda_model
    lens = torch.randint(3, 40, (batch,))
    lens[0] = 40
    ids = torch.randint(0, 32768, (batch, 40), device="cuda")
    eager_state = model.new_state(batch, 64)
    model.prefill(ids, lens, eager_state)
    graph_state = _clone_state(eager_state)
    runner = DecodeGraph(model, graph_state)
    tok = torch.randint(0, 32768, (batch,), device="cuda")
    for step in range(4):  # several replays: positions, caches and conv states advance inside the graph
        want = model.decode_step(tok, eager_state)
        got = runner(tok).clone()
        assert rel_err(got.float(), want.float()) < 1e-3, f"step {step}: replayed logits differ"
        assert torch.equal(graph_state.seq_lens, eager_state.seq_lens)
        for i in eager_state.conv_state:
            assert rel_err(graph_state.conv_state[i].float(), eager_state.conv_state[i].float()) < 1e-3
        tok = want.argmax(-1)


def test_cuda_graph_recaptures_after_the_state_grows(cuda_model):
    """generate() grows a state by replacing its caches and RoPE tables; a graph still pointing at the
    old ones would write past them. It captures again on the grown state."""
    from lfm_kernels.model.cuda_graph import DecodeGraph
    from lfm_kernels.model.generate import _grow_state

    model = cuda_model
    eager_state = model.new_state(1, 12)
    model.prefill(torch.randint(0, 32768, (1, 8), device="cuda"), torch.tensor([8]), eager_state)
    graph_state = _clone_state(eager_state)
    runner = DecodeGraph(model, graph_state)
    tok = torch.randint(0, 32768, (1,), device="cuda")
    for step in range(8):  # past the first length (12) only after the growth at step 2
        if step == 2:
            _grow_state(model, eager_state, 24)
            _grow_state(model, graph_state, 24)
        want = model.decode_step(tok, eager_state)
        got = runner(tok).clone()
        assert rel_err(got.float(), want.float()) < 1e-3, f"step {step}: replayed logits differ"
        tok = want.argmax(-1)


def test_cuda_decode_step_never_syncs(cuda_model):
    """The wrapper's decode step with check=False asks the device for nothing (sync debug mode makes
    any synchronising call an error)."""
    model = cuda_model
    state = model.new_state(2, 16)
    model.prefill(torch.randint(0, 32768, (2, 5), device="cuda"), torch.tensor([5, 3]), state)
    tok = torch.randint(0, 32768, (2,), device="cuda")
    model.decode_step(tok, state, check=False)  # first call: Triton compiles (host work, may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.decode_step(tok, state, check=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_generate_with_and_without_graph(cuda_model):
    ids = torch.randint(0, 32768, (3, 12))
    a = cuda_model.generate(ids, 8, temperature=0, repetition_penalty=1.0, eos_token_id=[], cuda_graph=True)
    b = cuda_model.generate(ids, 8, temperature=0, repetition_penalty=1.0, eos_token_id=[], cuda_graph=False)
    assert torch.equal(a, b)
