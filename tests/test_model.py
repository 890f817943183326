"""lfm_kernels.model against transformers: loading (layouts, shards, bad checkpoints), prefill logits,
greedy continuations, batches of different lengths, sampling, text prompts and chat with a tokenizer
(templates and tool-call parsing: test_chat.py)."""

import json
import os
import re
import sys

import pytest
import torch
from conftest import rel_err, write_word_tokenizer

from lfm_kernels.model import (
    config_from_dict,
    default_model,
    from_pretrained,
    sample_next,
    to_transformers,
)

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

LOGIT_TOL = 1e-4  # fp32 prefill logits within 1e-4 relative error of transformers' eager


def _moe_config(**over):
    kw = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        moe_intermediate_size=24,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=6,
        num_experts_per_tok=2,
        num_dense_layers=2,
        layer_types=["conv", "conv", "full_attention", "conv", "full_attention"],
        initializer_range=0.2,  # well-separated logits: greedy paths don't hinge on 1e-7 near-ties
        attn_implementation="eager",
        experts_implementation="eager",
    )
    kw.update(over)
    return transformers.Lfm2MoeConfig(**kw)


def _hf_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = transformers.Lfm2MoeForCausalLM(cfg) if cfg.model_type == "lfm2_moe" else transformers.Lfm2ForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms, conv taps and expert bias, so loading mistakes show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small random Lfm2MoeForCausalLM saved with save_pretrained (per-expert layout on disk)."""
    path = tmp_path_factory.mktemp("tiny_moe")
    hf = _hf_model(_moe_config())
    hf.save_pretrained(path)
    return hf, str(path)


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


def _hf_greedy(hf, ids, n):
    """transformers' greedy loop with its own cache, never stopping early."""
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0, repetition_penalty=1.0)
    return out[:, ids.shape[1]:]


# ----------------------------------------------------------------------------- parity
def test_prefill_logits_match_transformers(tiny):
    hf, path = tiny
    model = from_pretrained(path, progress=False)
    assert model.dtype == torch.float32
    for T in (1, 2, 3, 17):
        ids = torch.randint(0, 97, (2, T))
        err = rel_err(model.forward(ids), _hf_logits(hf, ids))
        assert err < LOGIT_TOL, f"T={T}: logits relative error {err:.3g}"


def test_greedy_continuation_matches_transformers(tiny):
    hf, path = tiny
    model = from_pretrained(path, progress=False)
    ids = torch.randint(3, 97, (1, 11))
    ours = model.generate(ids, 32, temperature=0, repetition_penalty=1.0, eos_token_id=[])
    assert ours.dtype == torch.int64 and ours.shape == (1, 32)
    assert ours.tolist() == _hf_greedy(hf, ids, 32).tolist()


def test_batch_of_different_lengths(tiny):
    """Right-padded batch == each prompt alone in transformers (logits of the last prompt token and
    the whole greedy continuation)."""
    hf, path = tiny
    model = from_pretrained(path, progress=False)
    prompts = [torch.randint(3, 97, (13,)).tolist(), torch.randint(3, 97, (4,)).tolist(), [5]]
    ours = model.generate(prompts, 32, temperature=0, repetition_penalty=1.0, eos_token_id=[])
    assert ours.shape == (3, 32)
    for b, p in enumerate(prompts):
        ref = _hf_greedy(hf, torch.tensor([p]), 32)
        assert ours[b].tolist() == ref[0].tolist(), f"row {b} (prompt length {len(p)})"
    # transformers-style left-padded ids with an attention mask give the same rows
    left = torch.zeros(3, 13, dtype=torch.int64)
    mask = torch.zeros(3, 13, dtype=torch.int64)
    for b, p in enumerate(prompts):
        left[b, 13 - len(p):] = torch.tensor(p)
        mask[b, 13 - len(p):] = 1
    again = model.generate(left, 32, temperature=0, repetition_penalty=1.0, eos_token_id=[], attention_mask=mask)
    assert torch.equal(again, ours)
    # the prefill logits of each row's last real token, too
    state = model.new_state(3, 20)
    ids = torch.zeros(3, 13, dtype=torch.int64)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    logits = model.prefill(ids, torch.tensor([len(p) for p in prompts]), state)
    for b, p in enumerate(prompts):
        ref = _hf_logits(hf, torch.tensor([p]))[0, -1]
        assert rel_err(logits[b], ref) < LOGIT_TOL


