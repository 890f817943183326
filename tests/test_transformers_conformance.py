"""A patched transformers LFM2 / LFM2-MoE model behaves as transformers' own tests expect.

Each test here is a failure mode found by running transformers' LFM2 model tests with the patch
active (tools/transformers_suite.py), reduced to a tiny random model built in the test (no download):
  * an attention implementation the user asked for (argument, config setting, from_pretrained) is
    honoured; only the default is replaced, and switching after loading works as in transformers;
  * the default keeps transformers' name, `config._attn_implementation == "sdpa"` (transformers'
    tests assert it), while running our kernel; an explicit "sdpa" runs torch's SDPA, never ours;
  * a patched model compiles with fullgraph=True and exports with torch.export wherever the unpatched
    one does (no data-dependent Python control flow on tensor values in the patched path).
head_dim is 64 so the decode-attention kernel is on the path (at transformers' tester default of 16
it never runs).
"""

from __future__ import annotations

import collections
import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lfm_kernels  # noqa: E402
from lfm_kernels.integrations import transformers as integ  # noqa: E402

from conftest import TOL, rel_err  # noqa: E402

from transformers import (  # noqa: E402
    DynamicCache,
    Lfm2Config,
    Lfm2ForCausalLM,
    Lfm2MoeConfig,
    Lfm2MoeForCausalLM,
)
from transformers.modeling_utils import AttentionInterface  # noqa: E402
from transformers.models.lfm2 import modeling_lfm2  # noqa: E402
from transformers.models.lfm2_moe import modeling_lfm2_moe  # noqa: E402

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
# The default keeps transformers' name "sdpa" and runs our kernel; an explicit "sdpa" is torch's SDPA
# --------------------------------------------------------------------------------------------------

DECODE_STEPS = 3


@pytest.fixture
def ran(monkeypatch):
    """Counts, per attention call, what ran: our decode kernel ("ours"), and transformers' global "sdpa"
    entry on one-token decode steps ("sdpa_decode") and on longer inputs ("sdpa_prefill"). An explicit
    "sdpa" and our entry's prefill fallback both reach that global entry."""
    counts = collections.Counter()
    ours = lfm_kernels.decode_attention
    sdpa = AttentionInterface._global_mapping["sdpa"]

    def counted_ours(*args, **kwargs):
        counts["ours"] += 1
        return ours(*args, **kwargs)

    def counted_sdpa(module, query, *args, **kwargs):
        counts["sdpa_decode" if query.shape[2] == 1 else "sdpa_prefill"] += 1
        return sdpa(module, query, *args, **kwargs)

    monkeypatch.setattr(lfm_kernels, "decode_attention", counted_ours)
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", counted_sdpa)
    return counts


