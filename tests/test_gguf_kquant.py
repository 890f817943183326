"""K-quant GGUF files (Q4_K, Q5_K, Q6_K and llama.cpp's Q4_K_M mix) run on the quantized kernels: they
load without dequantize as QuantizedTensor weights over the file's blocks, stacked parts of different
types become SplitWeights, and the logits match the same model on the dequantized weights. Also the
quant="q4_k_m" mode of from_pretrained / default_model and `lfm-kernels bench --e2e` on it.

Tolerances. The quantized model differs from the fp32 model on the dequantized weights only in that
every quantized `linear` rounds its input to int8, per block of 256 values for the K-quants (32 for
Q8_0 / Q4_0): a step of 1/127 of the block's largest value. Over 256 values the largest is larger
(heavy-tailed SwiGLU products most of all), so the step and the error are about 1.5x those of 32-value
blocks. On the small models below (hidden 256, weights N(0, 0.02), 3-4 layers) that compounds to
1.6-2.8% of the logits on the dense model (Q8_0 / Q4_0: 1.6-1.8%) and 1.4-4.3% on the MoE one, where
a rounding now and then flips a near-tied expert choice (one prompt of three measured 7%; the tests
use a fixed prompt, measured at most 3.6%): LOGIT_TOL 6e-2. A wrong block, part order or format gives
errors of order 1. The strict check is against the same model with the activations rounded exactly as
the kernels do (quant._linear_reference, experts included): only the fp32 summation order differs,
which now and then moves a value across a rounding boundary of the next int8 step: EMULATED_TOL 1e-2
(measured 1e-7 .. 6e-3)"""


import time

import numpy as np
import pytest
import torch
from conftest import rel_err

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from lfm_kernels import QuantizedTensor, quantize  # noqa: E402
from lfm_kernels.kquants import q4_k_m_type  # noqa: E402
from lfm_kernels.model import default_model, from_pretrained  # noqa: E402
from lfm_kernels.model import gguf as G  # noqa: E402
from lfm_kernels.model import model as M  # noqa: E402
from lfm_kernels.model import weights as W  # noqa: E402
from lfm_kernels.model.gguf_write import gguf_tensors, write_gguf  # noqa: E402
from lfm_kernels.model.weights import SplitWeight  # noqa: E402

LOGIT_TOL = 6e-2
EMULATED_TOL = 1e-2
V = 300
MATRICES = ("qkv", "out_proj", "in_proj", "conv_out", "w13", "w2", "gate_up_proj", "down_proj")


def _moe_hf(seed=0, **over):
    from test_model import _hf_model, _moe_config

    kw = dict(vocab_size=V, hidden_size=256, intermediate_size=256, moe_intermediate_size=256, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
              num_dense_layers=1, layer_types=["conv", "full_attention", "conv", "full_attention"],
              initializer_range=0.02)
    kw.update(over)
    return _hf_model(_moe_config(**kw), seed=seed)


def _dense_hf(seed=1):
    from test_model import _hf_model

    cfg = transformers.Lfm2Config(
        vocab_size=V, hidden_size=256, intermediate_size=512, block_auto_adjust_ff_dim=False, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention", "conv"],
        initializer_range=0.02, attn_implementation="eager", tie_word_embeddings=False,
    )
    return _hf_model(cfg, seed=seed)


