"""The CPU graph (lfm_kernels.model.cpu_graph): a decode step's op calls recorded twice, then replayed
from C++. The replay must give the eager step's bits, state included, and must refuse (staying eager)
whatever it cannot replay faithfully."""

from __future__ import annotations

import pytest
import torch

from lfm_kernels import _backend, _policy
from lfm_kernels.model import LfmModel, config_from_dict
from lfm_kernels.model.cpu_graph import CpuDecodeGraph, cpu_graph_available
from lfm_kernels.model.generate import _grow_state
from lfm_kernels.model.weights import allocate, fill_random

pytestmark = pytest.mark.skipif(not _backend.cpu_extension_available(), reason="needs the compiled CPU extension")


def _model(weights: str):
    """Every kind of layer (dense FFN, conv, attention, MoE); K a multiple of 256 for the K-quants.
    "<quant>-fp16": quantized weights in a float16 model (its table's lookup dequantizes to fp32)."""
    cfg = config_from_dict(dict(
        model_type="lfm2_moe", vocab_size=300, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
        num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
        num_dense_layers=2, layer_types=["conv", "conv", "full_attention", "conv", "full_attention"],
    ))
    dtype = torch.float32 if weights == "fp32" else torch.float16 if weights.endswith("-fp16") else torch.bfloat16
    weights = weights.removesuffix("-fp16")
    quant = None if weights in ("fp32", "bf16") else weights
    w, _, _ = allocate(cfg, dtype, "cpu", quant=quant)
    fill_random(w, cfg, seed=3, progress=False, std=0.2)
    return LfmModel(cfg, w, dtype)


_MODELS: dict = {}


def _cached(weights: str):
    if weights not in _MODELS:
        _MODELS[weights] = _model(weights)
    return _MODELS[weights]


def _prefilled(model, batch: int, max_len: int = 24):
    ids = torch.randint(3, 300, (batch, 6), generator=torch.Generator().manual_seed(batch))
    lens = torch.tensor([6, 4][:batch])
    states = []
    for _ in range(2):
        s = model.new_state(batch, max_len)
        model.prefill(ids, lens, s)
        states.append(s)
    return states


@pytest.mark.parametrize("weights", ["fp32", "bf16", "q8_0", "q4_0", "q4_k_m", "q4_0-fp16"])
@pytest.mark.parametrize("batch", [1, 2])
def test_replay_gives_the_eager_bits(weights, batch):
    model = _cached(weights)
    eager, graphed = _prefilled(model, batch)
    step = CpuDecodeGraph(model, graphed)
    tok = torch.randint(3, 300, (batch,), generator=torch.Generator().manual_seed(7))
    for n in range(6):
        want = model.decode_step(tok, eager, check=False)
        got = step(tok)
        assert step.reason is None, step.reason
        assert torch.equal(got, want), f"step {n}: logits differ"
        for a, b in zip(graphed.buffers(), eager.buffers()):
            assert torch.equal(a, b), f"step {n}: the state differs"
        tok = want.argmax(-1)  # a new token each step: the replay must not have baked the first one in
    assert step.replay is not None and len(step.replay) > 50, "the steps after the second were not replayed"


@pytest.mark.parametrize("weights,first", [("bf16", "aten::embedding"), ("q4_k_m", "lfm_kernels_cpu::quant_embedding"),
                                           ("q4_0-fp16", "lfm_kernels_cpu::quant_embedding")])
def test_the_embedding_lookup_is_recorded(weights, first, monkeypatch):
    """The recording starts at the token ids: the lookup is one recorded op (a quantized float16 table:
    the fp32 lookup, then its rounding to float16)."""
    import lfm_kernels.model.cpu_graph as cpu_graph_mod

    programs = []
    real = cpu_graph_mod._program
    monkeypatch.setattr(cpu_graph_mod, "_program", lambda *a: programs.append(real(*a)) or programs[-1])
    model = _cached(weights)
    _, graphed = _prefilled(model, 1)
    step = CpuDecodeGraph(model, graphed)
    for _ in range(3):
        step(torch.tensor([5]))
    assert step.replay is not None
    assert programs[-1][0][0][0]._schema.name == first


