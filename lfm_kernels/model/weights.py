"""Weight layout of our model and the checkpoint loader.

Every weight lives in one preallocated tensor in the layout the forward pass wants:
  - attention q/k/v projections stacked into one `qkv` [(Hq + 2 Hkv) * D, H] (one linear per layer),
  - dense SwiGLU w1/w3 stacked into `w13` [2I, H] (gate rows first),
  - experts fused as transformers does: `gate_up_proj` [E, 2I, H] (w1 rows, then w3), `down_proj` [E, H, I],
  - the conv taps as [H, L].
A stacked weight whose parts have *different* quantized formats (`quant="q4_k_m"`, or a GGUF Q4_K_M
file: q/k in Q4_K and v in Q6_K stacked into `qkv`) is a `SplitWeight`: the parts in row order, runs of
equal-format parts still stacked (q and k together), each part a QuantizedTensor (or float tensor); the
forward pass runs one `linear` per part and concatenates the outputs. Same-format parts never split.
Checkpoint tensors are matched by name to a *slot* (a view into one of these tensors with the shape
the checkpoint must have), so loading is: check every name and shape (from the safetensors headers,
no data read), then read tensor by tensor from the file straight into its slot (`readinto` on the
slot's memory: no mmap, no temporary when the dtypes agree, one tensor-sized buffer when converting).
No fp32 copy, no second copy of the model: peak memory is the model plus the interpreter. Experts may come per expert (`experts.E.w1/w2/w3.weight`, the original layout)
or fused (`experts.gate_up_proj` / `experts.down_proj`, transformers' layout).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from .. import _memory
from ..quant import QuantizedTensor, _row_bytes, quantize
from .config import ModelConfig

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}

# names that may appear in checkpoints but hold nothing we need (recomputed or unused)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "pos_emb.inv_freq", "pos_emb.original_inv_freq")


QUANT_MODES = ("q8_0", "q4_0", "q4_k_m")


def resolve_quant(quant) -> str | None:
    """None, "q8_0", "q4_0" or "q4_k_m" (the weight formats a model can be quantized to while loading;
    "q4_k_m" is llama.cpp's mix of Q4_K and Q6_K, see `allocate`)."""
    if quant is None or quant in QUANT_MODES:
        return quant
    raise ValueError(f"quant must be None or one of {QUANT_MODES}, got {quant!r}")


def _nbytes(t) -> int:
    """Bytes a weight occupies: a float tensor's elements, a QuantizedTensor's blocks, a SplitWeight's parts."""
    if isinstance(t, (QuantizedTensor, SplitWeight)):
        return t.nbytes
    return t.numel() * t.element_size()


class SplitWeight:
    """One stacked weight ([N, K] or [E, N, K]) kept as parts of different types, stacked along N (the
    output rows, dimension -2) in order: what a stacked weight becomes when its parts are quantized in
    different formats (Q4_K_M's q/k Q4_K and v Q6_K in `qkv`), since one QuantizedTensor has one
    format. Each part is a QuantizedTensor or a float tensor; `linear` on it is one `linear` per part,
    outputs concatenated (lfm_kernels.model.model._linear)."""

    __slots__ = ("parts", "shape")

    def __init__(self, parts):
        parts = tuple(parts)
        if len(parts) < 2:
            raise ValueError(f"a SplitWeight needs at least two parts, got {len(parts)}")
        first = tuple(parts[0].shape)
        for p in parts[1:]:
            s = tuple(p.shape)
            if len(s) != len(first) or s[:-2] != first[:-2] or s[-1] != first[-1]:
                raise ValueError(
                    f"SplitWeight parts must agree in every dimension but the rows (-2): {first} and {s}"
                )
        self.parts = parts
        self.shape = torch.Size((*first[:-2], sum(int(p.shape[-2]) for p in parts), first[-1]))

    @property
    def formats(self) -> tuple[str, ...]:
        """Each part's format ("q4_k", ...) or dtype ("bfloat16", ...)."""
        return tuple(_format_of(p) for p in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(p) for p in self.parts)

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def expert(self, e: int) -> "SplitWeight":
        """The [N, K] weight of expert e of a stacked [E, N, K] one (views, no copy)."""
        return SplitWeight(_expert(p, e) for p in self.parts)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat([p.dequantize(dtype) if isinstance(p, QuantizedTensor) else p.to(dtype) for p in self.parts],
                         dim=-2)

    def _locate(self, start: int, stop: int):
        """(part, start, stop within it) for rows [start, stop) of the whole, which must lie in one part."""
        r0 = 0
        for p in self.parts:
            n = int(p.shape[-2])
            if r0 <= start and stop <= r0 + n:
                return p, start - r0, stop - r0
            r0 += n
        raise ValueError(f"rows [{start}, {stop}) span several parts of a SplitWeight {list(self.shape)}")

    def __repr__(self) -> str:
        return f"SplitWeight(shape={list(self.shape)}, parts={[f'{f} {list(p.shape)}' for f, p in zip(self.formats, self.parts)]})"


def _format_of(t) -> str:
    return t.format if isinstance(t, QuantizedTensor) else str(t.dtype).replace("torch.", "")


def _expert(w, e: int):
    """Expert e's [N, K] weight of a stacked [E, N, K] one, without a copy."""
    if isinstance(w, QuantizedTensor):
        return QuantizedTensor(w.data[e], w.format, w.shape[1:], w.layout)
    if isinstance(w, SplitWeight):
        return w.expert(e)
    return w[e]


def weight_formats(weights: "Weights") -> dict[str, int]:
    """Bytes per weight format ("q4_k", "q6_k", "bfloat16", ...) over all weights, largest first."""
    out: dict[str, int] = {}
    for _, t in weights.tensors():
        for p in (t.parts if isinstance(t, SplitWeight) else (t,)):
            out[_format_of(p)] = out.get(_format_of(p), 0) + _nbytes(p)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def resolve_dtype(dtype) -> torch.dtype | None:
    """None, or one of the dtypes the ops compute in (float32, bfloat16, float16); anything else,
    float64 included, is a TypeError naming `dtype`."""
    if dtype is None:
        return dtype
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype.replace("torch.", ""), dtype)
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    raise TypeError(
        f"dtype must be torch.float32, torch.bfloat16 or torch.float16 (or one of {sorted(_DTYPES)}), got {dtype!r}"
    )


