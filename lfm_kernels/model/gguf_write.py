"""Writing LFM2 / LFM2-MoE GGUF files as llama.cpp's converter and quantizer lay them out (for tests
and the benchmark; reading is what users need, see `gguf.py`).

    from lfm_kernels.model import default_model
    from lfm_kernels.model.gguf_write import write_gguf
    write_gguf("tiny-Q4_K_M.gguf", model, "Q4_K_M")              # + a tokenizer section and chat template

Layout (what `convert_hf_to_gguf.py` writes for `Lfm2ForCausalLM` / `Lfm2MoeForCausalLM`, then
`llama-quantize` for the K-quant mixes): llama.cpp's tensor names, GGML's reversed dimension order
(the `gguf` writer reverses numpy shapes), q/k/v and the dense gate/up as separate matrices, the
experts stacked per layer as `ffn_{gate,up,down}_exps` [E, I, H] / [E, I, H] / [E, H, I], the conv
taps squeezed to [H, L], the output matrix only when untied. 1-D tensors, norms, the router
(`ffn_gate_inp`) and the conv taps are F32 whatever the file type; every other matrix gets the file
type ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"), or with "Q4_K_M" llama.cpp's mix
(Q4_K, with Q6_K for the output / tied embedding, some attn_v and some ffn_down: see
`lfm_kernels.kquants.q4_k_m_type`). `types` overrides the type of single tensors by name.

Tensors are encoded and written one at a time (the header first, from shapes alone), so writing the
full-size model needs memory for one tensor's encoding beside the model.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from .config import ModelConfig

__all__ = ["FILE_TYPES", "LFM2_CHAT_TEMPLATE", "LFM2_SPECIAL_TOKENS", "gguf_tensors", "make_vocab", "write_default_gguf",
           "write_gguf"]

FILE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M")

# LFM2's first token ids (its tokenizer's special tokens, in order)
LFM2_SPECIAL_TOKENS = [
    "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>",
    "<|im_start|>", "<|im_end|>", "<|tool_list_start|>", "<|tool_list_end|>", "<|tool_call_start|>",
    "<|tool_call_end|>", "<|tool_response_start|>", "<|tool_response_end|>",
]

# A Jinja chat template in LFM2's format (ChatML-like, tools listed as JSON in the system turn,
# non-string content as JSON, tool results between the tool-response markers): what
# lfm_kernels.model.chat.apply_chat_template renders for conversations without assistant tool_calls,
# as a template a GGUF file can carry.
LFM2_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system_prompt='') -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.system_prompt = messages[0]['content'] -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- if tools -%}"
    "{%- set listing = 'List of tools: <|tool_list_start|>' + (tools | tojson) + '<|tool_list_end|>' -%}"
    "{%- if ns.system_prompt -%}{%- set ns.system_prompt = ns.system_prompt + '\\n' + listing -%}"
    "{%- else -%}{%- set ns.system_prompt = listing -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- if ns.system_prompt -%}{{- '<|im_start|>system\\n' + ns.system_prompt + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set content = message['content'] if message['content'] is string else (message['content'] | tojson) -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{%- set content = '<|tool_response_start|>' + content + '<|tool_response_end|>' -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Liquid foundation models run on phones, laptops and "
    "servers; they mix short convolutions with a few attention layers and route each token to a few "
    "experts. Hello, world! What is the weather in Paris today? It is sunny and 21 degrees. "
    "def main():\n    print('hello')\n    return 0\n"
)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable spelling of the 256 byte values (the byte-level BPE alphabet), in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def make_vocab(vocab_size: int) -> dict:
    """A byte-level BPE vocabulary of exactly `vocab_size` tokens in LFM2's shape: its special tokens at
    ids 0..13 (CONTROL), the 256 byte symbols, merges learned from a short built-in text, then unused
    placeholders. Returned as the GGUF tokenizer fields (tokens, token_type, merges, ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    base = len(LFM2_SPECIAL_TOKENS) + 256
    if vocab_size < base:
        raise ValueError(f"vocab_size must be at least {base} for a byte-level vocabulary with LFM2's specials, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, base + 2000), special_tokens=LFM2_SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1,
    )
    tok.train_from_iterator([_SAMPLE_TEXT] * 4, trainer)
    vocab = tok.get_vocab()
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    import json

    merges = [" ".join(m) if isinstance(m, (list, tuple)) else m
              for m in json.loads(tok.to_str())["model"]["merges"]]
    types = [3] * len(LFM2_SPECIAL_TOKENS) + [1] * (len(tokens) - len(LFM2_SPECIAL_TOKENS))
    extra = vocab_size - len(tokens)
    tokens += [f"<|reserved_{i}|>" for i in range(extra)]
    types += [5] * extra  # UNUSED
    return dict(tokens=tokens, token_type=types, merges=merges, bos_token_id=1, eos_token_id=7,
                padding_token_id=0, pre="lfm2", add_bos_token=True)


# ------------------------------------------------------------------------------------------ tensors


def gguf_tensors(model, fuse_qkv: bool = False):
    """(llama.cpp name, tensor, small) for every tensor of our model, in llama.cpp's layout. `small`
    marks the ones the converter always keeps in F32 (1-D, norms, router, conv taps)."""
    cfg: ModelConfig = model.config
    w = model.weights
    H, D = cfg.hidden_size, cfg.head_dim
    Hq, Hkv, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.conv_L_cache
    yield "token_embd.weight", w.embed, False
    yield "token_embd_norm.weight", w.final_norm, True
    if not cfg.tie_word_embeddings:
        yield "output.weight", w.lm_head, False
    for i, lw in enumerate(w.layers):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", lw.operator_norm, True
        if lw.attention:
            if fuse_qkv:
                yield p + "attn_qkv.weight", lw.qkv, False
            else:
                yield p + "attn_q.weight", lw.qkv[: Hq * D], False
                yield p + "attn_k.weight", lw.qkv[Hq * D : (Hq + Hkv) * D], False
                yield p + "attn_v.weight", lw.qkv[(Hq + Hkv) * D :], False
            yield p + "attn_output.weight", lw.out_proj, False
            yield p + "attn_q_norm.weight", lw.q_norm, True
            yield p + "attn_k_norm.weight", lw.k_norm, True
        else:
            yield p + "shortconv.in_proj.weight", lw.in_proj, False
            yield p + "shortconv.conv.weight", lw.conv.reshape(H, L), True
            yield p + "shortconv.out_proj.weight", lw.conv_out, False
            if cfg.conv_bias:
                yield p + "shortconv.in_proj.bias", lw.in_proj_bias, True
                yield p + "shortconv.conv.bias", lw.conv_bias, True
                yield p + "shortconv.out_proj.bias", lw.conv_out_bias, True
        yield p + "ffn_norm.weight", lw.ffn_norm, True
        if lw.moe:
            I = cfg.moe_intermediate_size
            yield p + "ffn_gate_inp.weight", lw.gate, True
            if cfg.use_expert_bias:
                yield p + "exp_probs_b.bias", lw.expert_bias, True
            yield p + "ffn_gate_exps.weight", lw.gate_up_proj[:, :I], False
            yield p + "ffn_up_exps.weight", lw.gate_up_proj[:, I:], False
            yield p + "ffn_down_exps.weight", lw.down_proj, False
        else:
            I = cfg.intermediate_size
            yield p + "ffn_gate.weight", lw.w13[:I], False
            yield p + "ffn_up.weight", lw.w13[I:], False
            yield p + "ffn_down.weight", lw.w2, False


def _file_type_id(ftype: str) -> int:
    import gguf

    return {
        "F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
        "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S,
        "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_S, "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
        "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    }[ftype].value


def _choose_types(model, items, ftype: str, types) -> list[str]:
    """The GGML type of every tensor (names as llama.cpp writes them)."""
    from ..kquants import q4_k_m_type

    cfg = model.config
    n_attn_v = sum(1 for n, _, _ in items if n.endswith(("attn_v.weight", "attn_qkv.weight")))
    out, i_v, i_down = [], 0, 0
    for name, t, small in items:
        if small:
            chosen = "F32"
        elif ftype == "Q4_K_M":
            is_v = name.endswith(("attn_v.weight", "attn_qkv.weight"))
            is_down = "ffn_down" in name
            chosen = q4_k_m_type(
                name, cfg.num_hidden_layers, i_attn_v=i_v, n_attn_v=n_attn_v,
                i_ffn_down=None if cfg.is_moe else i_down, tied_embeddings=cfg.tie_word_embeddings,
                row_len=t.shape[-1],
            ) or "F32"
            i_v += is_v
            i_down += is_down
        else:
            chosen = ftype
        if types is not None:
            override = types(name) if callable(types) else types.get(name)
            if override is not None:
                chosen = str(override).upper()
        out.append(chosen)
    return out


def _encode(t: torch.Tensor, qtype: str, name: str) -> np.ndarray:
    """One tensor in its GGML type: numpy in numpy's order (float types) or uint8 blocks [..., row bytes]."""
    import gguf

    if qtype == "F32":
        return t.detach().to("cpu", torch.float32).contiguous().numpy()
    if qtype == "F16":
        return t.detach().to("cpu", torch.float16).contiguous().numpy()
    if qtype == "BF16":
        return t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    x = t.detach().to("cpu", torch.float32).contiguous().numpy()
    if qtype in ("Q8_0", "Q4_0"):
        if x.shape[-1] % 32:
            raise ValueError(f"{name}: row length {x.shape[-1]} is not a multiple of 32, needed for {qtype}")
        return gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])
    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        from ..kquants import quantize

        return quantize(x, qtype)
    raise ValueError(f"{name}: unsupported tensor type {qtype!r}; expected one of {FILE_TYPES[:-1]}")