def test_decode_logits_match_transformers_step_by_step(tiny):
    hf, path = tiny
    model = from_pretrained(path, progress=False)
    ids = torch.randint(3, 97, (2, 6))
    state = model.new_state(2, 12)
    model.prefill(ids, torch.tensor([6, 6]), state)
    seq = ids
    for _ in range(4):
        nxt = torch.randint(3, 97, (2,))
        seq = torch.cat([seq, nxt[:, None]], 1)
        ours = model.decode_step(nxt, state)
        ref = _hf_logits(hf, seq)[:, -1]
        assert rel_err(ours, ref) < LOGIT_TOL
    assert state.seq_lens.tolist() == [10, 10]


def test_generate_stops_on_eos_and_pads(tiny):
    hf, path = tiny
    model = from_pretrained(path, progress=False)
    ids = torch.randint(3, 97, (2, 5))
    free = model.generate(ids, 8, temperature=0, repetition_penalty=1.0, eos_token_id=[])
    stop = int(free[0, 2])  # row 0's third token becomes the stop token
    streamed = []
    out = model.generate(ids, 8, temperature=0, repetition_penalty=1.0, eos_token_id=[stop],
                         callback=lambda b, t: streamed.append((b, t)))
    row0 = free[0].tolist()
    cut = row0.index(stop) + 1
    assert out[0, :cut].tolist() == row0[:cut]
    assert (out[0, cut:] == model.config.pad_token_id).all()
    assert [t for b, t in streamed if b == 0] == row0[:cut]
    row1 = free[1].tolist()
    if stop in row1:
        assert out[1, : row1.index(stop) + 1].tolist() == row1[: row1.index(stop) + 1]
    else:
        assert out[1].tolist() == row1
        assert [t for b, t in streamed if b == 1] == row1


# ----------------------------------------------------------------------------- checkpoint layouts
def test_sharded_checkpoint(tiny, tmp_path):
    hf, _ = tiny
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    model = from_pretrained(tmp_path, progress=False)
    ids = torch.randint(0, 97, (1, 9))
    assert rel_err(model.forward(ids), _hf_logits(hf, ids)) < LOGIT_TOL


