"""Parity, state and bad-input tests for lfm_kernels.short_conv on the C++ (AVX2 and portable) and Triton paths."""


import pytest
import torch

import lfm_kernels
from lfm_kernels import _backend, reference
from conftest import HAS_CUDA, HAS_TRITON, assert_close, call_triton, cpu_isa_path, dtype_id

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IMPLS = ["avx512", "avx2", "portable", "triton"]


def _run(impl, bcx, weight, bias=None, conv_state=None, attention_mask=None, poison=False):
    """Call one implementation, so each path is tested whatever the dispatcher would pick.

    poison=True writes into a NaN-filled output buffer through the kernel's private entry point, so an
    element the kernel forgets to write fails the comparison; otherwise the public API runs."""
    out = None
    if poison:
        out = torch.full((bcx.shape[0], bcx.shape[1], bcx.shape[2] // 3), float("nan"), dtype=bcx.dtype)
    if impl == "triton":
        if not HAS_TRITON:
            pytest.skip("triton not installed")
        from lfm_kernels.triton.short_conv import short_conv_triton

        return call_triton(short_conv_triton, bcx, weight, bias, conv_state, attention_mask, out=out)
    if _backend._C is None:
        pytest.fail(f"CPU extension not loaded: {_backend._EXT_ERROR}")
    with cpu_isa_path(impl):
        if poison:
            return torch.ops.lfm_kernels_cpu.short_conv(bcx, weight, bias, conv_state, attention_mask, out)
        return lfm_kernels.short_conv(bcx, weight, bias, conv_state, attention_mask)


def _inputs(batch, seqlen, dim, dtype, width=3, strided=False, with_state=True, device="cpu"):
    if strided:
        # a slice of a wider tensor: batch and time strides are not those of a contiguous [B, T, 3D]
        wide = torch.randn(batch, seqlen, 3 * dim + 40, dtype=dtype, device=device)
        bcx = wide[:, :, 16 : 16 + 3 * dim]
    else:
        bcx = torch.randn(batch, seqlen, 3 * dim, dtype=dtype, device=device)
    weight = torch.randn(dim, width, dtype=dtype, device=device) * 0.5
    state = torch.randn(batch, dim, width, device=device).to(dtype) if with_state else None
    return bcx, weight, state


def _check(impl, batch, seqlen, dim, dtype, with_state, strided=False, width=3, bias=False):
    bcx, weight, state = _inputs(batch, seqlen, dim, dtype, width, strided, with_state)
    b = torch.randn(dim, dtype=dtype) if bias else None
    ref_state = state.clone() if state is not None else None
    bcx_before = bcx.clone()
    out = _run(impl, bcx, weight, b, state, poison=True)
    ref = reference.short_conv(bcx, weight, b, ref_state)
    assert_close(out, ref, dtype)
    assert torch.equal(bcx, bcx_before), "bcx must not be modified"
    if state is not None:
        # the state only holds moved (rounded) values of B*x: bit-exact
        assert torch.equal(state, ref_state), "conv_state differs from the reference"


def _case_id(batch, seqlen, dim, dtype):
    return f"B{batch}-T{seqlen}-D{dim}-{dtype_id(dtype)}"


CPU_GRID = [
    (b, t, d, dt)
    for dt in DTYPES
    # 100: 4 channels past 16-bit lines; 124: 8-channel columns and 4 past the lines; 2056: 8 past them
    for d in (64, 100, 124, 2048, 2056)
    for t in (1, 2, 3, 17, 129)
    for b in (1, 3)
]


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
@pytest.mark.parametrize("batch,seqlen,dim,dtype", CPU_GRID, ids=[_case_id(*c) for c in CPU_GRID])
@pytest.mark.parametrize("impl", ["avx512", "avx2", "portable"])
def test_parity_cpu(impl, batch, seqlen, dim, dtype, with_state):
    _check(impl, batch, seqlen, dim, dtype, with_state)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl", ["avx512", "avx2", "portable"])
def test_parity_cpu_long(impl, dtype):
    _check(impl, 2, 1024, 2056, dtype, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("seqlen,dim", [(1, 40), (7, 2056), (9, 264), (513, 2048)], ids=lambda v: str(v))
def test_avx512_equals_avx2_bits(seqlen, dim, dtype):
    """The AVX-512 column does the AVX2 column's operations in the same order per channel: same bits,
    over time-block edges (8 steps), the channel tails that fill no vector, a mask and the state."""
    bcx, weight, state = _inputs(2, seqlen, dim, dtype, 3, True, True)
    mask = torch.ones(2, seqlen, dtype=torch.bool)
    mask[1, : seqlen // 3] = False
    b = torch.randn(dim, dtype=dtype)
    outs = []
    for impl in ("avx512", "avx2"):
        st = state.clone()
        with cpu_isa_path(impl):
            outs.append((lfm_kernels.short_conv(bcx, weight, b, st, mask), st))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


# The interpreter runs every program in Python: the Triton grid keeps all T and D values but fewer combinations.
TRITON_GRID = [
    (b, t, d, dt)
    for dt in DTYPES
    for t in (1, 2, 3, 17, 129)
    for (b, d) in ((1, 64), (3, 100), (1, 2048), (3, 2056))
    if not (t == 129 and d >= 2048 and (dt != torch.bfloat16 or b > 1))
]


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
@pytest.mark.parametrize("batch,seqlen,dim,dtype", TRITON_GRID, ids=[_case_id(*c) for c in TRITON_GRID])
def test_parity_triton(batch, seqlen, dim, dtype, with_state):
    _check("triton", batch, seqlen, dim, dtype, with_state)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("width", [2, 3, 4])
def test_widths_bias_strided(impl, width):
    _check(impl, 3, 17, 72, torch.float32, True, strided=True, width=width, bias=True)
    _check(impl, 2, 5, 72, torch.bfloat16, True, strided=True, width=width, bias=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_strided_state(impl, dtype):
    """conv_state may be a view (e.g. one layer of a [layers, B, D, L] buffer, or transposed storage)."""
    batch, seqlen, dim = 2, 9, 40
    bcx, weight, _ = _inputs(batch, seqlen, dim, dtype)
    store = torch.randn(batch, 3, dim, device="cpu").to(dtype)
    state = store.transpose(1, 2)  # [B, D, L] with non-unit last stride
    ref_state = state.clone()
    out = _run(impl, bcx, weight, None, state)
    ref = reference.short_conv(bcx, weight, None, ref_state)
    assert_close(out, ref, dtype)
    assert torch.equal(state, ref_state)


@pytest.mark.parametrize("impl", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("seqlen,dim", [(1, 2048), (1, 100), (5, 2056), (1, 24)], ids=lambda v: str(v))
def test_model_layouts_give_the_same_bits(impl, dtype, seqlen, dim):
    """The model wrapper's CPU layouts: fp32 taps in [L, D] memory (read in place) and a state in
    [B, L, D] memory (moved in whole vectors) give the bits of contiguous taps and state."""
    bcx, weight, state = _inputs(2, seqlen, dim, dtype)
    bias = torch.randn(dim, dtype=dtype)
    taps = weight.float().t().contiguous().t()
    state_t = state.transpose(1, 2).contiguous().transpose(1, 2)
    assert taps.stride() == (1, dim) and state_t.stride()[1:] == (1, dim)
    out = _run(impl, bcx, taps, bias, state_t, poison=True)
    ref_state = state.clone()
    ref = _run(impl, bcx, weight, bias, ref_state, poison=True)
    assert torch.equal(out, ref)
    assert torch.equal(state_t, ref_state)


@pytest.mark.parametrize("impl", ["avx512", "avx2", "portable"])
def test_state_sharing_the_taps_memory(impl):
    """A state inside the taps' buffer (absurd, but legal) is written while the taps are read: the op
    then converts the taps first instead of reading them in place, and the result is the reference's."""
    dim = 64
    bcx = torch.randn(1, 3, 3 * dim)
    buf = torch.randn(4, dim)  # rows 0-2: taps [L, D]; rows 1-3: the state, [B, L, D] memory
    taps, state = buf[:3].t(), buf[1:].view(1, 3, dim).transpose(1, 2)
    ref_state = state.clone()
    ref = reference.short_conv(bcx, taps.clone(), None, ref_state)
    out = _run(impl, bcx, taps, None, state)
    assert_close(out, ref, torch.float32)
    assert torch.equal(state, ref_state)  # and through it rows 1-2 of the taps


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_chunked_prefill_equals_one_prefill(impl, dtype):
    batch, seqlen, dim = 2, 40, 136
    bcx, weight, _ = _inputs(batch, seqlen, dim, dtype)
    state_once = torch.zeros(batch, dim, 3, dtype=dtype)
    y_once = _run(impl, bcx, weight, None, state_once)
    for split in (1, 2, 17):
        state = torch.zeros(batch, dim, 3, dtype=dtype)
        y1 = _run(impl, bcx[:, :split], weight, None, state)
        y2 = _run(impl, bcx[:, split:], weight, None, state)
        assert torch.equal(state, state_once), f"states differ after a split at {split}"
        assert_close(torch.cat([y1, y2], dim=1), y_once, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_prefill_then_decode_equals_prefill(impl, dtype):
    batch, prompt, steps, dim = 3, 11, 5, 96
    bcx, weight, _ = _inputs(batch, prompt + steps, dim, dtype)
    state_all = torch.zeros(batch, dim, 3, dtype=dtype)
    y_all = _run(impl, bcx, weight, None, state_all)
    state = torch.zeros(batch, dim, 3, dtype=dtype)
    ys = [_run(impl, bcx[:, :prompt], weight, None, state)]
    for t in range(prompt, prompt + steps):
        ys.append(_run(impl, bcx[:, t : t + 1], weight, None, state))
    assert torch.equal(state, state_all)
    assert_close(torch.cat(ys, dim=1), y_all, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_padded_rows_equal_unpadded(impl, dtype):
    """Left padding (transformers' generate) and right padding: each row equals that row run alone."""
    dim, lengths, seqlen = 80, (13, 6, 1), 13
    weight = torch.randn(dim, 3, dtype=dtype) * 0.5
    rows = [torch.randn(1, n, 3 * dim, dtype=dtype) for n in lengths]
    for side in ("left", "right"):
        bcx = torch.randn(len(lengths), seqlen, 3 * dim, dtype=dtype)  # padding positions hold garbage
        mask = torch.zeros(len(lengths), seqlen, dtype=torch.long)
        for i, (row, n) in enumerate(zip(rows, lengths)):
            sl = slice(seqlen - n, seqlen) if side == "left" else slice(0, n)
            bcx[i, sl] = row[0]
            mask[i, sl] = 1
        state = torch.zeros(len(lengths), dim, 3, dtype=dtype)
        y = _run(impl, bcx, weight, None, state, mask)
        for i, (row, n) in enumerate(zip(rows, lengths)):
            sl = slice(seqlen - n, seqlen) if side == "left" else slice(0, n)
            alone_state = torch.zeros(1, dim, 3, dtype=dtype)
            alone = _run(impl, row, weight, None, alone_state)
            assert_close(y[i : i + 1, sl], alone, dtype, what=f"{side}-padded row {i}")
            pad = torch.ones(seqlen, dtype=torch.bool)
            pad[sl] = False
            assert torch.all(y[i, pad] == 0), "padded positions must give y = 0"
            if side == "left":
                assert torch.equal(state[i : i + 1], alone_state), f"state of left-padded row {i}"
        ref_state = torch.zeros(len(lengths), dim, 3, dtype=dtype)
        ref = reference.short_conv(bcx, weight, None, ref_state, mask)
        assert_close(y, ref, dtype)
        assert torch.equal(state, ref_state)


@pytest.mark.parametrize("dim, dtype", [(2048, torch.bfloat16), (1024, torch.float32), (1536, torch.bfloat16)])
def test_prefill_output_is_not_4k_aliased_with_bcx(dim, dtype):
    """A prefill's y starts away, modulo 4 KiB, from the streams of bcx it is written beside (stores
    and loads that share their low 12 address bits stall each other: 1.5x slower at D = 2048 bf16),
    and it is still an ordinary contiguous tensor with the reference's values."""
    if _backend._C is None:
        pytest.fail(f"CPU extension not loaded: {_backend._EXT_ERROR}")
    bcx, weight, _ = _inputs(1, 16, dim, dtype)
    y = lfm_kernels.short_conv(bcx, weight)
    es = bcx.element_size()
    for t in range(15):
        for s in range(3):
            d = (y.data_ptr() + t * dim * es - bcx.data_ptr() - ((t + 1) * 3 * dim + s * dim) * es) % 4096
            assert min(d, 4096 - d) >= 256, (t, s, d)
    assert y.is_contiguous() and y.shape == (1, 16, dim)
    assert_close(y, reference.short_conv(bcx, weight), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_avx2_columns_give_the_same_bits(dtype):
    """The AVX2 path runs whole cache lines of channels (32 16-bit or 16 fp32 ones, in a lane order
    of their own) and 8-channel columns for the rest, promising the same operations per channel: a
    channel's y and state are the same bits whichever column it lands in. Rotating the channels by 8
    moves channels between the two (D = 72: 64 in lines, 8 in a column), over time-block edges, with
    a mask, a bias and the state."""
    dim, seqlen = 72, 19
    bcx, weight, state = _inputs(2, seqlen, dim, dtype, 3, True, True)
    bias = torch.randn(dim, dtype=dtype)
    mask = torch.ones(2, seqlen, dtype=torch.bool)
    mask[1, : seqlen // 3] = False

    def rot(t, dim_index, k):
        return torch.roll(t, k, dims=dim_index)

    def split_roll(x, k):  # roll the channels of each chunk B, C, x of bcx alike
        return torch.cat([rot(c, -1, k) for c in x.chunk(3, dim=-1)], dim=-1)

    outs = []
    for k in (0, 8):
        st = rot(state, 1, k).clone()
        with cpu_isa_path("avx2"):
            y = lfm_kernels.short_conv(split_roll(bcx, k), rot(weight, 0, k), rot(bias, 0, k), st, mask)
        outs.append((rot(y, -1, -k), rot(st, 1, -k)))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


def test_float_mask_and_empty_sequence():
    bcx, weight, state = _inputs(2, 4, 16, torch.float32)
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    ref_state = state.clone()
    out = lfm_kernels.short_conv(bcx, weight, None, state, mask)
    assert_close(out, reference.short_conv(bcx, weight, None, ref_state, mask.bool()))
    assert torch.equal(state, ref_state)
    empty = lfm_kernels.short_conv(bcx[:, :0], weight, None, state)
    assert empty.shape == (2, 0, 16)
    assert torch.equal(state, ref_state), "T = 0 leaves the state unchanged"


def test_opcheck():
    bcx, weight, state = _inputs(2, 5, 24, torch.float32)
    mask = torch.ones(2, 5, dtype=torch.bool)
    torch.library.opcheck(torch.ops.lfm_kernels.short_conv.default, (bcx, weight, None, state, mask))
    torch.library.opcheck(torch.ops.lfm_kernels.short_conv.default, (bcx, weight, torch.randn(24), None, None))


def test_torch_compile():
    bcx, weight, state = _inputs(1, 3, 32, torch.float32)
    ref_state = state.clone()
    compiled = torch.compile(lfm_kernels.short_conv, fullgraph=True, backend="aot_eager")
    out = compiled(bcx, weight, None, state)
    assert_close(out, reference.short_conv(bcx, weight, None, ref_state))
    assert torch.equal(state, ref_state)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("seqlen", [1, 2, 3, 17, 129, 1024])
def test_cuda_parity(seqlen, dtype):
    bcx, weight, state = _inputs(3, seqlen, 2056, dtype, strided=True, device="cuda")
    ref_state = state.clone()
    out = lfm_kernels.short_conv(bcx, weight, None, state)
    ref = reference.short_conv(bcx, weight, None, ref_state)
    assert_close(out, ref, dtype)
    assert torch.equal(state, ref_state)


BAD = [
    ("bcx", lambda: dict(bcx=torch.randn(2, 3 * 8)), ValueError, "bcx must have 3 dimensions"),
    ("bcx", lambda: dict(bcx=torch.randn(2, 4, 25)), ValueError, "divisible by 3"),
    ("bcx", lambda: dict(bcx=torch.randint(0, 5, (2, 4, 24))), TypeError, "bcx must have dtype"),
    ("bcx", lambda: dict(bcx=[1, 2, 3]), TypeError, "bcx must be a torch.Tensor"),
    ("weight", lambda: dict(weight=torch.randn(8, 5)), ValueError, "weight must have shape"),
    ("weight", lambda: dict(weight=torch.randn(8, 1, 3)), ValueError, "weight must have 2 dimensions"),
    ("weight", lambda: dict(weight=torch.randn(7, 3)), ValueError, "weight must have shape"),
    ("bias", lambda: dict(bias=torch.randn(9)), ValueError, "bias must have shape"),
    ("conv_state", lambda: dict(conv_state=torch.randn(2, 8, 2)), ValueError, "conv_state must have shape"),
    ("conv_state", lambda: dict(conv_state=torch.randn(1, 8, 3)), ValueError, "conv_state must have shape"),
    ("conv_state", lambda: dict(conv_state=torch.randn(2, 8, 3, dtype=torch.float64)), TypeError, "conv_state"),
    ("conv_state", lambda: dict(conv_state=torch.randn(2, 8, 3).bfloat16()), TypeError, "conv_state has dtype"),
    ("attention_mask", lambda: dict(attention_mask=torch.ones(2, 5)), ValueError, "attention_mask must have shape"),
    ("attention_mask", lambda: dict(attention_mask=torch.ones(2, 4, 1)), ValueError, "attention_mask must have 2"),
]


@pytest.mark.parametrize("arg,make,exc,match", BAD, ids=[f"{a}-{i}" for i, (a, *_) in enumerate(BAD)])
def test_bad_input(arg, make, exc, match):
    kwargs = dict(bcx=torch.randn(2, 4, 24), weight=torch.randn(8, 3), bias=None, conv_state=None, attention_mask=None)
    kwargs.update(make())
    with pytest.raises(exc, match=match):
        lfm_kernels.short_conv(**kwargs)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_device_mismatch():
    with pytest.raises(ValueError, match="weight is on"):
        lfm_kernels.short_conv(torch.randn(1, 2, 24, device="cuda"), torch.randn(8, 3))


def test_device_mismatch_meta():
    # A second device without a GPU: the meta device still has to be rejected by name.
    with pytest.raises(ValueError, match="conv_state is on"):
        lfm_kernels.short_conv(torch.randn(1, 2, 24), torch.randn(8, 3), None, torch.empty(1, 8, 3, device="meta"))