def test_rerecords_after_the_state_grows():
    """generate() grows a state by replacing its caches; a replay holding the old ones would write
    past them. The graph records again and stays on the eager bits."""
    model = _cached("q4_0")
    eager, graphed = _prefilled(model, 1, max_len=10)
    step = CpuDecodeGraph(model, graphed)
    tok = torch.tensor([11])
    for n in range(9):
        if n == 3:
            _grow_state(model, eager, 16)
            _grow_state(model, graphed, 16)
            assert step.replay is not None
        want = model.decode_step(tok, eager, check=False)
        assert torch.equal(step(tok), want), f"step {n}"
        if n == 3:
            assert step.replay is None, "the old replay ran on the grown state"
        tok = want.argmax(-1)
    assert step.replay is not None and step.reason is None


def test_rerecords_when_the_policy_changes():
    model = _cached("bf16")
    eager, graphed = _prefilled(model, 2)
    step = CpuDecodeGraph(model, graphed)
    tok = torch.tensor([5, 9])

    def one(n):
        want = model.decode_step(tok, eager, check=False)
        assert torch.equal(step(tok), want), f"step {n}"

    for n in range(3):
        one(n)
    assert step.replay is not None
    with _policy.kernel_policy(kernel_only=True):  # the previous policy comes back after the block
        one(3)
        assert step.replay is None, "the replay recorded under the old policy ran"
        for n in range(4, 7):
            one(n)
        assert step.replay is not None
    one(7)  # the policy changed back: recorded again, eager bits meanwhile
    assert step.replay is None


def test_replays_list_arguments_and_ops_without_returns():
    """An op's outputs inside a list argument (torch.cat of a split weight's parts) and an op that
    returns nothing: replayed, the same bits."""
    model = _model("fp32")
    eager, graphed = _prefilled(model, 1)
    inner = model._decode_embedded

    def with_lists(x, state):
        a, b = x * 1.0, x + 0.0
        torch._foreach_mul_([a, b], 1.0)  # returns nothing, mutates two op outputs
        return inner(torch.cat([a, b], dim=-1)[..., : x.shape[-1]], state)

    model._decode_embedded = with_lists
    step = CpuDecodeGraph(model, graphed)
    tok = torch.tensor([4])
    for n in range(5):
        want = with_lists(model._embed(tok).unsqueeze(1), eager)
        assert torch.equal(step(tok), want), f"step {n}"
        tok = want.argmax(-1)
    assert step.replay is not None, step.reason


def test_refuses_a_step_that_reads_a_value():
    """A step whose Python reads a tensor (here the position) cannot be replayed: refused, eager bits."""
    model = _model("fp32")
    eager, graphed = _prefilled(model, 1)
    inner = model._decode_embedded

    def reads_position(x, state):
        if int(state.seq_lens[0]) >= 0:
            return inner(x, state)

    model._decode_embedded = reads_position
    step = CpuDecodeGraph(model, graphed)
    tok = torch.tensor([4])
    for _ in range(4):
        assert torch.equal(step(tok), inner(model._embed(tok).unsqueeze(1), eager))
    assert step.replay is None and "non-tensor" in step.reason


def test_refuses_a_tensor_made_in_python_each_step():
    """A tensor the step builds outside the dispatcher (here the position, as a new tensor each step)
    would be baked in as a constant: the two recordings differ, refused, eager bits."""
    model = _model("fp32")
    eager, graphed = _prefilled(model, 1)
    inner = model._decode_embedded
    counter = {"n": 0}

    def adds_a_fresh_tensor(x, state):
        counter["n"] += 1
        return inner(x + torch.tensor(float(counter["n"] % 2)) * 0, state)

    model._decode_embedded = adds_a_fresh_tensor
    step = CpuDecodeGraph(model, graphed)
    tok = torch.tensor([4])
    for _ in range(6):
        step(tok)
    assert step.replay is None and "differs between the two recorded steps" in step.reason


def test_generate_is_the_same_with_and_without_the_graph():
    model = _cached("q4_k_m")
    ids = torch.randint(3, 300, (2, 5), generator=torch.Generator().manual_seed(0))
    ta, tb = {}, {}
    a = model.generate(ids, 8, temperature=0, repetition_penalty=1.0, eos_token_id=[], cpu_graph=True, timings=ta)
    b = model.generate(ids, 8, temperature=0, repetition_penalty=1.0, eos_token_id=[], cpu_graph=False, timings=tb)
    assert torch.equal(a, b)
    assert ta["decode_path"].startswith("cpu graph ("), ta["decode_path"]  # the bench reports it
    assert tb["decode_path"] == "eager"