def _write_checkpoint(path, tensors: dict, config: dict):
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def test_fused_expert_layout_checkpoint(tiny, tmp_path):
    """transformers' in-memory layout (gate_up_proj [E, 2I, H], down_proj [E, H, I]) on disk, in bf16."""
    hf, path = tiny
    sd = {k: v if k.endswith("expert_bias") else v.to(torch.bfloat16)  # expert_bias stays fp32, as in HF
          for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    cfg = json.load(open(os.path.join(path, "config.json")))
    _write_checkpoint(tmp_path, sd, cfg)
    model = from_pretrained(tmp_path, progress=False)
    assert model.dtype == torch.bfloat16
    ref_model = from_pretrained(path, dtype=torch.bfloat16, progress=False)  # per-expert layout
    for (n1, a), (n2, b) in zip(model.weights.tensors(), ref_model.weights.tensors()):
        assert n1 == n2 and torch.equal(a, b), n1


def test_per_expert_layout_written_by_hand(tiny, tmp_path):
    """The original layout written from the fused tensors ourselves, with a shuffled tensor order."""
    hf, path = tiny
    cfg = hf.config
    I = cfg.moe_intermediate_size
    sd = {}
    for k, v in hf.state_dict().items():
        if k.endswith("experts.gate_up_proj"):
            base = k[: -len("gate_up_proj")]
            for e in range(v.shape[0]):
                sd[f"{base}{e}.w1.weight"] = v[e, :I]
                sd[f"{base}{e}.w3.weight"] = v[e, I:]
        elif k.endswith("experts.down_proj"):
            base = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                sd[f"{base}{e}.w2.weight"] = v[e]
        elif k != "lm_head.weight":
            sd[k] = v
    keys = list(sd)
    order = torch.randperm(len(keys)).tolist()
    _write_checkpoint(tmp_path, {keys[i]: sd[keys[i]] for i in order}, json.load(open(os.path.join(path, "config.json"))))
    model = from_pretrained(tmp_path, progress=False)
    ids = torch.randint(0, 97, (2, 7))
    assert rel_err(model.forward(ids), _hf_logits(hf, ids)) < LOGIT_TOL


def _checkpoint_dict(path):
    return load_file(os.path.join(path, "model.safetensors")), json.load(open(os.path.join(path, "config.json")))


@pytest.mark.parametrize(
    "name", ["model.layers.3.feed_forward.experts.4.w3.weight", "model.layers.4.self_attn.k_layernorm.weight"]
)
def test_missing_tensor_is_an_error(tiny, tmp_path, name):
    _, path = tiny
    sd, cfg = _checkpoint_dict(path)
    del sd[name]
    _write_checkpoint(tmp_path, sd, cfg)
    with pytest.raises(ValueError, match=f"missing tensor '{re.escape(name)}'"):
        from_pretrained(tmp_path, progress=False)


def test_wrong_shape_is_an_error(tiny, tmp_path):
    _, path = tiny
    sd, cfg = _checkpoint_dict(path)
    sd["model.layers.2.self_attn.q_proj.weight"] = torch.randn(40, 48)
    _write_checkpoint(tmp_path, sd, cfg)
    with pytest.raises(ValueError, match=r"'model\.layers\.2\.self_attn\.q_proj\.weight' has shape \[40, 48\].*\[48, 48\]"):
        from_pretrained(tmp_path, progress=False)


def test_unexpected_tensor_is_an_error(tiny, tmp_path):
    _, path = tiny
    sd, cfg = _checkpoint_dict(path)
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.randn(48, 48)  # layer 0 is a conv layer
    _write_checkpoint(tmp_path, sd, cfg)
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.weight'"):
        from_pretrained(tmp_path, progress=False)


def test_expert_given_twice_is_an_error(tiny, tmp_path):
    hf, path = tiny
    sd, cfg = _checkpoint_dict(path)
    sd["model.layers.3.feed_forward.experts.down_proj"] = hf.state_dict()["model.layers.3.feed_forward.experts.down_proj"]
    _write_checkpoint(tmp_path, sd, cfg)
    with pytest.raises(ValueError, match="given twice"):
        from_pretrained(tmp_path, progress=False)


def test_unknown_model_type_is_an_error(tiny, tmp_path):
    _, path = tiny
    sd, cfg = _checkpoint_dict(path)
    cfg["model_type"] = "llama"
    _write_checkpoint(tmp_path, sd, cfg)
    with pytest.raises(ValueError, match=r"model_type 'llama' is not supported.*'lfm2_moe'"):
        from_pretrained(tmp_path, progress=False)
    with pytest.raises(ValueError, match="model_type None"):
        config_from_dict({"hidden_size": 8})


def test_no_safetensors_is_an_error(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "lfm2_moe", "layer_types": ["conv"], "num_hidden_layers": 1}, f)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        from_pretrained(tmp_path, progress=False)


# ----------------------------------------------------------------------------- dense LFM2
def test_dense_lfm2_parity(tmp_path):
    cfg = transformers.Lfm2Config(
        vocab_size=91, hidden_size=40, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["conv", "full_attention", "conv", "conv"], initializer_range=0.2,
        block_multiple_of=16, attn_implementation="eager",
    )
    hf = _hf_model(cfg, seed=1)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, progress=False)
    assert model.config.model_type == "lfm2" and model.config.intermediate_size == hf.model.layers[0].feed_forward.w1.out_features
    ids = torch.randint(0, 91, (2, 9))
    assert rel_err(model.forward(ids), _hf_logits(hf, ids)) < LOGIT_TOL
    ours = model.generate(ids[:1], 16, temperature=0, repetition_penalty=1.0, eos_token_id=[])
    assert ours.tolist() == _hf_greedy(hf, ids[:1], 16).tolist()


