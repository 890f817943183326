"""GGUF files (llama.cpp's format) of LFM2 / LFM2-MoE models: our writer's files against the same
weights from safetensors (F32, BF16, and each quantized type expanded with dequantize=True), a file
written by llama.cpp's own converter against transformers, bad files, and the file's tokenizer and
chat template.

Dimensions are multiples of 256 so every K-quant applies to every matrix. The quantized files are
compared with dequantize=True against the safetensors model whose weights were replaced by the very
same decoded values: the weights are bit-identical, so the logits must agree to fp32 round-off
(no activation quantization is involved on this path)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import rel_err

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from lfm_kernels.model import apply_chat_template, from_pretrained  # noqa: E402
from lfm_kernels.model import gguf as G  # noqa: E402
from lfm_kernels.model.gguf_write import gguf_tensors, make_vocab, write_gguf  # noqa: E402

LOGIT_TOL = 1e-5  # same weights, same ops: fp32 round-off only
HF_TOL = 1e-4  # against transformers' eager forward (as in test_model.py)
V = 300


def _moe_hf(seed=0):
    from test_model import _hf_model, _moe_config

    cfg = _moe_config(vocab_size=V, hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                      num_experts_per_tok=2, num_dense_layers=1,
                      layer_types=["conv", "full_attention", "conv", "full_attention"])
    return _hf_model(cfg, seed=seed)


def _dense_hf(seed=1):
    from test_model import _hf_model

    cfg = transformers.Lfm2Config(
        vocab_size=V, hidden_size=256, intermediate_size=256, block_auto_adjust_ff_dim=False, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention", "conv"],
        initializer_range=0.2, attn_implementation="eager", tie_word_embeddings=False,
    )
    return _hf_model(cfg, seed=seed)


@pytest.fixture(scope="module", params=["moe", "dense"])
def ckpt(request, tmp_path_factory):
    """(transformers model, safetensors dir, our model loaded from it in fp32)."""
    hf = _moe_hf() if request.param == "moe" else _dense_hf()
    path = tmp_path_factory.mktemp(f"st_{request.param}")
    hf.save_pretrained(path)
    return hf, str(path), from_pretrained(path, progress=False)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    hf = _moe_hf()
    path = tmp_path_factory.mktemp("st_moe")
    hf.save_pretrained(path)
    return hf, str(path), from_pretrained(path, progress=False)


@pytest.fixture(scope="module")
def moe_f32_file(moe, tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-F32.gguf", moe[2], "F32")


def _ids(batch=2, T=9):
    return torch.randint(0, V, (batch, T))


def _in_mapping(t: torch.Tensor, reader) -> bool:
    lo = reader.data.ctypes.data
    p = t.untyped_storage().data_ptr()
    return lo <= p < lo + reader.data.nbytes


# ----------------------------------------------------------------------------- float files
def test_f32_gguf_gives_the_safetensors_logits(ckpt, tmp_path):
    hf, st, ours = ckpt
    file = write_gguf(tmp_path / "m-F32.gguf", ours, "F32")
    model = from_pretrained(file, progress=False)
    assert model.dtype == torch.float32
    c, r = model.config, ours.config
    fields = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "layer_types", "norm_eps", "rope_theta",
              "conv_L_cache", "num_dense_layers", "num_experts", "num_experts_per_tok", "use_expert_bias",
              "tie_word_embeddings", "conv_bias"]
    if r.is_moe:
        fields += ["moe_intermediate_size", "routed_scaling_factor", "norm_topk_prob"]
    for field in fields:
        assert getattr(c, field) == getattr(r, field), field
    for (n1, a), (n2, b) in zip(model.weights.tensors(), ours.weights.tensors()):
        assert n1 == n2 and a.shape == b.shape and torch.equal(a, b), n1
    # whole-weight float tensors are the mapped file itself (no copy); fused ones are copies
    assert _in_mapping(model.weights.embed, model.gguf_reader)
    assert _in_mapping(model.weights.layers[0].in_proj, model.gguf_reader)
    assert not _in_mapping(model.weights.layers[1].qkv, model.gguf_reader)
    ids = _ids()
    assert rel_err(model.forward(ids), ours.forward(ids)) < LOGIT_TOL
    with torch.no_grad():
        assert rel_err(model.forward(ids), hf(ids).logits) < HF_TOL


def test_directory_holding_one_gguf_file(moe_f32_file, tmp_path):
    shutil.copy(moe_f32_file, tmp_path / "model.gguf")
    assert from_pretrained(tmp_path, progress=False).config.num_hidden_layers == 4
    shutil.copy(moe_f32_file, tmp_path / "other.gguf")
    with pytest.raises(ValueError, match="2 .gguf files"):
        from_pretrained(tmp_path, progress=False)


def test_fused_qkv_layout(moe, tmp_path):
    _, _, ours = moe
    file = write_gguf(tmp_path / "qkv.gguf", ours, "F32", fuse_qkv=True)
    assert any(t.name == "blk.1.attn_qkv.weight" for t in G.open_gguf(file).tensors)
    model = from_pretrained(file, progress=False)
    assert _in_mapping(model.weights.layers[1].qkv, model.gguf_reader)
    ids = _ids()
    assert rel_err(model.forward(ids), ours.forward(ids)) < LOGIT_TOL


@pytest.mark.parametrize("ftype", ["BF16", "F16"])
def test_bf16_and_f16_files(moe, tmp_path, ftype):
    _, st, ours = moe
    file = write_gguf(tmp_path / f"m-{ftype}.gguf", ours, ftype)
    model = from_pretrained(file, progress=False)
    assert model.dtype == torch.bfloat16
    if ftype == "BF16":
        ref = from_pretrained(st, dtype=torch.bfloat16, progress=False)
        for (n, a), (_, b) in zip(model.weights.tensors(), ref.weights.tensors()):
            assert torch.equal(a, b), n
        ids = _ids()
        assert rel_err(model.forward(ids).float(), ref.forward(ids).float()) < LOGIT_TOL
    f32 = from_pretrained(file, dtype=torch.float32, progress=False)
    t = dict(f32.weights.tensors())
    gate_up = ours.weights.layers[2].gate_up_proj
    dt = torch.bfloat16 if ftype == "BF16" else torch.float16
    assert torch.equal(t["layers.2.gate_up_proj"], gate_up.to(dt).float())


# ----------------------------------------------------------------------------- quantized files
def _dequantized_reference(st, file):
    """Our model from safetensors with every tensor replaced by the file's tensor decoded by the `gguf`
    package on its own (placed through the writer's name map, independent of the loader's)."""
    ref = from_pretrained(st, progress=False)
    reader = gguf.GGUFReader(file)
    by_name = {t.name: t for t in reader.tensors}
    with torch.no_grad():
        for name, view, _ in gguf_tensors(ref):
            t = by_name[name]
            vals = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(view.shape))
            view.copy_(torch.from_numpy(np.array(vals)))
    return ref


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_0", "Q4_K", "Q6_K", "Q5_K", "Q4_K_M"])
def test_quantized_file_dequantized_gives_the_logits_of_the_same_weights(moe, tmp_path, ftype):
    _, st, ours = moe
    file = write_gguf(tmp_path / f"m-{ftype}.gguf", ours, ftype)
    types = {t.name: t.tensor_type.name for t in G.open_gguf(file).tensors}
    matrices = [n for n in types if not n.endswith(("norm.weight", "ffn_gate_inp.weight", "conv.weight", ".bias"))]
    if ftype == "Q4_K_M":
        # use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2 (integer division):
        # ffn_down of layers 0..3 (n = 4: 0, 3): layers 2 and 3; attn_v 0..1 (n = 2: 0, 1): the second
        assert types["token_embd.weight"] == "Q6_K"  # tied: the output matrix
        assert [types[f"blk.{i}.ffn_down{'_exps' if i else ''}.weight"] for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
        assert [types[f"blk.{i}.attn_v.weight"] for i in (1, 3)] == ["Q4_K", "Q6_K"]
        assert types["blk.1.attn_q.weight"] == "Q4_K" and types["blk.2.ffn_up_exps.weight"] == "Q4_K"
    else:
        assert {types[n] for n in matrices} == {ftype}
    assert types["blk.0.shortconv.conv.weight"] == "F32" and types["blk.2.ffn_gate_inp.weight"] == "F32"

    # without dequantize every type loads as QuantizedTensor weights (test_model_quant.py,
    # test_gguf_kquant.py); here the expanded weights are compared
    model = from_pretrained(file, dtype=torch.float32, dequantize=True, progress=False)
    ref = _dequantized_reference(st, file)
    for (n, a), (_, b) in zip(model.weights.tensors(), ref.weights.tensors()):
        assert torch.equal(a, b), n
    ids = _ids()
    assert rel_err(model.forward(ids), ref.forward(ids)) < LOGIT_TOL
    # and the quantized model is still the model (loose: 4-bit weights of a random model)
    assert rel_err(model.forward(ids), ours.forward(ids)) < {"Q8_0": 0.05, "Q6_K": 0.2}.get(ftype, 1.0)


# ----------------------------------------------------------------------------- llama.cpp's converter
LLAMA_CPP_VERSION = "0.3.36"


def _llama_cpp_dir():
    """llama.cpp's source tree from the llama-cpp-python sdist (which vendors it): $LFM_KERNELS_LLAMA_CPP,
    else a cached copy, else downloaded once with pip into the cache; None when it cannot be had."""
    env = os.environ.get("LFM_KERNELS_LLAMA_CPP")
    if env:
        return env if os.path.isfile(os.path.join(env, "convert_hf_to_gguf.py")) else None
    cache = os.path.join(os.path.expanduser("~"), ".cache", "lfm_kernels")
    src = os.path.join(cache, f"llama_cpp_python-{LLAMA_CPP_VERSION}", "vendor", "llama.cpp")
    if os.path.isfile(os.path.join(src, "convert_hf_to_gguf.py")):
        return src
    os.makedirs(cache, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                        f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", cache, "-q"],
                       check=True, timeout=240, capture_output=True)
        import tarfile

        with tarfile.open(os.path.join(cache, f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz")) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and
                       ("/conversion/" in m.name or "/gguf-py/" in m.name or m.name.endswith("convert_hf_to_gguf.py")
                        or "/ggml/" in m.name)]
            tar.extractall(cache, members=members, filter="data")
    except Exception:  # noqa: BLE001 - no network, no pip, corrupt download: the test says so and skips
        return None
    return src if os.path.isfile(os.path.join(src, "convert_hf_to_gguf.py")) else None


_CONVERT = r'''
import json, os, sys
llama_dir, ckpt, out, outtype = sys.argv[1:5]
sys.path.insert(0, os.path.join(llama_dir, "gguf-py"))
sys.path.insert(0, llama_dir)
import gguf
import convert_hf_to_gguf as conv
from conversion import lfm2

def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]

def set_vocab(self):
    # the random checkpoint has no tokenizer: a byte-level vocabulary of the config's size instead
    V = json.load(open(os.path.join(ckpt, "config.json")))["vocab_size"]
    toks = bytes_to_unicode() + [f"tok{i}" for i in range(256, V)]
    w = self.gguf_writer
    w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("default"); w.add_token_list(toks)
    w.add_token_types([gguf.TokenType.NORMAL] * V); w.add_token_merges(["\u0120 t"])
    w.add_bos_token_id(1); w.add_eos_token_id(7); w.add_pad_token_id(0)

for cls in (lfm2.LFM2MoeModel, lfm2.LFM2Model):
    cls.set_vocab = set_vocab
sys.argv = ["convert_hf_to_gguf.py", ckpt, "--outfile", out, "--outtype", outtype]
conv.main()
'''


def test_gguf_from_llama_cpp_converter_matches_transformers(tmp_path):
    src = _llama_cpp_dir()
    if src is None:
        pytest.skip(f"llama.cpp's convert_hf_to_gguf.py (llama-cpp-python=={LLAMA_CPP_VERSION} sdist) could not be "
                    "had: no $LFM_KERNELS_LLAMA_CPP, no cached copy, and pip download failed")
    hf = _moe_hf(seed=3)
    ckpt = tmp_path / "ckpt"
    hf.save_pretrained(ckpt)
    script = tmp_path / "convert.py"
    script.write_text(_CONVERT)
    outs = {}
    for outtype in ("f32", "q8_0"):
        out = tmp_path / f"conv-{outtype}.gguf"
        r = subprocess.run([sys.executable, str(script), src, str(ckpt), str(out), outtype],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[outtype] = str(out)
    model = from_pretrained(outs["f32"], progress=False)
    assert model.config.layer_types == list(hf.config.layer_types)
    assert model.config.num_dense_layers == 1 and model.config.num_experts == 4 and model.config.use_expert_bias
    assert model.config.eos_token_id == [7] and model.tokenizer is not None
    ids = _ids(2, 11)
    with torch.no_grad():
        truth = hf(ids).logits
    assert rel_err(model.forward(ids), truth) < HF_TOL
    # the converter's Q8_0 file: the matrices in Q8_0 (the embedding too), norms / router / conv in F32
    types = {t.name: t.tensor_type.name for t in G.open_gguf(outs["q8_0"]).tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.2.ffn_down_exps.weight"] == "Q8_0"
    assert types["blk.2.ffn_gate_inp.weight"] == "F32" and types["blk.0.shortconv.conv.weight"] == "F32"
    q8 = from_pretrained(outs["q8_0"], dtype=torch.float32, dequantize=True, progress=False)
    ref = _dequantized_reference(str(ckpt), outs["q8_0"])
    assert rel_err(q8.forward(ids), ref.forward(ids)) < LOGIT_TOL


# ----------------------------------------------------------------------------- bad files
def _rewrite(src, dst, edit_tensor=None, arch=None):
    """Copy a GGUF file field by field and tensor by tensor through gguf's writer, editing on the way:
    edit_tensor(name, array, type) -> (name, array, type) or None to drop the tensor."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch or r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = f.contents()
        if arch and key.startswith(r.fields["general.architecture"].contents() + "."):
            key = arch + key[key.index("."):]
        w.add_key_value(key, value, vtype, sub)
    for t in r.tensors:
        item = (t.name, np.array(t.data), t.tensor_type)
        if edit_tensor is not None:
            item = edit_tensor(*item)
            if item is None:
                continue
        name, arr, ty = item
        w.add_tensor(name, arr, raw_dtype=ty if arr.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(dst)


@pytest.fixture
def no_allocation(monkeypatch):
    """Fails the test if the loader allocates real weights (anything but the meta-device layout)."""
    real = G.allocate
    calls = []

    def spy(cfg, dtype, device="cpu"):
        calls.append(str(device))
        return real(cfg, dtype, device)

    monkeypatch.setattr(G, "allocate", spy)
    yield calls
    assert all(d == "meta" for d in calls), f"weights were allocated on {calls} before the error"


def test_wrong_magic(tmp_path, no_allocation):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + os.urandom(200))
    with pytest.raises(ValueError, match="not a GGUF file"):
        from_pretrained(bad, progress=False)