@pytest.fixture(scope="module", params=["moe", "dense"])
def ckpt(request, tmp_path_factory):
    """(safetensors dir, our fp32 model loaded from it)."""
    hf = _moe_hf() if request.param == "moe" else _dense_hf()
    path = tmp_path_factory.mktemp(f"kq_{request.param}")
    hf.save_pretrained(path)
    return str(path), from_pretrained(path, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def moe_q4_k_m(tmp_path_factory):
    path = tmp_path_factory.mktemp("kq_moe_file")
    hf = _moe_hf()
    hf.save_pretrained(path / "st")
    ours = from_pretrained(path / "st", dtype=torch.float32, progress=False)
    return str(path / "st"), write_gguf(path / "m-Q4_K_M.gguf", ours, "Q4_K_M")


def _ids(batch=2, T=9, seed=0):
    return torch.randint(0, V, (batch, T), generator=torch.Generator().manual_seed(seed))


def _dequantized_reference(st, file):
    """Our fp32 model from safetensors with every tensor replaced by the file's tensor decoded by the
    `gguf` package on its own (placed through the writer's name map, independent of the loader's)."""
    ref = from_pretrained(st, dtype=torch.float32, progress=False)
    by_name = {t.name: t for t in gguf.GGUFReader(file).tensors}
    with torch.no_grad():
        for name, view, _ in gguf_tensors(ref):
            t = by_name[name]
            vals = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(view.shape))
            view.copy_(torch.from_numpy(np.array(vals)))
    return ref


def _emulated_forward(model, ids, monkeypatch):
    """model.forward(ids) with every quantized linear (the experts' included, run expert by expert)
    replaced by quant._linear_reference: the weight dequantized, the input rounded to int8 per block
    as the kernels round it, exact products."""
    from lfm_kernels.quant import _linear_reference

    real = M.linear

    def emulated(x, w, b=None):
        if not isinstance(w, QuantizedTensor):
            return real(x, w, b)
        x2 = x.reshape(-1, x.shape[-1])
        return _linear_reference(x2, w, b).to(x.dtype).reshape(*x.shape[:-1], -1)

    with monkeypatch.context() as mp:
        mp.setattr(M, "linear", emulated)
        mp.setattr(M, "_FUSED_MOE_FORMATS", ())
        return model.forward(ids)


def _formats(w):
    if isinstance(w, SplitWeight):
        return w.formats
    return (w.format,) if isinstance(w, QuantizedTensor) else (str(w.dtype).replace("torch.", ""),)


def _in_mapping(t: torch.Tensor, reader) -> bool:
    lo = reader.data.ctypes.data
    p = t.untyped_storage().data_ptr()
    return lo <= p < lo + reader.data.nbytes


# ----------------------------------------------------------------------------- K-quant files
@pytest.mark.parametrize("ftype", ["Q4_K", "Q6_K", "Q5_K", "Q4_K_M"])
def test_kquant_file_runs_quantized_with_the_logits_of_its_dequantized_weights(ckpt, tmp_path, ftype, monkeypatch):
    st, ours = ckpt
    file = write_gguf(tmp_path / f"m-{ftype}.gguf", ours, ftype)
    types = {t.name: t.tensor_type.name.lower() for t in G.open_gguf(file).tensors}
    model = from_pretrained(file, dtype=torch.float32, progress=False)
    w, cfg = model.weights, model.config
    assert w.embed.format == types["token_embd.weight"]
    if not cfg.tie_word_embeddings:
        assert w.lm_head.format == types["output.weight"]
    for i, lw in enumerate(w.layers):
        p = f"blk.{i}."
        names = {"qkv": ["attn_q", "attn_k", "attn_v"], "out_proj": ["attn_output"],
                 "in_proj": ["shortconv.in_proj"], "conv_out": ["shortconv.out_proj"], "w13": ["ffn_gate", "ffn_up"],
                 "w2": ["ffn_down"], "gate_up_proj": ["ffn_gate_exps", "ffn_up_exps"], "down_proj": ["ffn_down_exps"]}
        for attr in MATRICES:
            v = getattr(lw, attr)
            if v is None:
                continue
            want = [types[p + n + ".weight"] for n in names[attr]]
            runs = [f for j, f in enumerate(want) if j == 0 or want[j - 1] != f]  # equal neighbours stay stacked
            assert _formats(v) == tuple(runs), (i, attr, want)
            assert isinstance(v, SplitWeight) == (len(runs) > 1), (i, attr)
            # every quantized weight, a SplitWeight's parts included, runs from the x8 layout
            assert all(p.layout == "x8" for p in (v.parts if isinstance(v, SplitWeight) else (v,))
                       if hasattr(p, "layout")), (i, attr, _formats(v))
    if ftype == "Q4_K_M":  # the mix really mixes: the test covers split qkv and Q6_K beside Q4_K
        assert w.embed.format == ("q6_k" if cfg.tie_word_embeddings else "q4_k")
        assert any(isinstance(lw.qkv, SplitWeight) for lw in w.layers if lw.attention)
        if cfg.is_moe:
            assert (w.layers[3].gate_up_proj.format, w.layers[3].down_proj.format) == ("q4_k", "q6_k")

    ref = _dequantized_reference(st, file)
    ids = _ids()
    out = model.forward(ids)
    assert rel_err(out, ref.forward(ids)) < LOGIT_TOL
    assert rel_err(out, _emulated_forward(model, ids, monkeypatch)) < EMULATED_TOL
    # the decode path (right-padded prefill, then token by token) against the same steps on the reference
    st_q, st_r = model.new_state(2, 16), ref.new_state(2, 16)
    lengths = torch.tensor([9, 6])
    # (against the model's own full forward of each sequence, with the emulation's tolerance: against the
    # dequantized reference one token's top-k experts can flip on a near-tie once activations are
    # rounded, which moves a whole row by more than LOGIT_TOL)
    pre = model.prefill(ids, lengths, st_q)
    ref.prefill(ids, lengths, st_r)
    seqs = [ids[b, :n] for b, n in enumerate(lengths.tolist())]
    for b, seq in enumerate(seqs):
        assert rel_err(pre[b], model.forward(seq[None])[0, -1]) < EMULATED_TOL, b
    for t in range(3):
        step = model.decode_step(ids[:, t], st_q)
        ref.decode_step(ids[:, t], st_r)
        seqs = [torch.cat([seq, ids[b, t : t + 1]]) for b, seq in enumerate(seqs)]
        for b, seq in enumerate(seqs):
            assert rel_err(step[b], model.forward(seq[None])[0, -1]) < EMULATED_TOL, (t, b)


