"""Edge cases around the kernels: NaN propagation in decode attention on every CPU path, in-place
conv states that overlap, the ops' missing autograd, meta tensors, generate's argument checks and
state allocation, and one model shared by threads."""

import importlib
import sys
import threading

import pytest
import torch
from conftest import HAS_TRITON, call_triton, cpu_isa_path, rel_err

import lfm_kernels
from lfm_kernels import _backend, reference
from lfm_kernels.model import LfmModel, allocate, config_from_dict, fill_random

needs_ext = pytest.mark.skipif(not _backend.cpu_extension_available(), reason="the compiled CPU extension did not load")


def _cpu_paths():
    """(name, context) for every CPU path this machine can run; a missing ISA is a visible skip."""
    paths = [pytest.param("reference", id="reference")]
    if _backend.cpu_extension_available():
        paths.append(pytest.param("portable", id="portable"))
        has_avx2 = bool(_backend._C.cpu_supports_avx2())
        has_avx512 = bool(_backend._C.cpu_supports_avx512())
        paths.append(pytest.param("avx2", id="avx2", marks=pytest.mark.skipif(not has_avx2, reason="CPU has no AVX2+FMA")))
        paths.append(pytest.param("avx512", id="avx512", marks=pytest.mark.skipif(
            not has_avx512, reason="needs AVX-512 (F/BW/VL/DQ): this CPU does not have it")))
    else:
        paths.append(pytest.param("portable", id="portable", marks=pytest.mark.skip(reason="no compiled extension")))
    return paths


def _run_path(path, fn):
    if path == "reference":
        return fn(reference)
    with cpu_isa_path(path):
        return fn(lfm_kernels)


