"""lfm_kernels.patch() / unpatch() on transformers' LFM2-MoE and dense LFM2 models (small, random, fp32)."""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

import lfm_kernels  # noqa: E402
from lfm_kernels.integrations import transformers as integ  # noqa: E402

from conftest import HAS_TRITON, TOL, rel_err  # noqa: E402

from transformers import (  # noqa: E402
    DynamicCache,
    Lfm2Config,
    Lfm2ForCausalLM,
    Lfm2MoeConfig,
    Lfm2MoeForCausalLM,
)
from transformers.integrations.moe import ExpertsInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402
from transformers.modeling_utils import AttentionInterface  # noqa: E402
from transformers.models.lfm2 import modeling_lfm2  # noqa: E402
from transformers.models.lfm2_moe import modeling_lfm2_moe  # noqa: E402

VOCAB = 211
LAYERS = ["conv", "full_attention", "conv", "full_attention"]
KINDS = ["moe", "dense"]
OPS = ("short_conv", "moe_route", "moe_experts", "decode_attention", "linear")


def make_config(kind: str, dtype=torch.float32):
    # head_dim 64 (128 / 2 heads) so decode attention takes the kernel; GQA group 2; initializer_range 0.1
    # gives random models whose greedy continuations vary (0.02 collapses onto one token).
    common = dict(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=160,
        num_hidden_layers=len(LAYERS),
        num_attention_heads=2,
        num_key_value_heads=1,
        layer_types=LAYERS,
        max_position_embeddings=512,
        initializer_range=0.1,
        pad_token_id=0,
    )
    if kind == "moe":
        return Lfm2MoeConfig(
            moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2, num_dense_layers=1, **common
        )
    return Lfm2Config(**common)


def make_model(kind: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    cls = Lfm2MoeForCausalLM if kind == "moe" else Lfm2ForCausalLM
    model = cls(make_config(kind)).to(dtype).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):  # zeros after init: make selection depend on it
                buf.copy_(torch.randn_like(buf) * 0.05)
    return model


def clone_model(model):
    twin = type(model)(model.config.__class__.from_dict(model.config.to_dict())).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        for (_, a), (_, b) in zip(model.named_buffers(), twin.named_buffers()):
            b.copy_(a)
    return twin.to(next(model.parameters()).dtype)


def prompt(n: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n))


