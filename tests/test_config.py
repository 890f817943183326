"""config.json parsing: absurd values fail at load naming the field, parsing is linear in the layer
count, and transformers' rules for rope_scaling vs rope_parameters and for 'sliding_attention'."""

import logging
import time

import pytest

from conftest import tiny_moe_config

from lfm_kernels.model import config_from_dict


def _cfg(**over):
    return tiny_moe_config(**over)


@pytest.mark.parametrize(
    "over, field",
    [
        (dict(hidden_size=0), "hidden_size"),
        (dict(hidden_size=-16), "hidden_size"),
        (dict(num_key_value_heads=0), "num_key_value_heads"),
        (dict(num_attention_heads=0), "num_attention_heads"),
        (dict(num_attention_heads=3), "hidden_size.*num_attention_heads"),  # 16 % 3: heads don't divide hidden
        (dict(conv_L_cache=1), "conv_L_cache"),
        (dict(conv_L_cache=5), "conv_L_cache"),
        (dict(conv_L_cache=0), "conv_L_cache"),
        (dict(vocab_size=10**12), "vocab_size"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(max_position_embeddings=-1), "max_position_embeddings"),
        (dict(max_position_embeddings=0), "max_position_embeddings"),
        (dict(num_hidden_layers=0, layer_types=[]), "num_hidden_layers"),
        (dict(num_experts=0), "num_experts"),
        (dict(moe_intermediate_size=-8), "moe_intermediate_size"),
        (dict(intermediate_size=0), "intermediate_size"),
        (dict(head_dim=0), "head_dim"),
        (dict(vocab_size="37"), "vocab_size"),
        (dict(hidden_size=16.5), "hidden_size"),
        (dict(num_hidden_layers=True), "num_hidden_layers"),
        (dict(norm_eps=0), "norm_eps"),
        (dict(norm_eps=float("nan")), "norm_eps"),
        (dict(rope_theta=-1.0), "rope_theta"),
        (dict(eos_token_id="12"), "eos_token_id"),
        (dict(eos_token_id=[7, -1]), "eos_token_id"),
        (dict(pad_token_id=-3), "pad_token_id"),
        (dict(num_dense_layers=-1), "num_dense_layers"),
        (dict(layer_types="conv"), "layer_types"),
    ],
)
def test_absurd_config_fails_at_load_naming_the_field(over, field):
    with pytest.raises(ValueError, match=field):
        config_from_dict(_cfg(**over))


def test_dense_config_parsing_is_linear_in_the_layer_count():
    """A dense lfm2 config with full_attn_idxs and no layer_types: 30k layers parse in well under a
    second (a list membership test per layer made it quadratic: seconds)."""
    n = 30_000
    d = dict(model_type="lfm2", vocab_size=37, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
             num_hidden_layers=n, full_attn_idxs=list(range(0, n, 2)), block_ff_dim=24, block_multiple_of=8)
    t0 = time.perf_counter()
    cfg = config_from_dict(d)
    elapsed = time.perf_counter() - t0
    assert cfg.layer_types[:3] == ["full_attention", "conv", "full_attention"] and len(cfg.layer_types) == n
    assert elapsed < 1.0, f"parsing {n} layers took {elapsed:.2f} s"


def test_rope_scaling_wins_over_rope_parameters_as_in_transformers():
    transformers = pytest.importorskip("transformers")
    d = _cfg(rope_scaling={"rope_type": "default", "rope_theta": 5000.0},
             rope_parameters={"rope_type": "default", "rope_theta": 7000.0})
    assert config_from_dict(d).rope_theta == 5000.0
    assert transformers.Lfm2MoeConfig.from_dict(d).rope_parameters["rope_theta"] == 5000.0
    # theta missing from rope_scaling: the top-level rope_theta, as transformers fills it in
    d = _cfg(rope_scaling={"rope_type": "default"}, rope_parameters={"rope_theta": 7000.0}, rope_theta=9000.0)
    assert config_from_dict(d).rope_theta == transformers.Lfm2MoeConfig.from_dict(d).rope_parameters["rope_theta"] == 9000.0
    # a null rope_scaling leaves rope_parameters in charge
    d = _cfg(rope_scaling=None, rope_parameters={"rope_type": "default", "rope_theta": 7000.0})
    assert config_from_dict(d).rope_theta == 7000.0
    with pytest.raises(ValueError, match="rope_type 'linear' is not supported"):
        config_from_dict(_cfg(rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_parameters={"rope_theta": 1.0}))


def test_sliding_attention_is_an_attention_layer_as_in_transformers():
    """transformers builds an attention layer for any type but 'conv'; it has no sliding-window mask for
    LFM2, so the context is capped at sliding_window, where full and sliding attention agree."""
    cfg = config_from_dict(_cfg(layer_types=["conv", "sliding_attention", "full_attention"], sliding_window=32,
                                max_position_embeddings=4096))
    assert cfg.attention_layers == [1, 2] and cfg.conv_layers == [0]
    assert cfg.max_position_embeddings == 32
    assert config_from_dict(_cfg(layer_types=["conv", "sliding_attention", "conv"])).attention_layers == [1]
    with pytest.raises(ValueError, match="unknown layer types"):
        config_from_dict(_cfg(layer_types=["conv", "mamba", "conv"]))


def test_sliding_attention_checkpoint_loads_and_matches_transformers_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    from lfm_kernels.model import from_pretrained

    hf_cfg = transformers.Lfm2MoeConfig(**{k: v for k, v in _cfg(layer_types=["conv", "sliding_attention", "conv"]).items()
                                           if k != "model_type"})
    torch.manual_seed(0)
    hf = transformers.Lfm2MoeForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, progress=False, tokenizer=False)
    assert model.config.attention_layers == [1]
    assert torch.equal(model.weights.layers[1].out_proj, hf.model.layers[1].self_attn.out_proj.weight)


def test_unknown_keys_are_logged_once_at_debug_level(caplog):
    with caplog.at_level(logging.DEBUG, logger="lfm_kernels.model.config"):
        config_from_dict(_cfg(some_future_knob=3, another_unknown_key="x"))
        config_from_dict(_cfg(some_future_knob=3, another_unknown_key="x"))
    records = [r for r in caplog.records if "some_future_knob" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.DEBUG
    assert "another_unknown_key" in records[0].getMessage()
    with caplog.at_level(logging.DEBUG, logger="lfm_kernels.model.config"):
        config_from_dict(_cfg(architectures=["Lfm2MoeForCausalLM"], transformers_version="5.24.0", use_cache=True))
    assert not [r for r in caplog.records if "architectures" in r.getMessage()]