# ----------------------------------------------------------------------------- NaN in decode attention
def _attn_inputs(dtype, B=2, Hq=8, Hkv=2, S=700, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    lens = torch.tensor([S, S // 2 + 3][:B], dtype=torch.int64)
    return q, k, v, lens


def _check_same_nans(out, ref, tol):
    assert torch.equal(out.isnan(), ref.isnan()), (
        f"NaN pattern differs: kernel {int(out.isnan().sum())} NaNs, reference {int(ref.isnan().sum())}"
    )
    ok = ~ref.isnan()
    if ok.any():
        assert rel_err(out[ok], ref[ok]) < tol


@pytest.mark.parametrize("path", _cpu_paths())
@pytest.mark.parametrize("D", [64, 128, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", ["k-first-block", "k-late", "q-one-head", "v", "k-past-len"])
def test_decode_attention_nan_in_gives_nan_out_on_every_path(path, D, dtype, where):
    """A NaN in q, K or V gives NaN in exactly the outputs the reference makes NaN (the AVX2 fast exp
    used to clamp NaN scores to exp(-87), as if the position were dropped), also across split-KV
    merges (S = 700 splits); a NaN past seq_lens is never read."""
    q, k, v, lens = _attn_inputs(dtype, D=D)
    if where == "k-first-block":
        k[0, 1, 5, 3] = float("nan")
    elif where == "k-late":
        k[1, 0, 300, D - 1] = float("nan")  # inside row 1's length (353)
    elif where == "q-one-head":
        q[0, 6, 2] = float("nan")
    elif where == "v":
        v[0, 0, 650, 0] = float("nan")
    else:
        k[1, 1, 400, 0] = float("nan")  # row 1 attends to 353 positions: never read
    ref = reference.decode_attention(q, k, v, lens, D**-0.5)
    assert ref.isnan().any() == (where != "k-past-len")
    out = _run_path(path, lambda m: m.decode_attention(q, k, v, lens, D**-0.5))
    _check_same_nans(out.float(), ref.float(), 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("where", ["k-first-block", "v", "k-past-len"])
def test_decode_attention_triton_nan_in_gives_nan_out(where):
    """The Triton kernel's split merge used to treat a NaN row sum as an empty split (`l > 0`)."""
    from lfm_kernels.triton.decode_attention import decode_attention_triton

    q, k, v, lens = _attn_inputs(torch.float32, D=64, S=300)
    if where == "k-first-block":
        k[0, 1, 5, 3] = float("nan")
    elif where == "v":
        v[0, 0, 250, 0] = float("nan")
    else:
        k[1, 1, 200, 0] = float("nan")  # row 1 attends to 153 positions: never read
    ref = reference.decode_attention(q, k, v, lens, 64**-0.5)
    assert ref.isnan().any() == (where != "k-past-len")
    out = call_triton(decode_attention_triton, q, k, v, lens, 64**-0.5, num_splits=2)
    _check_same_nans(out.float(), ref.float(), 1e-5)


@pytest.mark.parametrize("path", _cpu_paths())
@pytest.mark.parametrize("D", [64, 40])
def test_decode_attention_minus_inf_scores_match_the_reference(path, D):
    """Scores of -inf (an -inf key) in a whole first block are exact zeros of the softmax, not
    -inf - -inf = NaN; a row whose every score is -inf is 0/0 = NaN, as in the reference."""
    q, k, v, lens = _attn_inputs(torch.float32, D=D, S=300)
    q[:, :, 0] = q[:, :, 0].abs() + 0.5
    k[0, 0, :100, 0] = float("-inf")  # row 0, KV head 0: the first 100 positions score -inf
    k[1, 1, :, 0] = float("-inf")  # row 1, KV head 1: every position scores -inf
    ref = reference.decode_attention(q, k, v, lens, D**-0.5)
    assert not ref[0].isnan().any() and ref[1, 4:].isnan().all()
    out = _run_path(path, lambda m: m.decode_attention(q, k, v, lens, D**-0.5))
    _check_same_nans(out, ref, 1e-5)


def test_decode_attention_meta_tensors_infer_the_shape():
    q = torch.empty(3, 8, 64, device="meta", dtype=torch.bfloat16)
    k = torch.empty(3, 2, 100, 64, device="meta", dtype=torch.bfloat16)
    lens = torch.empty(3, dtype=torch.int64, device="meta")
    out = lfm_kernels.decode_attention(q, k, k, lens, 0.125)
    assert out.device.type == "meta" and out.shape == (3, 8, 64) and out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="k_cache"):  # shape checks still run on meta tensors
        lfm_kernels.decode_attention(q, k[:, :, :, :32], k, lens, 0.125)


# ----------------------------------------------------------------------------- overlapping conv state
def _conv_inputs(B=3, T=2, D=40, L=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 3 * D, generator=g), torch.randn(D, L, generator=g)


@pytest.mark.parametrize("path", ["eager-fast-path", "custom-op", "no-extension"])
def test_short_conv_refuses_an_overlapping_conv_state(path, monkeypatch):
    """An expanded (stride-0) state would have every row write one shared history: refused, as torch's
    in-place ops refuse such tensors; so is a state inside bcx. The C++ op checks on the CPU paths,
    the Python function where no C++ op runs."""
    if path != "eager-fast-path":
        monkeypatch.setattr(_backend, "eager_cpu_fast_path", lambda t: False)
    if path == "no-extension":
        monkeypatch.setattr(_backend, "cpu_extension_available", lambda: False)
    elif not _backend.cpu_extension_available():
        pytest.skip("the compiled CPU extension did not load")
    bcx, w = _conv_inputs()
    expanded = torch.randn(1, 40, 3).expand(3, 40, 3)
    with pytest.raises(ValueError, match="conv_state has overlapping elements"):
        lfm_kernels.short_conv(bcx, w, None, expanded)
    broadcast_channels = torch.randn(3, 1, 3).expand(3, 40, 3)
    with pytest.raises(ValueError, match="conv_state has overlapping elements"):
        lfm_kernels.short_conv(bcx, w, None, broadcast_channels)
    buf = torch.randn(3 * 40 * 3 + 3 * 2 * 120)
    bcx_in = buf[360:].view(3, 2, 120)
    with pytest.raises(ValueError, match="conv_state shares memory with bcx"):
        lfm_kernels.short_conv(bcx_in, w, None, buf[300:660].view(3, 40, 3))
    # a distinct, strided state (every other channel of a larger buffer) is fine
    big = torch.randn(3, 80, 3)
    st = big[:, ::2]
    ref_state = st.clone()
    y = lfm_kernels.short_conv(bcx, w, None, st)
    y_ref = reference.short_conv(bcx, w, None, ref_state)
    assert rel_err(y, y_ref) < 1e-5 and torch.equal(st, ref_state)


@needs_ext
def test_short_conv_cpp_op_refuses_overlap_and_an_out_that_aliases_the_state():
    op = torch.ops.lfm_kernels_cpu.short_conv
    bcx, w = _conv_inputs()
    with pytest.raises(ValueError, match="conv_state has overlapping elements"):
        op(bcx, w, None, torch.randn(1, 40, 3).expand(3, 40, 3), None, None)
    buf = torch.randn(3 * 2 * 40 + 3 * 40 * 3)
    out, state = buf[:240].view(3, 2, 40), buf[120:480].view(3, 40, 3)  # overlapping ranges
    with pytest.raises(ValueError, match="out shares memory with conv_state"):
        op(bcx, w, None, state, None, out)
    with pytest.raises(ValueError, match="out shares memory with bcx"):
        op(bcx, w, None, None, None, bcx.view(-1)[:240].view(3, 2, 40))
    state = torch.ones(3, 40, 3)
    mask = state.view(-1).view(torch.uint8)[:6].view(3, 2)  # the state's first bytes read as a mask
    with pytest.raises(ValueError, match="conv_state shares memory with attention_mask"):
        op(bcx, w, None, state, mask, None)


# ----------------------------------------------------------------------------- no autograd
def _op_calls():
    g = torch.Generator().manual_seed(1)
    N, H, E, I, k = 3, 16, 4, 8, 2
    hidden = torch.randn(N, H, generator=g)
    gate = torch.randn(E, H, generator=g)
    bias = torch.randn(E, generator=g)
    gup = torch.randn(E, 2 * I, H, generator=g) * 0.2
    down = torch.randn(E, H, I, generator=g) * 0.2
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]])
    wts = torch.rand(N, k, generator=g)
    bcx, cw = _conv_inputs()
    q, kc, vc, lens = _attn_inputs(torch.float32, S=20)
    return {
        "short_conv": (lfm_kernels.short_conv, [bcx, cw], 0),
        "moe_route": (lfm_kernels.moe_route, [hidden, gate, bias, k], 0),
        "moe_experts": (lfm_kernels.moe_experts, [hidden, gup, down, ids, wts], 1),
        "moe": (lfm_kernels.moe, [hidden, gate, bias, gup, down, k], 0),
        "decode_attention": (lfm_kernels.decode_attention, [q, kc, vc, lens, 0.125], 2),
        "linear": (lfm_kernels.linear, [hidden, gate], 1),
    }


@pytest.mark.parametrize("custom_op", [False, True], ids=["eager-fast-path", "custom-op"])
@pytest.mark.parametrize("name", ["short_conv", "moe_route", "moe_experts", "moe", "decode_attention", "linear"])
def test_ops_refuse_inputs_that_require_grad(name, custom_op, monkeypatch):
    """No op has an autograd formula: with grad mode on and an input that requires grad, every op
    raises the same error on every path (the eager CPU path used to return a result whose backward
    gave None gradients). Under no_grad / inference_mode the same call runs."""
    if custom_op:
        monkeypatch.setattr(_backend, "eager_cpu_fast_path", lambda t: False)
    fn, args, which = _op_calls()[name]
    args = list(args)
    args[which] = args[which].clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match=f"lfm_kernels.{name} has no autograd"):
        fn(*args)
    with torch.no_grad():
        fn(*args)
    with torch.inference_mode():
        fn(*args)


# ----------------------------------------------------------------------------- generate
_TINY = dict(
    model_type="lfm2_moe", vocab_size=37, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
    num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
    num_dense_layers=1, layer_types=["conv", "full_attention", "conv"],
)


def _tiny(**over):
    d = dict(_TINY)
    d.update(over)
    cfg = config_from_dict(d)
    weights, _, _ = allocate(cfg, torch.float32)
    fill_random(weights, cfg, seed=0, progress=False, std=0.3)
    return LfmModel(cfg, weights, torch.float32)


@pytest.fixture(scope="module")
def tiny():
    return _tiny(max_position_embeddings=10**6)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(inputs=torch.empty(1, 0, dtype=torch.int64)), ValueError, "empty"),
        (dict(inputs=torch.empty(0, dtype=torch.int64)), ValueError, "empty"),
        (dict(inputs=torch.empty(0, 5, dtype=torch.int64)), ValueError, "batch of 0"),
        (dict(inputs=[]), ValueError, "batch of 0"),
        (dict(inputs=[[]]), ValueError, "empty"),
        (dict(inputs=[[1, 2], [3, 40]]), ValueError, "outside the model's vocabulary"),
        (dict(inputs=[[1, 2.5]]), TypeError, "inputs"),
        (dict(inputs=torch.tensor([[True, False]])), ValueError, "integer tensor"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature="hot"), TypeError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(repetition_penalty=float("nan")), ValueError, "repetition_penalty"),
        (dict(repetition_penalty=float("inf")), ValueError, "repetition_penalty"),
        (dict(top_p=float("nan")), ValueError, "top_p"),
        (dict(top_k=2.5), TypeError, "top_k"),
        (dict(top_k="5"), TypeError, "top_k"),
        (dict(max_new_tokens=True), TypeError, "max_new_tokens"),
        (dict(max_new_tokens=2.0), TypeError, "max_new_tokens"),
        (dict(eos_token_id="12"), TypeError, "eos_token_id"),
        (dict(eos_token_id=[1, "2"]), TypeError, "eos_token_id"),
        (dict(eos_token_id=-1), ValueError, "eos_token_id"),
        (dict(seed="0"), TypeError, "seed"),
        (dict(callback=3), TypeError, "callback"),
    ],
)
def test_generate_argument_checks_name_the_argument(tiny, kwargs, exc, match):
    kw = dict(inputs=[[1, 2, 3]], max_new_tokens=2)
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        tiny.generate(kw.pop("inputs"), **kw)


