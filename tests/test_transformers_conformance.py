"""A patched transformers LFM2 / LFM2-MoE model behaves as transformers' own tests expect.

Each test here is a failure mode found by running transformers' LFM2 model tests with the patch
active (tools/transformers_suite.py), reduced to a tiny random model built in the test (no download):
  * an attention implementation the user asked for (argument, config setting, from_pretrained) is
    honoured; only the default is replaced, and switching after loading works as in transformers;
  * a patched model compiles with fullgraph=True and exports with torch.export wherever the unpatched
    one does (no data-dependent Python control flow on tensor values in the patched path).
head_dim is 64 so the decode-attention kernel is on the path (at transformers' tester default of 16
it never runs).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lfm_kernels  # noqa: E402
from lfm_kernels.integrations import transformers as integ  # noqa: E402

from conftest import TOL, rel_err  # noqa: E402

from transformers import Lfm2Config, Lfm2ForCausalLM, Lfm2MoeConfig, Lfm2MoeForCausalLM  # noqa: E402

VOCAB = 97
KINDS = ["moe", "dense"]



def make_config(kind: str):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=128,  # 2 heads of 64: the decode-attention kernel's head size
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        layer_types=["full_attention", "conv", "full_attention"],
        max_position_embeddings=256,
        initializer_range=0.1,
        pad_token_id=0,
    )
    if kind == "moe":
        return Lfm2MoeConfig(moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2, num_dense_layers=1, **common)
    return Lfm2Config(**common)


def model_class(kind: str):
    return Lfm2MoeForCausalLM if kind == "moe" else Lfm2ForCausalLM


def n_attention_layers(config) -> int:
    return sum(t == "full_attention" for t in config.layer_types)


def inputs(batch: int = 3, seqlen: int = 9):
    ids = torch.randint(3, VOCAB, (batch, seqlen))
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    mask[1, :3] = 0  # one left-padded row: the mask is a real tensor on every path
    return ids, mask


@pytest.fixture(autouse=True)
def _always_unpatch():
    lfm_kernels.unpatch()
    yield
    lfm_kernels.unpatch()


# --------------------------------------------------------------------------------------------------
# Attention implementation requests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_default_attention_is_replaced(kind):
    """Without a request, a model built after patch() runs our attention entry (decode on the kernel),
    under transformers' own name for the default."""
    lfm_kernels.patch()
    model = model_class(kind)(make_config(kind))
    assert model.config._attn_implementation == "sdpa"
    assert integ.attention_implementation(model) == integ.IMPL_NAME