def test_generate_reuses_its_state_and_graph(monkeypatch):
    """A second generate call with the same batch size reuses the first one's state and recorded graph
    (no recording) and gives the tokens of a fresh state; another batch size or a prompt that does not
    fit gets a new state and records again."""
    import lfm_kernels.model.cpu_graph as cpu_graph_mod

    recordings = []

    class Counting(cpu_graph_mod._Recorder):
        def __init__(self):
            super().__init__()
            recordings.append(1)

    monkeypatch.setattr(cpu_graph_mod, "_Recorder", Counting)
    model = _model("q4_0")
    gen = torch.Generator().manual_seed(1)
    p1, p2, p3 = (torch.randint(3, 300, (1, n), generator=gen) for n in (5, 9, 70))
    kw = dict(eos_token_id=[], temperature=0.7, top_k=20, repetition_penalty=1.1)
    model.generate(p1, 6, seed=1, **kw)
    assert len(recordings) == 2
    t = {}
    again = model.generate(p2, 6, seed=2, timings=t, **kw)
    assert len(recordings) == 2, "the second call recorded its decode step again"
    assert t["decode_path"].startswith("cpu graph (")
    assert torch.equal(again, model.generate(p2, 6, seed=2, cpu_graph=False, **kw))  # a fresh state, eager
    model.generate(torch.cat([p2, p2]), 4, seed=3, **kw)  # batch 2: a state of its own, kept
    assert len(recordings) == 4
    model.generate(p1, 4, seed=3, **kw)  # batch 1 again: the batch-2 state does not serve
    assert len(recordings) == 6
    model.generate(p3, 3, seed=4, **kw)  # 70 + 3 positions do not fit the spare's 64
    assert len(recordings) == 8
    model.generate(p3, 3, seed=4, **kw)
    assert len(recordings) == 8


def test_a_model_with_a_kept_graph_is_freed_when_dropped():
    """The state and graph generate() keeps with the model must not keep the model alive: dropping the
    last reference frees it at once (a 17 GB model must not wait for the cycle collector)."""
    import gc
    import weakref

    model = _model("q4_0")
    model.generate(torch.randint(3, 300, (1, 5)), 4, eos_token_id=[])
    assert model._spare_decode is not None
    ref = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert ref() is None, "the model outlived its last reference"
    finally:
        gc.enable()


def test_public_stepper_replays_on_the_cpu():
    from lfm_kernels.model import decode_stepper

    model = _cached("q4_0")
    eager, graphed = _prefilled(model, 1)
    step = decode_stepper(model, graphed)
    assert isinstance(step, CpuDecodeGraph)
    tok = torch.tensor([8])
    for _ in range(4):
        want = model.decode_step(tok, eager, check=False)
        assert torch.equal(step(tok), want)
        tok = want.argmax(-1)
    assert step.path.startswith("cpu graph (")
    eager_step = decode_stepper(model, graphed, cpu_graph=False)
    assert not isinstance(eager_step, CpuDecodeGraph)


def test_needs_the_cpu():
    model = _cached("fp32")
    assert cpu_graph_available(model)
    with pytest.raises(ValueError, match=r"tokens must have shape \[B=1\]"):
        CpuDecodeGraph(model, model.new_state(1, 4))(torch.tensor([1, 2]))


def test_op_replay_rejects_bad_registers():
    replay = _backend._C.OpReplay(2)
    x = torch.randn(3)
    with pytest.raises(ValueError, match="register 5 out of range"):
        replay.add("aten::neg", "", [None], [(0, -1, 5)], [1])
    with pytest.raises(ValueError, match="not a tensor; only tensors come from registers"):
        replay.add("aten::add", "Tensor", [x, x, None], [(2, -1, 0)], [1])
    replay.add("aten::neg", "", [None], [(0, -1, 0)], [1])
    assert torch.equal(replay.run([x], [1])[0], -x)
    unwritten = _backend._C.OpReplay(3)
    unwritten.add("aten::neg", "", [None], [(0, -1, 2)], [1])
    with pytest.raises(RuntimeError, match="read before it is written"):
        unwritten.run([x], [1])
