"""The CPU-checkable parts of the CUDA-graph decode (lfm_kernels.model.cuda_graph); the capture and
replay themselves are checked on a GPU by tests/test_cuda.py."""

from __future__ import annotations

import pytest
import torch

from lfm_kernels.model import LfmModel, config_from_dict
from lfm_kernels.model.cuda_graph import DecodeGraph, _restore, _snapshot, decode_stepper
from lfm_kernels.model.weights import allocate, fill_random


def _tiny_model():
    cfg = config_from_dict(dict(
        model_type="lfm2_moe", vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
        num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
        num_dense_layers=2, layer_types=["conv", "conv", "full_attention", "conv", "full_attention"],
    ))
    weights, _, _ = allocate(cfg, torch.float32, "cpu")
    fill_random(weights, cfg, seed=1, progress=False, std=0.2)
    return LfmModel(cfg, weights, torch.float32)


def test_snapshot_restore_undoes_a_decode_step():
    """The warm-up step before a capture changes the state; _restore must put back exactly what it
    changed, or the first replayed token would see a conv history one step ahead."""
    model = _tiny_model()
    state = model.new_state(3, 16)
    ids = torch.randint(3, 97, (3, 7))
    model.prefill(ids, torch.tensor([7, 4, 2]), state)
    for i in state.k_cache:  # the positions a step writes hold values worth restoring
        state.k_cache[i].normal_()
        state.v_cache[i].normal_()
    before = [t.clone() for t in state.buffers()]
    saved = _snapshot(model, state)
    model.decode_step(torch.randint(3, 97, (3,)), state, check=False)
    assert not all(torch.equal(a, b) for a, b in zip(before, state.buffers())), "the step changed nothing?"
    _restore(state, saved)
    for a, b in zip(before, state.buffers()):
        assert torch.equal(a, b)


def test_stepper_on_cpu_is_the_eager_step():
    model = _tiny_model()
    ids = torch.randint(3, 97, (2, 5))
    s1, s2 = model.new_state(2, 9), model.new_state(2, 9)
    model.prefill(ids, torch.tensor([5, 3]), s1)
    model.prefill(ids, torch.tensor([5, 3]), s2)
    step = decode_stepper(model, s2, cuda_graph=True)  # no CUDA: the eager step
    tok = torch.randint(3, 97, (2,))
    assert torch.equal(step(tok), model.decode_step(tok, s1))
    assert torch.equal(s1.seq_lens, s2.seq_lens)


def test_generate_cuda_graph_flag_is_harmless_on_cpu():
    model = _tiny_model()
    ids = torch.randint(3, 97, (2, 5))
    a = model.generate(ids, 4, temperature=0, repetition_penalty=1.0, eos_token_id=[], cuda_graph=True)
    b = model.generate(ids, 4, temperature=0, repetition_penalty=1.0, eos_token_id=[], cuda_graph=False)
    assert torch.equal(a, b)


def test_decode_graph_needs_cuda():
    model = _tiny_model()
    with pytest.raises(ValueError, match="CUDA device"):
        DecodeGraph(model, model.new_state(1, 4))