def decode_logits(model, ids, mask, steps):
    """A padded prefill, then one-token decode steps feeding `steps` [B, n]: the decode steps' logits."""
    cache = DynamicCache(config=model.config)
    logits = []
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache, use_cache=True)
        for i in range(steps.shape[1]):
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
            logits.append(model(steps[:, i : i + 1], attention_mask=mask, cache=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1)


def reference_run(kind, tmp_path=None):
    """An unpatched model (saved to tmp_path if given) and its decode logits, computed before any patch."""
    assert not integ.is_patched()
    model = model_class(kind)(make_config(kind)).eval()
    ids, mask = inputs()
    steps = torch.randint(3, VOCAB, (ids.shape[0], DECODE_STEPS))
    ref = decode_logits(model, ids, mask, steps)
    if tmp_path is not None:
        model.save_pretrained(tmp_path)
    return model, (ids, mask, steps), ref


def load_weights(model, ref_model):
    model.load_state_dict(ref_model.state_dict())
    with torch.no_grad():
        for (_, a), (_, b) in zip(ref_model.named_buffers(), model.named_buffers()):
            b.copy_(a)
    return model.eval()


def check_runs(model, data, ref, ran, expect):
    """The model's decode logits match the reference, and its decode steps ran `expect` ("ours" / "sdpa")."""
    ran.clear()
    out = decode_logits(model, *data)
    assert rel_err(out, ref) < TOL[torch.float32]
    decode_calls = DECODE_STEPS * n_attention_layers(model.config)
    if expect == "ours":
        assert ran["ours"] == decode_calls and ran["sdpa_decode"] == 0, dict(ran)
        assert ran["sdpa_prefill"] == n_attention_layers(model.config), dict(ran)  # prefill stays on SDPA
    else:
        assert ran["ours"] == 0 and ran["sdpa_decode"] == decode_calls, dict(ran)


@pytest.mark.parametrize("kind", KINDS)
def test_default_reports_sdpa_and_runs_our_kernel(kind, ran):
    ref_model, data, ref = reference_run(kind)
    lfm_kernels.patch()
    model = load_weights(model_class(kind)(make_config(kind)), ref_model)
    assert model.config._attn_implementation == "sdpa"
    assert integ.attention_implementation(model) == integ.IMPL_NAME
    check_runs(model, data, ref, ran, "ours")
    # patch(model) on a model built before the patch: its "sdpa" counts as the default too
    lfm_kernels.unpatch()
    model = load_weights(model_class(kind)(make_config(kind)), ref_model)
    assert lfm_kernels.patch(model).config._attn_implementation == "sdpa"
    assert integ.attention_implementation(model) == integ.IMPL_NAME
    check_runs(model, data, ref, ran, "ours")


@pytest.mark.parametrize("kind", KINDS)
def test_from_pretrained_default_is_sdpa_as_transformers_tests_expect(kind, tmp_path, ran):
    """What transformers' test_sdpa_can_dispatch_non_composite_models does, plus proof of what runs."""
    ref_model, data, ref = reference_run(kind, tmp_path / "unpatched")
    lfm_kernels.patch()
    model = model_class(kind)(make_config(kind))
    model.save_pretrained(tmp_path / "patched")
    saved = json.loads((tmp_path / "patched" / "config.json").read_text())
    assert saved == json.loads((tmp_path / "unpatched" / "config.json").read_text())
    assert integ.IMPL_NAME not in json.dumps(saved)
    default = model_class(kind).from_pretrained(tmp_path / "unpatched").eval()
    assert default.config._attn_implementation == "sdpa"
    assert integ.attention_implementation(default) == integ.IMPL_NAME
    check_runs(default, data, ref, ran, "ours")
    eager = model_class(kind).from_pretrained(tmp_path / "unpatched", attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager" == integ.attention_implementation(eager)
    for name, module in eager.named_modules():
        assert getattr(getattr(module, "config", None), "_attn_implementation", "eager") == "eager", name


EXPLICIT_SDPA = ["from_pretrained", "from_config", "config", "set_after_loading", "set_after_patch_model"]


@pytest.mark.parametrize("how", EXPLICIT_SDPA)
@pytest.mark.parametrize("kind", KINDS)
def test_explicit_sdpa_runs_torch_sdpa(kind, how, tmp_path, ran):
    ref_model, data, ref = reference_run(kind, tmp_path)
    if how != "set_after_patch_model":
        lfm_kernels.patch()
    if how == "from_pretrained":
        model = model_class(kind).from_pretrained(tmp_path, attn_implementation="sdpa")
    elif how == "from_config":
        model = model_class(kind)._from_config(make_config(kind), attn_implementation="sdpa")
    elif how == "config":
        config = make_config(kind)
        config._attn_implementation = "sdpa"
        model = model_class(kind)(config)
    elif how == "set_after_loading":
        model = model_class(kind).from_pretrained(tmp_path)
        assert integ.attention_implementation(model) == integ.IMPL_NAME
        model.set_attn_implementation("sdpa")
    else:
        model = lfm_kernels.patch(model_class(kind).from_pretrained(tmp_path))
        assert integ.attention_implementation(model) == integ.IMPL_NAME
        model.set_attn_implementation("sdpa")
        lfm_kernels.patch(model)  # patching again keeps what was asked for
    model = load_weights(model, ref_model)
    assert model.config._attn_implementation == "sdpa" == integ.attention_implementation(model)
    check_runs(model, data, ref, ran, "sdpa")
    # a deep copy of the config keeps the request: a model built from it is on torch's SDPA as well
    twin = load_weights(model_class(kind)(copy.deepcopy(model.config)), ref_model)
    assert integ.attention_implementation(twin) == "sdpa"
    check_runs(twin, data, ref, ran, "sdpa")


@pytest.mark.parametrize("kind", KINDS)
def test_set_attn_implementation_switches_both_ways(kind, tmp_path, ran):
    """From the default to each implementation by name and back, and from an explicit "sdpa" to ours."""
    ref_model, data, ref = reference_run(kind, tmp_path)
    ids, mask, _ = data
    with torch.no_grad():
        ref_model.set_attn_implementation("eager")
        ref_attentions = ref_model(ids, attention_mask=mask, output_attentions=True).attentions
    lfm_kernels.patch()
    model = model_class(kind).from_pretrained(tmp_path).eval()
    check_runs(model, data, ref, ran, "ours")
    for name, expect in (("sdpa", "sdpa"), (integ.IMPL_NAME, "ours"), ("eager", None), ("sdpa", "sdpa")):
        model.set_attn_implementation(name)
        assert model.config._attn_implementation == name
        assert integ.attention_implementation(model) == name
        if expect is None:  # eager: transformers' attention maps come back, equal to the unpatched ones
            with torch.no_grad():
                attentions = model(ids, attention_mask=mask, output_attentions=True).attentions
            assert attentions is not None and len(attentions) == len(ref_attentions) == n_attention_layers(model.config)
            for a, b in zip(attentions, ref_attentions):
                assert rel_err(a, b) < TOL[torch.float32]
        else:
            check_runs(model, data, ref, ran, expect)
    explicit = model_class(kind).from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    check_runs(explicit, data, ref, ran, "sdpa")
    explicit.set_attn_implementation(integ.IMPL_NAME)
    assert explicit.config._attn_implementation == integ.IMPL_NAME == integ.attention_implementation(explicit)
    check_runs(explicit, data, ref, ran, "ours")


@pytest.mark.parametrize("kind", KINDS)
def test_default_survives_copies_and_leaves_configs_alone(kind, ran):
    ref_model, data, ref = reference_run(kind)
    lfm_kernels.patch()
    model = load_weights(model_class(kind)(make_config(kind)), ref_model)
    # nothing of ours on the config: its dict, serialization and equality are transformers' own
    assert not any("lfm" in str(key) for key in vars(model.config))
    assert model.config.to_dict() == ref_model.config.to_dict()
    for twin in (copy.deepcopy(model), load_weights(model_class(kind)(copy.deepcopy(model.config)), ref_model)):
        assert twin.config._attn_implementation == "sdpa"
        assert integ.attention_implementation(twin) == integ.IMPL_NAME
        check_runs(twin, data, ref, ran, "ours")
    copied = copy.deepcopy(model)
    lfm_kernels.unpatch()
    for m in (model, copied):
        assert m.config._attn_implementation == "sdpa" == integ.attention_implementation(m)
        check_runs(m, data, ref, ran, "sdpa")


def test_unpatch_restores_transformers_attention_lookup(ran):
    before = {
        "dense": modeling_lfm2.ALL_ATTENTION_FUNCTIONS,
        "moe": modeling_lfm2_moe.ALL_ATTENTION_FUNCTIONS,
        "sdpa": AttentionInterface._global_mapping["sdpa"],
    }
    ref_model, data, ref = reference_run("moe")
    lfm_kernels.patch()
    # only the LFM2 modules' own lookup changes; transformers' global "sdpa" is the one every other model uses
    assert AttentionInterface._global_mapping["sdpa"] is before["sdpa"]
    assert modeling_lfm2.ALL_ATTENTION_FUNCTIONS is not before["dense"]
    model = load_weights(model_class("moe")(make_config("moe")), ref_model)
    check_runs(model, data, ref, ran, "ours")
    lfm_kernels.unpatch()
    assert modeling_lfm2.ALL_ATTENTION_FUNCTIONS is before["dense"]
    assert modeling_lfm2_moe.ALL_ATTENTION_FUNCTIONS is before["moe"]
    assert AttentionInterface._global_mapping["sdpa"] is before["sdpa"]
    for cls in (modeling_lfm2.Lfm2PreTrainedModel, modeling_lfm2_moe.Lfm2MoePreTrainedModel):
        assert "set_attn_implementation" not in cls.__dict__
    assert model.config._attn_implementation == "sdpa" == integ.attention_implementation(model)
    check_runs(model, data, ref, ran, "sdpa")
    with torch.no_grad():
        assert torch.equal(decode_logits(model, *data), decode_logits(ref_model, *data))


def test_attention_implementation_reports_what_runs():
    """A head size the decode kernel does not take falls back, and is reported as the fallback."""
    lfm_kernels.patch()
    config = make_config("dense")
    config.hidden_size = 32  # head_dim 16
    small = model_class("dense")(config)
    assert integ.attention_implementation(small) == "sdpa"
    small.set_attn_implementation(integ.IMPL_NAME)
    assert small.config._attn_implementation == integ.IMPL_NAME
    assert integ.attention_implementation(small) == "sdpa"
    with pytest.raises(TypeError, match="model"):
        integ.attention_implementation(torch.nn.Linear(2, 2))


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
