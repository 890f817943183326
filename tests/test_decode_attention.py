"""GQA decode attention: kernels vs the eager reference, the reference vs transformers, bad input."""

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_TRITON, TOL, assert_close, dtype_id, rel_err

import lfm_kernels
from lfm_kernels import _backend, reference
from lfm_kernels.ops.decode_attention import _decode_attention_op

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEADS = [(32, 8), (8, 8), (4, 1)]
SEQ = [1, 2, 63, 64, 65, 1000, 4097]
needs_ext = pytest.mark.skipif(_backend._C is None, reason="CPU extension not built")


def _lens(batch, S):
    """Different lengths, one of them 1, the longest S."""
    return [S, max(1, (S * 2) // 3), 1][:batch]


def make_inputs(batch, n_q, n_kv, S, D, dtype, lens=None, extra=0, device="cpu", poison=True):
    """q [B, Hq, D]; caches are [:, :, :S] views of a longer [B, H_kv, S + extra, D] buffer, NaN at
    and past each sequence's length (those positions must never reach the output)."""
    lens = lens if lens is not None else _lens(batch, S)
    q = torch.randn(batch, n_q, D, device=device).to(dtype)
    k_buf = torch.randn(batch, n_kv, S + extra, D, device=device).to(dtype)
    v_buf = torch.randn(batch, n_kv, S + extra, D, device=device).to(dtype)
    if poison:
        for b, length in enumerate(lens):
            k_buf[b, :, length:] = float("nan")
            v_buf[b, :, length:] = float("nan")
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k_buf[:, :, :S], v_buf[:, :, :S], seq_lens


def _check(out, q, k, v, seq_lens, scale, dtype):
    ref = reference.decode_attention(q, k, v, seq_lens, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "non-finite output (a position past seq_lens leaked in?)"
    assert_close(out, ref, dtype)


# ---------------------------------------------------------------------------- CPU kernel vs reference


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
@pytest.mark.parametrize("S", SEQ, ids=lambda s: f"S{s}")
def test_cpu_matches_reference(S, heads, D, dtype):
    n_q, n_kv = heads
    q, k, v, seq_lens = make_inputs(3, n_q, n_kv, S, D, dtype, extra=5)
    scale = D**-0.5
    out = lfm_kernels.decode_attention(q, k, v, seq_lens, scale)
    _check(out, q, k, v, seq_lens, scale, dtype)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "case",
    [(1, 32, 8, 4097, 64), (3, 8, 8, 1000, 128), (2, 4, 1, 300, 64), (3, 12, 4, 129, 80), (2, 6, 2, 70, 16)],
    ids=lambda c: f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-S{c[3]}-D{c[4]}",
)
def test_cpu_portable_path(case, dtype):
    """The non-AVX2 C++ path (any D) against the reference; D = 80 / 16 also take it on AVX2 CPUs."""
    batch, n_q, n_kv, S, D = case
    q, k, v, seq_lens = make_inputs(batch, n_q, n_kv, S, D, dtype)
    scale = D**-0.5
    with _backend.force_portable_cpu():
        out = lfm_kernels.decode_attention(q, k, v, seq_lens, scale)
    _check(out, q, k, v, seq_lens, scale, dtype)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("heads", [(32, 8), (12, 2), (24, 8), (8, 8)], ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
def test_cpu_many_threads_split_merge(heads, dtype):
    """More threads than KV heads x sequences: every sequence is split and merged by log-sum-exp.
    Group sizes 6 and 3 use the 4 + 2 and 2 + 1 head tiles of the AVX2 kernel."""
    n_q, n_kv = heads
    q, k, v, seq_lens = make_inputs(2, n_q, n_kv, 3001, 64, dtype, lens=[3001, 777])
    old = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        out = lfm_kernels.decode_attention(q, k, v, seq_lens, 0.125)
    finally:
        torch.set_num_threads(old)
    _check(out, q, k, v, seq_lens, 0.125, dtype)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_cpu_strided_layouts(dtype):
    """q a non-contiguous view; caches stored [B, S, H_kv, D] and viewed as [B, H_kv, S, D] (the
    head stride is not the largest); a cache whose last dim is strided (copied by the wrapper)."""
    batch, n_q, n_kv, S, D = 3, 8, 2, 200, 64
    lens = [200, 57, 1]
    q = torch.randn(n_q, batch, D).to(dtype).transpose(0, 1)  # [B, Hq, D], batch stride D
    k_bshd = torch.randn(batch, S + 3, n_kv, D).to(dtype)
    v_bshd = torch.randn(batch, S + 3, n_kv, D).to(dtype)
    for b, length in enumerate(lens):
        k_bshd[b, length:] = float("nan")
        v_bshd[b, length:] = float("nan")
    k = k_bshd.transpose(1, 2)[:, :, :S]
    v = v_bshd.transpose(1, 2)[:, :, :S]
    seq_lens = torch.tensor(lens, dtype=torch.int64)
    assert not q.is_contiguous() and not k.is_contiguous()
    out = lfm_kernels.decode_attention(q, k, v, seq_lens, D**-0.5)
    _check(out, q, k, v, seq_lens, D**-0.5, dtype)
    # last dim with stride 2
    k2 = torch.randn(batch, n_kv, S, 2 * D).to(dtype)[..., ::2]
    v2 = torch.randn(batch, n_kv, S, 2 * D).to(dtype)[..., ::2]
    out = lfm_kernels.decode_attention(q, k2, v2, seq_lens, D**-0.5)
    _check(out, q, k2, v2, seq_lens, D**-0.5, dtype)


@needs_ext
def test_cpu_does_not_modify_inputs():
    q, k, v, seq_lens = make_inputs(2, 8, 2, 100, 64, torch.bfloat16, lens=[100, 40], poison=False)
    copies = [t.clone() for t in (q, k, v, seq_lens)]
    lfm_kernels.decode_attention(q, k, v, seq_lens, 0.125)
    for t, c in zip((q, k, v, seq_lens), copies):
        assert torch.equal(t, c)


def test_large_scores_are_stable():
    """Scores in the hundreds: the running max keeps exp in range (no inf / NaN)."""
    q, k, v, seq_lens = make_inputs(2, 8, 2, 500, 64, torch.float32, lens=[500, 123])
    out = lfm_kernels.decode_attention(q * 30, k, v, seq_lens, 1.0)
    _check(out, q * 30, k, v, seq_lens, 1.0, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_opcheck(dtype):
    q, k, v, seq_lens = make_inputs(3, 8, 2, 70, 64, dtype, lens=[70, 9, 1], poison=False)
    torch.library.opcheck(_decode_attention_op, (q, k, v, seq_lens, 0.125))


def test_torch_compile_fullgraph():
    q, k, v, seq_lens = make_inputs(2, 8, 2, 70, 64, torch.float32, lens=[70, 9])
    fn = torch.compile(lambda *a: lfm_kernels.decode_attention(*a, 0.125), fullgraph=True, backend="eager")
    _check(fn(q, k, v, seq_lens), q, k, v, seq_lens, 0.125, torch.float32)


# ---------------------------------------------------------------------------- Triton (interpreter on CPU)

TRITON_CASES = [
    # batch, Hq, H_kv, S, D, lens, num_splits
    (1, 4, 1, 1, 64, [1], None),
    (3, 8, 2, 130, 64, [130, 65, 1], None),
    (2, 4, 4, 128, 128, [100, 3], None),
    (1, 6, 2, 200, 80, [200], 2),
    (3, 32, 8, 70, 64, [70, 64, 1], 1),
]


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "case", TRITON_CASES, ids=lambda c: f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-S{c[3]}-D{c[4]}-splits{c[6] or 'auto'}"
)
def test_triton_matches_reference(case, dtype):
    from lfm_kernels.triton.decode_attention import decode_attention_triton

    batch, n_q, n_kv, S, D, lens, splits = case
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, seq_lens = make_inputs(batch, n_q, n_kv, S, D, dtype, lens=lens, extra=3, device=device)
    out = decode_attention_triton(q, k, v, seq_lens, D**-0.5, num_splits=splits)
    _check(out, q, k, v, seq_lens, D**-0.5, dtype)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_num_splits_fill_the_chip():
    from lfm_kernels.triton.decode_attention import num_splits_for

    cpu = torch.device("cpu")  # the interpreter assumes 132 SMs
    assert num_splits_for(1, 8, 8192, cpu) * 8 >= 132  # batch 1: enough programs for every SM
    assert num_splits_for(64, 8, 8192, cpu) == 1  # big batch: one split per (sequence, head)
    assert num_splits_for(1, 8, 10, cpu) == 1  # never more splits than blocks of positions


# ---------------------------------------------------------------------------- the reference itself


def _hf_eager(q, k, v, seq_lens, scale):
    """transformers' Lfm2Moe eager_attention_forward on one query token per sequence, with the
    4D additive mask it gets from the mask builder (0 where attended, finfo.min elsewhere)."""
    from transformers.models.lfm2_moe.modeling_lfm2_moe import eager_attention_forward

    batch, n_q, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]

    class _Module(torch.nn.Module):
        num_key_value_groups = n_q // n_kv

    pos = torch.arange(S)
    valid = pos[None, :] < seq_lens[:, None].long()  # [B, S]
    mask = torch.zeros(batch, 1, 1, S, dtype=q.dtype).masked_fill(~valid[:, None, None, :], torch.finfo(q.dtype).min)
    out, _ = eager_attention_forward(_Module().eval(), q[:, :, None], k, v, mask, scaling=scale)
    return out[:, 0]  # [B, 1, Hq, D] -> [B, Hq, D]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
def test_reference_matches_transformers_eager(heads, dtype):
    n_q, n_kv = heads
    q, k, v, seq_lens = make_inputs(3, n_q, n_kv, 97, 64, dtype, lens=[97, 40, 1], poison=False)
    ref = reference.decode_attention(q, k, v, seq_lens, 0.125)
    hf = _hf_eager(q, k, v, seq_lens, 0.125)
    assert_close(ref, hf, dtype, "reference vs transformers eager_attention_forward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
def test_reference_matches_sdpa_gqa(heads, dtype):
    n_q, n_kv = heads
    lens = [150, 33, 1]
    q, k, v, seq_lens = make_inputs(3, n_q, n_kv, 150, 128, dtype, lens=lens)
    ref = reference.decode_attention(q, k, v, seq_lens, 128**-0.5)
    for b, length in enumerate(lens):
        sdpa = F.scaled_dot_product_attention(
            q[b : b + 1, :, None].float(), k[b : b + 1, :, :length].float(), v[b : b + 1, :, :length].float(),
            scale=128**-0.5, enable_gqa=True,
        )[:, :, 0]
        assert rel_err(ref[b : b + 1].float(), sdpa) < TOL[dtype], f"sequence {b}"


# ---------------------------------------------------------------------------- bad input


def _good():
    return make_inputs(2, 8, 2, 16, 64, torch.float32, lens=[16, 3], poison=False)


@pytest.mark.parametrize(
    "mutate, exc, words",
    [
        (lambda a: a.update(seq_lens=torch.tensor([17, 3], dtype=torch.int32)), ValueError, "seq_lens"),
        (lambda a: a.update(seq_lens=torch.tensor([16, 0], dtype=torch.int32)), ValueError, "seq_lens"),
        (lambda a: a.update(seq_lens=torch.tensor([-1, 3])), ValueError, "seq_lens"),
        (lambda a: a.update(seq_lens=torch.tensor([16.0, 3.0])), TypeError, "seq_lens"),
        (lambda a: a.update(seq_lens=torch.tensor([16, 3, 3])), ValueError, "seq_lens"),
        (lambda a: a.update(seq_lens=torch.tensor([16, 3], device="meta")), ValueError, "seq_lens"),
        (lambda a: a.update(q=torch.randn(2, 7, 64)), ValueError, "multiple"),
        (lambda a: a.update(q=torch.randn(2, 8, 32)), ValueError, "k_cache"),
        (lambda a: a.update(q=torch.randn(3, 8, 64)), ValueError, "k_cache"),
        (lambda a: a.update(q=torch.randn(2, 1, 8, 64)), ValueError, "q"),
        (lambda a: a.update(q=torch.randint(0, 3, (2, 8, 64))), TypeError, "q"),
        (lambda a: a.update(q=a["q"].bfloat16()), TypeError, "k_cache"),
        (lambda a: a.update(q=a["q"].numpy()), TypeError, "q"),
        (lambda a: a.update(v_cache=a["v_cache"][:, :, :8]), ValueError, "v_cache"),
        (lambda a: a.update(v_cache=a["v_cache"].half()), TypeError, "v_cache"),
        (lambda a: a.update(k_cache=a["k_cache"][0]), ValueError, "k_cache"),
        (lambda a: a.update(k_cache=a["k_cache"][:, :, :0], v_cache=a["v_cache"][:, :, :0]), ValueError, "S"),
        (lambda a: a.update(k_cache=a["k_cache"].to("meta"), v_cache=a["v_cache"].to("meta")), ValueError, "device"),
        (lambda a: a.update(scale="0.125"), TypeError, "scale"),
    ],
    ids=[
        "len-past-S", "len-zero", "len-negative", "lens-float", "lens-shape", "lens-device",
        "Hq-not-multiple", "D-mismatch", "B-mismatch", "q-rank", "q-int", "dtype-mismatch", "q-not-tensor",
        "v-shape", "v-dtype", "k-rank", "S-zero", "cache-device", "scale-str",
    ],
)
def test_bad_input(mutate, exc, words):
    q, k, v, seq_lens = _good()
    args = {"q": q, "k_cache": k, "v_cache": v, "seq_lens": seq_lens, "scale": 0.125}
    mutate(args)
    with pytest.raises(exc, match=words):
        lfm_kernels.decode_attention(**args)


@needs_ext
def test_extension_checks_lengths_itself():
    """Called directly (no Python validation), the C++ op still refuses lengths it would overrun."""
    q, k, v, _ = _good()
    with pytest.raises(RuntimeError, match="seq_lens"):
        torch.ops.lfm_kernels_cpu.decode_attention(q, k, v, torch.tensor([17, 3]), 0.125)


def test_benchmark_cases_are_well_formed():
    """The benchmark module builds its cases (without running them): names, sizes, baselines."""
    from lfm_kernels.benchmark.decode_attention import cases

    quick = cases("cpu", quick=True)
    assert [c.name for c in quick] == ["ctx1k-B1-Hq32-Hkv8-D64", "ctx8k-B1-Hq32-Hkv8-D64"] * 2
    full = cases("cpu")
    assert len(full) == 12 and {c.dtype for c in full} == {torch.bfloat16, torch.float32}
    c = next(c for c in full if c.name == "ctx8k-B1-Hq32-Hkv8-D64" and c.dtype == torch.bfloat16)
    assert c.bytes_moved == 2 * 8 * 8192 * 64 * 2 + 2 * 32 * 64 * 2
    assert set(c.baselines) == {"sdpa", "eager"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_benchmark_baselines_compute_the_same(dtype):
    from lfm_kernels.benchmark import decode_attention as bench

    q, k, v, seq_lens = make_inputs(2, 32, 8, 300, 64, dtype, lens=[300, 300], poison=False)
    inp = {"q": q, "k_cache": k, "v_cache": v, "seq_lens": seq_lens, "length": 300, "scale": 0.125}
    ref = reference.decode_attention(q, k, v, seq_lens, 0.125)
    assert_close(bench._sdpa(inp), ref, dtype, "sdpa baseline")
    assert_close(bench._hf_eager(inp), ref, dtype, "hf_eager baseline")