def greedy(model, ids, n=32, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


@pytest.fixture(autouse=True)
def _always_unpatch():
    lfm_kernels.unpatch()
    yield
    lfm_kernels.unpatch()


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that reach each public lfm_kernels op (the patch looks them up per call)."""
    counts = collections.Counter()
    for name in OPS:
        fn = getattr(lfm_kernels, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            counts[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(lfm_kernels, name, counted)
    return counts


def expected_ops(kind):
    return ("short_conv", "decode_attention", "linear") + (("moe_route", "moe_experts") if kind == "moe" else ())


def originals():
    """Every function / mapping entry patch() may touch, by identity."""
    return {
        "moe_conv": modeling_lfm2_moe.Lfm2MoeShortConv.__dict__["forward"],
        "moe_router": modeling_lfm2_moe.Lfm2MoeTopKRouter.__dict__["forward"],
        "moe_experts": modeling_lfm2_moe.Lfm2MoeExperts.__dict__["forward"],
        "dense_conv": modeling_lfm2.Lfm2ShortConv.__dict__["forward"],
        "moe_post_init": modeling_lfm2_moe.Lfm2MoePreTrainedModel.__dict__.get("post_init"),
        "dense_post_init": modeling_lfm2.Lfm2PreTrainedModel.__dict__.get("post_init"),
        "moe_set_attn": modeling_lfm2_moe.Lfm2MoePreTrainedModel.__dict__.get("set_attn_implementation"),
        "dense_set_attn": modeling_lfm2.Lfm2PreTrainedModel.__dict__.get("set_attn_implementation"),
        "moe_attention_lookup": modeling_lfm2_moe.ALL_ATTENTION_FUNCTIONS,
        "dense_attention_lookup": modeling_lfm2.ALL_ATTENTION_FUNCTIONS,
        "attention": dict(AttentionInterface._global_mapping),
        "masks": dict(AttentionMaskInterface._global_mapping),
        "experts": dict(ExpertsInterface._global_mapping),
        "linear_forward": nn.Linear.__dict__["forward"],
    }


def assert_same_originals(before, after):
    for key, value in before.items():
        if isinstance(value, dict):
            assert value.keys() == after[key].keys(), f"{key}: entries {set(after[key]) ^ set(value)} differ"
            for k in value:
                assert after[key][k] is value[k], f"{key}[{k}] is not the original"
        else:
            assert after[key] is value, f"{key} is not the original function"


# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_and_kernels_run(kind, calls):
    model = make_model(kind)
    ids = prompt(13)
    with torch.no_grad():
        ref = model(ids).logits
    assert lfm_kernels.patch(model) is model
    assert model.config._attn_implementation == "sdpa"  # the default keeps its name ...
    assert integ.attention_implementation(model) == integ.IMPL_NAME  # ... and runs ours
    with torch.no_grad():
        out = model(ids).logits
    assert rel_err(out, ref) < TOL[torch.float32]
    assert calls["short_conv"] > 0 and calls["linear"] > 0
    if kind == "moe":
        assert model.config._experts_implementation == integ.IMPL_NAME
        assert calls["moe_route"] > 0 and calls["moe_experts"] > 0


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_identical(kind, calls):
    model = make_model(kind)
    ids = prompt(11)
    ref = greedy(model, ids)
    assert len(set(ref[0, 11:].tolist())) > 8, "degenerate random model: the test would prove little"
    lfm_kernels.patch(model)
    out = greedy(model, ids)
    assert torch.equal(out, ref)
    for op in expected_ops(kind):
        assert calls[op] > 0, f"{op} never ran"


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_identical_static_cache(kind, calls):
    """StaticCache: the KV cache is max-length and the decode mask marks the filled prefix."""
    model = make_model(kind)
    ids = prompt(9)
    ref = greedy(model, ids, n=12, cache_implementation="static")
    lfm_kernels.patch(model)
    assert torch.equal(greedy(model, ids, n=12, cache_implementation="static"), ref)
    assert calls["decode_attention"] > 0 and calls["short_conv"] > 0


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_and_decode_states_match(kind, calls):
    """Prefill (fresh cache), a multi-token continuation, then one-token steps: logits and conv states."""
    model = make_model(kind)
    twin = clone_model(model)
    lfm_kernels.patch(model)
    ids = prompt(12)
    chunks = [ids[:, :2], ids[:, 2:9], ids[:, 9:10], ids[:, 10:11], ids[:, 11:12]]  # T=2 < L first
    caches = [DynamicCache(config=m.config) for m in (model, twin)]
    with torch.no_grad():
        for chunk in chunks:
            out = model(chunk, cache=caches[0], use_cache=True).logits
            ref = twin(chunk, cache=caches[1], use_cache=True).logits
            assert rel_err(out, ref) < TOL[torch.float32]
            for idx, layer_type in enumerate(LAYERS):
                if layer_type == "conv":
                    a, b = caches[0].layers[idx].conv_states[0], caches[1].layers[idx].conv_states[0]
                    # B*x comes from in_proj, which lfm_kernels.linear computes with its own summation
                    # order (and deeper layers see the rounding of the layers below): close, not bit-equal.
                    # test_short_conv_module_matches_transformers_exactly checks the bits on equal inputs.
                    assert rel_err(a, b) < TOL[torch.float32], f"layer {idx}: conv state differs"
    assert calls["short_conv"] == 2 * len(chunks)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("padded", [False, True], ids=["nomask", "leftpad"])
def test_short_conv_module_matches_transformers_exactly(kind, padded, calls):
    """One conv module, same inputs through both paths: first prefill (T < L and T >= L), continuation, decode."""
    model = make_model(kind)
    conv = model.model.layers[0].conv
    lfm_kernels.patch(model)
    original = type(conv).forward  # class not patched: patch(model) patched the instance
    batch, dim = 2, conv.in_proj.in_features
    for first in (2, 5):
        caches = [DynamicCache(config=model.config) for _ in range(2)]
        for step, seqlen in enumerate((first, 4, 1, 1)):
            hidden = torch.randn(batch, seqlen, dim)
            mask = None
            if padded and step == 0:
                mask = torch.ones(batch, seqlen, dtype=torch.long)
                mask[0, : seqlen - 1] = 0  # row 0 is left-padded down to one real token
            with torch.no_grad():
                out = conv(hidden, cache=caches[0], attention_mask=mask)
                ref = original(conv, hidden, cache=caches[1], attention_mask=mask)
            assert rel_err(out, ref) < TOL[torch.float32]
            a, b = caches[0].layers[0].conv_states[0], caches[1].layers[0].conv_states[0]
            assert a.shape == b.shape == (batch, dim, conv.conv.weight.shape[-1])
            assert torch.equal(a, b), f"first={first} step={step}: conv state differs from transformers'"
            assert caches[0].has_previous_state(0) and caches[1].has_previous_state(0)
    assert calls["short_conv"] == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_short_conv_follows_its_weight(dtype, calls):
    """The patched conv reads the module's weight at every call: changed in place or replaced, the
    outputs still equal transformers'."""
    model = make_model("moe", dtype=dtype)
    conv = model.model.layers[0].conv
    lfm_kernels.patch(model)
    original = type(conv).forward
    hidden = torch.randn(1, 3, conv.in_proj.in_features).to(dtype)

    def check():
        with torch.no_grad():
            out, ref = conv(hidden), original(conv, hidden)
        assert rel_err(out, ref) < TOL[dtype]
        return out

    before = check()
    with torch.no_grad():
        conv.conv.weight.mul_(-2)  # in place
    assert not torch.equal(check(), before)
    conv.conv.weight = nn.Parameter(torch.randn_like(conv.conv.weight), requires_grad=False)
    check()
    assert calls["short_conv"] == 3


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch_matches_each_prompt_alone(kind, calls):
    model = make_model(kind)
    lfm_kernels.patch(model)
    p1, p2 = prompt(6), prompt(10)
    pad = 10 - 6
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), p1], 1), p2], 0)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    batch = greedy(model, ids, n=24, attention_mask=mask)
    alone1 = greedy(model, p1, n=24)
    alone2 = greedy(model, p2, n=24)
    assert torch.equal(batch[0, 10:], alone1[0, 6:])
    assert torch.equal(batch[1, 10:], alone2[0, 10:])
    assert calls["decode_attention"] > 0
    # and each alone run is what transformers itself produces
    lfm_kernels.unpatch()
    assert torch.equal(greedy(model, p1, n=24), alone1)