@dataclass
class LayerWeights:
    attention: bool
    moe: bool
    operator_norm: torch.Tensor = None
    ffn_norm: torch.Tensor = None
    # attention
    qkv: torch.Tensor = None
    out_proj: torch.Tensor = None
    q_norm: torch.Tensor = None
    k_norm: torch.Tensor = None
    # conv
    in_proj: torch.Tensor = None
    in_proj_bias: torch.Tensor | None = None
    conv: torch.Tensor = None  # [H, L]
    conv_bias: torch.Tensor | None = None
    conv_out: torch.Tensor = None
    conv_out_bias: torch.Tensor | None = None
    # dense feed-forward
    w13: torch.Tensor = None
    w2: torch.Tensor = None
    # MoE feed-forward
    gate: torch.Tensor = None
    expert_bias: torch.Tensor | None = None  # float32, as transformers keeps it
    gate_up_proj: torch.Tensor = None
    down_proj: torch.Tensor = None


@dataclass
class Weights:
    embed: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor  # the embedding itself when tied
    layers: list[LayerWeights] = field(default_factory=list)

    def tensors(self):
        """(name, tensor) for every distinct tensor (a tied lm_head is listed once)."""
        yield "embed", self.embed
        yield "final_norm", self.final_norm
        if self.lm_head is not self.embed:
            yield "lm_head", self.lm_head
        for i, layer in enumerate(self.layers):
            for name, value in vars(layer).items():
                if isinstance(value, (torch.Tensor, QuantizedTensor, SplitWeight)) and not name.startswith("_"):  # _*: derived caches
                    yield f"layers.{i}.{name}", value

    def nbytes(self) -> int:
        return sum(_nbytes(t) for _, t in self.tensors())

    def is_quantized(self) -> bool:
        return any(isinstance(t, (QuantizedTensor, SplitWeight)) for _, t in self.tensors())