def test_parts_of_every_kind_in_one_stacked_weight(tmp_path, monkeypatch):
    # three formats in one qkv, expert gate and up in different K formats with down in a third, a dense
    # gate/up of a float and a quantized part: the general SplitWeight paths, not only Q4_K_M's
    hf = _moe_hf(seed=4)
    hf.save_pretrained(tmp_path / "st")
    ours = from_pretrained(tmp_path / "st", dtype=torch.float32, progress=False)
    override = {"blk.1.attn_q.weight": "Q8_0", "blk.1.attn_k.weight": "Q4_K", "blk.1.attn_v.weight": "Q6_K",
                "blk.2.ffn_gate_exps.weight": "Q4_K", "blk.2.ffn_up_exps.weight": "Q6_K",
                "blk.2.ffn_down_exps.weight": "Q5_K", "blk.0.ffn_gate.weight": "F32", "blk.0.ffn_up.weight": "Q4_K"}
    file = write_gguf(tmp_path / "mixed.gguf", ours, "Q4_K", types=override)
    model = from_pretrained(file, dtype=torch.float32, progress=False)
    l0, l1, l2 = model.weights.layers[:3]
    assert l1.qkv.formats == ("q8_0", "q4_k", "q6_k") and l1.qkv.shape == (512, 256)
    assert l2.gate_up_proj.formats == ("q4_k", "q6_k") and l2.gate_up_proj.shape == (4, 512, 256)
    assert l2.down_proj.format == "q5_k"
    assert l0.w13.formats == ("float32", "q4_k")
    ref = _dequantized_reference(str(tmp_path / "st"), file)
    for (n, a), (_, b) in zip(model.weights.tensors(), ref.weights.tensors()):
        deq = a.dequantize(torch.float32) if isinstance(a, (QuantizedTensor, SplitWeight)) else a
        assert torch.equal(deq, b), n
    ids = _ids(seed=3)
    out = model.forward(ids)
    assert rel_err(out, ref.forward(ids)) < LOGIT_TOL
    assert rel_err(out, _emulated_forward(model, ids, monkeypatch)) < EMULATED_TOL