# ----------------------------------------------------------------------------- sampling
def test_sampling_top_k_1_is_greedy(tiny):
    _, path = tiny
    model = from_pretrained(path, progress=False)
    ids = torch.randint(3, 97, (2, 6))
    greedy = model.generate(ids, 12, temperature=0, repetition_penalty=1.3, eos_token_id=[])
    sampled = model.generate(ids, 12, temperature=0.7, top_k=1, repetition_penalty=1.3, eos_token_id=[], seed=3)
    assert sampled.tolist() == greedy.tolist()


def test_sampling_is_seeded_and_varied(tiny):
    _, path = tiny
    model = from_pretrained(path, progress=False)
    ids = torch.randint(3, 97, (1, 6))
    a = model.generate(ids, 24, temperature=1.5, top_k=0, eos_token_id=[], seed=11)
    b = model.generate(ids, 24, temperature=1.5, top_k=0, eos_token_id=[], seed=11)
    c = model.generate(ids, 24, temperature=1.5, top_k=0, eos_token_id=[], seed=12)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_logits_processing_matches_transformers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from lfm_kernels.model import process_logits

    V = 50
    logits = torch.randn(3, V) * 3
    hist = torch.randint(0, V, (3, 7))
    seen = torch.zeros(3, V, dtype=torch.bool)
    seen[torch.arange(3)[:, None], hist] = True
    ref = logits.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7), TopKLogitsWarper(9),
                 TopPLogitsWarper(0.8)):
        ref = proc(hist, ref)
    ours = process_logits(logits, seen, 0.7, 9, 0.8, 1.2)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert torch.allclose(ours[fin], ref[fin], rtol=1e-6, atol=1e-6)


def test_sample_next_bad_arguments():
    from lfm_kernels.model.generate import _check_sampling

    with pytest.raises(ValueError, match="temperature"):
        _check_sampling(4, -1.0, 80, 1.0, 1.05)
    with pytest.raises(ValueError, match="top_p"):
        _check_sampling(4, 0.2, 80, 0.0, 1.05)
    with pytest.raises(ValueError, match="max_new_tokens"):
        _check_sampling(0, 0.2, 80, 1.0, 1.05)
    assert sample_next(torch.tensor([[0.0, 5.0, 1.0]]), None, temperature=0).tolist() == [1]


def test_generate_bad_inputs(tiny):
    _, path = tiny
    model = from_pretrained(path, progress=False)
    with pytest.raises(ValueError, match="outside"):
        model.generate([[1, 2, 500]], 2)
    with pytest.raises(ValueError, match="empty"):
        model.generate([[1, 2], []], 2)
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate("hello", 2)


# ----------------------------------------------------------------------------- default model
def test_default_model_reduced_depth_runs():
    model = default_model(num_layers=3, vocab_size=1000, progress=False)
    cfg = model.config
    assert cfg.hidden_size == 2048 and cfg.num_experts == 32 and cfg.layer_types == ["conv", "conv", "full_attention"]
    assert model.weights.layers[2].moe and not model.weights.layers[1].moe
    from lfm_kernels.model import allocate, fill_random

    again, _, _ = allocate(cfg, torch.bfloat16)  # same seed, same weights
    fill_random(again, cfg, seed=0, progress=False)
    assert torch.equal(model.weights.layers[2].gate_up_proj[5], again.layers[2].gate_up_proj[5])
    del again
    ids = torch.randint(0, 1000, (1, 5))
    out = model.generate(ids, 3, eos_token_id=[], seed=0)
    assert out.shape == (1, 3)
    logits = model.forward(ids)
    assert torch.isfinite(logits).all() and logits.float().std() > 0.1  # activations neither blow up nor vanish


def test_to_transformers_shares_storage(tiny):
    hf, path = tiny
    model = from_pretrained(path, progress=False)
    twin = to_transformers(model)
    assert twin.model.layers[3].feed_forward.experts.gate_up_proj.data_ptr() == model.weights.layers[3].gate_up_proj.data_ptr()
    ids = torch.randint(0, 97, (1, 8))
    assert rel_err(_hf_logits(twin, ids), _hf_logits(hf, ids)) < 1e-6


