"""lfm_kernels.patch(model, quant="q8_0" | "q4_0") on transformers' LFM2-MoE and dense LFM2 models (small, random).

The reference for a quantized model is the same model, unpatched, in fp32, with every weight the patch
quantized replaced by its dequantized values: the two then differ only in the kernels' rounding of the
activations to int8 per block of 32 (and, for bf16 models, in bf16 activations).
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

import lfm_kernels  # noqa: E402
from lfm_kernels import _backend, reference  # noqa: E402
from lfm_kernels.integrations import transformers as integ  # noqa: E402
from lfm_kernels.integrations.transformers import QuantizedExperts, QuantizedLinear  # noqa: E402
from lfm_kernels.quant import BLOCK, _quantize_activations  # noqa: E402

from conftest import rel_err  # noqa: E402

from transformers import Lfm2Config, Lfm2ForCausalLM, Lfm2MoeConfig, Lfm2MoeForCausalLM  # noqa: E402

pytestmark = pytest.mark.skipif(
    not _backend.cpu_extension_available(), reason="the compiled CPU extension (quantized kernels) is not built"
)

VOCAB = 211
LAYERS = ["conv", "full_attention", "conv", "full_attention"]
KINDS = ["moe", "dense"]
MODES = ["q8_0", "q4_0"]
# Logits of the patched model vs the fp32 model on the dequantized weights, ||out - ref|| / ||ref||.
# Each quantized matmul rounds its input to int8 per 32-block (step max|x| / 127): about 0.5% of the
# input's norm, and about 20 such roundings lie on the path through these 4 layers and the lm_head of a
# small random model (initializer range 0.1, where errors grow layer to layer): measured 3.3-4.6% over
# seeds, formats and both model dtypes (bf16 activations add their own ~0.4% per op). The bound leaves
# about 2x margin; weight quantization moves Q4_0 logits 10x further (checked, so the bound can fail),
# and the emulated reference below pins the kernels much tighter in fp32. The MoE models use a fixed
# expert selection here (see make_model): a rounding difference can flip a token's top-k choice on a
# near-tie, which changes its output by far more than any rounding (tested separately, emulated).
LOGITS_TOL = 8e-2
# vs the same reference with the activation rounding emulated (int8 inputs of every quantized op): what
# is left is the kernels' fp32 summation order, 3e-7 on most models, up to 1.3e-2 measured where an
# fp32 value lands on the other side of an int8 rounding boundary than the reference's and the small
# random model amplifies that one-step change through the later layers.
EMULATED_TOL = 3e-2


def make_config(kind: str, hidden=128, intermediate=160, moe_intermediate=96, tie=True, init=0.1):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=len(LAYERS),
        num_attention_heads=2,
        num_key_value_heads=1,
        layer_types=LAYERS,
        max_position_embeddings=512,
        initializer_range=init,
        pad_token_id=0,
        tie_word_embeddings=tie,
    )
    if kind == "moe":
        return Lfm2MoeConfig(
            moe_intermediate_size=moe_intermediate, num_experts=8, num_experts_per_tok=2, num_dense_layers=1, **common
        )
    return Lfm2Config(**common)


def make_model(kind: str, dtype=torch.float32, seed=0, fixed_routing=False, **cfg):
    """fixed_routing: an expert bias that makes every token select experts 1 and 6 (the bias only selects;
    the routing weights still vary per token), so that rounding differences cannot flip a selection."""
    torch.manual_seed(seed)
    cls = Lfm2MoeForCausalLM if kind == "moe" else Lfm2ForCausalLM
    model = cls(make_config(kind, **cfg)).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):  # zeros after init: make expert selection depend on it
                buf.copy_(torch.randn_like(buf) * 0.05)
                if fixed_routing:
                    buf[[1, 6]] += 10.0
    return model.to(dtype)


def dequantized_reference(original: nn.Module, quantized: nn.Module) -> nn.Module:
    """fp32 copy of the float model (unpatched) with every weight `quantized` holds in blocks replaced by
    its dequantized values; a tied lm_head is untied (the embedding lookup keeps the float weights, as
    the quantized model's does)."""
    ref = copy.deepcopy(original).float()
    mods = dict(ref.named_modules())
    n = 0
    for name, module in quantized.named_modules():
        if isinstance(module, QuantizedLinear):
            mods[name].weight = nn.Parameter(module.qweight.dequantize(torch.float32), requires_grad=False)
            n += 1
        elif isinstance(module, QuantizedExperts):
            mods[name].gate_up_proj = nn.Parameter(module.q_gate_up_proj.dequantize(torch.float32), requires_grad=False)
            mods[name].down_proj = nn.Parameter(module.q_down_proj.dequantize(torch.float32), requires_grad=False)
            n += 1
    assert n > 0
    return ref


def _round_activations(module, args):
    """Forward pre-hook: the Linear's input rounded to int8 per 32-block as the quantized kernels do."""
    (x,) = args
    q, d = _quantize_activations(x.reshape(-1, x.shape[-1]))
    xq = (q.float().reshape(*q.shape[:-1], -1, BLOCK) * d.unsqueeze(-1)).reshape(x.shape)
    return (xq.to(x.dtype),)


def emulated_reference(original: nn.Module, quantized: nn.Module) -> nn.Module:
    """dequantized_reference with the activation rounding emulated too: every quantized Linear's input is
    rounded to int8 per block of 32, and the quantized experts run lfm_kernels.reference.moe_experts_quant
    (float64: the dequantized weights, the tokens and SwiGLU products rounded as the kernels do). What is
    left between this and the patched model is the kernels' fp32 summation order."""
    ref = dequantized_reference(original, quantized)
    mods = dict(ref.named_modules())
    for name, module in quantized.named_modules():
        if isinstance(module, QuantizedLinear):
            mods[name].register_forward_pre_hook(_round_activations)
        elif isinstance(module, QuantizedExperts):
            gu, dn = module.q_gate_up_proj, module.q_down_proj

            def forward(hidden, ids, weights, _gu=gu, _dn=dn):
                return reference.moe_experts_quant(hidden, _gu, _dn, ids, weights).to(hidden.dtype)

            mods[name].forward = forward
    return ref


def prompt(n: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, n))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(autouse=True)
def _always_unpatch():
    lfm_kernels.unpatch()
    yield
    # A failed test's traceback keeps its quantized model alive, which would make unpatch() refuse and leave
    # transformers patched for the next test files: forget those models here (test_unpatch_* checks the refusal).
    integ._ledger.state.quantized.clear()
    lfm_kernels.unpatch()