@dataclass
class _Slot:
    dest: torch.Tensor  # view with exactly the checkpoint tensor's expected shape (a quantized slot: its blocks)
    parts: tuple[str, ...]  # the canonical part names this tensor fills
    fmt: str | None = None  # a quantized slot: the format the float tensor is quantized to when read
    qshape: tuple[int, ...] | None = None  # a quantized slot: the float tensor's shape

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape the checkpoint tensor must have."""
        return tuple(self.qshape) if self.fmt else tuple(self.dest.shape)


def _qrows(qt: QuantizedTensor, *index) -> tuple[torch.Tensor, str, tuple[int, ...]]:
    """(the blocks, the format, the logical shape) of qt[index] for an index that selects whole rows (ints and
    row slices over the leading dimensions): quantized blocks run along K, so rows stack as they do
    in a float matrix."""
    data = qt.data[index]
    return data, qt.format, (*data.shape[:-1], qt.shape[-1])


def _q4_k_m_types(cfg: ModelConfig) -> dict[str, str]:
    """llama.cpp name -> our format ("q4_k", "q6_k", "q8_0") of every matrix under llama.cpp's Q4_K_M rules,
    decided exactly as the GGUF writer decides them (same names, same counters)."""
    from types import SimpleNamespace

    from .gguf_write import _choose_types, gguf_tensors

    skeleton, _, _ = allocate(cfg, torch.float32, "meta")
    model = SimpleNamespace(config=cfg, weights=skeleton)
    items = list(gguf_tensors(model))
    try:
        types = _choose_types(model, items, "Q4_K_M", None)
    except ValueError as exc:
        raise ValueError(f"quant='q4_k_m': {exc}") from None
    return {name: t.lower() for (name, _, small), t in zip(items, types) if not small}


def allocate(cfg: ModelConfig, dtype: torch.dtype, device="cpu", quant: str | None = None) -> tuple[Weights, dict[str, _Slot], list[str]]:
    """Uninitialised weights (torch.empty: pages are committed only when written), the slot of every
    accepted checkpoint name, and the ordered list of required part names.

    quant "q8_0" / "q4_0": every projection (conv in/out, attention q/k/v/o, dense FFN, experts) is a
    QuantizedTensor of that format, and the embedding (and an untied lm_head) Q8_0 in both modes, as
    llama.cpp keeps its token embedding and output matrix at higher precision than Q4_0.
    quant "q4_k_m": llama.cpp's Q4_K_M choice per tensor (`lfm_kernels.kquants.q4_k_m_type`): Q6_K for
    the output matrix (the tied embedding), for attn_v and ffn_down(_exps) in the first and last
    eighth of the layers and every third layer between, Q4_K for the rest; a qkv whose v is Q6_K is a
    SplitWeight [q/k Q4_K, v Q6_K]. Every K of such a model must be a multiple of 256.
    Norms, the router, expert bias and conv taps stay float. The slots of quantized tensors hold their
    blocks; the loader quantizes each float tensor as it reads it."""
    H, V, D = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    Hq, Hkv, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.conv_L_cache
    quant = resolve_quant(quant)
    plan = _q4_k_m_types(cfg) if quant == "q4_k_m" else None

    def fmt_of(name: str, default=quant):
        """The format of llama.cpp's tensor `name` under this quant mode (None: float)."""
        if plan is not None:
            return plan[name]
        return default

    def empty(*shape, dt=dtype):
        # big weights on huge pages (lfm_kernels/_memory.py): decode streams them
        return _memory.empty(*shape, dtype=dt, device=device)

    def matrix(*shape, fmt=quant):
        """A projection: float, or (quant given) the uninitialised blocks of a QuantizedTensor."""
        if fmt is None:
            return empty(*shape)
        data = _memory.empty(*shape[:-1], _row_bytes(fmt, shape[-1]), dtype=torch.uint8, device=device)
        return QuantizedTensor(data, fmt, shape)

    def stacked(lead: tuple, parts: list[tuple[int, str | None]], k: int):
        """A weight [*lead, sum of rows, k] from parts (rows, format) stacked along the rows: one matrix
        when every part has the same format, else a SplitWeight of the runs of equal formats."""
        runs: list[list] = []
        for n, f in parts:
            if runs and runs[-1][1] == f:
                runs[-1][0] += n
            else:
                runs.append([n, f])
        if len(runs) == 1:
            return matrix(*lead, runs[0][0], k, fmt=runs[0][1])
        return SplitWeight(matrix(*lead, n, k, fmt=f) for n, f in runs)

    def rows(w, *index):
        """The slot destination for w[index] (whole rows: ints over the leading dims, a slice last)."""
        if isinstance(w, SplitWeight):
            sl = index[-1]
            n = w.shape[-2]
            start, stop, _ = sl.indices(n)
            part, a, b = w._locate(start, stop)
            return rows(part, *index[:-1], slice(a, b))
        return _qrows(w, *index) if isinstance(w, QuantizedTensor) else w[index]

    slots: dict[str, _Slot] = {}
    required: list[str] = []

    def add(name: str, dest, parts: tuple[str, ...] | None = None, required_part: bool = True):
        if isinstance(dest, SplitWeight):
            return  # a whole-weight slot over parts of different formats: the per-part names fill it
        if isinstance(dest, QuantizedTensor):
            dest = (dest.data, dest.format, tuple(dest.shape))
        if isinstance(dest, tuple):  # (blocks, format, logical shape) of a quantized weight
            slots[name] = _Slot(dest[0], parts or (name,), dest[1], dest[2])
        else:
            slots[name] = _Slot(dest, parts or (name,))
        if parts is None and required_part:
            required.append(name)

    embed = matrix(V, H, fmt=fmt_of("token_embd.weight", "q8_0" if quant else None))
    add("model.embed_tokens.weight", embed)
    final_norm = empty(H)
    add("model.embedding_norm.weight", final_norm)
    if cfg.tie_word_embeddings:
        lm_head = embed
    else:
        lm_head = matrix(V, H, fmt=fmt_of("output.weight", "q8_0" if quant else None))
        add("lm_head.weight", lm_head)
    weights = Weights(embed=embed, final_norm=final_norm, lm_head=lm_head)

    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        g = f"blk.{i}."  # llama.cpp's names, for the q4_k_m plan
        lw = LayerWeights(attention=cfg.is_attention(i), moe=cfg.is_moe_layer(i))
        lw.operator_norm = empty(H)
        lw.ffn_norm = empty(H)
        add(p + "operator_norm.weight", lw.operator_norm)
        add(p + "ffn_norm.weight", lw.ffn_norm)
        if lw.attention:
            lw.qkv = stacked((), [(Hq * D, fmt_of(g + "attn_q.weight")), (Hkv * D, fmt_of(g + "attn_k.weight")),
                                  (Hkv * D, fmt_of(g + "attn_v.weight"))], H)
            add(p + "self_attn.q_proj.weight", rows(lw.qkv, slice(0, Hq * D)))
            add(p + "self_attn.k_proj.weight", rows(lw.qkv, slice(Hq * D, (Hq + Hkv) * D)))
            add(p + "self_attn.v_proj.weight", rows(lw.qkv, slice((Hq + Hkv) * D, None)))
            lw.out_proj = matrix(H, Hq * D, fmt=fmt_of(g + "attn_output.weight"))
            add(p + "self_attn.out_proj.weight", lw.out_proj)
            lw.q_norm, lw.k_norm = empty(D), empty(D)
            add(p + "self_attn.q_layernorm.weight", lw.q_norm)
            add(p + "self_attn.k_layernorm.weight", lw.k_norm)
        else:
            lw.in_proj = matrix(3 * H, H, fmt=fmt_of(g + "shortconv.in_proj.weight"))
            add(p + "conv.in_proj.weight", lw.in_proj)
            lw.conv = empty(H, L)
            add(p + "conv.conv.weight", lw.conv.view(H, 1, L))
            lw.conv_out = matrix(H, H, fmt=fmt_of(g + "shortconv.out_proj.weight"))
            add(p + "conv.out_proj.weight", lw.conv_out)
            if cfg.conv_bias:
                lw.in_proj_bias, lw.conv_bias, lw.conv_out_bias = empty(3 * H), empty(H), empty(H)
                add(p + "conv.in_proj.bias", lw.in_proj_bias)
                add(p + "conv.conv.bias", lw.conv_bias)
                add(p + "conv.out_proj.bias", lw.conv_out_bias)
        if lw.moe:
            E, I = cfg.num_experts, cfg.moe_intermediate_size
            lw.gate = empty(E, H)
            add(p + "feed_forward.gate.weight", lw.gate)
            if cfg.use_expert_bias:
                lw.expert_bias = empty(E, dt=torch.float32)
                add(p + "feed_forward.expert_bias", lw.expert_bias)
            lw.gate_up_proj = stacked((E,), [(I, fmt_of(g + "ffn_gate_exps.weight")),
                                             (I, fmt_of(g + "ffn_up_exps.weight"))], H)
            lw.down_proj = matrix(E, H, I, fmt=fmt_of(g + "ffn_down_exps.weight"))
            ex = p + "feed_forward.experts."
            gu_parts, down_parts = [], []
            for e in range(E):
                add(f"{ex}{e}.w1.weight", rows(lw.gate_up_proj, e, slice(0, I)))
                add(f"{ex}{e}.w3.weight", rows(lw.gate_up_proj, e, slice(I, None)))
                add(f"{ex}{e}.w2.weight", rows(lw.down_proj, e, slice(None)))
                gu_parts += [f"{ex}{e}.w1.weight", f"{ex}{e}.w3.weight"]
                down_parts.append(f"{ex}{e}.w2.weight")
            add(ex + "gate_up_proj", lw.gate_up_proj, tuple(gu_parts))
            add(ex + "down_proj", lw.down_proj, tuple(down_parts))
        else:
            I = cfg.intermediate_size
            lw.w13 = stacked((), [(I, fmt_of(g + "ffn_gate.weight")), (I, fmt_of(g + "ffn_up.weight"))], H)
            add(p + "feed_forward.w1.weight", rows(lw.w13, slice(0, I)))
            add(p + "feed_forward.w3.weight", rows(lw.w13, slice(I, None)))
            lw.w2 = matrix(H, I, fmt=fmt_of(g + "ffn_down.weight"))
            add(p + "feed_forward.w2.weight", lw.w2)
        weights.layers.append(lw)
    return weights, slots, required