def test_weights_are_the_files_blocks_with_no_dequantized_copy(moe_q4_k_m):
    _, file = moe_q4_k_m
    model = from_pretrained(file, progress=False)  # default dtype: bfloat16 activations
    reader, w = model.gguf_reader, model.weights
    raw = {t.name: torch.from_numpy(t.data) for t in reader.tensors}
    # whole weights are the file's own blocks, the tied Q6_K embedding included: rearranged once at
    # load into the x8 layout of the same bytes (lfm_kernels/quant.py), which the kernels read fastest
    whole = {"token_embd.weight": w.embed, "blk.0.shortconv.in_proj.weight": w.layers[0].in_proj,
             "blk.0.ffn_down.weight": w.layers[0].w2, "blk.3.attn_output.weight": w.layers[3].out_proj,
             "blk.2.ffn_down_exps.weight": w.layers[2].down_proj}
    for name, qt in whole.items():
        assert isinstance(qt, QuantizedTensor) and qt.layout == "x8", name
        assert torch.equal(qt.to_layout("rows").data.reshape(-1), raw[name].reshape(-1)), name
    assert w.lm_head is w.embed
    # a split qkv: each part rearranged into x8 like a whole weight (decode reads the rows layout's
    # K-quant tiles several times slower): v the file's Q6_K blocks, q and k its Q4_K blocks stacked
    qk, v = w.layers[3].qkv.parts
    assert qk.layout == v.layout == "x8" and not _in_mapping(v.data, reader)
    assert torch.equal(v.to_layout("rows").data.reshape(-1), raw["blk.3.attn_v.weight"].reshape(-1))
    assert torch.equal(qk.to_layout("rows").data,
                       torch.cat([raw["blk.3.attn_q.weight"], raw["blk.3.attn_k.weight"]]))
    # nothing is float but the small tensors, and what is not on the map is only the stacked copies
    stacked_bytes = 0
    for name, t in w.tensors():
        if isinstance(t, torch.Tensor):
            assert t.dim() == 1 or name.endswith((".conv", ".gate")), name
            continue
        for p in (t.parts if isinstance(t, SplitWeight) else (t,)):
            if not _in_mapping(p.data, reader) and p.layout != "x8":
                assert name.endswith(("qkv", "w13", "gate_up_proj")), name
                stacked_bytes += p.nbytes
    file_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    assert model.weight_bytes() <= file_bytes and stacked_bytes < 0.6 * file_bytes
    assert model.dtype == torch.bfloat16 and model.forward(_ids()).isfinite().all()


def test_greedy_tokens_equal_on_peaked_logits(tmp_path):
    # peaked logits (as in test_model_quant.py): an untied lm_head that is the embedding of a permutation
    # of the vocabulary, with the embedding 10x the layers' scale so it dominates the residual stream;
    # each position's top logit is then the permuted successor of its token, far ahead of the second.
    # The margin is checked against the quantized model's logit error, so the equality is earned
    hf = _moe_hf(seed=3, tie_word_embeddings=False)
    with torch.no_grad():
        perm = torch.randperm(V, generator=torch.Generator().manual_seed(3))
        hf.model.embed_tokens.weight.mul_(10)
        hf.lm_head.weight.copy_(hf.model.embed_tokens.weight[perm] * 5)
    hf.save_pretrained(tmp_path / "st")
    ours = from_pretrained(tmp_path / "st", dtype=torch.float32, progress=False)
    file = write_gguf(tmp_path / "peaked-Q4_K_M.gguf", ours, "Q4_K_M")
    model = from_pretrained(file, dtype=torch.float32, progress=False)
    assert model.weights.lm_head.format == "q6_k" and model.weights.embed.format == "q4_k"
    ref = _dequantized_reference(str(tmp_path / "st"), file)
    ids = _ids(1, 7, seed=5)
    n = 12
    want = ref.generate(ids, n, temperature=0, repetition_penalty=1.0, eos_token_id=[])
    assert len(set(want[0].tolist())) > n // 2
    full = torch.cat([ids, want], dim=1)
    logits = ref.forward(full)[0, ids.shape[1] - 1 : -1]
    top2 = logits.topk(2, dim=-1).values
    err = (model.forward(full)[0, ids.shape[1] - 1 : -1] - logits).abs().max()
    assert (top2[:, 0] - top2[:, 1]).min() > 2 * err, "reference logits not peaked enough for this test"
    got = model.generate(ids, n, temperature=0, repetition_penalty=1.0, eos_token_id=[])
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("new_type", ["Q4_K", "Q5_K", "Q8_0"])
def test_kquant_type_disagreeing_with_the_data(moe_q4_k_m, tmp_path, new_type):
    # the header says another block type for a Q6_K tensor's bytes: a clear error, not garbage weights
    import shutil

    _, file = moe_q4_k_m
    bad = tmp_path / "type.gguf"
    shutil.copy(file, bad)
    r = gguf.GGUFReader(bad, "r+")
    t = next(t for t in r.tensors if t.name == "blk.3.attn_v.weight")
    assert t.tensor_type.name == "Q6_K"
    t.field.parts[4][0] = int(gguf.GGMLQuantizationType[new_type])
    r.data.flush()
    del r
    with pytest.raises(ValueError, match="disagrees|truncated|blk.3.attn_v.weight"):
        from_pretrained(bad, progress=False)