def test_bf16_no_worse_than_transformers_bf16(tmp_path):
    """bf16 logits (fp32 accumulation in our ops) are at least as close to the fp32 truth as
    transformers' own bf16 eager logits are."""
    hf = _hf_model(_moe_config(initializer_range=0.02, hidden_size=128, moe_intermediate_size=64,
                               intermediate_size=192, vocab_size=300))
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 300, (2, 21))
    truth = _hf_logits(hf, ids)
    hf16 = transformers.Lfm2MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager",
                                                            experts_implementation="eager")
    ours = from_pretrained(tmp_path, dtype="bfloat16", progress=False)
    assert ours.weights.layers[2].expert_bias.dtype == torch.float32
    assert rel_err(ours.forward(ids), truth) <= rel_err(_hf_logits(hf16, ids), truth)


def test_text_prompts_and_chat_with_tokenizer(tiny, tmp_path):
    hf, _ = tiny
    hf.save_pretrained(tmp_path)
    write_word_tokenizer(tmp_path, 97)
    model = from_pretrained(tmp_path, progress=False)
    assert model.tokenizer is not None
    assert model.tokenizer.encode("<|im_start|> w3 w4", add_special_tokens=False) == [3, 12, 13]
    texts = model.generate(["w1 w2 w3", "w7"], 5, temperature=0, eos_token_id=[])
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    ids = [model.tokenizer.encode(s) for s in ("w1 w2 w3", "w7")]
    assert texts[0] == model.tokenizer.decode(model.generate(ids, 5, temperature=0, eos_token_id=[])[0].tolist())
    reply = model.chat([{"role": "user", "content": "w5 w6"}], max_new_tokens=6, temperature=0, eos_token_id=[])
    assert isinstance(reply.text, str) and isinstance(reply.tool_calls, list)


@pytest.mark.parametrize("shard", [1 << 40, 40 << 10], ids=["one-file", "sharded"])
def test_save_pretrained_round_trip(tmp_path, shard):
    from lfm_kernels.model import save_pretrained

    from lfm_kernels.model import LfmModel, allocate, fill_random
    from lfm_kernels.model.config import lfm25_8b_a1b_config

    cfg = lfm25_8b_a1b_config(4, vocab_size=500)  # the default's layer pattern at a small width
    cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size, cfg.num_experts = 64, 96, 32, 8
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 16
    weights, _, _ = allocate(cfg, torch.bfloat16)
    fill_random(weights, cfg, seed=5, progress=False)
    model = LfmModel(cfg, weights, torch.bfloat16)
    save_pretrained(model, tmp_path, max_shard_bytes=shard)
    assert os.path.isfile(tmp_path / "model.safetensors.index.json") == (shard < 1 << 30)
    # published checkpoints name their class; llama.cpp's converter needs it
    assert json.load(open(tmp_path / "config.json"))["architectures"] == ["Lfm2MoeForCausalLM"]
    again = from_pretrained(tmp_path, progress=False)
    assert again.dtype == torch.bfloat16 and again.config.layer_types == model.config.layer_types
    for (n1, a), (n2, b) in zip(model.weights.tensors(), again.weights.tensors()):
        assert n1 == n2 and a.dtype == b.dtype and torch.equal(a, b), n1
    # transformers reads what we wrote
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert torch.equal(hf.model.layers[2].feed_forward.experts.down_proj, model.weights.layers[2].down_proj)