def quantized_names(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedExperts))}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_match_dequantized_reference(kind, mode, dtype):
    model = make_model(kind, dtype, fixed_routing=True)
    original = copy.deepcopy(model)
    ids = prompt(11, batch=2)
    float_logits = logits(copy.deepcopy(original).float(), ids)
    calls = {"linear": 0, "moe_experts": 0}
    patched = lfm_kernels.patch(model, quant=mode)
    assert patched is model

    names = quantized_names(model)
    expect = {"lm_head", "model.layers.1.self_attn.q_proj", "model.layers.0.conv.in_proj", "model.layers.0.conv.out_proj",
              "model.layers.0.feed_forward.w1", "model.layers.0.feed_forward.w2", "model.layers.0.feed_forward.w3"}
    if kind == "moe":
        expect.add("model.layers.1.feed_forward.experts")
        assert type(model.model.layers[1].feed_forward.gate).__name__ == "Lfm2MoeTopKRouter"  # router stays float
        assert model.model.layers[1].feed_forward.gate.weight.dtype == dtype
    assert expect <= set(names)
    assert model.lm_head.weight_format == "q8_0"  # the output matrix stays Q8_0 in both modes
    assert model.model.layers[1].self_attn.q_proj.weight_format == mode
    assert isinstance(model.model.embed_tokens, nn.Embedding) and model.model.embed_tokens.weight.dtype == dtype
    assert model.model.layers[0].conv.conv.weight.dtype == dtype
    # the blocks sit in the kernels' fast layout where it applies, and are GGUF's blocks in row order
    orig_modules = dict(original.named_modules())
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            assert m.weight_layout == ("x8" if m.out_features % 8 == 0 else "rows"), name
            want = lfm_kernels.quantize(orig_modules[name].weight.detach(), m.weight_format).data
            assert torch.equal(m.qweight.to_layout("rows").data, want), name
        elif isinstance(m, QuantizedExperts):
            assert m.weight_layout == m.q_gate_up_proj.layout == m.q_down_proj.layout
            want = lfm_kernels.quantize(orig_modules[name].down_proj.detach(), m.weight_format).data
            assert torch.equal(m.q_down_proj.to_layout("rows").data, want), name

    # count the quantized kernel calls (the modules look the op up per call)
    real_linear, real_experts = lfm_kernels.linear, lfm_kernels.moe_experts

    def linear(x, w, b=None):
        calls["linear"] += isinstance(w, lfm_kernels.QuantizedTensor)
        return real_linear(x, w, b)

    def moe_experts(h, gu, dn, ids_, w):
        calls["moe_experts"] += isinstance(gu, lfm_kernels.QuantizedTensor)
        return real_experts(h, gu, dn, ids_, w)

    mp = pytest.MonkeyPatch()
    mp.setattr(lfm_kernels, "linear", linear)
    mp.setattr(lfm_kernels, "moe_experts", moe_experts)
    try:
        out = logits(model, ids)
    finally:
        mp.undo()
    n_linear = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    assert n_linear == (16 if kind == "moe" else 25)
    assert calls["linear"] == n_linear  # each quantized Linear ran the quantized kernel once
    assert calls["moe_experts"] == (3 if kind == "moe" else 0)
    assert out.shape == (2, 11, VOCAB)

    err = rel_err(out, logits(dequantized_reference(original, model), ids))
    assert err < LOGITS_TOL, f"{kind} {mode} {dtype}: logits rel err {err:.3g} vs the dequantized fp32 reference"
    if mode == "q4_0":  # Q8_0 weights move the logits about as much as the int8 activations do
        assert rel_err(out, float_logits) > 3 * err
    if dtype == torch.float32:
        err = rel_err(out, logits(emulated_reference(original, model), ids))
        assert err < EMULATED_TOL, f"{kind} {mode}: logits rel err {err:.3g} vs the emulated reference"