def _allowed_roots(root: str) -> list[str]:
    """Directories a checkpoint's files may resolve into: the checkpoint directory itself and, for a
    Hugging Face hub cache snapshot (`<repo>/snapshots/<revision>`, whose files are symlinks into
    `<repo>/blobs`), that repository's blob store."""
    roots = [root]
    parent = os.path.dirname(root)
    if os.path.basename(parent) == "snapshots":
        blobs = os.path.join(os.path.dirname(parent), "blobs")
        if os.path.isdir(blobs):
            roots.append(os.path.realpath(blobs))
    return roots


def _inside(path: str, name: str) -> str:
    """The real path of `name` (a file name a checkpoint refers to) inside checkpoint directory `path`.

    Refuses, with one ValueError that says nothing about the target (neither its contents nor whether
    it exists), any name that resolves outside the directory: `..` components, absolute paths and
    symlinks that leave it. The only exception is a Hugging Face hub cache snapshot, whose files are
    symlinks into the same repository's `blobs` folder. Existence is checked by the caller, after this.
    """
    root = os.path.realpath(path)
    if not isinstance(name, str) or not name or "\0" in name:
        raise ValueError(f"checkpoint {path!r}: file name {name!r} is not a valid file name; refused")
    target = os.path.realpath(os.path.join(root, name))
    for allowed in _allowed_roots(root):
        if target != allowed and os.path.commonpath([allowed, target]) == allowed:
            return target
    raise ValueError(
        f"checkpoint {path!r}: file {name!r} resolves outside the checkpoint directory; refused "
        "(every file a checkpoint names must lie inside its directory)"
    )