@pytest.mark.parametrize("keep", [0.6, 0.001])
def test_truncated_file(moe_f32_file, tmp_path, keep, no_allocation):
    data = open(moe_f32_file, "rb").read()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: max(16, int(len(data) * keep))])
    with pytest.raises(ValueError, match="truncated"):
        from_pretrained(bad, progress=False)


def test_tensor_type_disagreeing_with_the_data(moe_f32_file, tmp_path, no_allocation):
    bad = tmp_path / "type.gguf"
    shutil.copy(moe_f32_file, bad)
    r = gguf.GGUFReader(bad, "r+")
    t = next(t for t in r.tensors if t.name == "blk.1.attn_k.weight")
    t.field.parts[4][0] = int(gguf.GGMLQuantizationType.F16)  # the header now says F16 for F32 data
    r.data.flush()
    del r
    with pytest.raises(ValueError, match="blk.1.attn_k.weight|disagrees"):
        from_pretrained(bad, progress=False)


def test_tensor_shape_disagreeing_with_the_metadata(moe_f32_file, tmp_path, no_allocation):
    def edit(name, arr, ty):
        return (name, arr[:-64], ty) if name == "blk.3.attn_k.weight" else (name, arr, ty)

    bad = _rewrite(moe_f32_file, tmp_path / "shape.gguf", edit)
    with pytest.raises(ValueError, match=r"'blk.3.attn_k.weight' has shape \[64, 256\].*implies \[128, 256\]"):
        from_pretrained(bad, progress=False)