@pytest.mark.parametrize("requested", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_attn_implementation_argument_is_honoured(kind, requested):
    lfm_kernels.patch()
    model = model_class(kind)._from_config(make_config(kind), attn_implementation=requested)
    assert model.config._attn_implementation == requested


@pytest.mark.parametrize("kind", KINDS)
def test_attn_implementation_set_on_config_is_honoured(kind):
    config = make_config(kind)
    config._attn_implementation = "eager"
    lfm_kernels.patch()
    model = model_class(kind)(config)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("requested", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_from_pretrained_attn_implementation_is_honoured(kind, requested, tmp_path):
    model_class(kind)(make_config(kind)).save_pretrained(tmp_path)
    lfm_kernels.patch()
    loaded = model_class(kind).from_pretrained(tmp_path, attn_implementation=requested)
    assert loaded.config._attn_implementation == requested


@pytest.mark.parametrize("kind", KINDS)
def test_output_attentions_from_config_with_eager(kind):
    """config.output_attentions=True on an eager config gives transformers' attention maps while patched."""
    config = make_config(kind)
    config._attn_implementation = "eager"
    config.output_attentions = True
    ids, mask = inputs()
    ref_model = model_class(kind)(config).eval()
    with torch.no_grad():
        ref = ref_model(ids, attention_mask=mask).attentions
    lfm_kernels.patch()
    model = model_class(kind)(config).eval()
    model.load_state_dict(ref_model.state_dict())
    with torch.no_grad():
        got = model(ids, attention_mask=mask).attentions
    assert got is not None and len(got) == len(ref) == n_attention_layers(config)
    for a, b in zip(got, ref):
        assert a.shape == b.shape == (ids.shape[0], config.num_attention_heads, ids.shape[1], ids.shape[1])
        assert rel_err(a, b) < TOL[torch.float32]


@pytest.mark.parametrize("kind", KINDS)
def test_switching_attention_after_loading(kind):
    """set_attn_implementation() on a patched model switches as in transformers, and back."""
    lfm_kernels.patch()
    model = model_class(kind)(make_config(kind)).eval()
    ids, mask = inputs()
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
    assert out.attentions is not None and len(out.attentions) == n_attention_layers(model.config)
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"


# --------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) and torch.export
# --------------------------------------------------------------------------------------------------


def _moe_op_inputs(n=5, hidden=32, inter=16, experts=6, k=2):
    h = torch.randn(n, hidden)
    gate_up = torch.randn(experts, 2 * inter, hidden) * 0.1
    down = torch.randn(experts, hidden, inter) * 0.1
    ids = torch.stack([torch.randperm(experts)[:k] for _ in range(n)])
    weights = torch.rand(n, k)
    return h, gate_up, down, ids, weights


def test_moe_experts_compiles_fullgraph():
    args = _moe_op_inputs()
    ref = lfm_kernels.moe_experts(*args)
    torch._dynamo.reset()
    out = torch.compile(lfm_kernels.moe_experts, fullgraph=True, backend="eager")(*args)
    assert rel_err(out, ref) < TOL[torch.float32]


def test_moe_compiles_fullgraph():
    h, gate_up, down, _, _ = _moe_op_inputs()
    gate = torch.randn(gate_up.shape[0], h.shape[1])
    bias = torch.randn(gate_up.shape[0]) * 0.05
    ref = lfm_kernels.moe(h, gate, bias, gate_up, down, 2)
    torch._dynamo.reset()
    out = torch.compile(lfm_kernels.moe, fullgraph=True, backend="eager")(h, gate, bias, gate_up, down, 2)
    assert rel_err(out, ref) < TOL[torch.float32]


def _patched_and_reference(kind):
    ref_model = model_class(kind)(make_config(kind)).eval()
    lfm_kernels.patch()
    model = model_class(kind)(make_config(kind)).eval()
    model.load_state_dict(ref_model.state_dict())
    with torch.no_grad():
        for (_, a), (_, b) in zip(ref_model.named_buffers(), model.named_buffers()):
            b.copy_(a)
    return model, ref_model


def test_moe_model_prefill_compiles_fullgraph():
    model, ref_model = _patched_and_reference("moe")
    ids, mask = inputs()
    torch._dynamo.reset()
    with torch.no_grad():
        ref = ref_model(ids, attention_mask=mask, use_cache=False).logits
        out = torch.compile(model.forward, fullgraph=True, backend="eager")(ids, attention_mask=mask, use_cache=False)
    assert rel_err(out.logits, ref) < TOL[torch.float32]


def test_dense_model_padded_decode_step_compiles_fullgraph():
    """A one-token decode step with a padding mask (what generate() compiles) on the decode kernel."""
    model, ref_model = _patched_and_reference("dense")
    ids, mask = inputs()
    step_mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
    nxt = torch.randint(3, VOCAB, (ids.shape[0], 1))
    with torch.no_grad():
        ref_cache = ref_model(ids, attention_mask=mask, use_cache=True).past_key_values
        ref = ref_model(nxt, attention_mask=step_mask, past_key_values=ref_cache, use_cache=True).logits
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        torch._dynamo.reset()
        step = torch.compile(model.forward, fullgraph=True, backend="eager")
        out = step(nxt, attention_mask=step_mask, past_key_values=cache, use_cache=True).logits
    assert rel_err(out, ref) < TOL[torch.float32]




@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_model_exports_where_unpatched_does(kind):
    """torch.export of a model built after patch() succeeds where the unpatched model's does, same logits."""
    ids, mask = inputs()
    kwargs = {"attention_mask": mask, "use_cache": False}
    ref_model = model_class(kind)(make_config(kind)).eval()
    try:
        torch.export.export(ref_model, (ids,), kwargs=kwargs, strict=False)
    except Exception as exc:  # noqa: BLE001 - the baseline itself must export, or this test proves nothing
        pytest.fail(f"the unpatched model does not export: {type(exc).__name__}: {exc}")
    with torch.no_grad():
        ref = ref_model(ids, **kwargs).logits
    lfm_kernels.patch()
    model = model_class(kind)(make_config(kind)).eval()
    model.load_state_dict(ref_model.state_dict())
    with torch.no_grad():
        for (_, a), (_, b) in zip(ref_model.named_buffers(), model.named_buffers()):
            b.copy_(a)
    exported = torch.export.export(model, (ids,), kwargs=kwargs, strict=False)
    out = exported.module()(ids, **kwargs).logits
    assert rel_err(out, ref) < TOL[torch.float32]