def _check_tokenizer_files(path: str) -> None:
    """Before transformers loads a checkpoint's tokenizer: every file it could open must lie inside the
    directory. Which names a tokenizer class reads varies, so this fails closed: every top-level entry
    of the directory, every chat template in `additional_chat_templates/`, and the versioned
    tokenizer files `tokenizer_config.json` may name (`fast_tokenizer_files`) are checked."""
    for entry in sorted(os.listdir(path)):
        _inside(path, entry)
    templates = os.path.join(path, "additional_chat_templates")
    if os.path.isdir(_inside(path, "additional_chat_templates")):
        for entry in sorted(os.listdir(templates)):
            _inside(path, os.path.join("additional_chat_templates", entry))
    cfg_file = os.path.join(path, "tokenizer_config.json")
    if os.path.lexists(cfg_file):
        cfg = _load_json(_inside(path, "tokenizer_config.json"), "tokenizer_config.json")
        extra = cfg.get("fast_tokenizer_files") if isinstance(cfg, dict) else None
        if extra is not None:
            if not isinstance(extra, list):
                raise ValueError(f"{cfg_file}: fast_tokenizer_files must be a list of file names")
            for name in extra:
                _inside(path, name)


def _load_json(file: str, what: str):
    """A JSON file of the checkpoint; a file that is not JSON is a ValueError naming it."""
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: {what} is not valid JSON ({exc})") from None


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (through the index when there is one), as real
    paths, each checked to lie inside the directory (see `_inside`)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    index_name = "model.safetensors.index.json"
    if os.path.lexists(os.path.join(path, index_name)):
        index = _inside(path, index_name)
        data = _load_json(index, "the shard index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise ValueError(
                f"{index}: a shard index must be a JSON object whose 'weight_map' maps tensor names to "
                "shard file names (strings)"
            )
        names = sorted(set(weight_map.values()))
        files = [_inside(path, name) for name in names]  # every name checked before any is opened
        for name, file in zip(names, files):
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{index} lists shard {name!r}, which is missing from {path!r}")
        return files
    names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(
            f"no *.safetensors files in {path!r} (only safetensors checkpoints are supported; "
            "convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True))"
        )
    files = [_inside(path, name) for name in names]
    for name, file in zip(names, files):
        if not os.path.isfile(file):
            raise ValueError(f"checkpoint {path!r}: {name!r} is not a regular file")
    return files


