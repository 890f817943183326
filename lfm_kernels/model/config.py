"""Model configuration: LFM2-MoE (`lfm2_moe`) and dense LFM2 (`lfm2`) config.json -> ModelConfig.

Only what the forward pass needs is kept, with transformers' defaults and aliases
(`tie_embedding`, `block_ff_dim`, `full_attn_idxs`, top-level `rope_theta`), so a config.json that
transformers accepts gives the same shapes here.
"""

from __future__ import annotations

import json
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
    layer_types: list[str] = field(default_factory=list)  # "full_attention" or "conv" per layer
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
        bad = sorted({t for t in self.layer_types if t not in ("conv", "full_attention")})
        if bad:
            raise ValueError(f"config: unknown layer types {bad}; expected 'conv' or 'full_attention'")
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
            layer_types=list(self.layer_types),
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


def _eos_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def config_from_dict(d: dict) -> ModelConfig:
    """Parse a config.json dict. Unknown model_type -> ValueError naming the supported ones."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json: model_type {model_type!r} is not supported; lfm_kernels.model loads "
            f"{', '.join(repr(t) for t in SUPPORTED_MODEL_TYPES)} (LFM2-MoE and dense LFM2)"
        )
    hidden = int(d.get("hidden_size", 2048 if model_type == "lfm2_moe" else 2560))
    n_layers = int(d.get("num_hidden_layers", 32))
    n_heads = int(d.get("num_attention_heads", 32))

    layer_types = d.get("layer_types")
    if layer_types is None:
        idxs = d.get("full_attn_idxs")
        if idxs is None:
            if model_type == "lfm2_moe":
                raise ValueError("config.json: an lfm2_moe config needs layer_types (or full_attn_idxs)")
            idxs = list(range(n_layers))  # transformers' Lfm2Config default: all attention
        layer_types = ["full_attention" if i in idxs else "conv" for i in range(n_layers)]

    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"config.json: rope_type {rope_type!r} is not supported (only 'default' RoPE)")
    theta = rope.get("rope_theta", d.get("rope_theta", 1e6))

    if model_type == "lfm2_moe":
        inter = int(d.get("intermediate_size", 7168))
    else:
        inter = int(d.get("block_ff_dim", d.get("intermediate_size", 12288)))
        if d.get("block_auto_adjust_ff_dim", True):  # what transformers' Lfm2MLP does
            inter = int(2 * inter / 3)
            mult = d.get("block_ffn_dim_multiplier", 1.0)
            if mult is not None:
                multiple_of = int(d.get("block_multiple_of", 256))
                inter = int(mult * inter)
                inter = multiple_of * ((inter + multiple_of - 1) // multiple_of)

    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=int(d.get("vocab_size", 65536)),
        hidden_size=hidden,
        intermediate_size=inter,
        moe_intermediate_size=int(d.get("moe_intermediate_size", 1792)),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=int(d.get("num_key_value_heads", 8)),
        head_dim=int(d.get("head_dim") or hidden // n_heads),
        layer_types=list(layer_types),
        norm_eps=float(d.get("norm_eps", 1e-5)),
        rope_theta=float(theta),
        max_position_embeddings=int(d.get("max_position_embeddings", 128_000)),
        conv_L_cache=int(d.get("conv_L_cache", 3)),
        conv_bias=bool(d.get("conv_bias", False)),
        num_dense_layers=int(d.get("num_dense_layers", 2)) if model_type == "lfm2_moe" else n_layers,
        num_experts=int(d.get("num_experts", 32)) if model_type == "lfm2_moe" else 0,
        num_experts_per_tok=int(d.get("num_experts_per_tok", 4)) if model_type == "lfm2_moe" else 0,
        use_expert_bias=bool(d.get("use_expert_bias", True)) if model_type == "lfm2_moe" else False,
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        tie_word_embeddings=bool(d.get("tie_embedding", d.get("tie_word_embeddings", True))),
        bos_token_id=d.get("bos_token_id", 1),
        eos_token_id=_eos_list(d.get("eos_token_id", 2)),
        pad_token_id=d.get("pad_token_id", 0),
        torch_dtype=d.get("dtype", d.get("torch_dtype")),
    )
    cfg.validate()
    return cfg


def load_config(path: str) -> ModelConfig:
    """config.json of a checkpoint directory (or the file itself)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json at {path!r}")
    with open(file) as f:
        return config_from_dict(json.load(f))


def lfm25_8b_a1b_config(num_layers: int | None = None, vocab_size: int = 128_000) -> ModelConfig:
    """LFM2.5-8B-A1B shapes (DESIGN.md); num_layers < 24 keeps the attention/conv pattern's prefix
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
