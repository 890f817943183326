"""Reading llama.cpp's GGUF files of LFM2 (`lfm2`) and LFM2-MoE (`lfm2moe`) models.

    from lfm_kernels.model import from_pretrained
    model = from_pretrained("LFM2-8B-A1B-Q8_0.gguf")             # or a directory holding one .gguf
    model = from_pretrained("model-F32.gguf", dtype=torch.float32)
    model = from_pretrained("model-Q4_K_M.gguf", dequantize=True) # quantized weights -> model dtype

The file is opened with the `gguf` package's reader, which memory-maps it: the metadata is parsed,
and every tensor is a view of the mapped file (nothing is read until it is used). Then, before any
weight is allocated, the metadata becomes our ModelConfig and every tensor's name, type and shape
is checked against it (the first mismatch is named). Only then are the weights placed, tensor by
tensor: a float tensor whose dtype is already the model's and that fills a whole weight of ours is
used as it is (a copy-on-write view of the file: no copy, pages read on first use); the others are
copied into our fused layout (q/k/v stacked into one `qkv`, gate/up stacked into `w13` /
`gate_up_proj`).

llama.cpp's converter writes what transformers keeps, renamed and in GGML's dimension order (the
reverse of numpy's: a GGUF shape {H, 3H} is the [3H, H] matrix of transformers). It transposes
nothing; it squeezes the conv weight [H, 1, L] to [H, L], and stacks the per-expert w1 / w3 / w2
into `ffn_{gate,up,down}_exps` [E, I, H] / [E, I, H] / [E, H, I]. 1-D tensors, norms, the router
and the conv taps stay F32; everything else is in the chosen type.

Tensor types: F32, F16, BF16 load as tensors. Q8_0, Q4_0, Q4_K, Q5_K, Q6_K (GGML's block formats)
go through one adapter, `_quantized`, and become `lfm_kernels.QuantizedTensor` weights over the
file's own blocks, run by the quantized CPU kernels (`linear`; the MoE experts by the fused op where
it takes their format, expert by expert otherwise). A tensor that is a whole weight of ours is used
in place (zero-copy on the map: a Q4_K_M file's embedding, out_proj, conv projections, ffn_down,
expert down). Every quantized tensor's row length must be a multiple of its block size and its byte
count that of its blocks; both are checked with the names and shapes, before anything is allocated.

Stacked weights (q/k/v -> `qkv`, dense gate/up -> `w13`, expert gate/up -> `gate_up_proj`):
- parts of one type (all Q4_K, all F32, ...) are copied into one stacked weight, still quantized
  (blocks run along K, so rows stack as in a float matrix);
- parts of different types (Q4_K_M: attn_q / attn_k Q4_K, attn_v Q6_K in some layers) become a
  `SplitWeight`: the parts in row order, runs of equal types stacked (q and k copied into one Q4_K
  weight), a single part used in place on the map. The forward pass runs one `linear` per part and
  concatenates the outputs (for the experts: per expert, per part). A split is never made when the
  parts share a type, so Q8_0 / Q4_0 / single-type K files keep one matrix per stacked weight.

`dequantize=True` expands every quantized tensor to the model dtype instead (with
`gguf.quants.dequantize`, the reference decoder; about 4x the file's memory in bf16). Any other
type is an error naming the tensor and its type; quantized weights need device="cpu" (their kernels
are C++), checked before anything is allocated.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..quant import QuantizedTensor, _row_bytes
from .config import ModelConfig
from .weights import SplitWeight, Weights, _progress, allocate, resolve_dtype

__all__ = ["GGUF_ARCHITECTURES", "SUPPORTED_TYPES", "find_gguf", "from_gguf", "gguf_config", "gguf_tokenizer",
           "is_gguf_path", "load_gguf", "open_gguf"]

GGUF_MAGIC = b"GGUF"
# llama.cpp's architecture name -> our model_type
GGUF_ARCHITECTURES = {"lfm2": "lfm2", "lfm2moe": "lfm2_moe"}
FLOAT_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_TYPES = FLOAT_TYPES + QUANT_TYPES
# GGUF type -> our QuantizedTensor format (every quantized type we read has CPU kernels)
_KERNEL_FORMATS = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k"}
_TORCH_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_EXPERT_GATING_SIGMOID = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID


# ------------------------------------------------------------------------------------------ file


def find_gguf(path) -> str:
    """The .gguf file itself, or the only .gguf file in a directory (error for none or several)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(files) != 1:
            what = "no .gguf file" if not files else f"{len(files)} .gguf files ({', '.join(files[:4])})"
            raise ValueError(f"{path!r} holds {what}; pass the path of one .gguf file")
        return os.path.join(path, files[0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path!r}")
    return path


def is_gguf_path(path) -> bool:
    """True for a .gguf file, or a directory holding .gguf files and no config.json."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path.endswith(".gguf") or _has_magic(path)
    if os.path.isdir(path):
        has_gguf = any(f.endswith(".gguf") for f in os.listdir(path))
        return has_gguf and not os.path.isfile(os.path.join(path, "config.json"))
    return False


def _has_magic(file: str) -> bool:
    try:
        with open(file, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


class _TruncatedError(ValueError):
    pass


def _reader_class():
    import gguf

    class _Reader(gguf.GGUFReader):
        """GGUFReader that refuses to read past the end of the file: a truncated file otherwise
        shows up as a numpy reshape error (or silently short tensors) deep inside the reader."""

        def _get(self, offset, dtype, count=1, override_order=None):
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > self.data.shape[0]:
                raise _TruncatedError(
                    f"the file ends at byte {self.data.shape[0]} but its header places data up to byte {end}"
                )
            return super()._get(offset, dtype, count, override_order)

    return _Reader


def open_gguf(path):
    """A memory-mapped `gguf.GGUFReader` (copy-on-write: tensors are writable views, the file is
    never modified) with clear errors for files that are not GGUF, truncated or corrupt."""
    try:
        import gguf  # noqa: F401
    except ImportError as exc:  # pragma: no cover - gguf is a dependency
        raise ImportError("reading GGUF files needs the `gguf` package (pip install gguf)") from exc
    file = find_gguf(path)
    size = os.path.getsize(file)
    with open(file, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{file}: not a GGUF file (it starts with {magic!r}, a GGUF file with {GGUF_MAGIC!r})")
    try:
        reader = _reader_class()(file, mode="c")
    except _TruncatedError as exc:
        raise ValueError(f"{file}: truncated GGUF file ({size} bytes): {exc}") from None
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: corrupt GGUF header: {exc}") from exc
    # As llama.cpp checks: tensors follow each other in the data section in the order of their
    # infos, each padded to the alignment. A type or shape that disagrees with what was written
    # changes a tensor's byte size, so the next tensor's offset no longer matches.
    expected = 0
    for t in reader.tensors:
        rel = int(t.data_offset) - int(reader.data_offset)
        if rel != expected:
            raise ValueError(
                f"{file}: tensor {t.name!r} starts at data offset {rel}, but the tensors before it end at "
                f"{expected}: a tensor's type or shape in the header disagrees with the data in the file"
            )
        expected += -(-int(t.n_bytes) // reader.alignment) * reader.alignment
        if t.data_offset + t.n_bytes > size:
            raise ValueError(
                f"{file}: truncated GGUF file ({size} bytes): tensor {t.name!r} needs bytes up to "
                f"{t.data_offset + t.n_bytes}"
            )
    reader.path = file
    return reader


def _field(reader, key, default=KeyError):
    f = reader.fields.get(key)
    if f is None:
        if default is KeyError:
            raise ValueError(f"{reader.path}: GGUF metadata key {key!r} is missing")
        return default
    return f.contents()


def _type_name(t) -> str:
    return t.tensor_type.name


def _logical_shape(t) -> tuple[int, ...]:
    """numpy / torch order (GGUF lists dimensions innermost first)."""
    return tuple(int(d) for d in reversed(t.shape.tolist()))


# ------------------------------------------------------------------------------------------ config


def _per_layer(value, n_layers: int, key: str, file: str) -> list[int]:
    if isinstance(value, list):
        if len(value) != n_layers:
            raise ValueError(f"{file}: {key} lists {len(value)} values for {n_layers} layers")
        return [int(v) for v in value]
    return [int(value)] * n_layers


def _one_value(values: list[int], key: str, file: str) -> int:
    distinct = sorted({v for v in values if v})
    if len(distinct) > 1:
        raise ValueError(f"{file}: {key} differs between layers ({distinct}); lfm_kernels.model needs one value")
    return distinct[0] if distinct else 0


def _f32_value(v) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06):
    the shortest repr that rounds to the same float32."""
    return float(str(np.float32(v)))


def gguf_config(reader) -> ModelConfig:
    """Our ModelConfig from llama.cpp's metadata keys (and, where llama.cpp reads it from the tensors,
    from the tensor list: a separate `output` means untied embeddings, conv biases, expert bias)."""
    file = reader.path
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{file}: architecture {arch!r} is not supported; lfm_kernels.model reads "
            f"{', '.join(repr(a) for a in GGUF_ARCHITECTURES)} GGUF files (LFM2 and LFM2-MoE)"
        )
    model_type = GGUF_ARCHITECTURES[arch]

    def key(name, default=KeyError):
        return _field(reader, f"{arch}.{name}", default)

    names = {t.name for t in reader.tensors}
    n_layers = int(key("block_count"))
    hidden = int(key("embedding_length"))
    n_heads = int(key("attention.head_count"))
    kv = _per_layer(key("attention.head_count_kv"), n_layers, f"{arch}.attention.head_count_kv", file)
    # llama.cpp marks the conv layers by 0 key/value heads
    layer_types = ["full_attention" if h > 0 else "conv" for h in kv]
    n_kv = _one_value(kv, f"{arch}.attention.head_count_kv", file) or n_heads
    head_dim = int(key("attention.key_length", hidden // n_heads))
    ff = _one_value(_per_layer(key("feed_forward_length", 0), n_layers, f"{arch}.feed_forward_length", file),
                    f"{arch}.feed_forward_length", file)
    vocab = key("vocab_size", None)
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    if vocab is None:
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if embd is None:
            raise ValueError(f"{file}: no {arch}.vocab_size, no tokenizer.ggml.tokens and no token_embd.weight")
        vocab = _logical_shape(embd)[0]
    eos = []
    for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        v = _field(reader, k, None)
        if v is not None and int(v) not in eos:
            eos.append(int(v))

    moe = dict(num_dense_layers=n_layers, num_experts=0, num_experts_per_tok=0, use_expert_bias=False,
               moe_intermediate_size=0, routed_scaling_factor=1.0)
    if model_type == "lfm2_moe":
        gating = key("expert_gating_func", _EXPERT_GATING_SIGMOID)
        if int(gating) != _EXPERT_GATING_SIGMOID:
            raise ValueError(
                f"{file}: {arch}.expert_gating_func is {gating}; LFM2-MoE routes with a sigmoid "
                f"({_EXPERT_GATING_SIGMOID}), the only router lfm_kernels implements"
            )
        dense = int(key("leading_dense_block_count", 0))
        scale = float(key("expert_weights_scale", 0.0))
        moe = dict(
            num_dense_layers=dense,
            num_experts=int(key("expert_count")),
            num_experts_per_tok=int(key("expert_used_count")),
            # llama.cpp requires the bias on every MoE layer of lfm2moe; we follow the file
            use_expert_bias=any(f"blk.{i}.exp_probs_b.bias" in names for i in range(dense, n_layers)),
            moe_intermediate_size=_one_value(
                _per_layer(key("expert_feed_forward_length"), n_layers, f"{arch}.expert_feed_forward_length", file),
                f"{arch}.expert_feed_forward_length", file),
            # llama.cpp: 0 (absent) or 1 means no scaling; it always renormalises the top-k weights
            routed_scaling_factor=_f32_value(scale) if scale != 0.0 else 1.0,
        )
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=ff,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        layer_types=layer_types,
        norm_eps=_f32_value(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32_value(key("rope.freq_base", 10000.0)),  # llama.cpp's default when absent
        max_position_embeddings=int(key("context_length", 128_000)),
        conv_L_cache=int(key("shortconv.l_cache")),
        conv_bias=any(n.startswith("blk.") and n.endswith("shortconv.in_proj.bias") for n in names),
        norm_topk_prob=True,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=eos,
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", None),
        torch_dtype=None,
        **moe,
    )
    cfg.validate()
    if model_type == "lfm2" and cfg.intermediate_size <= 0:
        raise ValueError(f"{file}: {arch}.feed_forward_length is missing or 0")
    return cfg


# ------------------------------------------------------------------------------------------ tensors


class _Target:
    """Where one GGUF tensor goes: `dest` (a view with the tensor's logical shape), the attribute that
    holds the whole weight when the tensor fills it (for zero-copy placement), and whether it is a
    small always-float tensor (norm, bias, router, conv taps)."""

    __slots__ = ("dest", "owner", "attr", "small", "part", "index")

    def __init__(self, dest, owner=None, attr=None, small=False, part=None, index=None):
        self.dest, self.owner, self.attr, self.small, self.part = dest, owner, attr, small, part
        # a part of a stacked weight: the object holding it and the index of this part's rows in it
        # (where a quantized part's blocks go)
        self.index = index


def _targets(cfg: ModelConfig, w: Weights, names: set[str]) -> tuple[dict[str, _Target], list[str]]:
    """GGUF tensor name -> _Target for this config, and the names that must be present."""
    H, D = cfg.hidden_size, cfg.head_dim
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    t: dict[str, _Target] = {}
    required: list[str] = []

    def add(name, dest, owner=None, attr=None, small=False, req=True, part=None, index=None):
        t[name] = _Target(dest, owner, attr, small, part, index)
        if req:
            required.append(name)

    add("token_embd.weight", w.embed, w, "embed")
    # llama.cpp names LFM2's final norm (transformers' `embedding_norm`) token_embd_norm; accept the
    # generic output_norm as well
    norm_name = "output_norm.weight" if "output_norm.weight" in names and "token_embd_norm.weight" not in names \
        else "token_embd_norm.weight"
    add(norm_name, w.final_norm, w, "final_norm", small=True)
    if not cfg.tie_word_embeddings:
        add("output.weight", w.lm_head, w, "lm_head")
    for i, lw in enumerate(w.layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", lw.operator_norm, lw, "operator_norm", small=True)
        add(p + "ffn_norm.weight", lw.ffn_norm, lw, "ffn_norm", small=True)
        if lw.attention:
            fused = p + "attn_qkv.weight" in names  # llama.cpp's --fuse-qkv layout
            add(p + "attn_qkv.weight", lw.qkv, lw, "qkv", req=fused)
            for suffix, rows in (("q", slice(0, Hq * D)), ("k", slice(Hq * D, (Hq + Hkv) * D)),
                                 ("v", slice((Hq + Hkv) * D, None))):
                add(p + f"attn_{suffix}.weight", lw.qkv[rows], lw, req=not fused, part="qkv", index=(rows,))
            add(p + "attn_output.weight", lw.out_proj, lw, "out_proj")
            add(p + "attn_q_norm.weight", lw.q_norm, lw, "q_norm", small=True)
            add(p + "attn_k_norm.weight", lw.k_norm, lw, "k_norm", small=True)
        else:
            add(p + "shortconv.in_proj.weight", lw.in_proj, lw, "in_proj")
            add(p + "shortconv.conv.weight", lw.conv, lw, "conv", small=True)
            add(p + "shortconv.out_proj.weight", lw.conv_out, lw, "conv_out")
            if cfg.conv_bias:
                add(p + "shortconv.in_proj.bias", lw.in_proj_bias, lw, "in_proj_bias", small=True)
                add(p + "shortconv.conv.bias", lw.conv_bias, lw, "conv_bias", small=True)
                add(p + "shortconv.out_proj.bias", lw.conv_out_bias, lw, "conv_out_bias", small=True)
        if lw.moe:
            I = cfg.moe_intermediate_size
            add(p + "ffn_gate_inp.weight", lw.gate, lw, "gate", small=True)
            if cfg.use_expert_bias:
                add(p + "exp_probs_b.bias", lw.expert_bias, lw, "expert_bias", small=True)
            gate, up = (slice(None), slice(0, I)), (slice(None), slice(I, None))
            add(p + "ffn_gate_exps.weight", lw.gate_up_proj[gate], lw, part="gate_up_proj", index=gate)
            add(p + "ffn_up_exps.weight", lw.gate_up_proj[up], lw, part="gate_up_proj", index=up)
            add(p + "ffn_down_exps.weight", lw.down_proj, lw, "down_proj")
        else:
            I = cfg.intermediate_size
            add(p + "ffn_gate.weight", lw.w13[:I], lw, part="w13", index=(slice(0, I),))
            add(p + "ffn_up.weight", lw.w13[I:], lw, part="w13", index=(slice(I, None),))
            add(p + "ffn_down.weight", lw.w2, lw, "w2")
    return t, required


def _check_tensors(reader, cfg: ModelConfig, targets: dict[str, _Target], required: list[str], dequantize: bool,
                   device="cpu"):
    """Names, types and shapes of every tensor against the config, before anything is allocated."""
    file = reader.path
    arch = _field(reader, "general.architecture")
    present = set()
    for t in reader.tensors:
        name = t.name
        tname = _type_name(t)
        if name == "output.weight" and cfg.tie_word_embeddings:
            continue
        target = targets.get(name)
        if target is None:
            raise ValueError(
                f"{file}: unexpected tensor {name!r}, which an {arch} model with this file's metadata "
                f"(block_count {cfg.num_hidden_layers}, attention layers {cfg.attention_layers}) does not have"
            )
        if tname not in SUPPORTED_TYPES:
            raise ValueError(
                f"{file}: tensor {name!r} has type {tname}; supported tensor types are "
                f"{', '.join(SUPPORTED_TYPES)}"
            )
        shape = _logical_shape(t)
        want = tuple(target.dest.shape)
        if shape != want:
            raise ValueError(
                f"{file}: tensor {name!r} has shape {list(shape)} (GGUF order {t.shape.tolist()}), but the "
                f"file's metadata implies {list(want)}"
            )
        if tname in QUANT_TYPES:
            _check_blocks(file, name, tname, shape, int(t.n_bytes))
        if tname in QUANT_TYPES and not target.small and not dequantize and torch.device(device).type != "cpu":
            raise ValueError(
                f"{file}: tensor {name!r} is {tname}: quantized weights run on the CPU only (their kernels "
                f"are C++), got device={device!r}; load with device='cpu' or dequantize=True"
            )
        present.add(name)
    for name in required:
        if name not in present:
            raise ValueError(f"{file}: tensor {name!r} is missing (an {arch} model with this metadata needs it)")


def _check_blocks(file: str, name: str, tname: str, shape, n_bytes: int) -> None:
    """A quantized tensor's row length is a whole number of its blocks, and its bytes are its blocks'."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[tname]]
    k = int(shape[-1])
    if k % block:
        raise ValueError(f"{file}: tensor {name!r} is {tname} with rows of {k} values, not a multiple of its block "
                         f"size {block}")
    want = int(np.prod(shape[:-1], dtype=np.int64)) * (k // block) * size
    if n_bytes != want:
        raise ValueError(f"{file}: tensor {name!r} is {tname} of shape {list(shape)}: {want} bytes of blocks, "
                         f"but the file gives it {n_bytes}")


def _stack_kind(tname: str, dequantize: bool) -> str:
    """What a part of a stacked weight becomes: its quantized type, or "float" (float or expanded)."""
    return tname if (tname in QUANT_TYPES and not dequantize) else "float"


def _quantized(raw: torch.Tensor, fmt: str, shape, *, dequantize: bool = False, dtype=torch.float32, name: str = "?"):
    """The one adapter from a GGUF quantized tensor (raw blocks as a uint8 tensor [..., row bytes], its
    GGML format name, its logical shape) to a weight.

    Every quantized type becomes a QuantizedTensor over the same bytes (GGUF stores exactly our blocks;
    on a memory-mapped file this is zero-copy). `dequantize=True` decodes the blocks with
    `gguf.quants.dequantize` (the reference decoder) instead, one leading slice at a time so the fp32
    temporary stays small, into `dtype`."""
    if fmt not in QUANT_TYPES:
        raise ValueError(f"tensor {name!r}: unsupported quantized type {fmt}; expected one of {QUANT_TYPES}")
    if not dequantize:
        shape = tuple(int(s) for s in shape)
        return QuantizedTensor(raw.reshape(*shape[:-1], -1), _KERNEL_FORMATS[fmt], shape)
    import gguf

    qtype = gguf.GGMLQuantizationType[fmt]
    shape = tuple(int(s) for s in shape)
    out = torch.empty(shape, dtype=dtype)
    arr = raw.numpy()
    if len(shape) == 1:
        out.copy_(torch.from_numpy(gguf.quants.dequantize(arr, qtype).reshape(shape)))
        return out
    lead = arr.reshape(-1, arr.shape[-1])
    flat = out.view(-1, shape[-1])
    step = max(1, (1 << 22) // max(1, shape[-1]))  # ~16 MB of fp32 per step
    for r0 in range(0, lead.shape[0], step):
        r1 = min(lead.shape[0], r0 + step)
        flat[r0:r1].copy_(torch.from_numpy(gguf.quants.dequantize(lead[r0:r1], qtype)))
    return out


def _as_tensor(t) -> tuple[torch.Tensor, str]:
    """A GGUF tensor as a torch tensor on the mapped file (no copy): floats with their logical shape,
    quantized ones as raw uint8 blocks [..., row bytes]."""
    tname = _type_name(t)
    data = torch.from_numpy(t.data)  # the reader's copy-on-write memmap: a view of the file
    shape = _logical_shape(t)
    if tname == "BF16":
        return data.view(torch.uint8).reshape(-1).view(torch.bfloat16).view(shape), tname
    if tname in ("F32", "F16"):
        return data.view(shape), tname
    return data, tname


def _pick_dtype(reader) -> torch.dtype:
    """The model dtype when none is given: the type of the large float matrices (F32 -> float32,
    BF16/F16 -> bfloat16), bfloat16 for quantized files."""
    for t in reader.tensors:
        if len(t.shape) >= 2 and not t.name.endswith(("shortconv.conv.weight", "ffn_gate_inp.weight")):
            return torch.float32 if _type_name(t) == "F32" else torch.bfloat16
    return torch.float32


def load_gguf(path, dtype=None, device="cpu", dequantize: bool = False, progress: bool = True, reader=None):
    """(config, weights, dtype, reader) from a GGUF file; see the module docstring."""
    reader = reader or open_gguf(path)
    cfg = gguf_config(reader)
    dt = resolve_dtype(dtype) or _pick_dtype(reader)
    cfg.torch_dtype = str(dt).replace("torch.", "")
    names = {t.name for t in reader.tensors}
    # a meta-device layout first: checks need shapes only, so nothing is allocated before they pass
    meta, _, _ = allocate(cfg, dt, "meta")
    targets, required = _targets(cfg, meta, names)
    _check_tensors(reader, cfg, targets, required, dequantize, device)

    weights, _, _ = allocate(cfg, dt, device)
    targets, _ = _targets(cfg, weights, names)
    tensors = [t for t in reader.tensors if not (t.name == "output.weight" and cfg.tie_word_embeddings)]
    bar = _progress(sum(int(t.n_bytes) for t in tensors), f"loading {os.path.basename(reader.path)}", progress)
    tied = weights.lm_head is weights.embed
    # stacked weights whose parts differ in kind (quantized type, or float): they become SplitWeights
    kinds: dict = {}
    for t in tensors:
        target = targets[t.name]
        if target.index is not None:
            kinds.setdefault((id(target.owner), target.part), set()).add(_stack_kind(_type_name(t), dequantize))
    split = {key for key, k in kinds.items() if len(k) > 1}
    pending: dict = {}  # split key -> (owner, attribute, {first row: the part's weight})
    stacked: dict = {}  # (owner, attribute) -> the QuantizedTensor its quantized parts are copied into
    with torch.no_grad():
        for t in tensors:
            target = targets[t.name]
            src, tname = _as_tensor(t)
            if tname in QUANT_TYPES:
                # small tensors llama.cpp never quantizes (norms, router, conv taps) are always expanded
                src = _quantized(src, tname, target.dest.shape, dequantize=dequantize or target.small,
                                 dtype=target.dest.dtype, name=t.name)
            key = (id(target.owner), target.part)
            if target.index is not None and key in split:
                # one part of a SplitWeight: quantized blocks stay on the map; floats in the model dtype
                if not isinstance(src, QuantizedTensor) and (src.dtype != dt or torch.device(device).type != "cpu"):
                    src = src.to(device=device, dtype=dt)
                entry = pending.setdefault(key, (target.owner, target.part, {}))
                entry[2][target.index[-1].start] = src
                bar.update(int(t.n_bytes))
                continue
            if isinstance(src, QuantizedTensor):
                # the float weight allocated for it is never written, so its pages are never committed
                if target.index is None:
                    setattr(target.owner, target.attr, src)  # the file's blocks, in place
                    if tied and target.attr == "embed":
                        weights.lm_head = src
                else:  # q/k/v or gate/up: copy the blocks into the stacked weight (rows stack as floats do)
                    key = (id(target.owner), target.part)
                    if key not in stacked:
                        full = getattr(target.owner, target.part).shape
                        data = torch.empty(*full[:-1], _row_bytes(src.format, full[-1]), dtype=torch.uint8)
                        stacked[key] = QuantizedTensor(data, src.format, full)
                        setattr(target.owner, target.part, stacked[key])
                    stacked[key].data[target.index].copy_(src.data)
                bar.update(int(t.n_bytes))
                continue
            if (
                target.index is None
                and target.owner is not None
                and src.dtype == target.dest.dtype
                and torch.device(device).type == "cpu"
                and src.is_contiguous()
            ):
                # the file's tensor fills a whole weight of ours: use it in place (zero copy)
                setattr(target.owner, target.attr, src)
                if tied and target.attr == "embed":
                    weights.lm_head = src
            else:
                target.dest.copy_(src)
            bar.update(int(t.n_bytes))
        for owner, attr, parts in pending.values():
            setattr(owner, attr, _split_weight([parts[r] for r in sorted(parts)]))
    bar.close()
    return cfg, weights, dt, reader


def _split_weight(parts: list) -> SplitWeight:
    """A SplitWeight from a stacked weight's parts in row order: runs of parts of one kind (the same
    quantized format, or float) are stacked into one weight (copied); a lone part is kept as it is."""
    runs: list[list] = []
    for p in parts:
        kind = p.format if isinstance(p, QuantizedTensor) else "float"
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(p)
        else:
            runs.append([kind, [p]])
    out = []
    for kind, ps in runs:
        if len(ps) == 1:
            out.append(ps[0])
        elif kind == "float":
            out.append(torch.cat(ps, dim=-2))
        else:
            data = torch.cat([p.data for p in ps], dim=-2)
            out.append(QuantizedTensor(data, kind, (*ps[0].shape[:-2], data.shape[-2], ps[0].shape[-1])))
    return SplitWeight(out)


# ------------------------------------------------------------------------------------------ tokenizer


# llama.cpp's pre-tokenizer regex for `tokenizer.ggml.pre` = "lfm2" (and the other llama3-style ones)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_PRE_SPLITS = {"lfm2": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
               "default": _GPT2_SPLIT, "gpt-2": _GPT2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4


def gguf_tokenizer(reader):
    """A transformers fast tokenizer built from the file's `tokenizer.ggml.*` section (byte-level BPE,
    `tokenizer.ggml.model` = "gpt2", as LFM2's vocabulary is), with the file's chat template
    (`tokenizer.chat_template`) attached; None when the file has no tokenizer."""
    model = _field(reader, "tokenizer.ggml.model", None)
    if model is None:
        return None
    if model != "gpt2":
        raise ValueError(
            f"{reader.path}: tokenizer.ggml.model is {model!r}; LFM2 files carry a byte-level BPE "
            "vocabulary ('gpt2'), the only kind read here"
        )
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", None) or [1] * len(tokens)
    merges = _field(reader, "tokenizer.ggml.merges", [])
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    # llama.cpp only ranks merges; the tokenizers library refuses one whose parts or result are not in
    # the vocabulary, which no tokenizer could produce anyway: leave those out
    pairs = [p for p in (tuple(m.split(" ", 1)) for m in merges)
             if len(p) == 2 and p[0] in vocab and p[1] in vocab and p[0] + p[1] in vocab]
    # llama.cpp's llama3-style pre-tokenizers (lfm2 among them) look a whole word up before merging
    bpe = models.BPE(vocab, pairs, ignore_merges=pre in ("lfm2", "llama3", "llama-bpe", "llama-v3"))
    tok = Tokenizer(bpe)
    split = _PRE_SPLITS.get(pre, _LLAMA3_SPLIT)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if specials:
        tok.add_special_tokens(specials)
    if user:
        tok.add_tokens(user)

    def tok_str(key):
        i = _field(reader, key, None)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos, pad = tok_str("tokenizer.ggml.bos_token_id"), tok_str("tokenizer.ggml.eos_token_id"), \
        tok_str("tokenizer.ggml.padding_token_id")
    unk = tok_str("tokenizer.ggml.unknown_token_id")
    # llama.cpp adds BOS for the lfm2 pre-tokenizer unless the file says otherwise
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", pre == "lfm2"))
    if add_bos and bos is not None:
        bos_id = vocab[bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
        chat_template=_field(reader, "tokenizer.chat_template", None),
    )
    return fast


# ------------------------------------------------------------------------------------------ model


def from_gguf(path, dtype=None, device="cpu", progress: bool = True, tokenizer: bool = True,
              dequantize: bool = False):
    """An LfmModel from a GGUF file (or a directory holding exactly one)."""
    from .model import LfmModel

    reader = open_gguf(path)
    cfg, weights, dt, reader = load_gguf(path, dtype=dtype, device=device, dequantize=dequantize,
                                         progress=progress, reader=reader)
    tok = gguf_tokenizer(reader) if tokenizer else None
    model = LfmModel(cfg, weights, dt, tokenizer=tok, path=reader.path)
    if cfg.eos_token_id:
        model.generation_defaults["eos_token_id"] = list(cfg.eos_token_id)
    model.gguf_metadata = _scalar_metadata(reader)
    model.gguf_reader = reader  # the mapping the zero-copy weights live in
    return model


def _scalar_metadata(reader) -> dict:
    """The file's scalar metadata (architecture, name, file type, ...), arrays left out."""
    import gguf

    out = {}
    for k, f in reader.fields.items():
        if k.startswith("GGUF.") or not f.types or f.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        out[k] = f.contents()
    return out