_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def read_header(file: str) -> tuple[int, dict]:
    """A safetensors file's header: (byte offset of the data, {name: {dtype, shape, data_offsets}}).

    Every entry is checked here (a JSON object of objects with a string `dtype`, a `shape` of
    non-negative ints and `data_offsets` [start, end] inside the file's data), so a malformed file is
    a ValueError naming it and the entry, never a KeyError/TypeError later."""
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f"{file}: not a safetensors file (too short)")
        n = int.from_bytes(head, "little")
        if n > 100 << 20:
            raise ValueError(f"{file}: not a safetensors file (header length {n} exceeds 100 MiB)")
        raw = fh.read(n)
        if len(raw) != n:
            raise ValueError(f"{file}: truncated safetensors header ({len(raw)} of {n} bytes)")
        data_len = os.fstat(fh.fileno()).st_size - 8 - n
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: safetensors header must be a JSON object, got {type(header).__name__}")
    header.pop("__metadata__", None)
    for name, info in header.items():
        _check_entry(file, name, info, data_len)
    return 8 + n, header


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entry(file: str, name: str, info, data_len: int) -> None:
    where = f"{file}: tensor {name!r}"
    if not isinstance(info, dict):
        raise ValueError(f"{where}: header entry must be an object with dtype, shape, data_offsets")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise ValueError(f"{where}: header entry has no {key!r}")
    if not isinstance(info["dtype"], str):
        raise ValueError(f"{where}: dtype must be a string, got {info['dtype']!r}")
    shape = info["shape"]
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise ValueError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    off = info["data_offsets"]
    if not (isinstance(off, list) and len(off) == 2 and all(_is_int(o) for o in off)):
        raise ValueError(f"{where}: data_offsets must be [start, end] (two ints), got {off!r}")
    if not 0 <= off[0] <= off[1] <= data_len:
        raise ValueError(
            f"{where}: data_offsets {off} must satisfy 0 <= start <= end <= {data_len} (the data size)"
        )


def _first_dtype(headers: dict) -> torch.dtype:
    """The dtype the checkpoint stores its matrices in. A float64 checkpoint loads as float32 (the ops
    have no float64 kernels): each tensor is converted while it is read, through one tensor-sized
    buffer, so the float64 data is never all in memory."""
    for file, (_, header) in headers.items():
        for name, info in header.items():
            if "norm" in name or name.endswith("expert_bias"):
                continue  # some exporters keep these in fp32
            dt = _ST_DTYPES.get(info["dtype"], torch.float32)
            return torch.float32 if dt == torch.float64 else dt
    return torch.float32


def _read_into(fh, base: int, info: dict, dest: torch.Tensor, name: str) -> None:
    """Read one tensor straight from the file into dest: no mmap, and no temporary at all when the
    dtypes agree (only a dtype conversion needs one tensor-sized buffer)."""
    src_dtype = _ST_DTYPES.get(info["dtype"])
    if src_dtype is None:
        raise ValueError(f"tensor {name!r} has dtype {info['dtype']}; expected a float dtype (BF16, F16, F32)")
    start, end = info["data_offsets"]
    nbytes = dest.numel() * torch.empty(0, dtype=src_dtype).element_size()
    if end - start != nbytes:
        raise ValueError(f"tensor {name!r}: {end - start} bytes in the file, {nbytes} expected (corrupt file?)")
    direct = dest.dtype == src_dtype and dest.is_contiguous() and dest.device.type == "cpu"
    buf = dest if direct else _memory.scratch(*dest.shape, dtype=src_dtype)
    fh.seek(base + start)
    view = buf.view(-1).view(torch.uint8).numpy()
    got = 0
    while got < nbytes:  # readinto may return short counts on large reads
        n = fh.readinto(view[got:])
        if not n:
            raise ValueError(f"tensor {name!r}: file ends early (corrupt or truncated file?)")
        got += n
    if not direct:
        dest.copy_(buf)