@pytest.mark.parametrize("mode", MODES)
def test_moe_routing_matches_emulated_reference(mode):
    """Token-dependent expert selection (no fixed routing): against the reference that rounds the
    activations as the kernels do, the selections agree and the logits match to EMULATED_TOL."""
    model = make_model("moe", seed=3)
    original = copy.deepcopy(model)
    lfm_kernels.patch(model, quant=mode)
    ids = prompt(13, batch=2)
    err = rel_err(logits(model, ids), logits(emulated_reference(original, model), ids))
    assert err < EMULATED_TOL, f"{mode}: logits rel err {err:.3g} vs the emulated reference"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_greedy_tokens_equal_on_peaked_logits(kind, mode):
    """Greedy decoding (prefill, then cached one-token steps) picks the reference's tokens. The model has
    peaked logits (initializer range 0.02: its top-1 margins, about 0.3, are far above the ~0.01 the
    activation rounding moves a logit; asserted, so a flat model cannot pass by luck); such small random
    models then continue with one repeated token, so each step is a choice among 211 that must agree."""
    model = make_model(kind, seed=1, fixed_routing=True, init=0.02)
    original = copy.deepcopy(model)
    lfm_kernels.patch(model, quant=mode)
    ref = dequantized_reference(original, model)
    ids = prompt(7)
    n = 10
    with torch.no_grad():
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        want = ref.generate(ids, output_logits=True, return_dict_in_generate=True, **kw)
        got = model.generate(ids, **kw)
        seq = want.sequences
        moved = (model(seq).logits[:, 6:-1] - ref(seq).logits[:, 6:-1]).abs().max().item()
    top2 = torch.stack(want.logits, dim=1).float().topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1]).min().item()
    assert margin > 4 * moved, f"top-1 margin {margin:.3g} vs logits moved by {moved:.3g}: not peaked enough to test"
    assert torch.equal(got, seq)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_float_weights_are_freed(kind, tie):
    model = make_model(kind, dtype=torch.bfloat16, tie=tie)
    watched = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name != "lm_head":
            watched[name + ".weight"] = weakref.ref(module.weight)
        elif name.endswith("experts"):
            watched[name + ".gate_up_proj"] = weakref.ref(module.gate_up_proj)
            watched[name + ".down_proj"] = weakref.ref(module.down_proj)
    watched["lm_head.weight"] = weakref.ref(model.lm_head.weight)
    embed = model.model.embed_tokens.weight
    float_bytes = sum(p.untyped_storage().nbytes() for p in {p.data_ptr(): p for p in model.parameters()}.values())
    del module
    lfm_kernels.patch(model, quant="q4_0")
    gc.collect()
    alive = [name for name, ref in watched.items() if ref() is not None]
    # a tied lm_head shares the embedding, which stays float: nothing else may survive
    assert alive == (["lm_head.weight"] if tie else []), alive
    assert model.model.embed_tokens.weight is embed and embed.dtype == torch.bfloat16
    if tie:
        assert model.lm_head.weight is embed  # tying still holds for transformers' bookkeeping
    # what the model holds now: the float tensors left plus the blocks (Q4_0 is 18 bytes per 32 weights)
    held = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}
    now = sum(t.untyped_storage().nbytes() for t in held.values())
    assert now < 0.62 * float_bytes, (now, float_bytes)
    for p in model.parameters():
        assert not p.requires_grad


