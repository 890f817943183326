"""The references compute what transformers' LFM2-MoE modules compute (the oracle must itself be right)."""

import pytest
import torch

from lfm_kernels import reference
from conftest import assert_close, dtype_id

transformers = pytest.importorskip("transformers")
from transformers import Lfm2MoeConfig  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.models.lfm2_moe import modeling_lfm2_moe as hf  # noqa: E402


def _config(**kw):
    base = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, num_dense_layers=0,
        layer_types=["conv", "full_attention"],
    )
    base.update(kw)
    return Lfm2MoeConfig(**base)


def _randomize(module, scale=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return module


def _conv_via_reference(conv, hidden, conv_state=None, mask=None):
    bcx = conv.in_proj(hidden if mask is None else hidden * mask[:, :, None].to(hidden.dtype))
    y = reference.short_conv(bcx, conv.conv.weight.squeeze(1), conv.conv.bias, conv_state, mask)
    return conv.out_proj(y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("seqlen", [1, 2, 7])
def test_short_conv_no_cache(seqlen, dtype):
    conv = _randomize(hf.Lfm2MoeShortConv(_config(), 0)).to(dtype)
    hidden = torch.randn(3, seqlen, 64, dtype=dtype)
    with torch.no_grad():
        assert_close(_conv_via_reference(conv, hidden), conv(hidden), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_short_conv_with_cache(dtype):
    """Prefill that fills the cache, a chunked continuation, then one-token decode steps; states equal too."""
    cfg = _config()
    conv = _randomize(hf.Lfm2MoeShortConv(cfg, 0)).to(dtype)
    cache = DynamicCache(config=cfg)
    state = torch.zeros(2, 64, cfg.conv_L_cache, dtype=dtype)
    with torch.no_grad():
        for seqlen in (5, 2, 1, 1, 1):
            hidden = torch.randn(2, seqlen, 64, dtype=dtype)
            ours = _conv_via_reference(conv, hidden, state)
            theirs = conv(hidden, cache=cache)
            assert_close(ours, theirs, dtype, what=f"T={seqlen}")
            assert torch.equal(state, cache.get_conv_state(0, state_idx=0)), f"conv state after T={seqlen}"


def test_short_conv_padding_mask():
    """Left-padded batch: transformers zeroes padded positions before in_proj; the reference's mask does the same."""
    conv = _randomize(hf.Lfm2MoeShortConv(_config(), 0))
    hidden = torch.randn(2, 6, 64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        assert_close(_conv_via_reference(conv, hidden, None, mask), conv(hidden, attention_mask=mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("n_tokens", [1, 9, 64])
def test_moe_block(n_tokens, dtype):
    """Router with an expert_bias that changes the selection, then the experts: equals Lfm2MoeSparseMoeBlock."""
    cfg = _config()
    block = _randomize(hf.Lfm2MoeSparseMoeBlock(cfg), scale=0.2).to(dtype)
    block.expert_bias.data = block.expert_bias.data.float()  # transformers creates it float32; .to() cast it
    hidden = torch.randn(1, n_tokens, 64, dtype=dtype)
    sig = torch.sigmoid(hidden.float().view(-1, 64) @ block.gate.weight.float().t())
    unbiased = sig.topk(2, dim=-1).indices
    with torch.no_grad():
        block.expert_bias.copy_(torch.linspace(-0.5, 0.5, cfg.num_experts))
        biased = (sig + block.expert_bias).topk(2, dim=-1).indices
        assert not torch.equal(unbiased, biased), "the bias must change the selection for this test to mean anything"
        theirs = block(hidden)
        weights, ids = reference.moe_route(hidden.view(-1, 64), block.gate.weight, block.expert_bias, 2)
        ours = reference.moe_experts(hidden.view(-1, 64), block.experts.gate_up_proj, block.experts.down_proj, ids, weights)
        _, their_weights, their_ids = block.gate(hidden.view(-1, 64), block.expert_bias)
    assert torch.equal(ids, their_ids), "the reference must select transformers' experts, bf16 included"
    assert_close(ours.view_as(theirs), theirs, dtype)
    assert_close(weights, their_weights.float(), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("n_q,n_kv", [(8, 2), (4, 4)])
def test_decode_attention(n_q, n_kv, dtype):
    """One query token against caches of different valid lengths: equals eager attention with repeat_kv + 4D mask."""
    batch, seqlen, head_dim = 3, 37, 32
    lengths = torch.tensor([37, 1, 20])
    q = torch.randn(batch, n_q, head_dim, dtype=dtype)
    k = torch.randn(batch, n_kv, seqlen, head_dim, dtype=dtype)
    v = torch.randn(batch, n_kv, seqlen, head_dim, dtype=dtype)
    mask = torch.full((batch, 1, 1, seqlen), float("-inf"))
    for b, n in enumerate(lengths.tolist()):
        mask[b, ..., :n] = 0
    module = torch.nn.Module()
    module.num_key_value_groups = n_q // n_kv
    module.training = False
    scale = head_dim**-0.5
    theirs, _ = hf.eager_attention_forward(module, q[:, :, None], k, v, mask.to(dtype), scaling=scale)
    ours = reference.decode_attention(q, k, v, lengths, scale)
    assert_close(ours, theirs[:, 0], dtype)
