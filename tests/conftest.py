"""Shared test helpers. Triton kernels run under the interpreter on CPU tensors when there's no GPU."""

import contextlib
import os
import zlib

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit is created (lfm_kernels.triton imports lazily, so here is early enough).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lfm_kernels._policy import DEFAULT_POLICY, set_policy  # noqa: E402

# Deterministic paths: the tests run the default thresholds, never ones measured on a busy machine
# (tests/test_chooser.py turns the measurement on for itself).
set_policy(DEFAULT_POLICY)

HAS_CUDA = torch.cuda.is_available()

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


# Where the Triton kernels run in tests: compiled kernels need CUDA tensors; the interpreter (no GPU)
# runs on CPU tensors.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def call_triton(fn, *args, **kwargs):
    """fn (a Triton launcher) on TRITON_DEVICE copies of the CPU tensor arguments: in-place changes
    (conv states, `out` buffers) are copied back and tensor results come back on the CPU. Without a
    GPU this is a plain call."""
    if TRITON_DEVICE == "cpu":
        return fn(*args, **kwargs)
    moved = []

    def to_dev(x):
        if isinstance(x, torch.Tensor) and x.device.type == "cpu":
            d = x.to(TRITON_DEVICE)
            moved.append((x, d))
            return d
        return x

    def to_cpu(x):
        if isinstance(x, torch.Tensor):
            return x.cpu()
        if isinstance(x, tuple):
            return tuple(to_cpu(y) for y in x)
        return x

    res = fn(*[to_dev(a) for a in args], **{k: to_dev(v) for k, v in kwargs.items()})
    for host, dev in moved:
        host.copy_(dev)
    return to_cpu(res)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in out gives inf so it can never pass."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denom if denom > 0 else 1.0)


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

def write_word_tokenizer(path, vocab_size: int) -> None:
    """A word-level tokenizer.json in directory `path`: ids 0..8 LFM2's special tokens, then w0, w1,
    ..., and [UNK] last (vocab_size ids in all)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
                "<|tool_call_start|>", "<|tool_call_end|>", "<|tool_list_start|>", "<|tool_list_end|>"]
    words = specials + [f"w{i}" for i in range(vocab_size - len(specials) - 1)] + ["[UNK]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    tok.save(str(path / "tokenizer.json"))


def tiny_moe_config(**over) -> dict:
    """The smallest LFM2-MoE config.json the loader takes (3 layers, one dense, one attention), a fresh
    dict each call with `over` applied: the base of the config-parsing and hostile-checkpoint tests."""
    return dict(
        model_type="lfm2_moe",
        vocab_size=37,
        hidden_size=16,
        intermediate_size=24,
        moe_intermediate_size=8,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=4,
        num_experts_per_tok=2,
        num_dense_layers=1,
        layer_types=["conv", "full_attention", "conv"],
    ) | over


def ulps(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|a - b| in units of dtype's spacing at |b| (0 where equal)."""
    eps = torch.finfo(dtype).eps
    return (a.double() - b.double()).abs() / (b.double().abs().clamp_min(torch.finfo(dtype).tiny) * eps)


def assert_norm_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, max_mismatch: float = 0.01):
    """An RMSNorm output against its reference when only the order of the fp32 sum of squares
    differs: in fp32 a few ulps; in 16-bit dtypes (two roundings) a last-bit change of the mean moves
    a few elements one step, so at most 2 ulps and at most max_mismatch of the elements."""
    d = ulps(out, ref, dtype)
    if dtype == torch.float32:
        assert d.max() <= 4, d.max()
    else:
        assert d.max() <= 2, d.max()
        assert (out != ref).double().mean() < max_mismatch