def test_state_dict_and_named_parameters():
    model = make_model("moe")
    lfm_kernels.patch(model, quant="q8_0")
    sd = model.state_dict()
    assert "model.layers.1.self_attn.q_proj.weight_blocks" in sd
    assert "model.layers.1.self_attn.q_proj.weight" not in sd
    assert sd["model.layers.1.self_attn.q_proj.weight_blocks"].dtype == torch.uint8
    assert "model.layers.1.feed_forward.experts.gate_up_proj_blocks" in sd
    assert "model.layers.1.feed_forward.experts.down_proj_blocks" in sd
    assert "model.layers.1.feed_forward.gate.weight" in sd  # the router stays float
    names = dict(model.named_parameters())
    assert "model.embed_tokens.weight" in names
    assert not any(n.endswith(("_proj.weight", "w1.weight", "gate_up_proj", "down_proj")) for n in names), sorted(names)
    assert all(p.dtype == torch.float32 for p in names.values())

    # the blocks load back into a model quantized the same way (a different random one)
    other = lfm_kernels.patch(make_model("moe", seed=5), quant="q8_0")
    other.load_state_dict(sd)
    ids = prompt(6)
    torch.testing.assert_close(logits(other, ids), logits(model, ids), rtol=0, atol=0)
    # a deep copy is quantized too, and computes the same
    twin = copy.deepcopy(model)
    torch.testing.assert_close(logits(twin, ids), logits(model, ids), rtol=0, atol=0)
    del twin, other


def test_k_not_multiple_of_32_stays_float():
    # dense FFN I = 72 (w2's K), experts I = 48 (down_proj's K): those stay float, everything else is quantized
    model = make_model("moe", intermediate=72, moe_intermediate=48)
    original = copy.deepcopy(model)
    lfm_kernels.patch(model, quant="q8_0")
    ffn = model.model.layers[0].feed_forward
    assert isinstance(ffn.w1, QuantizedLinear) and isinstance(ffn.w3, QuantizedLinear)
    assert type(ffn.w2) is integ.KernelLinear and ffn.w2.weight.dtype == torch.float32
    experts = model.model.layers[1].feed_forward.experts
    assert not isinstance(experts, QuantizedExperts) and experts.gate_up_proj.dtype == torch.float32
    ids = prompt(9)
    ref = dequantized_reference(original, model)
    err = rel_err(logits(model, ids), logits(ref, ids))
    assert err < LOGITS_TOL, err


