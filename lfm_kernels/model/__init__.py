"""lfm_kernels.model: a thin LFM2-MoE / LFM2 inference model built from lfm_kernels ops.

    from lfm_kernels.model import from_pretrained, default_model
    model = from_pretrained("/path/to/LFM2-8B-A1B")           # config.json + safetensors (+ tokenizer)
    new_ids = model.generate(ids, max_new_tokens=64)           # LongTensor [B, new]
    reply = model.chat([{"role": "user", "content": "Hi"}])    # ParsedReply(text, tool_calls, errors)
    model = default_model(num_layers=6)                        # LFM2.5-8B-A1B shapes, seeded random weights
    step = decode_stepper(model, state)                        # your own loop: logits = step(tokens), as a graph
"""

from __future__ import annotations

import json
import os

import torch

from .chat import ParsedReply, ToolCall, apply_chat_template, encode_chat, parse_tool_calls
from .config import ModelConfig, config_from_dict, lfm25_8b_a1b_config, load_config
from .cuda_graph import decode_stepper
from .generate import generate, process_logits, sample_next
from .model import LfmModel, State
from .weights import Weights, allocate, fill_random, load_weights, resolve_dtype

__all__ = [
    "LfmModel",
    "ModelConfig",
    "ParsedReply",
    "State",
    "ToolCall",
    "Weights",
    "apply_chat_template",
    "config_from_dict",
    "decode_stepper",
    "default_model",
    "encode_chat",
    "from_pretrained",
    "generate",
    "load_config",
    "parse_tool_calls",
    "process_logits",
    "sample_next",
    "save_pretrained",
    "to_transformers",
]


class _RawTokenizer:
    """A `tokenizers.Tokenizer` with the few methods generate/chat use."""

    def __init__(self, tok, eos_token_id=None):
        from tokenizers import Tokenizer

        self._tok = tok
        # a twin that encodes special-token text as plain text (chat content); a second object rather
        # than toggling the flag per call, so concurrent encodes can't see each other's setting
        self._plain = Tokenizer.from_str(tok.to_str())
        self._plain.encode_special_tokens = True
        self.eos_token_id = eos_token_id

    @property
    def added_tokens_decoder(self):
        return self._tok.get_added_tokens_decoder()

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        tok = self._plain if split_special_tokens else self._tok
        return tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str):
    """The checkpoint directory's tokenizer (local files only), or None when it has none.

    Never runs code from the checkpoint and never prompts (trust_remote_code=False: a tokenizer that
    needs custom code falls back to the plain tokenizer.json, or is an error); every file the tokenizer
    could read must lie inside the directory (a ValueError otherwise)."""
    from .weights import _check_tokenizer_files

    has_json = os.path.lexists(os.path.join(path, "tokenizer.json"))
    has_cfg = os.path.lexists(os.path.join(path, "tokenizer_config.json"))
    if not (has_json or has_cfg):
        return None
    _check_tokenizer_files(path)
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - fall back to the bare tokenizers library
        if not has_json:
            raise RuntimeError(f"could not load the tokenizer in {path!r}: {exc}") from exc
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        return _RawTokenizer(tok, tok.token_to_id("<|im_end|>"))