def _nbytes(shape, qtype: str) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    n = int(np.prod(shape))
    return n // block * size


def write_gguf(
    path,
    model,
    ftype: str = "F32",
    *,
    types: dict | Callable[[str], str | None] | None = None,
    vocab: dict | str | None = "auto",
    chat_template: str | None = LFM2_CHAT_TEMPLATE,
    name: str = "lfm-kernels",
    fuse_qkv: bool = False,
    progress: bool = False,
    values: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    distinct_rows: int | None = None,
) -> str:
    """Write `model` (an LfmModel) as a GGUF file in llama.cpp's layout; returns the path.

    ftype: one of FILE_TYPES. types: per-tensor override {llama.cpp name: type} or a function.
    vocab: "auto" (a byte-level vocabulary of the model's size in LFM2's shape, see make_vocab), a dict
        of tokenizer fields as make_vocab returns, or None (no tokenizer section).
    chat_template: stored as tokenizer.chat_template (None: none).
    fuse_qkv: one attn_qkv matrix per attention layer (llama.cpp's --fuse-qkv) instead of q/k/v.
    values: values(name, tensor) -> the tensor to write in its place (same shape), called one tensor at
        a time just before it is encoded: lets a model on the meta device be written from values
        generated on the fly (write_default_gguf).
    distinct_rows: for K-quant tensors with more rows, quantize only this many rows and repeat their
        blocks (the numpy K-quant search makes about half a million weights a second: hours for the
        full-size model). The file then has the full size and layout but periodic values; for
        benchmarks only.
    """
    import gguf

    ftype = str(ftype).upper()
    if ftype not in FILE_TYPES:
        raise ValueError(f"ftype must be one of {FILE_TYPES}, got {ftype!r}")
    cfg: ModelConfig = model.config
    arch = "lfm2moe" if cfg.is_moe else "lfm2"
    path = os.fspath(path)
    items = list(gguf_tensors(model, fuse_qkv=fuse_qkv))
    qtypes = _choose_types(model, items, ftype, types)

    w = gguf.GGUFWriter(path, arch)
    w.add_type("model")
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv([cfg.num_key_value_heads if cfg.is_attention(i) else 0 for i in range(cfg.num_hidden_layers)])
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if cfg.is_moe:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_leading_dense_block_count(cfg.num_dense_layers)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        if cfg.routed_scaling_factor != 1.0:
            w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_vocab_size(cfg.vocab_size)
    w.add_shortconv_l_cache(cfg.conv_L_cache)
    w.add_file_type(_file_type_id(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    if vocab == "auto":
        vocab = make_vocab(cfg.vocab_size)
    if vocab is not None:
        if len(vocab["tokens"]) != cfg.vocab_size:
            raise ValueError(f"vocab has {len(vocab['tokens'])} tokens, the model {cfg.vocab_size}")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab.get("pre", "lfm2"))
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["token_type"])
        w.add_token_merges(vocab["merges"])
        for key, fn in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                        ("padding_token_id", w.add_pad_token_id)):
            if vocab.get(key) is not None:
                fn(int(vocab[key]))
        if vocab.get("add_bos_token") is not None:
            w.add_add_bos_token(bool(vocab["add_bos_token"]))
    if chat_template is not None:
        w.add_chat_template(chat_template)

    for (tname, t, _), qtype in zip(items, qtypes):
        shape = tuple(t.shape)
        if qtype in ("F32", "F16"):
            w.add_tensor_info(tname, shape, np.dtype(np.float32 if qtype == "F32" else np.float16),
                              _nbytes(shape, qtype))
        else:
            w.add_tensor_info(tname, shape, np.dtype(np.uint16), _nbytes(shape, qtype),
                              raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    from .weights import _progress

    bar = _progress(sum(_nbytes(tuple(t.shape), q) for (_, t, _), q in zip(items, qtypes)), f"writing {os.path.basename(path)}", progress)
    for (tname, t, _), qtype in zip(items, qtypes):
        rows = t.numel() // max(1, t.shape[-1])
        if distinct_rows and qtype in ("Q4_K", "Q5_K", "Q6_K") and rows > distinct_rows:
            head = t.reshape(-1, t.shape[-1])[:distinct_rows]
            head = _encode(values(tname, head) if values is not None else head, qtype, tname)
            data = np.tile(head, (-(-rows // distinct_rows), 1))[:rows].reshape(*t.shape[:-1], head.shape[-1])
        else:
            data = _encode(values(tname, t) if values is not None else t, qtype, tname)
        del t
        w.write_tensor_data(data)
        bar.update(data.nbytes)
    bar.close()
    w.close()
    return path


def write_default_gguf(
    path,
    ftype: str = "Q4_K_M",
    num_layers: int | None = None,
    vocab_size: int = 128_000,
    seed: int = 0,
    distinct_rows: int | None = None,
    progress: bool = True,
) -> str:
    """The full-size LFM2.5-8B-A1B-shaped model with seeded random weights (the distributions of
    `default_model`, generated tensor by tensor: the values are not default_model's) written as a
    GGUF file of type `ftype`, holding one tensor in memory at a time (never the 17 GB model).
    distinct_rows: see write_gguf (K-quant types: periodic values, written in minutes instead of hours)."""
    from .config import lfm25_8b_a1b_config
    from .model import LfmModel
    from .weights import allocate

    cfg = lfm25_8b_a1b_config(num_layers, vocab_size=vocab_size)
    weights, _, _ = allocate(cfg, torch.bfloat16, "meta")
    skeleton = LfmModel(cfg, weights, torch.bfloat16)
    counter = [0]

    def values(name: str, meta: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator()
        gen.manual_seed(seed * 100_003 + counter[0])
        counter[0] += 1
        out = torch.empty(tuple(meta.shape), dtype=torch.float32)
        if name.endswith("norm.weight"):
            return out.normal_(1.0, 0.05, generator=gen)
        if name.endswith("exp_probs_b.bias"):
            return out.normal_(0.0, 0.01, generator=gen)
        if "shortconv.conv" in name:
            return out.normal_(0.0, 0.3, generator=gen)
        return out.normal_(0.0, 0.02, generator=gen)

    return write_gguf(path, skeleton, ftype, values=values, distinct_rows=distinct_rows, progress=progress,
                      name="lfm2.5-8b-a1b-random")