def test_unsupported_tensor_type(moe_f32_file, tmp_path, no_allocation):
    def edit(name, arr, ty):
        if name == "blk.2.ffn_up_exps.weight":
            return name, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q5_0), gguf.GGMLQuantizationType.Q5_0
        return name, arr, ty

    bad = _rewrite(moe_f32_file, tmp_path / "q5_0.gguf", edit)
    with pytest.raises(ValueError, match="'blk.2.ffn_up_exps.weight' has type Q5_0"):
        from_pretrained(bad, dequantize=True, progress=False)


@pytest.mark.parametrize("drop", ["blk.3.ffn_down_exps.weight", "blk.1.attn_q_norm.weight", "token_embd_norm.weight"])
def test_missing_tensor(moe_f32_file, tmp_path, drop, no_allocation):
    bad = _rewrite(moe_f32_file, tmp_path / "missing.gguf", lambda n, a, t: None if n == drop else (n, a, t))
    with pytest.raises(ValueError, match=f"tensor '{drop}' is missing"):
        from_pretrained(bad, progress=False)


def test_unexpected_tensor(moe_f32_file, tmp_path, no_allocation):
    def edit(name, arr, ty):
        return ("blk.0.attn_q.weight", arr, ty) if name == "blk.0.shortconv.in_proj.weight" else (name, arr, ty)

    bad = _rewrite(moe_f32_file, tmp_path / "unexpected.gguf", edit)
    with pytest.raises(ValueError, match="unexpected tensor 'blk.0.attn_q.weight'"):
        from_pretrained(bad, progress=False)