def from_pretrained(path: str, dtype=None, device="cpu", progress: bool = True, tokenizer: bool = True,
                    dequantize: bool = False, quant: str | None = None) -> LfmModel:
    """Load a local LFM2-MoE (or dense LFM2) checkpoint directory, or a llama.cpp GGUF file (a .gguf
    path, or a directory holding one and no config.json: see lfm_kernels.model.gguf; dequantize=True
    expands its quantized tensors to the model dtype).

    Reads config.json and one or several safetensors files (model.safetensors.index.json), experts in
    the original per-expert layout or transformers' fused one. Every tensor's name and shape is checked
    against the config before any data is read; a missing, unexpected or mis-shaped tensor is a
    ValueError naming it. dtype None keeps the checkpoint's dtype. Tensors are copied one at a time into
    preallocated weights (no fp32 copy, no second full copy).

    quant "q8_0" / "q4_0" quantizes a float checkpoint while loading (GGUF's block formats, run by the
    quantized CPU kernels): every projection (conv in/out, attention q/k/v/o, dense FFN, the experts)
    in that format, the embedding and an untied lm_head in Q8_0 for both (llama.cpp too keeps its
    token embedding and output matrix above Q4_0's precision); norms, router, expert bias and conv
    taps stay in `dtype`, the activations' dtype. quant "q4_k_m" is llama.cpp's Q4_K_M mix, tensor by
    tensor as `llama-quantize` chooses it (Q6_K for the output matrix / tied embedding and for some
    attn_v and ffn_down, Q4_K elsewhere; every K a multiple of 256; see weights.allocate). Each tensor
    is quantized as it is read, so memory peaks at the quantized model plus one checkpoint tensor.
    CPU only.
    """
    path = os.fspath(path)
    quant = _check_quant(quant, device)
    from .gguf import from_gguf, is_gguf_path

    if is_gguf_path(path):  # a llama.cpp GGUF file, or a directory holding one
        if quant is not None:
            raise ValueError(
                "quant applies to float checkpoints; a GGUF file keeps the formats it was written in "
                f"(got quant={quant!r} for {path!r})"
            )
        return from_gguf(path, dtype=dtype, device=device, progress=progress, tokenizer=tokenizer, dequantize=dequantize)
    cfg = load_config(path)
    weights, dt = load_weights(path, cfg, dtype=dtype, device=device, progress=progress, quant=quant)
    model = LfmModel(cfg, weights, dt, tokenizer=load_tokenizer(path) if tokenizer else None, path=path)
    gen_file = os.path.join(path, "generation_config.json")
    if os.path.lexists(gen_file):
        from .weights import _inside, _load_json

        gen = _load_json(_inside(path, "generation_config.json"), "generation_config.json")
        gen = gen if isinstance(gen, dict) else {}
        eos = gen.get("eos_token_id")
        if eos is not None:
            from .config import _eos_list

            try:
                model.generation_defaults["eos_token_id"] = _eos_list(eos)
            except ValueError:
                raise ValueError(f"generation_config.json: eos_token_id must be an int or a list of ints, got {eos!r}") from None
    return model


def default_model(
    num_layers: int | None = None,
    dtype=torch.bfloat16,
    seed: int = 0,
    vocab_size: int = 128_000,
    device="cpu",
    progress: bool = True,
    quant: str | None = None,
) -> LfmModel:
    """LFM2.5-8B-A1B shapes (hidden 2048, 32 experts top-4, attention at 2, 6, 10, 14, 18, 21, ...) with
    seeded random weights generated on the fly; num_layers < 24 keeps a prefix of the layer pattern
    (2 dense layers first, attention at index 2). vocab_size defaults to 128,000 (docs/design.md: "about
    128,000"; LFM2-8B-A1B uses 65,536). The full model is about 17 GB in bf16.

    quant "q8_0" / "q4_0" / "q4_k_m": the same random weights (the same seed gives the same float
    values), quantized tensor by tensor as `from_pretrained(quant=...)` does; memory peaks at the
    quantized model plus one float tensor. CPU only."""
    quant = _check_quant(quant, device)
    cfg = lfm25_8b_a1b_config(num_layers, vocab_size=vocab_size)
    dt = resolve_dtype(dtype)
    weights, _, _ = allocate(cfg, dt, device, quant=quant)
    fill_random(weights, cfg, seed=seed, progress=progress)
    return LfmModel(cfg, weights, dt)


