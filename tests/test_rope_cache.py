"""The decode step's rotary embedding and KV-cache write in one C++ op (csrc/rope_cache.cpp) against
the eager ops it replaces in the model (apply_rope, then index writes of k and v): the same bits."""

import pytest
import torch

from conftest import cpu_isa_path

from lfm_kernels import _backend
from lfm_kernels.model.model import apply_rope

pytestmark = pytest.mark.skipif(
    _backend._C is None or not hasattr(torch.ops.lfm_kernels_cpu, "rope_cache_write"),
    reason="needs the compiled CPU extension (lfm_kernels._C with the rope_cache_write op)",
)


def _tables(S, D, dtype):
    inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, dtype=torch.float) / D))
    emb = torch.arange(S, dtype=torch.float)[:, None] * inv
    emb = torch.cat((emb, emb), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    sin[:, : D // 2].neg_()
    return cos, sin


def _eager(qk, v, cos_t, sin_t, kc, vc, pos, hq):
    rows = torch.arange(qk.shape[0])
    r = apply_rope(qk, cos_t[pos].unsqueeze(1), sin_t[pos].unsqueeze(1))
    kc[rows, :, pos] = r[:, hq:]
    vc[rows, :, pos] = v
    return r[:, :hq].contiguous()


CASES = [(1, 32, 8, 64, 300), (3, 4, 2, 16, 9), (2, 6, 3, 2, 5)]  # (B, Hq, Hkv, D, S)


@pytest.mark.parametrize("impl", ["avx2", "portable"])
@pytest.mark.parametrize("k_layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[f"B{b}-Hq{q}-Hkv{k}-D{d}-S{s}" for b, q, k, d, s in CASES])
def test_rope_cache_write_is_the_eager_ops(case, dtype, k_layout, impl):
    B, Hq, Hkv, D, S = case
    g = torch.Generator().manual_seed(B * 1000 + D)
    qkv = (torch.randn(B, (Hq + 2 * Hkv) * D, generator=g) * 2).to(dtype)
    qk = qkv[:, : (Hq + Hkv) * D].reshape(B, Hq + Hkv, D)
    v = qkv[:, (Hq + Hkv) * D:].view(B, Hkv, D)  # a strided view, as the model passes it
    cos, sin = _tables(S, D, dtype)
    kc, vc = torch.randn(B, Hkv, S, D, generator=g).to(dtype), torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    if k_layout == "transposed":  # a cache whose head elements are S apart: the k heads' strided stores
        kc = kc.transpose(2, 3).contiguous().transpose(2, 3)
    pos = torch.randint(0, S, (B,), generator=g)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    qk_before = qk.clone()
    q_ref = _eager(qk, v, cos, sin, kc_ref, vc_ref, pos, Hq)
    with cpu_isa_path(impl):
        q = torch.ops.lfm_kernels_cpu.rope_cache_write(qk, v, cos, sin, kc, vc, pos, Hq)
    assert q.shape == (B, Hq, D) and q.dtype == dtype and q.is_contiguous()
    assert torch.equal(q, q_ref)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)  # only position pos[b] of each row changed
    assert torch.equal(qk, qk_before)


def test_rope_cache_write_bad_input():
    B, Hq, Hkv, D, S = 2, 4, 2, 8, 6
    qk, v = torch.randn(B, Hq + Hkv, D), torch.randn(B, Hkv, D)
    cos, sin = _tables(S, D, torch.float32)
    kc, vc = torch.zeros(B, Hkv, S, D), torch.zeros(B, Hkv, S, D)
    op = torch.ops.lfm_kernels_cpu.rope_cache_write
    for pos in (torch.tensor([0, S]), torch.tensor([-1, 0])):
        with pytest.raises(ValueError, match="outside the cache"):
            op(qk, v, cos, sin, kc, vc, pos, Hq)
    assert not kc.any() and not vc.any()  # nothing written before the check
    with pytest.raises(ValueError, match="rope tables"):
        op(qk, v, cos[:2], sin[:2], kc, vc, torch.tensor([3, 0]), Hq)
    with pytest.raises(ValueError, match="num_q_heads"):
        op(qk, v, cos, sin, kc, vc, torch.tensor([0, 0]), Hq + Hkv)
    with pytest.raises(ValueError, match="v must be"):
        op(qk, torch.randn(B, Hkv + 1, D), cos, sin, kc, vc, torch.tensor([0, 0]), Hq)
    with pytest.raises(ValueError, match="k_cache and v_cache must be"):
        op(qk, v, cos, sin, kc.bfloat16(), vc, torch.tensor([0, 0]), Hq)
    with pytest.raises(ValueError, match="different tensors"):
        op(qk, v, cos, sin, kc, kc, torch.tensor([0, 0]), Hq)
    with pytest.raises(ValueError, match="head_dim must be even"):
        op(torch.randn(B, Hq + Hkv, 3), torch.randn(B, Hkv, 3), cos[:, :3], sin[:, :3], kc[..., :3], vc[..., :3],
           torch.tensor([0, 0]), Hq)