def load_weights(path: str, cfg: ModelConfig, dtype=None, device="cpu", progress: bool = True,
                 quant: str | None = None) -> tuple[Weights, torch.dtype]:
    """Check every tensor's name and shape against cfg (errors name the first mismatch), then load.

    quant "q8_0" / "q4_0" (see `allocate` for which tensors): each float tensor is read into one
    buffer of its own size and quantized into its slot, so memory peaks at the quantized model plus
    the largest checkpoint tensor, never a float copy of the model."""
    files = checkpoint_files(path)
    headers = {file: read_header(file) for file in files}
    # None: the dtype the tensors are stored in (config.json's `dtype` can disagree with the files)
    dtype = resolve_dtype(dtype) or _first_dtype(headers)
    weights, slots, required = allocate(cfg, dtype, device, quant=quant)

    # Pass 1: names and shapes only (no data read), so a bad checkpoint fails before a long load.
    plan: list[tuple[str, str, _Slot]] = []
    covered: dict[str, str] = {}
    for file in files:
        for name, info in headers[file][1].items():
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # tied: transformers ignores a stored copy as well
            slot = slots.get(name)
            if slot is None:
                raise ValueError(
                    f"checkpoint {os.path.basename(file)}: unexpected tensor {name!r}, which a "
                    f"{cfg.model_type} model with this config.json does not have"
                )
            if info["dtype"] not in _ST_DTYPES:
                raise ValueError(
                    f"checkpoint {os.path.basename(file)}: tensor {name!r} has dtype {info['dtype']}; "
                    "expected a float dtype (BF16, F16, F32, F64)"
                )
            shape = tuple(info["shape"])
            if shape != slot.shape:
                raise ValueError(
                    f"checkpoint {os.path.basename(file)}: tensor {name!r} has shape {list(shape)}, "
                    f"but config.json implies {list(slot.shape)}"
                )
            for part in slot.parts:
                if part in covered:
                    raise ValueError(f"checkpoint: {part!r} is given twice (by {covered[part]!r} and {name!r})")
                covered[part] = name
            plan.append((file, name, slot))
    for name in required:
        if name not in covered:
            hint = ""
            if ".experts." in name:
                hint = " (nor the fused experts.gate_up_proj / experts.down_proj)"
            raise ValueError(f"checkpoint {path!r} is missing tensor {name!r}{hint}")

    # Pass 2: read tensor by tensor straight into the slots, in file order.
    total = sum(s.dest.numel() * s.dest.element_size() for _, _, s in plan)
    bar = _progress(total, f"loading {os.path.basename(os.path.abspath(path))}", progress)
    by_file: dict[str, list[tuple[str, _Slot]]] = {}
    for file, name, slot in plan:
        by_file.setdefault(file, []).append((name, slot))
    with torch.no_grad():
        for file, items in by_file.items():
            base, header = headers[file]
            items.sort(key=lambda it: header[it[0]]["data_offsets"][0])
            with open(file, "rb", buffering=0) as fh:
                for name, slot in items:
                    if slot.fmt is not None:
                        tmp = _memory.scratch(*slot.shape, dtype=_ST_DTYPES[header[name]["dtype"]])
                        _read_into(fh, base, header[name], tmp, name)
                        _quantize_into(slot.dest, tmp, slot.fmt)
                        del tmp
                    elif slot.dest.device.type == "cpu":
                        _read_into(fh, base, header[name], slot.dest, name)
                    else:
                        tmp = _memory.scratch(*slot.dest.shape, dtype=_ST_DTYPES[header[name]["dtype"]])
                        _read_into(fh, base, header[name], tmp, name)
                        slot.dest.copy_(tmp)
                    bar.update(slot.dest.numel() * slot.dest.element_size())
    bar.close()
    return weights, dtype


def _quantize_into(dest: torch.Tensor, src: torch.Tensor, fmt: str) -> None:
    """dest (blocks [..., row bytes]) = quantize(src [..., K], fmt), a few hundred rows at a time: the
    quantizer's fp32 temporaries stay about a megabyte instead of growing with the tensor."""
    k = src.shape[-1]
    rows, out = src.reshape(-1, k), dest.view(-1, dest.shape[-1])
    step = max(1, (1 << 18) // k)
    for r0 in range(0, rows.shape[0], step):
        out[r0 : r0 + step] = quantize(rows[r0 : r0 + step], fmt).data


def _store(t, values: torch.Tensor) -> None:
    """A quantized weight (QuantizedTensor, or SplitWeight: each part its rows) := quantize(values)."""
    if isinstance(t, QuantizedTensor):
        _quantize_into(t.data, values, t.format)
        return
    r0 = 0
    for p in t.parts:
        n = int(p.shape[-2])
        if isinstance(p, QuantizedTensor):
            _quantize_into(p.data, values[..., r0 : r0 + n, :], p.format)
        else:
            p.copy_(values[..., r0 : r0 + n, :])
        r0 += n


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled)