def to_transformers(model: LfmModel, attn_implementation: str = "eager", experts_implementation: str = "eager"):
    """transformers' Lfm2MoeForCausalLM / Lfm2ForCausalLM whose parameters *are* our tensors (views,
    no copy): built on the meta device, then every parameter and buffer pointed at our storage. For
    baselines on the same weights when two copies would not fit in memory."""
    from torch import nn

    _refuse_quantized(model, "to_transformers")
    cfg = model.config
    hf_cfg = cfg.to_transformers()
    hf_cfg._attn_implementation = attn_implementation
    if cfg.is_moe:
        hf_cfg._experts_implementation = experts_implementation
        from transformers import Lfm2MoeForCausalLM as Cls
    else:
        from transformers import Lfm2ForCausalLM as Cls
    with torch.device("meta"):
        hf = Cls(hf_cfg)
    # The loader's slots name every tensor as transformers does (fused experts included): point each
    # parameter and buffer of the meta model at the view of our storage under its name.
    views, _, _ = _views_by_name(model)
    views.setdefault("lm_head.weight", model.weights.lm_head)  # tied: the loader has no slot for it
    for prefix, module in hf.named_modules():
        for table in (module._parameters, module._buffers):
            for name in list(table):
                view = views.get(f"{prefix}.{name}" if prefix else name)
                if view is None:
                    continue
                table[name] = view if table is module._buffers else nn.Parameter(view, requires_grad=False)
    m, D = hf.model, cfg.head_dim
    rope = m.pos_emb if hasattr(m, "pos_emb") else m.rotary_emb
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float) / D))
    rope._buffers["inv_freq"] = inv_freq.to(model.device)
    if "original_inv_freq" in rope._buffers:
        rope._buffers["original_inv_freq"] = inv_freq.clone().to(model.device)
    left = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"to_transformers: tensors left on the meta device: {left[:5]}")
    hf.eval()
    return hf


def save_pretrained(model: LfmModel, path: str, max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json and safetensors shards (with model.safetensors.index.json when there are
    several) in the original checkpoint layout (per-expert w1/w2/w3), e.g. to keep a default model
    on disk. Shards are written one at a time, so memory grows by at most one shard."""
    from safetensors.torch import save_file

    _refuse_quantized(model, "save_pretrained")
    cfg = model.config
    os.makedirs(path, exist_ok=True)
    _, slots, _ = allocate(cfg, model.dtype, "meta")
    # map every per-tensor checkpoint name to the same view of *our* tensors
    mine, _, _ = _views_by_name(model)
    names = [n for n, s in slots.items() if len(s.parts) == 1]
    shards, cur, size = [], [], 0
    for n in names:
        nb = mine[n].numel() * mine[n].element_size()
        if cur and size + nb > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += nb
    shards.append(cur)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: mine[n].contiguous() for n in shard}, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    if len(shards) > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    hf_cfg = cfg.to_transformers()
    d = hf_cfg.to_dict()
    d["dtype"] = str(model.dtype).replace("torch.", "")
    # as in published checkpoints: llama.cpp's converter picks its model class from this field
    d["architectures"] = ["Lfm2MoeForCausalLM" if cfg.is_moe else "Lfm2ForCausalLM"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f, indent=1)


def _views_by_name(model: LfmModel):
    """Checkpoint name -> view of our tensor with the checkpoint's shape (the loader's slots, on our storage)."""
    from .weights import _Slot  # noqa: F401

    cfg = model.config
    meta_w, slots, required = allocate(cfg, model.dtype, "meta")
    # pair meta tensors with ours by walking both weight sets in the same order
    ours = dict(model.weights.tensors())
    meta_names = {id(t): n for n, t in meta_w.tensors()}
    out = {}
    for name, slot in slots.items():
        base = slot.dest._base if slot.dest._base is not None else slot.dest
        key = meta_names.get(id(base))
        if key is None:
            continue
        mine = ours[key]
        # as_strided's offset is absolute in the storage, and ours may start inside a larger buffer
        # (big weights are spans of a huge-page-aligned buffer, lfm_kernels/_memory.py)
        offset = mine.storage_offset() + slot.dest.storage_offset() - base.storage_offset()
        out[name] = mine.as_strided(slot.dest.shape, slot.dest.stride(), offset)
    return out, slots, required


def _check_quant(quant, device) -> str | None:
    from .weights import resolve_quant

    quant = resolve_quant(quant)
    if quant is not None and torch.device(device).type != "cpu":
        raise ValueError(
            f"quant={quant!r} needs device='cpu': the quantized kernels are C++ (CPU only), got device={device!r}"
        )
    return quant


def _refuse_quantized(model: LfmModel, what: str) -> None:
    if model.weights.is_quantized():
        raise ValueError(
            f"{what} needs float weights; this model holds quantized (QuantizedTensor) weights. Load it "
            "without quant= for this"
        )