def test_unpatch_restores_originals_and_bits():
    before = originals()
    never = make_model("moe", seed=3)
    never_dense = make_model("dense", seed=4)
    lfm_kernels.patch()
    lfm_kernels.patch()  # twice: harmless
    patched = make_model("moe", seed=3)  # built while patched: post_init patches it
    patched_dense = make_model("dense", seed=4)
    assert isinstance(patched.lm_head, integ.KernelLinear)
    assert patched.config._attn_implementation == "sdpa"  # the default keeps its name ...
    assert integ.attention_implementation(patched) == integ.IMPL_NAME  # ... and runs ours
    lfm_kernels.patch(patched)  # an already patched model: harmless
    lfm_kernels.patch(never_dense)
    ids = prompt(9)
    with torch.no_grad():
        assert rel_err(patched(ids).logits, never(ids).logits) < TOL[torch.float32]
    lfm_kernels.unpatch()
    assert_same_originals(before, originals())
    assert not integ.is_patched()
    for model in (patched, patched_dense, never_dense):
        assert all(type(m) is not integ.KernelLinear for m in model.modules())
        assert all("forward" not in m.__dict__ for m in model.modules())
        assert model.config._attn_implementation == "sdpa"
    assert patched.config._experts_implementation == never.config._experts_implementation
    with torch.no_grad():
        for a, b in ((patched, never), (patched_dense, make_model("dense", seed=4))):
            assert torch.equal(a(ids).logits, b(ids).logits), "unpatched outputs must be bit-identical"
            assert torch.equal(greedy(a, ids, n=8), greedy(b, ids, n=8))
    lfm_kernels.unpatch()  # twice: harmless
    assert_same_originals(before, originals())