def test_unknown_architecture(moe_f32_file, tmp_path, no_allocation):
    bad = _rewrite(moe_f32_file, tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(ValueError, match="architecture 'llama' is not supported"):
        from_pretrained(bad, progress=False)


def test_quantized_off_the_cpu_allocates_nothing(moe, tmp_path, no_allocation):
    # quantized weights run on the CPU only (C++ kernels): asking for another device fails at the check
    file = write_gguf(tmp_path / "q4k.gguf", moe[2], "Q4_K")
    with pytest.raises(ValueError, match="Q4_K: quantized weights run on the CPU only.*dequantize=True"):
        from_pretrained(file, device="cuda", progress=False)


def test_empty_directory_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        G.open_gguf(tmp_path / "none.gguf")
    (tmp_path / "x.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="not a GGUF file"):
        G.open_gguf(tmp_path / "x.gguf")


# ----------------------------------------------------------------------------- tokenizer and template
def test_tokenizer_round_trip_and_specials(moe_f32_file):
    tok = from_pretrained(moe_f32_file, progress=False).tokenizer
    for text in ("Hello, world! What is the weather in Paris today?", "  spaces\tand\nnewlines 12345 ",
                 "unicode: héllo wörld — 東京 🙂", "def main():\n    print('hello')\n"):
        ids = tok.encode(text, add_special_tokens=False)
        assert all(0 <= i < V for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode("Hi")[0] == 1  # BOS (<|startoftext|>) added, as llama.cpp does for lfm2
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)
    assert ids[0] == 6 and ids[-1] == 7
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 0
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi"
    # the merges are used: the longest merged token of the vocabulary encodes to itself
    merged = max((t for t in make_vocab(V)["tokens"][14 + 256:] if not t.startswith("<|")), key=len)
    text = tok.convert_tokens_to_string([merged])
    assert len(merged) > 2 and tok.encode(text, add_special_tokens=False) == [tok.convert_tokens_to_ids(merged)]


def test_chat_template_from_the_file(moe_f32_file):
    model = from_pretrained(moe_f32_file, progress=False)
    tok = model.tokenizer
    assert tok.chat_template is not None
    tools = [{"name": "get_weather", "description": "Weather", "parameters": {"city": {"type": "string"}}}]
    for messages, tl in (
        ([{"role": "user", "content": "Hi"}], None),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
          {"role": "assistant", "content": "<|tool_call_start|>[get_weather(city=\"Paris\")]<|tool_call_end|>"},
          {"role": "tool", "content": "[{\"t\": 21}]"}], tools),
        ([{"role": "user", "content": "Weather?"}], tools),
    ):
        rendered = tok.apply_chat_template(messages, tools=tl, tokenize=False, add_generation_prompt=True)
        assert rendered == apply_chat_template(messages, tools=tl, add_generation_prompt=True)