def assert_row_parity(out: torch.Tensor, ref: torch.Tensor, what: str, row_tol: float, flip_tol: float) -> None:
    """Per-row (token) relative error of a quantized MoE against its emulating reference: every row
    below row_tol, except at most max(2, N / 50) rows, each below flip_tol (an fp32 act on the other
    side of an int8 rounding boundary moves its block by one step; the calling modules say why)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    diff = (out.double() - ref.double()).norm(dim=1)
    row_err = diff / ref.double().norm(dim=1).clamp_min(1e-30)
    off = (row_err >= row_tol).nonzero().flatten().tolist()
    allowed = max(2, out.shape[0] // 50)
    assert len(off) <= allowed, (
        f"{what}: {len(off)} rows with relative error >= {row_tol:g} (at most {allowed}), worst {row_err.max():.3g}"
    )
    assert row_err.max() < flip_tol, f"{what}: row {int(row_err.argmax())} relative error {row_err.max():.3g} >= {flip_tol:g}"


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, what: str = "output"):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    tol = TOL[dtype or ref.dtype]
    err = rel_err(out, ref)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g}"


_QUANT_ISA_NEEDS = {"avx2": "AVX2+FMA+F16C", "avxvnni": "AVX-VNNI", "avx512vnni": "AVX512-VNNI (+VL/BW)"}


@contextlib.contextmanager
def quant_isa_path(name: str):
    """Runs the block on one quantized-kernel path ("portable", "avx2", "avxvnni", "avx512vnni"), or skips
    visibly when the CPU lacks its instructions."""
    from lfm_kernels import _backend

    from lfm_kernels._policy import QUANT_ROUTE_FIELDS, kernel_policy

    info = torch.ops.lfm_kernels_cpu._quant_isa_info
    # the path itself for every row count: no AMX-INT8 tiles or bf16 GEMM route taking many rows over
    never = 1 << 30
    own_path = kernel_policy(**{f: never for pair in QUANT_ROUTE_FIELDS.values() for f in pair if f})
    if name == "portable":
        with _backend.force_portable_cpu(), own_path:
            assert info()[0] == "portable"
            yield
        return
    if name not in info()[1:]:
        pytest.skip(f"needs {_QUANT_ISA_NEEDS[name]}: this CPU does not have it, so the {name} path cannot run here")
    torch.ops.lfm_kernels_cpu._quant_pin_isa(name)
    try:
        with own_path:
            assert info()[0] == name
            yield
    finally:
        torch.ops.lfm_kernels_cpu._quant_pin_isa("")



@contextlib.contextmanager
def cpu_isa_path(name: str):
    """Runs the block on one path of the plain-weight kernels: "portable", "avx2" (AVX-512 decode
    kernels pinned off) or "avx512" (the AVX-512 decode kernels on; everything else AVX2), or skips
    visibly when the CPU lacks its instructions. cpu_isa() then names that path."""
    from lfm_kernels import _backend

    if _backend._C is None:
        pytest.fail(f"CPU extension not loaded: {_backend._EXT_ERROR}")
    if name == "portable":
        with _backend.force_portable_cpu():
            assert _backend.cpu_isa() == "portable"
            yield
        return
    needs = {"avx2": ("cpu_supports_avx2", "AVX2+FMA+F16C"), "avx512": ("cpu_supports_avx512", "AVX-512 (F/BW/VL/DQ)")}
    check, what = needs[name]
    if not getattr(_backend._C, check)():
        pytest.skip(f"needs {what}: this CPU does not have it, so the {name} path cannot run here")
    _backend._C.set_pin_avx2(name == "avx2")
    try:
        assert _backend.cpu_isa() == name
        yield
    finally:
        _backend._C.set_pin_avx2(False)


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op thread count set to n for the block."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def dtype_id(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def case_seed(*key) -> int:
    """A seed of a test case's own parameters, the same in every process (hash() of a str is not)."""
    return zlib.crc32(repr(key).encode())


@pytest.fixture(autouse=True)
def _seed(request):
    # A different but reproducible seed per test: fresh inputs per check, replayable failures.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