def test_check_blocks_names_the_tensor():
    with pytest.raises(ValueError, match="'x' is Q4_K with rows of 300 values, not a multiple of its block size 256"):
        G._check_blocks("f.gguf", "x", "Q4_K", (4, 300), 4 * 144)
    with pytest.raises(ValueError, match="'x' is Q6_K of shape \\[4, 256\\]: 840 bytes of blocks, but the file gives it 830"):
        G._check_blocks("f.gguf", "x", "Q6_K", (4, 256), 830)
    G._check_blocks("f.gguf", "x", "Q5_K", (2, 3, 512), 2 * 3 * 2 * 176)


# ----------------------------------------------------------------------------- quant="q4_k_m"
def _plan(cfg):
    """llama.cpp name -> expected format under Q4_K_M, from kquants.q4_k_m_type directly."""
    n_v = len(cfg.attention_layers)
    out, i_v, i_down = {}, 0, 0
    out["token_embd.weight"] = q4_k_m_type("token_embd.weight", cfg.num_hidden_layers,
                                           tied_embeddings=cfg.tie_word_embeddings)
    if not cfg.tie_word_embeddings:
        out["output.weight"] = q4_k_m_type("output.weight", cfg.num_hidden_layers, tied_embeddings=False)
    for i in range(cfg.num_hidden_layers):
        p = f"blk.{i}."
        names = ["attn_q", "attn_k", "attn_v", "attn_output"] if cfg.is_attention(i) else \
            ["shortconv.in_proj", "shortconv.out_proj"]
        names += ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"] if cfg.is_moe_layer(i) else \
            ["ffn_gate", "ffn_up", "ffn_down"]
        for n in names:
            out[p + n + ".weight"] = q4_k_m_type(p + n + ".weight", cfg.num_hidden_layers, i_attn_v=i_v, n_attn_v=n_v,
                                                 i_ffn_down=None if cfg.is_moe else i_down)
        i_v += cfg.is_attention(i)
        i_down += 1
    return {k: v.lower() for k, v in out.items()}