def test_truncated_file_is_an_error(tiny, tmp_path):
    _, path = tiny
    data = open(os.path.join(path, "model.safetensors"), "rb").read()
    open(tmp_path / "model.safetensors", "wb").write(data[: len(data) - 100])
    open(tmp_path / "config.json", "w").write(open(os.path.join(path, "config.json")).read())
    with pytest.raises(ValueError, match=r"file ends early|<= \d+ \(the data size\)"):
        from_pretrained(tmp_path, progress=False)


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_fast_sampling_distribution_equals_full_vocabulary(top_p):
    """The top-k fast path (penalty on seen ids only, softmax over k) gives the same probabilities as
    transformers-style processing of the whole vocabulary."""
    from lfm_kernels.model import process_logits
    from lfm_kernels.model.generate import candidate_probs

    V = 1000
    logits = (torch.randn(2, V) * 4).to(torch.bfloat16)
    hist = torch.randint(0, V, (2, 30))
    seen = torch.zeros(2, V, dtype=torch.bool)
    seen[torch.arange(2)[:, None], hist] = True
    full = process_logits(logits.float(), seen, 0.6, 40, top_p, 1.3).softmax(-1)
    ids, probs = candidate_probs(logits, hist, 0.6, 40, top_p, 1.3)
    assert torch.allclose(full.gather(1, ids), probs, atol=1e-6)
    assert torch.allclose(full.sum(-1), probs.sum(-1), atol=1e-5)  # no mass outside the candidates
    greedy = sample_next(logits, hist, temperature=0, repetition_penalty=1.3)
    assert torch.equal(greedy, process_logits(logits.float(), seen, 0, None, 1.0, 1.3).argmax(-1))
    assert not torch.equal(logits, logits.clone().zero_())  # caller's logits untouched (never zeros)


@pytest.mark.parametrize("V", [128_000, 65_536, 5_000, 128_003])
@pytest.mark.parametrize("values", ["distinct", "ties", "inf", "nan"])
def test_blocked_topk_equals_torch_topk(V, values):
    """The sampler's top-k over blocks of 64 logits (a vocabulary of 5,000 or one that is not a multiple
    of 64 goes to torch.topk itself): torch.topk's values in its order, ids that hold those values."""
    from lfm_kernels.model.generate import _topk

    g = torch.Generator().manual_seed(V)
    scores = torch.randn(2, V, generator=g)
    if values == "ties":  # bf16-like: thousands of equal logits, ties at the k-th value
        scores = torch.randint(-4, 4, (2, V), generator=g).float()
    elif values == "inf":  # masked logits: fewer finite values than k
        scores = torch.full((2, V), float("-inf"))
        scores[:, torch.randperm(V, generator=g)[:30]] = torch.randn(30, generator=g)
        scores[1, 7] = float("inf")
    elif values == "nan":
        scores[0, V // 3] = float("nan")
    vals, ids = _topk(scores, 80)
    ref_vals, ref_ids = torch.topk(scores, 80, dim=-1)
    assert torch.allclose(vals, ref_vals, equal_nan=True, atol=0, rtol=0)  # equal, NaN where torch.topk has NaN
    assert ids.min() >= 0 and ids.max() < V and all(len(set(r.tolist())) == 80 for r in ids)
    assert torch.allclose(scores.gather(1, ids), vals, equal_nan=True, atol=0, rtol=0)
    if values == "distinct":
        assert torch.equal(ids, ref_ids)


def test_prefill_and_decode_parity_on_the_portable_cpu_path(tiny):
    """The same parity with the portable (non-AVX2) C++ kernels the ops dispatch to."""
    from lfm_kernels import _backend

    if not _backend.cpu_extension_available():
        pytest.skip("the CPU extension is not built")
    hf, path = tiny
    model = from_pretrained(path, progress=False)
    ids = torch.randint(3, 97, (2, 9))
    with _backend.force_portable_cpu():
        assert rel_err(model.forward(ids), _hf_logits(hf, ids)) < LOGIT_TOL
        ours = model.generate(ids[:1], 8, temperature=0, repetition_penalty=1.0, eos_token_id=[])
    assert ours.tolist() == _hf_greedy(hf, ids[:1], 8).tolist()


def test_big_weights_on_huge_pages_load_and_share_storage(tmp_path):
    """A weight of >= 2 MiB is a span, starting on a 2 MiB boundary, of a mapping of its own
    (lfm_kernels/_memory.py): loading fills it and to_transformers' views point into it (their storage
    offsets are absolute in that mapping)."""

    from lfm_kernels import _memory

    hf = _hf_model(_moe_config(vocab_size=24000))  # embedding 24000 x 48 fp32: 4.6 MB
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, progress=False)
    embed = model.weights.embed
    assert embed.numel() * embed.element_size() >= _memory._MIN_BYTES
    if sys.platform.startswith("linux"):
        assert embed.data_ptr() % _memory._HUGE == 0
    assert torch.equal(embed, hf.model.embed_tokens.weight.detach().to(embed.dtype))
    twin = to_transformers(model)
    assert twin.model.embed_tokens.weight.data_ptr() == embed.data_ptr()
    ids = torch.randint(0, 24000, (1, 8))
    assert rel_err(_hf_logits(twin, ids), _hf_logits(hf, ids)) < 1e-6
    # the helpers themselves: shape, dtype, contiguity, values; small tensors are left alone
    src = torch.randn(1024, 1024)
    moved = _memory.on_huge_pages(src)
    assert moved.is_contiguous() and moved.dtype == src.dtype and torch.equal(moved, src)
    small = torch.randn(10)
    assert _memory.on_huge_pages(small) is small
    # what the e2e bench reports as the weights' share on huge pages
    share = _memory.huge_page_share([embed])
    if sys.platform.startswith("linux"):
        assert isinstance(share, float) and 0.0 <= share <= 1.0
    else:
        assert share is None