class _BigTokenizer:
    """A tokenizer whose vocabulary is larger than the model's."""

    eos_token_id = None

    def encode(self, text, add_special_tokens=True):
        return [] if not text else [1, 500]

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def test_generate_text_prompt_checks(monkeypatch):
    model = _tiny()
    model.tokenizer = _BigTokenizer()
    with pytest.raises(ValueError, match="prompt 0 is empty text"):
        model.generate("", 2)
    with pytest.raises(ValueError, match="prompt 1 is empty text"):
        model.generate(["a", ""], 2)
    with pytest.raises(ValueError, match=r"prompt 0: the tokenizer gave token ids outside the model's vocabulary \[0, 37\): \[500\]"):
        model.generate("hello", 2)


def test_generate_allocates_what_it_uses_not_max_new_tokens(tiny, monkeypatch):
    """max_new_tokens=800000 for an answer that stops at once must not allocate 800000 positions: the
    state starts with room for 256 new tokens and doubles as generation goes on."""
    sizes = []
    orig = LfmModel.new_state

    def spy(self, batch, max_len):
        sizes.append(max_len)
        return orig(self, batch, max_len)

    monkeypatch.setattr(LfmModel, "new_state", spy)
    ids = torch.randint(0, 37, (1, 5))
    first = tiny.generate(ids, 1, temperature=0, eos_token_id=[])[0, 0].item()
    out = tiny.generate(ids, 800_000, temperature=0, eos_token_id=[first])
    assert out.tolist() == [[first]]
    assert sizes[-1] <= 5 + 256 + 63, f"state allocated for {sizes[-1]} positions"  # rounded up to 64