@pytest.mark.parametrize("kind", KINDS)
def test_from_pretrained_patch_before_and_after(kind, tmp_path, calls):
    model = make_model(kind)
    model.save_pretrained(tmp_path)
    cls = type(model)
    ids = prompt(10)
    ref = greedy(model, ids, n=12)

    lfm_kernels.patch()
    loaded = cls.from_pretrained(tmp_path).eval()
    assert loaded.config._attn_implementation == "sdpa"  # the default keeps its name ...
    assert integ.attention_implementation(loaded) == integ.IMPL_NAME  # ... and runs ours
    assert isinstance(loaded.lm_head, integ.KernelLinear)
    assert torch.equal(greedy(loaded, ids, n=12), ref)
    assert calls["short_conv"] > 0 and calls["decode_attention"] > 0
    lfm_kernels.unpatch()

    loaded = cls.from_pretrained(tmp_path).eval()
    assert loaded.config._attn_implementation == "sdpa"
    calls.clear()
    lfm_kernels.patch(loaded)
    assert torch.equal(greedy(loaded, ids, n=12), ref)
    assert calls["short_conv"] > 0 and calls["decode_attention"] > 0
    # saving a patched model writes a checkpoint transformers loads without lfm_kernels
    loaded.save_pretrained(tmp_path / "again")
    lfm_kernels.unpatch()
    assert cls.from_pretrained(tmp_path / "again").config._attn_implementation == "sdpa"


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_generate_runs(kind, calls):
    model = make_model(kind)
    lfm_kernels.patch(model)
    ids = torch.cat([prompt(7), prompt(7)], 0)
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=16, min_new_tokens=16, do_sample=True, temperature=0.8, top_k=50,
            repetition_penalty=1.05, pad_token_id=0,
        )
    assert out.shape == (2, 23)
    assert int(out.min()) >= 0 and int(out.max()) < VOCAB
    assert calls["decode_attention"] > 0


@pytest.mark.parametrize("kind", KINDS)
def test_grad_falls_back_to_transformers(kind, calls):
    model = make_model(kind)
    twin = clone_model(model)
    lfm_kernels.patch(model)
    model.train()
    twin.train()
    ids = prompt(8)
    out = model(ids, labels=ids)
    ref = twin(ids, labels=ids)
    assert rel_err(out.logits.detach(), ref.logits.detach()) < TOL[torch.float32]
    out.loss.backward()
    assert model.lm_head.weight.grad is not None
    assert sum(calls.values()) == 0, f"kernels without autograd ran under grad: {dict(calls)}"


def test_bf16_models_no_less_accurate_than_transformers(calls):
    """bf16 drifts from float32 everywhere; patched must drift no more than transformers' own bf16 does.

    Compared against the float32 model with the same weights, on the dense model (the MoE model's
    routing can flip on bf16 near-ties, in transformers and in ours alike, which says nothing of either).
    """
    truth = make_model("dense")
    hf = clone_model(truth).to(torch.bfloat16)
    ours = lfm_kernels.patch(clone_model(truth).to(torch.bfloat16))
    ids = prompt(9)
    with torch.no_grad():
        ref = truth(ids).logits
        err_hf, err_ours = rel_err(hf(ids).logits, ref), rel_err(ours(ids).logits, ref)
    assert err_ours < 1.25 * err_hf + 1e-3, f"patched bf16 error {err_ours:.3g} vs transformers' {err_hf:.3g}"
    moe = lfm_kernels.patch(make_model("moe", dtype=torch.bfloat16))
    out = greedy(moe, ids, n=6)
    assert out.shape == (1, 15)
    with torch.no_grad():
        assert torch.isfinite(moe(out).logits).all()
    for op in expected_ops("moe"):
        assert calls[op] > 0, f"{op} never ran in bf16"