@pytest.mark.parametrize("fmt,shape", [("q4_0", (3, 4096, 512)), ("q8_0", (136, 64)), ("q4_k", (2, 1032, 256)),
                                       ("q6_k", (4100, 256)), ("q4_0", (12, 64))],
                         ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)))
def test_kernel_layout_on_huge_pages_is_the_whole_relayout(fmt, shape):
    """The load's relayout runs about 1 MiB of rows at a time into the huge-page copy: the same bytes as
    relayouting the whole weight (several chunks, a partial last chunk, stacked experts, a K-quant whose
    N is not a multiple of 8, a weight that is not relayouted at all)."""
    from lfm_kernels import quantize
    from lfm_kernels.quant import _kernel_layout, _kernel_layout_on_huge_pages

    qt = quantize(torch.randn(*shape, generator=torch.Generator().manual_seed(5)), fmt)
    got, want = _kernel_layout_on_huge_pages(qt), _kernel_layout(qt)
    assert (got.format, got.shape, got.layout) == (want.format, want.shape, want.layout)
    assert torch.equal(got.data, want.data)
    assert got.layout == ("rows" if shape[-2] % 8 and fmt in ("q4_0", "q8_0") else "x8")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages: Linux only")
def test_huge_page_allocation_and_share():
    """`empty` takes a fresh mapping of its own (never recycled heap memory, which stays on small
    pages), its views keep it alive, and huge_page_share reads each tensor's own mappings: memory
    advised never to use huge pages counts 0, whatever the rest of the process holds."""
    import gc
    import mmap

    from lfm_kernels import _memory

    t = _memory.empty(3 << 20 | 12, dtype=torch.uint8)
    assert t.data_ptr() % _memory._HUGE == 0 and t.numel() == 3 << 20 | 12
    view = t[100:200]
    view.fill_(7)
    del t
    gc.collect()
    assert int(view.sum()) == 700  # the mapping outlives the tensor it was made for
    small = _memory.empty(1000, dtype=torch.float32)  # under 2 MiB: an ordinary tensor
    assert small.numel() == 1000 and small.dtype == torch.float32
    # a quantized weight: its blocks move, its format, shape and layout stay
    from lfm_kernels import quantize

    q = quantize(torch.randn(2048, 2048) * 0.02, "q4_0").to_layout("x8")
    moved = _memory.on_huge_pages(q)
    assert (moved.format, moved.shape, moved.layout) == (q.format, q.shape, q.layout)
    assert moved.data.data_ptr() % _memory._HUGE == 0 and torch.equal(moved.data, q.data)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    m = mmap.mmap(-1, 8 << 20, flags=flags)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    plain = torch.frombuffer(m, dtype=torch.uint8)
    plain.fill_(1)
    assert _memory.huge_page_share([plain]) == 0.0
    assert _memory.huge_page_share([]) is None