def test_file_without_tokenizer(moe, tmp_path):
    file = write_gguf(tmp_path / "notok.gguf", moe[2], "F32", vocab=None, chat_template=None)
    model = from_pretrained(file, progress=False)
    assert model.tokenizer is None and model.config.vocab_size == V


def test_make_vocab_sizes():
    v = make_vocab(V)
    assert len(v["tokens"]) == V == len(v["token_type"]) and v["tokens"][7] == "<|im_end|>"
    with pytest.raises(ValueError, match="vocab_size"):
        make_vocab(100)


def test_metadata_keys_are_llama_cpps(moe_f32_file):
    r = G.open_gguf(moe_f32_file)
    f = {k: r.fields[k].contents() for k in r.fields if k.startswith("lfm2moe.")}
    assert f["lfm2moe.attention.head_count_kv"] == [0, 2, 0, 2]
    assert f["lfm2moe.shortconv.l_cache"] == 3 and f["lfm2moe.leading_dense_block_count"] == 1
    assert f["lfm2moe.expert_gating_func"] == 2 and f["lfm2moe.expert_count"] == 4
    shapes = {t.name: t.shape.tolist() for t in r.tensors}
    assert shapes["blk.2.ffn_gate_exps.weight"] == [256, 256, 4]  # GGML order: {H, I, E}
    assert shapes["blk.0.shortconv.conv.weight"] == [3, 256]  # {L, H}
    assert shapes["token_embd.weight"] == [256, V]
    assert json.loads(json.dumps(f))  # plain values