@pytest.mark.parametrize("kind", KINDS)
def test_short_conv_module_bf16_states_exact(kind, calls):
    model = make_model(kind, dtype=torch.bfloat16)
    conv = model.model.layers[0].conv
    lfm_kernels.patch(model)
    original = type(conv).forward
    caches = [DynamicCache(config=model.config) for _ in range(2)]
    for seqlen in (7, 1, 1, 3):
        hidden = torch.randn(3, seqlen, conv.in_proj.in_features, dtype=torch.bfloat16)
        with torch.no_grad():
            out = conv(hidden, cache=caches[0])
            ref = original(conv, hidden, cache=caches[1])
        assert rel_err(out, ref) < TOL[torch.bfloat16]
        assert torch.equal(caches[0].layers[0].conv_states[0], caches[1].layers[0].conv_states[0])
    assert calls["short_conv"] == 4


def test_router_logits_still_recorded():
    model = make_model("moe")
    twin = clone_model(model)
    lfm_kernels.patch(model)
    ids = prompt(6)
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
        ref = twin(ids, output_router_logits=True)
    assert len(out.router_logits) == len(ref.router_logits) > 0
    for a, b in zip(out.router_logits, ref.router_logits):
        assert rel_err(a, b) < TOL[torch.float32]


def test_unsupported_transformers_names_the_range(monkeypatch):
    import transformers.integrations.moe as moe_mod

    from lfm_kernels.integrations.transformers import _hooks

    monkeypatch.setattr(_hooks, "_hooks", None)
    monkeypatch.delattr(moe_mod, "ExpertsInterface")
    with pytest.raises(RuntimeError, match=r">=5\.24,<6.*ExpertsInterface"):
        lfm_kernels.patch()
    assert not integ.is_patched()


def test_patch_rejects_non_module():
    with pytest.raises(TypeError, match="model"):
        lfm_kernels.patch("not a model")