# Large K-quant weights of the random default are filled from a pool of this many quantized random
# rows: llama.cpp's K-quant search runs at a few million weights per second here, so quantizing the
# full-size Q4_K_M default (8.3 B weights) row by row would take about half an hour.
_K_POOL_ROWS = 512
_K_POOL_MIN_ROWS = 8 * _K_POOL_ROWS


def _pooled(t) -> bool:
    parts = t.parts if isinstance(t, SplitWeight) else (t,)
    return any(isinstance(p, QuantizedTensor) and p.format in ("q4_k", "q5_k", "q6_k") for p in parts) and (
        t.shape.numel() // t.shape[-1] >= _K_POOL_MIN_ROWS
    )


def _fill_pooled(t, gen: torch.Generator, std: float, dtype: torch.dtype) -> None:
    """Each part's rows: N(0, std) rows quantized once into a pool of _K_POOL_ROWS, then every row of the
    weight a seeded random pick from the pool (real blocks of the format, in its byte layout: what the
    kernels read and time is what a quantized checkpoint gives them; the values repeat across rows)."""
    for p in t.parts if isinstance(t, SplitWeight) else (t,):
        k = int(p.shape[-1])
        rows = p.shape.numel() // k
        if not isinstance(p, QuantizedTensor):
            p.view(-1).normal_(0.0, std, generator=gen)
            continue
        pool_f = torch.empty(min(rows, _K_POOL_ROWS), k, dtype=dtype).normal_(0.0, std, generator=gen)
        pool = torch.empty(pool_f.shape[0], _row_bytes(p.format, k), dtype=torch.uint8)
        _quantize_into(pool, pool_f, p.format)
        dest = p.data.view(rows, -1)
        step = 1 << 14
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            dest[r0 : r0 + n] = pool[torch.randint(0, pool.shape[0], (n,), generator=gen)]


def fill_random(weights: Weights, cfg: ModelConfig, seed: int = 0, progress: bool = True, std: float = 0.02) -> None:
    """Seeded random weights, generated in place chunk by chunk in the weights' own dtype.

    Large K-quant weights (Q4_K / Q5_K / Q6_K, from quant="q4_k_m") come from a pool of quantized
    random rows (see `_fill_pooled`); every other quantized weight is the float default's quantized.

    Scales keep activations O(1) through any depth: matrices N(0, std) as transformers initialises
    them (std = initializer_range = 0.02), RMSNorm weights near 1, conv taps N(0, 0.3) (about what
    Conv1d's default init gives for width 3), a small random expert_bias so routing is not tied.
    """
    gen = torch.Generator(device=weights.embed.device)
    gen.manual_seed(seed)
    items = list(weights.tensors())
    total = sum(_nbytes(t) for _, t in items)
    bar = _progress(total, "random weights", progress)
    chunk = 1 << 24  # elements per normal_ call: keeps the progress bar moving
    dtype = weights.final_norm.dtype
    with torch.no_grad():
        for name, t in items:
            # a quantized weight draws the same numbers as the float model's (same generator calls, in
            # the model dtype) into one temporary, then is quantized: the quantized default model is
            # the float one quantized
            quantized = isinstance(t, (QuantizedTensor, SplitWeight))
            if quantized and _pooled(t):
                _fill_pooled(t, gen, std, dtype)
                bar.update(_nbytes(t))
                continue
            flat = torch.empty(t.shape, dtype=dtype, device=t.device).view(-1) if quantized else t.view(-1)
            if name.endswith("norm"):
                flat.normal_(1.0, 0.05, generator=gen)
            elif name.endswith("expert_bias"):
                flat.normal_(0.0, 0.01, generator=gen)
            elif name.endswith(".conv") or name.endswith("conv_bias"):
                flat.normal_(0.0, 0.3, generator=gen)
            else:
                for start in range(0, flat.numel(), chunk):
                    flat[start : start + chunk].normal_(0.0, std, generator=gen)
                    bar.update(min(chunk, flat.numel() - start) * _nbytes(t) // flat.numel())
                if quantized:
                    _store(t, flat.view(t.shape))
                continue
            bar.update(_nbytes(t))
    bar.close()
