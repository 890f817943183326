"""Model configuration: LFM2-MoE (`lfm2_moe`) and dense LFM2 (`lfm2`) config.json -> ModelConfig.

Only what the forward pass needs is kept, with transformers' defaults and aliases
(`tie_embedding`, `block_ff_dim`, `full_attn_idxs`, top-level `rope_theta`), so a config.json that
transformers accepts gives the same shapes here.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field

SUPPORTED_MODEL_TYPES = ("lfm2_moe", "lfm2")


@dataclass
class ModelConfig:
    model_type: str = "lfm2_moe"
    vocab_size: int = 65536
    hidden_size: int = 2048
    intermediate_size: int = 7168  # dense SwiGLU width (already adjusted for dense LFM2)
    moe_intermediate_size: int = 1792
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 64
    layer_types: list[str] = field(default_factory=list)  # "full_attention" (or "sliding_attention") or "conv"
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 128_000
    conv_L_cache: int = 3
    conv_bias: bool = False
    num_dense_layers: int = 2  # dense LFM2: every layer
    num_experts: int = 32
    num_experts_per_tok: int = 4
    use_expert_bias: bool = True
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: list[int] = field(default_factory=lambda: [2])
    pad_token_id: int | None = 0
    torch_dtype: str | None = None  # the checkpoint's dtype as config.json says it ("bfloat16", ...)

    @property
    def is_moe(self) -> bool:
        return self.model_type == "lfm2_moe"

    def is_attention(self, layer: int) -> bool:
        return self.layer_types[layer] != "conv"

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer >= self.num_dense_layers

    @property
    def attention_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_attention(i)]

    @property
    def conv_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if not self.is_attention(i)]

    def validate(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"config: layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        bad = sorted({t for t in self.layer_types if t not in _LAYER_TYPES})
        if bad:
            raise ValueError(f"config: unknown layer types {bad}; expected one of {list(_LAYER_TYPES)}")
        if self.num_key_value_heads < 1 or self.num_attention_heads < 1:
            raise ValueError(
                f"config: num_attention_heads ({self.num_attention_heads}) and num_key_value_heads "
                f"({self.num_key_value_heads}) must be >= 1"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.is_moe and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"config: num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts "
                f"({self.num_experts})"
            )

    def to_transformers(self):
        """The equivalent transformers config (Lfm2MoeConfig / Lfm2Config), for baselines and tests."""
        common = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            norm_eps=self.norm_eps,
            conv_bias=self.conv_bias,
            conv_L_cache=self.conv_L_cache,
            # transformers has no sliding-window mask for LFM2: within the window (max_position_embeddings
            # is capped at it) full attention is the same computation
            layer_types=["full_attention" if t == "sliding_attention" else t for t in self.layer_types],
            rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default"},
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id),
            pad_token_id=self.pad_token_id,
        )
        if self.is_moe:
            from transformers import Lfm2MoeConfig

            return Lfm2MoeConfig(
                intermediate_size=self.intermediate_size,
                moe_intermediate_size=self.moe_intermediate_size,
                num_dense_layers=self.num_dense_layers,
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                use_expert_bias=self.use_expert_bias,
                routed_scaling_factor=self.routed_scaling_factor,
                norm_topk_prob=self.norm_topk_prob,
                **common,
            )
        from transformers import Lfm2Config

        return Lfm2Config(intermediate_size=self.intermediate_size, block_auto_adjust_ff_dim=False, **common)


_logger = logging.getLogger(__name__)
_LOGGED_UNKNOWN: set[str] = set()

# Keys transformers writes into every config.json, and LFM2 keys that change nothing we compute.
_KNOWN_KEYS = frozenset(
    {
        "_name_or_path", "architectures", "chunk_size_feed_forward", "dtype", "torch_dtype", "id2label",
        "label2id", "is_encoder_decoder", "model_type", "output_attentions", "output_hidden_states",
        "problem_type", "return_dict", "transformers_version", "initializer_range", "use_cache",
        "output_router_logits", "use_pos_enc", "tie_embedding", "tie_word_embeddings", "bos_token_id",
        "eos_token_id", "pad_token_id", "vocab_size", "hidden_size", "intermediate_size",
        "moe_intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "layer_types", "full_attn_idxs", "norm_eps", "rope_theta", "rope_parameters", "rope_scaling",
        "max_position_embeddings", "conv_L_cache", "conv_bias", "num_dense_layers", "num_experts",
        "num_experts_per_tok", "use_expert_bias", "routed_scaling_factor", "norm_topk_prob", "block_ff_dim",
        "block_auto_adjust_ff_dim", "block_ffn_dim_multiplier", "block_multiple_of", "block_dim",
        "block_mlp_init_scale", "block_out_init_scale", "block_norm_eps", "block_use_swiglu", "block_use_xavier_init",
        "conv_dim", "conv_dim_out", "conv_use_xavier_init", "sliding_window",
    }
)

# Upper bound of every size: the kernels and torch index with 64-bit offsets, but a dimension past the
# int32 range is no real model, only a config that would fail later at allocation.
_MAX_DIM = 2**31 - 1
_LAYER_TYPES = ("conv", "full_attention", "sliding_attention")


def _int(d: dict, key: str, default, lo: int = 1, hi: int = _MAX_DIM) -> int:
    """config.json field `key` as an int in [lo, hi] (a float with an integer value is accepted, as
    transformers does); anything else is a ValueError naming the field."""
    value = d.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"config.json: {key} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"config.json: {key} must be in [{lo}, {hi}], got {value}")
    return value


def _float(d: dict, key: str, default, positive: bool = False) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"config.json: {key} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"config.json: {key} must be > 0, got {value}")
    return float(value)


def _token_id(d: dict, key: str, default) -> int | None:
    value = d.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"config.json: {key} must be a non-negative integer or null, got {value!r}")
    return value


def _eos_list(value) -> list[int]:
    if value is None:
        return []
    ids = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(ids, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ids):
        raise ValueError(f"config.json: eos_token_id must be a non-negative integer or a list of them, got {value!r}")
    return list(ids)


def _rope(d: dict, layer_types: list[str]) -> float:
    """RoPE theta as transformers resolves it: `rope_scaling` wins over `rope_parameters` when both are
    given (transformers takes `rope_scaling or rope_parameters`); a theta missing from the dict comes
    from the top-level `rope_theta`, else the LFM2 default 1e6. A dict keyed by layer type is read for
    the attention layers (which must agree). Only the default rope_type is supported."""
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"config.json: rope_parameters / rope_scaling must be an object, got {rope!r}")
    nested = [k for k in rope if k in set(layer_types)]
    if nested:
        parts = [rope[k] for k in nested if k != "conv"]
        if not parts or any(not isinstance(p, dict) for p in parts) or any(p != parts[0] for p in parts):
            raise ValueError(
                "config.json: rope parameters given per layer type must be objects, equal for every attention type"
            )
        rope = parts[0]
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"config.json: rope_type {rope_type!r} is not supported (only 'default' RoPE)")
    return _float({"rope_theta": rope.get("rope_theta", d.get("rope_theta", 1e6))}, "rope_theta", None, positive=True)


def _log_unknown_keys(d: dict) -> None:
    """Keys this loader does not read are logged once per key (debug level): nothing is dropped
    without a trace, and nothing is printed by default."""
    unknown = sorted(k for k in d if k not in _KNOWN_KEYS and k not in _LOGGED_UNKNOWN)
    if unknown:
        _LOGGED_UNKNOWN.update(unknown)
        _logger.debug("config.json: ignoring keys lfm_kernels.model does not use: %s", ", ".join(unknown))


def config_from_dict(d: dict) -> ModelConfig:
    """Parse a config.json dict. Unknown model_type -> ValueError naming the supported ones.

    Every size is checked here, so an absurd config (a zero or negative size, 0 KV heads, heads that
    do not divide hidden_size without an explicit head_dim, conv_L_cache outside 2..4 (what the conv
    kernels take), a vocabulary past 2**31 - 1, a negative max_position_embeddings...) is a ValueError
    naming the field at load, never a ZeroDivisionError or an allocation failure later. Parsing is
    linear in the layer count. Layer type 'sliding_attention' is an attention layer, as in transformers
    (whose decoder layer tests `layer_type != "conv"`); LFM2 has no sliding-window attention code, so
    with a `sliding_window` set, max_position_embeddings is capped at it (within the window sliding and
    full attention are the same). Unknown keys are logged once at debug level."""
    if not isinstance(d, dict):
        raise ValueError(f"config.json must hold a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json: model_type {model_type!r} is not supported; lfm_kernels.model loads "
            f"{', '.join(repr(t) for t in SUPPORTED_MODEL_TYPES)} (LFM2-MoE and dense LFM2)"
        )
    _log_unknown_keys(d)
    moe = model_type == "lfm2_moe"
    hidden = _int(d, "hidden_size", 2048 if moe else 2560)
    n_layers = _int(d, "num_hidden_layers", 32)
    n_heads = _int(d, "num_attention_heads", 32)
    n_kv = _int(d, "num_key_value_heads", 8)
    if d.get("head_dim") is None:
        if hidden % n_heads:
            raise ValueError(
                f"config.json: hidden_size ({hidden}) must be a multiple of num_attention_heads ({n_heads}) "
                "when head_dim is not given"
            )
        head_dim = hidden // n_heads
    else:
        head_dim = _int(d, "head_dim", None)

    layer_types = d.get("layer_types")
    if layer_types is None:
        idxs = d.get("full_attn_idxs")
        if idxs is None:
            if moe:
                raise ValueError("config.json: an lfm2_moe config needs layer_types (or full_attn_idxs)")
            layer_types = ["full_attention"] * n_layers  # transformers' Lfm2Config default: all attention
        else:
            if not isinstance(idxs, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idxs):
                raise ValueError(f"config.json: full_attn_idxs must be a list of layer indices, got {idxs!r}")
            idx_set = set(idxs)  # a set: membership per layer stays O(1) (linear in the layer count)
            layer_types = ["full_attention" if i in idx_set else "conv" for i in range(n_layers)]
    if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
        raise ValueError(f"config.json: layer_types must be a list of strings, got {type(layer_types).__name__}")

    theta = _rope(d, layer_types)
    max_pos = _int(d, "max_position_embeddings", 128_000)
    if "sliding_attention" in layer_types and d.get("sliding_window") is not None:
        max_pos = min(max_pos, _int(d, "sliding_window", None))

    if moe:
        inter = _int(d, "intermediate_size", 7168)
    else:
        inter = _int(d, "block_ff_dim", d.get("intermediate_size", 12288))
        if d.get("block_auto_adjust_ff_dim", True):  # what transformers' Lfm2MLP does
            inter = int(2 * inter / 3)
            mult = d.get("block_ffn_dim_multiplier", 1.0)
            if mult is not None:
                mult = _float(d, "block_ffn_dim_multiplier", 1.0, positive=True)
                multiple_of = _int(d, "block_multiple_of", 256)
                inter = int(mult * inter)
                inter = multiple_of * ((inter + multiple_of - 1) // multiple_of)
            if not 1 <= inter <= _MAX_DIM:
                raise ValueError(f"config.json: block_ff_dim / intermediate_size gives an MLP width of {inter}")

    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=_int(d, "vocab_size", 65536),
        hidden_size=hidden,
        intermediate_size=inter,
        moe_intermediate_size=_int(d, "moe_intermediate_size", 1792) if moe else 1792,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        layer_types=list(layer_types),
        norm_eps=_float(d, "norm_eps", 1e-5, positive=True),
        rope_theta=theta,
        max_position_embeddings=max_pos,
        conv_L_cache=_int(d, "conv_L_cache", 3, lo=2, hi=4),
        conv_bias=bool(d.get("conv_bias", False)),
        num_dense_layers=_int(d, "num_dense_layers", 2, lo=0) if moe else n_layers,
        num_experts=_int(d, "num_experts", 32) if moe else 0,
        num_experts_per_tok=_int(d, "num_experts_per_tok", 4) if moe else 0,
        use_expert_bias=bool(d.get("use_expert_bias", True)) if moe else False,
        routed_scaling_factor=_float(d, "routed_scaling_factor", 1.0),
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        tie_word_embeddings=bool(d.get("tie_embedding", d.get("tie_word_embeddings", True))),
        bos_token_id=_token_id(d, "bos_token_id", 1),
        eos_token_id=_eos_list(d.get("eos_token_id", 2)),
        pad_token_id=_token_id(d, "pad_token_id", 0),
        torch_dtype=d.get("dtype", d.get("torch_dtype")),
    )
    cfg.validate()
    return cfg


def load_config(path: str) -> ModelConfig:
    """config.json of a checkpoint directory (or the file itself)."""
    if os.path.isdir(path):
        from .weights import _inside

        file = _inside(path, "config.json")  # a symlink out of the checkpoint is refused
    else:
        file = path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json at {path!r}")
    try:
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: config.json is not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{file}: config.json must hold a JSON object, got {type(d).__name__}")
    return config_from_dict(d)


def lfm25_8b_a1b_config(num_layers: int | None = None, vocab_size: int = 128_000) -> ModelConfig:
    """LFM2.5-8B-A1B shapes (docs/design.md); num_layers < 24 keeps the attention/conv pattern's prefix
    but always includes at least one attention layer and one conv layer."""
    full_attn = [2, 6, 10, 14, 18, 21]
    n = 24 if num_layers is None else int(num_layers)
    if n < 1:
        raise ValueError(f"num_layers must be >= 1, got {n}")
    if n >= 24:
        # deeper than the reference model: repeat its 24-layer pattern
        types = ["full_attention" if (i % 24) in full_attn else "conv" for i in range(n)]
    else:
        types = ["full_attention" if i in full_attn else "conv" for i in range(n)]
        if n >= 2 and "full_attention" not in types:
            types[-1] = "full_attention"
    return ModelConfig(
        model_type="lfm2_moe",
        vocab_size=vocab_size,
        hidden_size=2048,
        intermediate_size=7168,
        moe_intermediate_size=1792,
        num_hidden_layers=n,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        layer_types=types,
        norm_eps=1e-5,
        rope_theta=1e6,
        max_position_embeddings=128_000,
        conv_L_cache=3,
        num_dense_layers=2,
        num_experts=32,
        num_experts_per_tok=4,
        eos_token_id=[7],  # <|im_end|> in the LFM2 tokenizer
        torch_dtype="bfloat16",
    )