@contextlib.contextmanager
def force_triton():
    """Inside the block the patched modules call each op's Triton entry point, whatever the tensors' device.

    For machines without a GPU (TRITON_INTERPRET=1 is set by conftest before triton is imported): the
    patch looks the public ops up per call, so substituting them reaches every patched module. Yields
    the set of op names that actually ran through Triton.
    """
    import importlib

    used: set[str] = set()
    names = {
        "short_conv": ("short_conv", "short_conv_triton"),
        "moe_route": ("moe", "moe_route_triton"),
        "moe_experts": ("moe", "moe_experts_triton"),
        "decode_attention": ("decode_attention", "decode_attention_triton"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for op, (module_name, fn_name) in names.items():
            fn = getattr(importlib.import_module(f"lfm_kernels.triton.{module_name}"), fn_name)

            def run(*args, _fn=fn, _op=op, **kwargs):
                kwargs.pop("check_lengths", None)  # a public-op option the Triton entry point does not take
                used.add(_op)
                return _fn(*args, **kwargs)

            mp.setattr(lfm_kernels, op, run)
        yield used


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_path_under_interpreter():
    """The patched modules calling the Triton kernels (interpreted on CPU tensors) on a tiny model."""
    model = make_model("moe")
    twin = clone_model(model)
    lfm_kernels.patch(model)
    ids = prompt(5)
    caches = [DynamicCache(config=m.config) for m in (model, twin)]
    with torch.no_grad(), force_triton() as used:
        for chunk in (ids[:, :4], ids[:, 4:5]):
            out = model(chunk, cache=caches[0], use_cache=True).logits
            ref = twin(chunk, cache=caches[1], use_cache=True).logits
            assert rel_err(out, ref) < TOL[torch.float32]
        ran = set(used)
    assert "short_conv" in ran, f"the short conv did not run through Triton (ran: {sorted(ran)})"
    for idx in (0, 2):
        a, b = caches[0].layers[idx].conv_states[0], caches[1].layers[idx].conv_states[0]
        assert rel_err(a, b) < TOL[torch.float32]


def test_requested_by_name_then_unpatched(tmp_path):
    """from_pretrained(attn_implementation="lfm_kernels") works while patched and still runs after unpatch()."""
    model = make_model("moe")
    model.save_pretrained(tmp_path)
    ids = prompt(8)
    ref = greedy(model, ids, n=6)
    lfm_kernels.patch()
    loaded = Lfm2MoeForCausalLM.from_pretrained(
        tmp_path, attn_implementation=integ.IMPL_NAME, experts_implementation=integ.IMPL_NAME
    ).eval()
    assert torch.equal(greedy(loaded, ids, n=6), ref)
    lfm_kernels.unpatch()
    assert loaded.config._attn_implementation == "sdpa"
    assert loaded.config._experts_implementation == "eager"
    assert torch.equal(greedy(loaded, ids, n=6), ref)


# ----------------------------------------------------------------- implementations the user asked for


def _dense_or_moe_cls(kind):
    return Lfm2MoeForCausalLM if kind == "moe" else Lfm2ForCausalLM


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("asked", ["eager", "sdpa"])
def test_from_pretrained_keeps_the_requested_attention(kind, asked, tmp_path, calls):
    """Only the default is replaced: attn_implementation= in from_pretrained is honoured while patched."""
    model = make_model(kind)
    model.save_pretrained(tmp_path)
    ids = prompt(9)
    ref = greedy(model, ids, n=6)
    lfm_kernels.patch()
    loaded = _dense_or_moe_cls(kind).from_pretrained(tmp_path, attn_implementation=asked).eval()
    assert loaded.config._attn_implementation == asked
    assert torch.equal(greedy(loaded, ids, n=6), ref)
    assert calls["decode_attention"] == 0 and calls["short_conv"] > 0  # the rest is still ours
    default = _dense_or_moe_cls(kind).from_pretrained(tmp_path).eval()
    assert default.config._attn_implementation == "sdpa"  # the default keeps its name ...
    assert integ.attention_implementation(default) == integ.IMPL_NAME  # ... and runs ours


@pytest.mark.parametrize("kind", KINDS)
def test_eager_config_and_output_attentions_are_honoured(kind, calls):
    """A config set to "eager" (directly or through output_attentions) keeps eager, and attentions come back."""
    ids = prompt(7)
    with torch.no_grad():
        torch.manual_seed(0)
        config = make_config(kind)
        config.output_attentions = True  # transformers switches an unset implementation to eager for this
        ref = _dense_or_moe_cls(kind)(config).eval()(ids)
    lfm_kernels.patch()
    for setup in ("attn_implementation", "output_attentions"):
        torch.manual_seed(0)
        config = make_config(kind)
        if setup == "attn_implementation":
            config._attn_implementation = "eager"
        else:
            config.output_attentions = True
        model = _dense_or_moe_cls(kind)(config).eval()
        assert model.config._attn_implementation == "eager", setup
        with torch.no_grad():
            out = model(ids, output_attentions=True)
        assert out.attentions is not None and len(out.attentions) == LAYERS.count("full_attention")
        for a, b in zip(out.attentions, ref.attentions):
            assert rel_err(a, b) < TOL[torch.float32]
        assert rel_err(out.logits, ref.logits) < TOL[torch.float32]
    # patch(model) on an existing eager model leaves it on eager too
    assert lfm_kernels.patch(model).config._attn_implementation == "eager"


@pytest.mark.parametrize("kind", KINDS)
def test_set_attn_implementation_after_patch(kind, calls):
    """Switching implementations after loading works as in transformers, and back to ours."""
    model = make_model(kind)
    twin = clone_model(model)
    lfm_kernels.patch(model)
    ids = prompt(8)
    for name in ("eager", "sdpa", integ.IMPL_NAME):
        calls.clear()
        model.set_attn_implementation(name)
        assert model.config._attn_implementation == name
        out = greedy(model, ids, n=5)
        twin.set_attn_implementation(name if name != integ.IMPL_NAME else "sdpa")
        assert torch.equal(out, greedy(twin, ids, n=5)), name
        assert (calls["decode_attention"] > 0) == (name == integ.IMPL_NAME), name
    model.set_attn_implementation("eager")
    with torch.no_grad():
        assert model(ids, output_attentions=True).attentions is not None


# ----------------------------------------------------------------------------- deep copies, unpatch


@pytest.mark.parametrize("how", ["instance", "classes"])
def test_deepcopy_of_patched_model_works_after_unpatch(how):
    import copy

    if how == "classes":
        lfm_kernels.patch()
        model = make_model("moe")
    else:
        model = lfm_kernels.patch(make_model("moe"))
    assert model.config._attn_implementation == "sdpa"  # the default keeps its name ...
    assert integ.attention_implementation(model) == integ.IMPL_NAME  # ... and runs ours
    twin = copy.deepcopy(model)
    ids = prompt(8)
    with torch.no_grad():
        patched_logits = twin(ids).logits
    lfm_kernels.unpatch()
    for m in (model, twin):
        assert m.config._attn_implementation == "sdpa"
        assert m.config._experts_implementation != integ.IMPL_NAME
        assert all(type(x) is not integ.KernelLinear for x in m.modules())
    with torch.no_grad():
        out = twin(ids).logits
        assert torch.equal(out, model(ids).logits)
    assert rel_err(out, patched_logits) < TOL[torch.float32]
    assert torch.equal(greedy(twin, ids, n=4), greedy(model, ids, n=4))


# ------------------------------------------------------------ the decode step without host reads


def test_decode_attention_any_kept_positions(calls):
    """A decode mask with holes (not one contiguous run) runs on the kernel and matches sdpa."""
    from lfm_kernels.integrations.transformers.attention import attention_forward

    torch.manual_seed(0)
    batch, n_q, n_kv, kv_len, head_dim = 3, 4, 2, 37, 64
    q = torch.randn(batch, n_q, 1, head_dim)
    k = torch.randn(batch, n_kv, kv_len, head_dim)
    v = torch.randn(batch, n_kv, kv_len, head_dim)
    keep = torch.rand(batch, kv_len) > 0.4
    keep[:, -1] = True
    keep[1, :5] = False  # a left-padded row
    module = nn.Module().eval()
    for mask in (keep[:, None, None, :], torch.zeros(batch, 1, 1, kv_len).masked_fill(~keep[:, None, None], -1e30)):
        with torch.no_grad():
            out, _ = attention_forward(module, q, k, v, mask, scaling=head_dim**-0.5)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(n_q // n_kv, 1), v.repeat_interleave(n_q // n_kv, 1), attn_mask=keep[:, None, None]
        ).transpose(1, 2)
        assert out.shape == ref.shape == (batch, 1, n_q, head_dim)
        assert rel_err(out, ref) < TOL[torch.float32]
    assert calls["decode_attention"] == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    ["dense", "moe"],
)
def test_decode_step_compiles_fullgraph(kind):
    """A patched decode step (head_dim 64: decode attention on our kernel) traces as one graph: no host
    reads (.tolist(), tensors built from Python lists) and no per-row launches on the decode path."""
    torch._dynamo.reset()
    model = make_model(kind)
    twin = clone_model(model)
    lfm_kernels.patch(model)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    pad = 3
    ids = torch.cat([prompt(10), torch.cat([torch.zeros(1, pad, dtype=torch.long), prompt(10 - pad)], 1)], 0)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :pad] = 0
    caches = [DynamicCache(config=m.config) for m in (model, twin)]
    with torch.no_grad():
        for m, c in zip((model, twin), caches):
            m(ids[:, :9], cache=c, attention_mask=mask[:, :9], use_cache=True)
        step = torch.compile(model, fullgraph=True, backend=backend)
        out = step(ids[:, 9:], cache=caches[0], attention_mask=mask, use_cache=True).logits
        ref = twin(ids[:, 9:], cache=caches[1], attention_mask=mask, use_cache=True).logits
    assert rel_err(out, ref) < TOL[torch.float32]
    assert len(graphs) == 1 and "lfm_kernels.decode_attention" in graphs[0]
    torch._dynamo.reset()