def test_generate_grows_the_state_with_identical_tokens(monkeypatch):
    """Growing the state (doubling from 4 new-token positions here) gives exactly the tokens a state
    allocated up front gives, greedy and sampled."""
    gen_mod = importlib.import_module("lfm_kernels.model.generate")

    model = _tiny(max_position_embeddings=4096)
    prompts = [torch.randint(0, 37, (7,)).tolist(), torch.randint(0, 37, (3,)).tolist()]
    kw = dict(eos_token_id=[], repetition_penalty=1.1)
    whole_greedy = model.generate(prompts, 40, temperature=0, **kw)
    whole_sampled = model.generate(prompts, 40, temperature=1.0, top_k=10, seed=3, **kw)
    monkeypatch.setattr(gen_mod, "_INITIAL_ROOM", 4)
    assert torch.equal(model.generate(prompts, 40, temperature=0, **kw), whole_greedy)
    assert torch.equal(model.generate(prompts, 40, temperature=1.0, top_k=10, seed=3, **kw), whole_sampled)


def test_generate_stops_at_the_model_context():
    """Prompt + new tokens never pass max_position_embeddings: generation ends there (it used to be a
    ValueError before any token); a prompt that fills the context is a ValueError naming inputs."""
    model = _tiny(max_position_embeddings=32)
    out = model.generate([list(range(1, 11))], 1000, temperature=0, eos_token_id=[])
    assert out.shape == (1, 22)
    with pytest.raises(ValueError, match="inputs: the longest prompt has 32 tokens"):
        model.generate([[1] * 32], 4, temperature=0)


# ----------------------------------------------------------------------------- threads
def test_rope_tables_are_swapped_atomically_between_threads():
    """Two threads growing one model's RoPE tables: every caller gets a cos and a sin of the same
    length, at least the length it asked for (cos and sin used to be swapped one after the other)."""
    model = _tiny(max_position_embeddings=10**6)
    errors = []
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def worker(offset):
        try:
            for n in range(1 + offset, 1500, 2):
                cos, sin = model._rope_tables(n)
                if cos.shape != sin.shape or cos.shape[0] < n:
                    errors.append((n, tuple(cos.shape), tuple(sin.shape)))
                    return
                cos[n - 1], sin[n - 1]  # noqa: B018 - the indexing that failed with IndexError
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    try:
        for _ in range(3):
            model._rope = None
            threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[:3]


def test_one_model_generates_from_two_threads(monkeypatch):
    """Concurrent generate calls on one model (each growing its state, and the shared RoPE tables)
    give each thread the tokens it gets alone."""
    monkeypatch.setattr(importlib.import_module("lfm_kernels.model.generate"), "_INITIAL_ROOM", 2)
    model = _tiny(max_position_embeddings=10**6)
    prompts = [torch.randint(0, 37, (1, 5)) for _ in range(2)]
    alone = [model.generate(p, 60, temperature=0, eos_token_id=[]) for p in prompts]
    model._rope = None
    results = [None, None]

    def run(i):
        results[i] = model.generate(prompts[i], 60, temperature=0, eos_token_id=[])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, a) for r, a in zip(results, alone))