def test_training_refused():
    model = make_model("moe")
    lfm_kernels.patch(model, quant="q4_0")
    ids = prompt(5)
    # grad mode on, no input requiring grad: the inference-only model runs (no parameter requires grad)
    assert torch.is_grad_enabled()
    out = model(ids).logits
    assert not out.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out, model(ids).logits, rtol=0, atol=0)
    # an input that requires grad: a clear error instead of gradients that would silently miss the weights
    embeds = model.model.embed_tokens(ids).detach().requires_grad_()
    with pytest.raises(RuntimeError, match=r"inference only.*requires grad.*no_grad"):
        model(inputs_embeds=embeds)
    with pytest.raises(RuntimeError, match="inference only"):
        model.model.layers[1].feed_forward.experts(
            torch.randn(3, 128, requires_grad=True), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2)
        )
    with torch.no_grad():
        model(inputs_embeds=embeds)  # under no_grad the same call runs


def test_unpatch_refuses_while_quantized_model_lives():
    model = make_model("dense")
    lfm_kernels.patch(model, quant="q8_0")
    ids = prompt(6)
    before = logits(model, ids)
    with pytest.raises(RuntimeError, match=r"cannot restore the float weights.*nothing was changed"):
        lfm_kernels.unpatch()
    assert integ.is_patched()
    assert isinstance(model.lm_head, QuantizedLinear)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)  # still patched and working
    del model
    lfm_kernels.unpatch()  # the quantized model is gone: nothing blocks unpatch any more
    assert not integ.is_patched()


def test_second_patch_same_format_is_noop_other_format_refused():
    model = make_model("moe")
    lfm_kernels.patch(model, quant="q4_0")
    blocks = model.model.layers[1].self_attn.q_proj.weight_blocks
    ids = prompt(6)
    before = logits(model, ids)
    assert lfm_kernels.patch(model, quant="q4_0") is model
    assert model.model.layers[1].self_attn.q_proj.weight_blocks is blocks
    lfm_kernels.patch(model)  # a plain patch of a quantized model changes nothing either
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"already quantized to 'q4_0'"):
        lfm_kernels.patch(model, quant="q8_0")
    assert model.model.layers[1].self_attn.q_proj.weight_format == "q4_0"


@pytest.mark.parametrize("bad", ["q4_k", "Q8_0", "int8", 4, ""])
def test_bad_format(bad):
    model = make_model("dense")
    with pytest.raises(ValueError, match=r"quant must be one of \('q8_0', 'q4_0'\)"):
        lfm_kernels.patch(model, quant=bad)
    assert not quantized_names(model)  # nothing changed
    assert type(model.lm_head) is nn.Linear


def test_no_model():
    with pytest.raises(ValueError, match="needs a model"):
        lfm_kernels.patch(quant="q8_0")
    assert not integ.is_patched()


def test_model_not_on_cpu_refused():
    model = make_model("dense")
    # the meta device stands in for CUDA here (no GPU needed): any non-CPU device is refused the same way
    model.model.layers[2].conv.in_proj.to("meta")
    with pytest.raises(ValueError, match=r"on the CPU.*'model\.layers\.2\.conv\.in_proj\.weight' is on device 'meta'"):
        lfm_kernels.patch(model, quant="q4_0")
    assert not quantized_names(model)  # refused before anything changed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_model_on_cuda_refused():
    model = make_model("dense").cuda()
    with pytest.raises(ValueError, match=r"on device 'cuda:0'"):
        lfm_kernels.patch(model, quant="q8_0")
