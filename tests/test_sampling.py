"""The C++ sampler (csrc/sampling.cpp) that generate() uses on the CPU: penalized_top_k against a
stable sort of the penalised scores, and sample_top_k's draws against the Python sampler's
distribution."""

from __future__ import annotations

import pytest
import torch

from lfm_kernels import _backend
from lfm_kernels.model.generate import _penalise, candidate_probs, sample_next
from conftest import cpu_isa_path, dtype_id

pytestmark = pytest.mark.skipif(not _backend.cpu_extension_available(), reason="needs the compiled CPU extension")


def _reference_top_k(logits, history, k, penalty):
    """The order the op promises: NaN first, then larger scores, equal scores by lower id (a stable
    descending sort puts NaN first and keeps ids ascending among equals)."""
    s = logits.float().clone()
    if penalty != 1.0 and history is not None and history.numel():
        _penalise(s, history, penalty)
    vals, ids = torch.sort(s, dim=-1, descending=True, stable=True)
    return vals[:, :k], ids[:, :k]


def _logits(V, values, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, V, generator=g) * 3
    if values == "ties":  # bf16-like: thousands of equal scores, ties at the k-th one
        s = torch.randint(-4, 4, (2, V), generator=g).float()
    elif values == "inf":  # masked logits: fewer finite scores than k
        s = torch.full((2, V), float("-inf"))
        s[:, torch.randperm(V, generator=g)[:30]] = torch.randn(30, generator=g)
        s[1, 7] = float("inf")
    elif values == "nan":
        s[0, V // 3] = float("nan")
        s[1, 5] = s[1, V - 1] = float("nan")
    return s.to(dtype)


@pytest.mark.parametrize("isa", ["avx2", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("values", ["distinct", "ties", "inf", "nan"])
@pytest.mark.parametrize("V", [128_000, 5_003, 70, 64], ids=lambda v: f"V{v}")
def test_penalized_top_k_is_a_stable_sort(V, values, dtype, isa):
    logits = _logits(V, values, dtype, V)
    # ids seen (with duplicates), among them the NaN and inf positions
    history = torch.cat([torch.randint(0, V, (2, 60), generator=torch.Generator().manual_seed(1)),
                         torch.tensor([[V // 3, 5, 5], [7, V - 1, 7]])], dim=1)
    before = logits.clone()
    with cpu_isa_path(isa):
        for k in sorted({1, 5, min(V, 80), min(V, 300)}):
            for penalty in (1.0, 1.3, 0.8):
                vals, ids = torch.ops.lfm_kernels_cpu.penalized_top_k(logits, history, k, penalty)
                want_vals, want_ids = _reference_top_k(logits, history, k, penalty)
                assert torch.equal(ids, want_ids), (k, penalty)
                torch.testing.assert_close(vals, want_vals, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(logits.view(torch.uint8), before.view(torch.uint8))


@pytest.mark.parametrize("temperature,top_p", [(0.2, 1.0), (1.0, 1.0), (0.7, 0.8), (1.5, 0.3)])
def test_sample_top_k_draws_the_python_samplers_distribution(temperature, top_p):
    """40,000 draws (one call, the same row repeated): each candidate's frequency within 5 standard
    deviations of the Python sampler's probability (candidate_probs: penalty, top-k, temperature,
    top-p, softmax), and nothing drawn that it gives probability 0."""
    V, n = 3_000, 40_000
    row = (torch.randn(1, V, generator=torch.Generator().manual_seed(3)) * 2).bfloat16()
    row = row.float() + torch.arange(V) * 1e-5  # distinct scores: both samplers keep the same k
    hist = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(4))
    ids, probs = candidate_probs(row, hist, temperature, 20, top_p, 1.05)
    got = torch.ops.lfm_kernels_cpu.sample_top_k(row.expand(n, V), hist.expand(n, 40), temperature, 20, top_p, 1.05,
                                                 torch.Generator().manual_seed(11))
    counts = torch.bincount(got, minlength=V).double()
    p = torch.zeros(V, dtype=torch.float64)
    p[ids[0]] = probs[0].double()
    assert counts[p == 0].sum() == 0, "drew a token the sampler gives probability 0"
    sigma = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 5 * sigma + 1).all()


def test_sample_top_k_follows_its_generator():
    logits = torch.randn(3, 500)
    op = torch.ops.lfm_kernels_cpu.sample_top_k
    draws = lambda seed: torch.stack([op(logits, None, 1.0, 50, 1.0, 1.0, g) for g in [torch.Generator().manual_seed(seed)]
                                      for _ in range(20)])
    assert torch.equal(draws(5), draws(5))
    assert not torch.equal(draws(5), draws(6))
    torch.manual_seed(7)  # no generator: the default one
    a = op(logits, None, 1.0, 50, 1.0, 1.0, None)
    torch.manual_seed(7)
    assert torch.equal(a, op(logits, None, 1.0, 50, 1.0, 1.0, None))
    # a top-p this small keeps only the best candidate
    assert torch.equal(op(logits, None, 1.0, 50, 1e-9, 1.0, None), logits.argmax(-1))


def test_greedy_is_argmax_of_the_penalised_scores():
    logits = _logits(5_000, "ties", torch.bfloat16, 5)
    logits[1, 4000] = float("nan")
    history = torch.randint(0, 5_000, (2, 30))
    s = logits.float().clone()
    _penalise(s, history, 1.3)
    got = sample_next(logits, history, temperature=0, repetition_penalty=1.3)
    assert torch.equal(got, s.argmax(-1)) and got[1].item() == 4000


def test_sample_top_k_bad_input():
    logits = torch.randn(2, 100)
    op = torch.ops.lfm_kernels_cpu.sample_top_k
    with pytest.raises(ValueError, match=r"history holds id 100, outside \[0, V=100\)"):
        op(logits, torch.tensor([[1, 100], [2, 3]]), 1.0, 5, 1.0, 1.1, None)
    with pytest.raises(ValueError, match="history must be int64"):
        op(logits, torch.tensor([[1.0, 2.0], [2.0, 3.0]]), 1.0, 5, 1.0, 1.1, None)
    with pytest.raises(ValueError, match=r"k must be in \[1, V=100\]"):
        op(logits, None, 1.0, 101, 1.0, 1.0, None)
    with pytest.raises(ValueError, match="temperature must be finite"):
        op(logits, None, -1.0, 5, 1.0, 1.0, None)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        op(logits, None, 1.0, 5, 0.0, 1.0, None)
    with pytest.raises(ValueError, match="repetition_penalty must be finite"):
        op(logits, torch.tensor([[1], [2]]), 1.0, 5, 1.0, float("nan"), None)
    nan = logits.clone()
    nan[0, 3] = float("nan")
    with pytest.raises(ValueError, match="probabilities are not finite"):
        op(nan, None, 1.0, 5, 1.0, 1.0, None)