def test_from_pretrained_q4_k_m_is_llama_cpps_mix_with_the_files_blocks(ckpt, tmp_path):
    st, ours = ckpt
    model = from_pretrained(st, dtype=torch.float32, quant="q4_k_m", progress=False)
    cfg = model.config
    # q/k/v rows: q then k then v; the first row of each part decides its format
    D, Hq, Hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    plan = _plan(cfg)
    for i, lw in enumerate(model.weights.layers):
        if lw.attention:
            want = [plan[f"blk.{i}.attn_{x}.weight"] for x in "qkv"]
            runs = tuple(f for j, f in enumerate(want) if j == 0 or want[j - 1] != f)
            assert _formats(lw.qkv) == runs, i
            if isinstance(lw.qkv, SplitWeight):
                assert [p.shape[0] for p in lw.qkv.parts] == [(Hq + Hkv) * D, Hkv * D]
    # the same blocks as the Q4_K_M file written from the same fp32 weights (the writer's choice and
    # quantizer), so the same logits
    file = write_gguf(tmp_path / "m.gguf", ours, "Q4_K_M", vocab=None)
    from_file = from_pretrained(file, dtype=torch.float32, progress=False, tokenizer=False)
    for (n, a), (n2, b) in zip(model.weights.tensors(), from_file.weights.tensors()):
        assert n == n2 and _formats(a) == _formats(b), n
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), n
        else:
            for pa, pb in zip(a.parts if isinstance(a, SplitWeight) else (a,), b.parts if isinstance(b, SplitWeight) else (b,)):
                assert torch.equal(pa.data, pb.data), n
    ids = _ids()
    assert rel_err(model.forward(ids), from_file.forward(ids)) < 1e-6
    assert model.weights.embed.format == plan["token_embd.weight"]


def test_default_model_q4_k_m_types(monkeypatch):
    # Quantizing the two full-width layers to K formats takes about a minute in numpy: every tensor
    # but the (small) embedding is recorded and left unquantized; the embedding is quantized for real
    # and checked against the float default's.
    calls = []
    real = W._quantize_into

    def record(dest, src, fmt):
        calls.append((tuple(src.shape), fmt))
        if src.numel() <= 512 * 2048:
            real(dest, src, fmt)

    monkeypatch.setattr(W, "_quantize_into", record)
    q = default_model(num_layers=2, vocab_size=512, dtype=torch.bfloat16, progress=False, quant="q4_k_m")
    cfg = q.config
    plan = _plan(cfg)
    assert q.weights.embed.format == plan["token_embd.weight"] == "q6_k"
    assert q.weights.lm_head is q.weights.embed
    for i, lw in enumerate(q.weights.layers):
        for attr, names in (("in_proj", ["shortconv.in_proj"]), ("conv_out", ["shortconv.out_proj"]),
                            ("out_proj", ["attn_output"]), ("w2", ["ffn_down"]), ("w13", ["ffn_gate", "ffn_up"]),
                            ("qkv", ["attn_q", "attn_k", "attn_v"])):
            v = getattr(lw, attr)
            if v is None:
                continue
            want = [plan[f"blk.{i}.{n}.weight"] for n in names]
            assert _formats(v) == tuple(f for j, f in enumerate(want) if j == 0 or want[j - 1] != f), (i, attr)
        for attr in ("operator_norm", "ffn_norm", "conv", "q_norm", "k_norm"):
            v = getattr(lw, attr)
            assert v is None or v.dtype == torch.bfloat16
    # every quantized weight (each SplitWeight part on its own) was filled once, with its format: in
    # full, or (a large K-quant weight) as its pool of quantized rows
    want = []
    for _, t in q.weights.tensors():
        if isinstance(t, torch.Tensor):
            continue
        pooled = W._pooled(t)
        for p in t.parts if isinstance(t, SplitWeight) else (t,):
            if isinstance(p, torch.Tensor):
                continue
            rows = p.shape.numel() // p.shape[-1]
            want.append(((min(rows, W._K_POOL_ROWS), p.shape[-1]) if pooled else tuple(p.shape), p.format))
    assert any(W._pooled(t) for _, t in q.weights.tensors() if not isinstance(t, torch.Tensor))
    assert sorted(want) == sorted(calls)
    f = default_model(num_layers=2, vocab_size=512, dtype=torch.bfloat16, progress=False)
    assert torch.equal(q.weights.embed.to_layout("rows").data, quantize(f.weights.embed, "q6_k").data)
    # after the first pooled weight the generator's stream differs from the float default's (the pool
    # draws fewer numbers), so only the weights before it are the float default's
    assert torch.equal(q.weights.final_norm, f.weights.final_norm)  # drawn before any pooled weight