def test_default_model_written_tensor_by_tensor(tmp_path, no_allocation):
    from lfm_kernels.model.config import lfm25_8b_a1b_config
    from lfm_kernels.model.gguf_write import write_default_gguf

    file = write_default_gguf(tmp_path / "default-Q4_K_M.gguf", "Q4_K_M", num_layers=3, vocab_size=512,
                              distinct_rows=64, progress=False)
    reader = G.open_gguf(file)
    cfg, want = G.gguf_config(reader), lfm25_8b_a1b_config(3, vocab_size=512)
    for field in ("hidden_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "intermediate_size",
                  "layer_types", "num_dense_layers", "num_key_value_heads", "head_dim", "rope_theta"):
        assert getattr(cfg, field) == getattr(want, field), field
    t = {x.name: x for x in reader.tensors}
    assert t["blk.2.ffn_down_exps.weight"].tensor_type.name == "Q6_K"  # use_more_bits(2, 3): last eighth
    up = t["blk.2.ffn_up_exps.weight"]
    assert up.tensor_type.name == "Q4_K" and _as_list(up.shape) == [2048, 1792, 32]
    rows = np.asarray(up.data).reshape(-1, up.data.shape[-1])
    assert np.array_equal(rows[:64], rows[64:128]) and not np.array_equal(rows[0], rows[1])  # periodic blocks
    with pytest.raises(ValueError, match="CPU only"):  # checked before any weight is allocated
        from_pretrained(file, device="cuda", progress=False)


def _as_list(shape):
    return [int(s) for s in shape]
