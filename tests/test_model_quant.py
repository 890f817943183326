"""Quantized models end to end: from_pretrained / default_model with quant="q8_0" | "q4_0" (which
tensors, the exact blocks, logits against the dequantized weights in fp32, greedy tokens, memory
while loading, bytes per decoded token)."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import rel_err

from lfm_kernels import QuantizedTensor, quantize
from lfm_kernels.model import LfmModel, Weights, default_model, from_pretrained

transformers = pytest.importorskip("transformers")

FORMATS = ["q8_0", "q4_0"]

# The quantized model against the same model in fp32 on the dequantized weights: the only difference
# is that every quantized linear rounds its input to int8 per block of 32 (a step of 1/127 of the
# block's largest value, about 0.5% rms on Gaussian activations). On the small model below (weights
# N(0, 0.02), 5 layers) that compounds to about 1% of the logits (measured 0.9% q4_0, 1.2% q8_0):
# tolerance 3e-2. A wrong block, tensor or layout gives errors of order 1.
LOGIT_TOL = 3e-2
# Against the same fp32 model with the activations quantized exactly as the kernels do (experts
# included): only the kernels' fp32 summation order differs, which now and then moves an activation
# across a rounding boundary of the next layer's int8 quantization (one step of its block).
# Measured 2e-7 (q8_0) and 2e-3 (q4_0): tolerance 1e-2, far below the 1% the rounding itself costs.
EMULATED_TOL = 1e-2


def _moe_config(**over):
    # every K (hidden 64, heads 4 x 16, expert inter 32, dense inter 96) a multiple of 32
    kw = dict(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=6,
        num_experts_per_tok=2,
        num_dense_layers=2,
        layer_types=["conv", "conv", "full_attention", "conv", "full_attention"],
        initializer_range=0.2,  # well-separated logits: greedy paths don't hinge on near-ties
        attn_implementation="eager",
        experts_implementation="eager",
    )
    kw.update(over)
    return transformers.Lfm2MoeConfig(**kw)


def _hf_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = transformers.Lfm2MoeForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_moe_quant")
    hf = _hf_model(_moe_config(initializer_range=0.02))
    hf.save_pretrained(path)
    return hf, str(path)


def _dequantized_twin(model: LfmModel) -> LfmModel:
    """The same model in fp32 with every QuantizedTensor replaced by its dequantized weight."""

    def deq(v):
        return v.dequantize(torch.float32) if isinstance(v, QuantizedTensor) else (
            v.float() if isinstance(v, torch.Tensor) else v)

    w = model.weights
    layers = [
        dataclasses.replace(lw, **{f.name: deq(getattr(lw, f.name)) for f in dataclasses.fields(lw)})
        for lw in w.layers
    ]
    embed = deq(w.embed)
    lm_head = embed if w.lm_head is w.embed else deq(w.lm_head)
    return LfmModel(model.config, Weights(embed, deq(w.final_norm), lm_head, layers), torch.float32)


def test_which_tensors_are_quantized_and_their_blocks(tiny):
    hf, path = tiny
    sd = hf.state_dict()
    model = from_pretrained(path, dtype=torch.float32, quant="q4_0", progress=False, tokenizer=False)
    w = model.weights
    # embedding (tied lm_head) Q8_0, projections Q4_0, bytes equal to quantizing transformers' tensor
    assert w.embed.format == "q8_0" and w.lm_head is w.embed
    assert torch.equal(w.embed.to_layout("rows").data, quantize(sd["model.embed_tokens.weight"], "q8_0").data)
    l0, l2, l3 = w.layers[0], w.layers[2], w.layers[3]
    assert torch.equal(l0.in_proj.to_layout("rows").data, quantize(sd["model.layers.0.conv.in_proj.weight"], "q4_0").data)
    assert torch.equal(l0.w2.to_layout("rows").data, quantize(sd["model.layers.0.feed_forward.w2.weight"], "q4_0").data)
    a = "model.layers.2.self_attn."
    qkv = torch.cat([sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"]])
    assert torch.equal(l2.qkv.to_layout("rows").data, quantize(qkv, "q4_0").data)
    assert torch.equal(l2.out_proj.to_layout("rows").data, quantize(sd[a + "out_proj.weight"], "q4_0").data)
    ex = "model.layers.3.feed_forward.experts."
    assert torch.equal(l3.gate_up_proj.to_layout("rows").data, quantize(sd[ex + "gate_up_proj"], "q4_0").data)
    assert torch.equal(l3.down_proj.to_layout("rows").data, quantize(sd[ex + "down_proj"], "q4_0").data)
    for i, lw in enumerate(w.layers):
        for name in ("qkv", "out_proj", "in_proj", "conv_out", "w13", "w2", "gate_up_proj", "down_proj"):
            v = getattr(lw, name)
            assert v is None or (isinstance(v, QuantizedTensor) and v.format == "q4_0"), name
        for name in ("operator_norm", "ffn_norm", "conv", "gate", "q_norm", "k_norm"):
            v = getattr(lw, name)
            assert v is None or (isinstance(v, torch.Tensor) and v.dtype == torch.float32), name
        if lw.moe:
            assert lw.expert_bias.dtype == torch.float32
            assert torch.equal(lw.gate, sd[f"model.layers.{i}.feed_forward.gate.weight"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_logits_against_the_dequantized_weights_in_fp32(tiny, fmt):
    _, path = tiny
    model = from_pretrained(path, dtype=torch.float32, quant=fmt, progress=False, tokenizer=False)
    ref = _dequantized_twin(model)
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(1))
    out = model.forward(ids)
    want = ref.forward(ids)
    assert rel_err(out, want) < LOGIT_TOL
    # decode path: prefill, then token by token, against the same steps on the twin
    st, st_ref = model.new_state(2, 20), ref.new_state(2, 20)
    lengths = torch.tensor([13, 9])
    assert rel_err(model.prefill(ids, lengths, st), ref.prefill(ids, lengths, st_ref)) < LOGIT_TOL
    for t in range(4):
        tok = ids[:, t]
        assert rel_err(model.decode_step(tok, st), ref.decode_step(tok, st_ref)) < LOGIT_TOL


def _emulated_forward(ref: LfmModel, ids, monkeypatch) -> torch.Tensor:
    """ref.forward(ids) (float weights) with every linear's input, the experts' included, quantized per
    block of 32 as the quantized kernels do (`_quantize_activations`), then multiplied in fp32."""
    import torch.nn.functional as F

    import lfm_kernels.model.model as M
    from lfm_kernels import moe_route
    from lfm_kernels.quant import _quantize_activations

    real_linear, real_ffn = M.linear, M.LfmModel._ffn

    def qlinear(x, w, b=None):
        x2 = x.reshape(-1, x.shape[-1])
        q, d = _quantize_activations(x2)
        xd = (q.float().reshape(x2.shape[0], -1, 32) * d.unsqueeze(-1)).reshape(x2.shape)
        return real_linear(xd, w, b).reshape(*x.shape[:-1], -1)

    def ffn(self, lw, h):
        if not lw.moe:
            return real_ffn(self, lw, h)
        cfg = self.config
        x = h.reshape(-1, h.shape[-1])
        wts, ids_ = moe_route(x, lw.gate, lw.expert_bias, cfg.num_experts_per_tok, cfg.norm_topk_prob,
                              cfg.routed_scaling_factor)
        out = torch.zeros_like(x)
        inter = lw.down_proj.shape[-1]
        for e in ids_.unique().tolist():
            tok, slot = (ids_ == e).nonzero(as_tuple=True)
            g = qlinear(x[tok], lw.gate_up_proj[e])
            a = F.silu(g[:, :inter]) * g[:, inter:]
            out.index_add_(0, tok, qlinear(a, lw.down_proj[e]) * wts[tok, slot, None])
        return out.view(h.shape)

    with monkeypatch.context() as mp:
        mp.setattr(M, "linear", qlinear)
        mp.setattr(M.LfmModel, "_ffn", ffn)
        return ref.forward(ids)


@pytest.mark.parametrize("fmt", FORMATS)
def test_logits_against_activations_quantized_in_the_reference(tiny, fmt, monkeypatch):
    # a model with larger weights (N(0, 0.2)): the activations' rounding matters more, and is emulated
    hf = _hf_model(_moe_config(), seed=2)
    path = tiny[1] + "-big"
    hf.save_pretrained(path)
    model = from_pretrained(path, dtype=torch.float32, quant=fmt, progress=False, tokenizer=False)
    ref = _dequantized_twin(model)
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(1))
    assert rel_err(model.forward(ids), _emulated_forward(ref, ids, monkeypatch)) < EMULATED_TOL


@pytest.mark.parametrize("fmt", FORMATS)
def test_greedy_tokens_equal_on_peaked_logits(tmp_path, fmt):
    # peaked logits: an untied lm_head that is 50 x the embedding of a permutation of the vocabulary,
    # so each position's top logit is the permuted successor of the token in the residual stream, far
    # ahead of the second; the test checks that the margin exceeds the quantized model's logit error
    # on the same positions, so a near-tie can't make it flaky and the equality is earned
    hf = _hf_model(_moe_config(initializer_range=0.02, tie_word_embeddings=False), seed=3)
    with torch.no_grad():
        perm = torch.randperm(101, generator=torch.Generator().manual_seed(3))
        hf.lm_head.weight.copy_(hf.model.embed_tokens.weight[perm] * 50)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=torch.float32, quant=fmt, progress=False, tokenizer=False)
    assert model.weights.lm_head.format == "q8_0"  # the output matrix stays Q8_0 for q4_0 as well
    ref = _dequantized_twin(model)
    ids = torch.randint(0, 101, (1, 7), generator=torch.Generator().manual_seed(5))
    n = 12
    want = ref.generate(ids, n, temperature=0, repetition_penalty=1.0, eos_token_id=[])
    assert len(set(want[0].tolist())) > n // 2  # a varied continuation, not one repeated token
    full = torch.cat([ids, want], dim=1)
    logits = ref.forward(full)[0, ids.shape[1] - 1 : -1]
    top2 = logits.topk(2, dim=-1).values
    err = (model.forward(full)[0, ids.shape[1] - 1 : -1] - logits).abs().max()
    assert (top2[:, 0] - top2[:, 1]).min() > 2 * err, "reference logits not peaked enough for this test"
    got = model.generate(ids, n, temperature=0, repetition_penalty=1.0, eos_token_id=[])
    assert got.tolist() == want.tolist()


def test_bytes_per_decoded_token_counts_the_blocks(tiny):
    _, path = tiny
    f32 = from_pretrained(path, dtype=torch.float32, progress=False, tokenizer=False)
    q4 = from_pretrained(path, dtype=torch.float32, quant="q4_0", progress=False, tokenizer=False)
    q8 = from_pretrained(path, dtype=torch.float32, quant="q8_0", progress=False, tokenizer=False)
    cfg = q4.config
    H, V, E, k = cfg.hidden_size, cfg.vocab_size, cfg.num_experts, cfg.num_experts_per_tok
    for m in (q4, q8):
        fmt = m.weights.layers[0].in_proj.format
        expect = 0
        for name, t in m.weights.tensors():
            if isinstance(t, QuantizedTensor):
                nb = t.nbytes
                assert nb == t.shape.numel() // 32 * (18 if t.format == "q4_0" else 34)
            else:
                nb = t.numel() * t.element_size()
            if name == "embed":
                nb = (1 + V) * (H // 32 * 34)  # one looked-up row + the tied lm_head, all Q8_0
            elif name.endswith(("gate_up_proj", "down_proj")):
                nb = nb * k // E
            expect += nb
        assert m.bytes_per_decoded_token() == expect, fmt
        assert m.weight_bytes() == sum(
            t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * t.element_size() for _, t in m.weights.tensors()
        )
    assert q4.bytes_per_decoded_token() < q8.bytes_per_decoded_token() < f32.bytes_per_decoded_token() / 3


def test_default_model_quantized_is_the_float_one_quantized():
    # one conv layer with its dense FFN at full width, small vocabulary: a few hundred MB at most
    f = default_model(num_layers=1, vocab_size=512, dtype=torch.bfloat16, progress=False)
    q = default_model(num_layers=1, vocab_size=512, dtype=torch.bfloat16, progress=False, quant="q4_0")
    fw, qw = f.weights, q.weights
    assert torch.equal(qw.embed.to_layout("rows").data, quantize(fw.embed, "q8_0").data)
    for name in ("in_proj", "conv_out", "w13", "w2"):
        assert torch.equal(getattr(qw.layers[0], name).to_layout("rows").data, quantize(getattr(fw.layers[0], name), "q4_0").data), name
    assert torch.equal(qw.layers[0].conv, fw.layers[0].conv)
    assert torch.equal(qw.final_norm, fw.final_norm)


def test_bad_quant_arguments(tiny):
    _, path = tiny
    with pytest.raises(ValueError, match="quant must be"):
        from_pretrained(path, quant="q5_0", progress=False)
    with pytest.raises(ValueError, match="device='cpu'"):
        default_model(num_layers=1, vocab_size=64, quant="q4_0", device="cuda", progress=False)
    model = from_pretrained(path, quant="q8_0", progress=False, tokenizer=False)
    from lfm_kernels.model import save_pretrained, to_transformers

    with pytest.raises(ValueError, match="quantized"):
        to_transformers(model)
    with pytest.raises(ValueError, match="quantized"):
        save_pretrained(model, "/nonexistent-never-written")


# ----------------------------------------------------------------------------- memory while loading

_MEASURE = textwrap.dedent(
    """
    import json, sys
    import torch
    from lfm_kernels.model import from_pretrained
    from lfm_kernels import quantize
    quantize(torch.randn(64, 64), "q4_0")  # first-call allocations before the baseline

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    before = rss()
    model = from_pretrained(sys.argv[1], quant=None if sys.argv[2] == "none" else sys.argv[2],
                            progress=False, tokenizer=False)
    # VmHWM: this process's peak RSS (ru_maxrss would also count the parent's RSS at fork time)
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    print(json.dumps({"growth": peak - before, "weights": model.weight_bytes()}))
    """
)


def _peak_growth(path, quant):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _MEASURE, path, quant], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loading_q4_0_never_allocates_the_bf16_size(tmp_path):
    if "libasan" in os.environ.get("LD_PRELOAD", ""):  # tools/sanitize.sh
        pytest.skip("resident memory under AddressSanitizer counts its quarantine of freed blocks, not our peak")
    # about 300 MB of bf16 weights in per-expert tensors (the largest tensor, the embedding, 12 MB)
    cfg = _moe_config(vocab_size=8192, hidden_size=768, intermediate_size=2048, moe_intermediate_size=384,
                      num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4, num_experts=24,
                      num_experts_per_tok=4, layer_types=["conv", "conv", "full_attention", "conv"] * 2,
                      dtype="bfloat16")
    with torch.device("meta"):
        hf = transformers.Lfm2MoeForCausalLM(cfg)
    hf = hf.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02)
    hf.save_pretrained(tmp_path)
    bf16_bytes = sum(p.numel() * 2 for p in hf.parameters())
    del hf
    assert bf16_bytes > 250e6
    q4 = _peak_growth(str(tmp_path), "q4_0")
    # the measurement sees a float load: it grows by at least the model's size
    flt = _peak_growth(str(tmp_path), "none")
    assert flt["growth"] > 0.95 * bf16_bytes, flt
    # q4_0: the quantized model (about 30% of bf16) plus one checkpoint tensor (at most 25 MB here) and
    # the quantizer's small temporaries (measured: the model + 9 to 22 MB over 30 loads)
    assert q4["weights"] < 0.35 * bf16_bytes
    assert q4["growth"] < q4["weights"] + 64e6, (q4, bf16_bytes)
    assert q4["growth"] < 0.5 * bf16_bytes, (q4, bf16_bytes)


# ----------------------------------------------------------------------------- GGUF files
@pytest.mark.parametrize("fmt", FORMATS)
def test_gguf_file_loads_quantized(tiny, tmp_path, fmt):
    pytest.importorskip("gguf")
    from lfm_kernels.model.gguf_write import write_gguf

    _, path = tiny
    f32 = from_pretrained(path, dtype=torch.float32, progress=False, tokenizer=False)
    file = write_gguf(tmp_path / f"m-{fmt}.gguf", f32, fmt.upper(), vocab=None)
    model = from_pretrained(file, dtype=torch.float32, progress=False, tokenizer=False)
    st = from_pretrained(path, dtype=torch.float32, quant=fmt, progress=False, tokenizer=False)
    lw, sw = model.weights.layers[3], st.weights.layers[3]
    assert isinstance(lw.gate_up_proj, QuantizedTensor) and lw.gate_up_proj.format == fmt
    for name in ("gate_up_proj", "down_proj", "in_proj", "conv_out", "qkv", "out_proj", "w13", "w2"):
        for a, b in ((lw, sw), (model.weights.layers[2], st.weights.layers[2]), (model.weights.layers[0], st.weights.layers[0])):
            if getattr(a, name) is not None:
                assert torch.equal(getattr(a, name).data, getattr(b, name).data), name
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(2))
    if fmt == "q8_0":  # every tensor the same blocks: the same logits
        assert torch.equal(model.weights.embed.data, st.weights.embed.data)
        assert rel_err(model.forward(ids), st.forward(ids)) < 1e-6
    else:  # the file's embedding is Q4_0 (ours Q8_0): against its own dequantized weights
        assert rel_err(model.forward(ids), _dequantized_twin(model).forward(ids)) < LOGIT_TOL


def _decode_logits(model, steps=4):
    state = model.new_state(2, 16)
    tok = torch.tensor([3, 7])
    out = []
    for _ in range(steps):
        logits = model.decode_step(tok, state, check=False)
        out.append(logits)
        tok = logits.argmax(-1)
    return torch.stack(out)


def _public_only(monkeypatch):
    from lfm_kernels.model.direct import DirectOps

    begin = DirectOps.begin_step

    def off(self, x):
        begin(self, x)
        self._on = False

    monkeypatch.setattr(DirectOps, "begin_step", off)


def _direct_and_public(model, monkeypatch, **policy):
    """Decode logits under a policy: through the decode step's direct calls, and through the public ops."""
    from lfm_kernels._policy import kernel_policy

    with kernel_policy(**policy):
        direct = _decode_logits(model)
        with monkeypatch.context() as mp:
            _public_only(mp)
            return direct, _decode_logits(model)