def test_q4_k_m_needs_rows_of_whole_superblocks(tmp_path):
    from test_model import _hf_model, _moe_config

    _hf_model(_moe_config()).save_pretrained(tmp_path)  # hidden 48: no K-quant fits
    with pytest.raises(ValueError, match="q4_k_m.*multiple of 256"):
        from_pretrained(tmp_path, quant="q4_k_m", progress=False)


# ----------------------------------------------------------------------------- the bench command
@pytest.fixture
def fast_machine(monkeypatch):
    from lfm_kernels.benchmark import core

    monkeypatch.setattr(core, "measure_read_bandwidth", lambda device="cpu", nbytes=0, repeats=0: 20e9)
    monkeypatch.setattr(core, "measure_compute_peak", lambda device="cpu", quick=False: (100e9, "fixed for tests"))
    from lfm_kernels.benchmark import e2e

    monkeypatch.setattr(e2e, "measure_read_bandwidth", lambda *a, **k: 20e9)


def _bench(tmp_path, *extra):
    import json

    from lfm_kernels import cli

    path = tmp_path / "bench.json"
    rc = cli.main(["bench", "--quick", "--ops", "none", "--device", "cpu", "--json", str(path), "--e2e", *extra])
    return rc, json.loads(path.read_text())


def test_bench_e2e_model_file(moe_q4_k_m, tmp_path, fast_machine):
    _, file = moe_q4_k_m
    rc, data = _bench(tmp_path, "--model", file, "--prompt-len", "8")
    assert rc == 0
    rows = data["e2e"]
    assert [r["impl"] for r in rows] == ["lfm_kernels"]  # quantized: no transformers row
    r = rows[0]
    assert r["model"] == file and r["weights"] == "q4_k+q6_k" and r["num_layers"] == 4
    assert "q4_k" in r["weight_formats"] and "q6_k" in r["weight_formats"]
    assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
    # 3 decode steps: two recorded, then replayed (the row says so, so a table shows how it decoded)
    assert r["decode_path"].startswith("cpu graph ("), r["decode_path"]


def test_bench_e2e_paired_steps_replay(moe_q4_k_m, tmp_path, fast_machine):
    # the paired figure: --quick's 4 steps on the replayed CPU graph, ours only, median inside its range
    _, file = moe_q4_k_m
    rc, data = _bench(tmp_path, "--model", file, "--prompt-len", "8")
    assert rc == 0
    r = data["e2e"][0]
    assert r["paired_steps"] == 4 and r["paired_path"].startswith("cpu graph ("), r["paired_path"]
    lo, hi = r["paired_share_range"]
    assert 0 < lo <= r["decode_vs_paired_floor"] <= hi and r["paired_bandwidth_GBs"] > 0


def test_paired_decode_share_is_probe_time_over_step_time(monkeypatch):
    # fakes with known times: each probe "reads" 1 GB in 40 ms (25 GB/s), each step takes 10 ms; a
    # token of 0.5 GB then has a floor of 20 ms, twice the step: share 2.0 (sleeps only overshoot, and
    # both sides by about the same few hundred microseconds)
    import types

    from lfm_kernels import model as model_pkg
    from lfm_kernels.benchmark import e2e

    steps_run = []

    def stepper(model, state):
        def step(tok):
            time.sleep(0.010)
            steps_run.append(int(tok.item()))
        return step

    monkeypatch.setattr(model_pkg, "decode_stepper", stepper)
    fake = types.SimpleNamespace(new_state=lambda b, n: None, config=types.SimpleNamespace(max_position_embeddings=4096),
                                 device=torch.device("cpu"))
    out = e2e._paired_decode(fake, 500_000_000, steps=5, warmup=2, probes=[lambda: time.sleep(0.040)], probe_bytes=10**9)
    assert len(steps_run) == 7 and out["paired_steps"] == 5 and out["paired_path"] == "eager"
    assert out["paired_bandwidth_GBs"] == pytest.approx(25.0, rel=0.1)
    assert out["decode_vs_paired_floor"] == pytest.approx(2.0, rel=0.15)
    lo, hi = out["paired_share_range"]
    assert lo <= out["decode_vs_paired_floor"] <= hi


def test_bench_e2e_floor_takes_probes_before_and_after(moe_q4_k_m, tmp_path, fast_machine, monkeypatch):
    from lfm_kernels.benchmark import e2e

    probes = iter([20e9, 30e9])
    monkeypatch.setattr(e2e, "measure_read_bandwidth", lambda *a, **k: next(probes))
    _, file = moe_q4_k_m
    rc, data = _bench(tmp_path, "--model", file, "--prompt-len", "8")
    assert rc == 0
    r = data["e2e"][0]
    assert (r["bandwidth_before_GBs"], r["bandwidth_after_GBs"], r["bandwidth_GBs"]) == (20.0, 30.0, 25.0)
    assert r["bandwidth_steady"] is False  # 1.5x apart: flagged
    assert r["floor_tok_s"] == pytest.approx(25e9 / r["bytes_per_token"])
    assert r["decode_vs_floor"] == pytest.approx(r["decode_tok_s"] / r["floor_tok_s"])


def test_bench_e2e_warns_when_big_weights_miss_huge_pages(moe_q4_k_m, tmp_path, fast_machine, monkeypatch, capsys):
    """The share is read per weight (stubbed here: the kernel decides where huge pages go); under 80% of
    the weights of 2 MiB and up the bench says why the decode will be slow, at 100% it says nothing."""
    from lfm_kernels import _memory

    _, file = moe_q4_k_m
    for share, warned in ((0.3, True), (1.0, False)):
        monkeypatch.setattr(_memory, "huge_page_share", lambda tensors, s=share: s)
        rc, data = _bench(tmp_path, "--model", file, "--prompt-len", "4", "--new-tokens", "2")
        assert rc == 0 and data["e2e"][0]["weights_on_huge_pages"] == f"{100 * share:.0f}%"
        err = capsys.readouterr()
        assert ("of the weights of 2 MiB and up are on huge pages" in err.out + err.err) is warned


def test_bench_e2e_quant_q4_k_m_quick(tmp_path, fast_machine, monkeypatch):
    # the --quick default has a 128k vocabulary at hidden 2048: its Q6_K embedding alone takes minutes
    # in numpy, so every tensor is quantized from its first 64 rows, repeated (the layout and the bytes
    # per token are the real ones; the values are periodic)
    real = W._quantize_into

    def periodic(dest, src, fmt):
        rows, out = src.reshape(-1, src.shape[-1]), dest.view(-1, dest.shape[-1])
        head = torch.empty(min(64, rows.shape[0]), out.shape[-1], dtype=torch.uint8)
        real(head, rows[: head.shape[0]], fmt)
        out.copy_(head.repeat(-(-rows.shape[0] // head.shape[0]), 1)[: rows.shape[0]])

    monkeypatch.setattr(W, "_quantize_into", periodic)
    rc, data = _bench(tmp_path, "--quant", "q4_k_m", "--no-transformers", "--num-layers", "1", "--prompt-len", "4",
                      "--new-tokens", "2")
    assert rc == 0
    rows = data["e2e"]
    assert [r["weights"] for r in rows] == ["bfloat16", "q4_k_m"]
    # one layer: the tied Q6_K embedding (6.6 bits a weight, 0.41x bf16) is most of what a token reads
    assert "q6_k" in rows[1]["weight_formats"] and rows[1]["bytes_per_token"] < 0.45 * rows[0]["bytes_per_token"]


def test_bench_model_option_errors(moe_q4_k_m, tmp_path, capsys):
    from lfm_kernels import cli

    _, file = moe_q4_k_m
    for argv, msg in (([file], "add --e2e"), ([file, "--e2e", "--quant", "q4_k_m"], "keeps its own formats"),
                      ([str(tmp_path / "none.gguf"), "--e2e"], "no such file"),
                      ([file, "--e2e", "--num-layers", "2"], "keeps its own")):
        with pytest.raises(SystemExit):
            cli.main(["bench", "--ops", "none", "--model", *argv])
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--e2e", "--quant", "q5_k_m"])
    assert "q4_k_m" in capsys.readouterr().err