@pytest.fixture(scope="module")
def tiny_256(tmp_path_factory):
    # every K a multiple of 256: the K-quant mix applies to every tensor
    path = tmp_path_factory.mktemp("tiny_moe_256")
    cfg = _moe_config(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.02)
    _hf_model(cfg).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("quant", [None, "q8_0", "q4_0", "q4_k_m"], ids=["float", "q8_0", "q4_0", "q4_k_m"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_decode_step_direct_calls_equal_the_public_ops(tiny_256, quant, dtype, monkeypatch):
    # model/direct.py calls the C++ ops itself in a decode step: bit for bit what the public ops give
    path = tiny_256
    model = from_pretrained(path, dtype=dtype, quant=quant, progress=False, tokenizer=False)
    direct = _decode_logits(model)
    with monkeypatch.context() as mp:
        _public_only(mp)
        public = _decode_logits(model)
    assert torch.equal(direct, public)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_decode_step_direct_float_linear_follows_the_policy(tiny_256, dtype, monkeypatch):
    # float weights: a policy that hands two-row calls to torch's GEMM (oneDNN for bf16, torch's fp32
    # GEMM for fp32) changes the logits; the direct calls must take that route too
    from lfm_kernels import _backend

    if dtype == torch.bfloat16 and not _backend.cpu_has_native_bf16_gemm():
        pytest.skip("needs AVX512-BF16 or AMX: without them bf16 calls never leave the C++ kernel")
    import types

    from lfm_kernels.ops import linear as linear_mod

    model = from_pretrained(tiny_256, dtype=dtype, progress=False, tokenizer=False)
    # torch's GEMM can give the C++ kernel's bits on a model this small (measured on a Zen 4), so
    # the route itself is counted: every torch GEMM call of the `linear` op goes through its F.linear
    calls = []

    def counting_linear(*args, **kwargs):
        calls.append(args[1].shape)
        return torch.nn.functional.linear(*args, **kwargs)

    monkeypatch.setattr(linear_mod, "F", types.SimpleNamespace(linear=counting_linear))
    _decode_logits(model)
    assert calls == []  # the default policy: every decode call on the C++ kernel
    field = "linear_onednn_min_rows" if dtype == torch.bfloat16 else "linear_fp32_torch_min_rows"
    from lfm_kernels._policy import kernel_policy

    with kernel_policy(**{field: 1}):
        _decode_logits(model)
    routed = len(calls)
    assert routed > 0  # the direct calls took torch's GEMM
    calls.clear()
    direct, public = _direct_and_public(model, monkeypatch, **{field: 1})
    assert len(calls) == 2 * routed  # once through the direct calls, once through the public ops
    assert torch.equal(direct, public)


def test_decode_step_direct_float_experts_follow_the_policy(tiny_256, monkeypatch):
    # bf16 experts: a policy that sends every expert to oneDNN's GEMMs (which round gate, up and their
    # product to bf16 each) changes the logits; the thresholds the direct calls bind once per step
    # must be that policy's, and a policy set between steps must reach the next step
    from lfm_kernels import _backend
    from lfm_kernels._policy import kernel_policy

    if not _backend.cpu_has_native_bf16_gemm():
        pytest.skip("needs AVX512-BF16 or AMX: without them bf16 experts never leave the AVX2 tiles")
    model = from_pretrained(tiny_256, dtype=torch.bfloat16, progress=False, tokenizer=False)
    default = _decode_logits(model)
    onednn = dict(moe_bf16_min_rows=1, moe_bf16_outer_min_rows=1, moe_bf16_outer_onednn_min_rows=1,
                  moe_bf16_dot_onednn_min_rows=1)
    direct, public = _direct_and_public(model, monkeypatch, **onednn)
    assert torch.equal(direct, public)
    assert not torch.equal(direct, default)  # the policy took effect
    assert torch.equal(_decode_logits(model), default)  # and is gone with the context


def test_decode_step_direct_calls_follow_the_policy(tiny_256, monkeypatch):
    # a policy that sends one-row calls to the bf16 GEMM route (dequantized panels) changes the
    # logits; the direct calls must take that route too, not their integer tiles
    from lfm_kernels import _policy
    from lfm_kernels._policy import QUANT_ROUTE_FIELDS

    if not _policy._quant_gemm_usable():
        pytest.skip("needs AMX or AVX512-BF16 (the bf16 GEMM route exists only there): this CPU has neither")
    path = tiny_256
    model = from_pretrained(path, dtype=torch.bfloat16, quant="q4_0", progress=False, tokenizer=False)
    tiles = _decode_logits(model)
    everything_routed = {f: 1 for amx, gemm in QUANT_ROUTE_FIELDS.values() for f in (gemm,) if f}
    direct, public = _direct_and_public(model, monkeypatch, **everything_routed)
    assert not torch.equal(direct, tiles)  # the route changes the bits: the comparison below can fail
    assert torch.equal(direct, public)
