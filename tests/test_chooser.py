"""The measured kernel-path choice (lfm_kernels/_chooser.py): what it picks from injected timings,
that a fixed policy overrides it, its cache file per CPU model, its time budget, and the real
measurement on this CPU."""

import json
import time
import warnings

import pytest
import torch

import lfm_kernels
from lfm_kernels import _backend, _chooser, _policy, reference
from lfm_kernels._policy import DEFAULT_POLICY, get_policy, kernel_policy, policy_report, set_policy
from lfm_kernels.ops import linear as linear_mod
from lfm_kernels.ops import moe as moe_mod
from conftest import assert_close


@pytest.fixture
def measured(tmp_path, monkeypatch):
    """The measured mode with a cache in tmp_path; the fixed default policy (conftest's) after."""
    path = tmp_path / "choice.json"

    def use(budget_s=10.0):
        _policy.use_measured_policy(path, budget_s=budget_s)
        return _policy._chooser

    yield path, use
    monkeypatch.setattr(_chooser, "_candidate_hook", None)
    set_policy(DEFAULT_POLICY)


class _Timings:
    """A candidate hook with injected medians: times[route](rows) seconds; counts the timed points."""

    def __init__(self, times):
        self.times, self.points = times, []

    def __call__(self, op, key, n):
        if n == 0:
            return dict.fromkeys(self.times, 0.0)
        self.points.append((key, n))
        return {r: float(f(n)) for r, f in self.times.items()}


def _bf16_linear_args(n=40, k=24, m=2):
    return torch.randn(m, k).to(torch.bfloat16), (torch.randn(n, k) / k**0.5).to(torch.bfloat16)


def _bf16_experts(e=4, h=12, inter=8):
    gu = (torch.randn(e, 2 * inter, h) * 0.1).to(torch.bfloat16)
    dn = (torch.randn(e, h, inter) * 0.1).to(torch.bfloat16)
    return gu, dn


def test_a_fake_slow_path_is_never_chosen(measured, monkeypatch):
    _, use = measured
    # oneDNN 3x slower than our kernel at every row count: no measured count may go to it
    hook = _Timings({"cpp": lambda n: 1e-4 * n, "onednn": lambda n: 3e-4 * n})
    monkeypatch.setattr(_chooser, "_candidate_hook", hook)
    ch = use()
    x, w = _bf16_linear_args()
    p = _policy._policy_for_linear(x, w)
    assert hook.points, "nothing was timed"
    assert p.linear_onednn_min_rows > max(_chooser.LINEAR_LADDER)
    assert ch.sources["linear"] == "measured"

    # MoE: the outer product is the slow one everywhere; the others cross over at 3 and 16 rows
    hook = _Timings({
        "tiled": lambda n: 1e-4 * n,
        "dot": lambda n: 1e-4 + 0.6e-4 * n,
        "outer": lambda n: 1e-2 * n,
        "onednn": lambda n: 8e-4 + 0.1e-4 * n,
    })
    monkeypatch.setattr(_chooser, "_candidate_hook", hook)
    gu, dn = _bf16_experts()
    p = _policy._policy_for_moe(torch.randn(3, 12).to(torch.bfloat16), gu, dn)
    rows = policy_report()["classes"][next(k for k in policy_report()["classes"] if k.startswith("moe"))]["rows"]
    assert rows
    for n in rows:
        route = _chooser.moe_route(n, *p.moe_bf16_routes(), True, True)
        fastest = min(hook.times, key=lambda r: hook.times[r](n))
        assert route != "outer", (n, p)
        assert route == fastest, (n, route, fastest, p)


def test_candidates_are_timed_in_turns(monkeypatch):
    """A machine that is slow for its first runs and fast after (a VM's memory bandwidth flips like
    that): two paths of equal cost must come out equal, which they do not when one path's runs all
    come before the other's."""
    clock, calls = [0.0], []
    monkeypatch.setattr(_chooser.time, "perf_counter", lambda: clock[0])

    def path(name):
        def run():
            calls.append(name)
            clock[0] += 3.0 if len(calls) <= 2 else 1.0
        return run

    medians = _chooser._interleaved_medians({"a": path("a"), "b": path("b")})
    assert medians == {"a": 1.0, "b": 1.0}
    assert calls.count("a") == calls.count("b") == _chooser._REPEATS
    assert calls[:2] in (["a", "b"], ["b", "a"]) and calls[2:4] != calls[:2]  # the order rotates
    assert _chooser._interleaved_medians({}) == {}


def test_the_chosen_thresholds_follow_the_crossovers(measured, monkeypatch):
    _, use = measured
    # our kernel wins below 8 rows, oneDNN from 8 on
    monkeypatch.setattr(_chooser, "_candidate_hook",
                        _Timings({"cpp": lambda n: 1e-4 * n, "onednn": lambda n: 7.5e-4 + 0.05e-4 * n}))
    use()
    x, w = _bf16_linear_args()
    assert _policy._policy_for_linear(x, w).linear_onednn_min_rows == 8
    assert get_policy().linear_onednn_min_rows == 8
    # the op reads the measured threshold (on any CPU: the native-bf16 check is answered "yes")
    monkeypatch.setattr(linear_mod, "cpu_has_native_bf16_gemm", lambda: True)
    assert not linear_mod._use_torch_gemm(torch.randn(7, 24).to(torch.bfloat16), w)
    assert linear_mod._use_torch_gemm(torch.randn(8, 24).to(torch.bfloat16), w)


def test_fp32_weights_hand_off_to_torch_where_it_is_measured_faster(measured, monkeypatch):
    """fp32 weights are their own class (any x dtype): torch's fp32 GEMM from the measured crossover,
    never when it is slower, and never in the bf16 classes' thresholds."""
    _, use = measured
    hook = _Timings({"cpp": lambda n: 1e-4 * n, "torch": lambda n: 7.5e-4 + 0.05e-4 * n})  # crossover at 8
    monkeypatch.setattr(_chooser, "_candidate_hook", hook)
    use()
    w = torch.randn(40, 24)
    p = _policy._policy_for_linear(torch.randn(2, 24).to(torch.bfloat16), w)
    assert p.linear_fp32_torch_min_rows == 16  # the first measured point (4, 16, 64) where torch wins
    assert p.linear_onednn_min_rows == DEFAULT_POLICY.linear_onednn_min_rows
    assert sorted(n for _, n in hook.points) == [4, 16, 64]
    assert all(key.startswith("linear:fp32:") for key, _ in hook.points), hook.points
    assert policy_report()["linear_fp32_source"] == "measured"
    assert not linear_mod._use_torch_gemm(torch.randn(15, 24), w)
    assert linear_mod._use_torch_gemm(torch.randn(16, 24), w)
    assert not linear_mod._use_torch_gemm(torch.randn(64, 24).to(torch.bfloat16), w.to(torch.bfloat16)) or (
        _backend.cpu_has_native_bf16_gemm())

    set_policy(DEFAULT_POLICY)  # the default never hands fp32 off
    assert not linear_mod._use_torch_gemm(torch.randn(512, 24), w)
    with kernel_policy(linear_fp32_torch_min_rows=8, kernel_only=True):
        assert not linear_mod._use_torch_gemm(torch.randn(512, 24), w)


def test_fp32_experts_hand_off_to_torch_where_it_is_measured_faster(measured, monkeypatch):
    """fp32 experts are their own class (any hidden dtype), with their own threshold."""
    _, use = measured
    hook = _Timings({"tiled": lambda n: 1e-4 * n, "torch": lambda n: 1.2e-3 + 0.2e-4 * n})  # crossover at 15
    monkeypatch.setattr(_chooser, "_candidate_hook", hook)
    use()
    gu, dn = torch.randn(4, 64, 24), torch.randn(4, 24, 32)
    p = _policy._policy_for_moe(torch.randn(3, 24).to(torch.bfloat16), gu, dn)
    assert p.moe_fp32_torch_min_rows == 16
    assert p.moe_bf16_routes() == DEFAULT_POLICY.moe_bf16_routes()
    assert all(key.startswith("moe:fp32:") for key, _ in hook.points), hook.points
    assert policy_report()["moe_fp32_source"] == "measured"
    assert moe_mod._fp32_torch_min_rows(torch.randn(3, 24), gu, dn) == 16


def test_fp32_slow_torch_is_never_chosen(measured, monkeypatch):
    _, use = measured
    monkeypatch.setattr(_chooser, "_candidate_hook",
                        _Timings({"cpp": lambda n: 1e-4 * n, "torch": lambda n: 2e-4 * n}))
    use()
    p = _policy._policy_for_linear(torch.randn(5, 24), torch.randn(40, 24))
    assert p.linear_fp32_torch_min_rows > max(_chooser.LINEAR_LADDER)


def test_cached_choice_reports_the_file_without_measuring(measured, monkeypatch):
    """`lfm-kernels info`'s cached choice: the thresholds the file's classes give for this CPU model and
    thread count, the same as a process that meets those classes derives; None for an empty file or
    another thread count; nothing is timed."""
    path, use = measured
    assert _chooser.cached_choice(str(path)) is None
    monkeypatch.setattr(_chooser, "_candidate_hook",
                        _Timings({"cpp": lambda n: 1e-4 * n, "onednn": lambda n: 7.5e-4 + 0.05e-4 * n}))
    use()
    x, w = _bf16_linear_args()
    want = _policy._policy_for_linear(x, w).linear_onednn_min_rows
    assert want == 8
    hook = _Timings({"cpp": lambda n: 1.0, "onednn": lambda n: 1.0})
    monkeypatch.setattr(_chooser, "_candidate_hook", hook)
    got = _chooser.cached_choice(str(path))
    assert not hook.points, "cached_choice must not time anything"
    assert got["thresholds"]["linear_onednn_min_rows"] == want
    assert got["classes"] == [f"linear:bf16:N40:K24:t{torch.get_num_threads()}"]
    old = torch.get_num_threads()
    torch.set_num_threads(old + 1)
    try:
        assert _chooser.cached_choice(str(path)) is None
    finally:
        torch.set_num_threads(old)


def test_a_fixed_policy_overrides_the_measurement(measured, monkeypatch):
    _, use = measured
    hook = _Timings({"cpp": lambda n: 1e-3, "onednn": lambda n: 1e-5})  # oneDNN always "faster"
    monkeypatch.setattr(_chooser, "_candidate_hook", hook)
    use()
    x, w = _bf16_linear_args()
    assert _policy._policy_for_linear(x, w).linear_onednn_min_rows == 1
    set_policy(DEFAULT_POLICY, linear_onednn_min_rows=5)
    x2, w2 = _bf16_linear_args(n=56, k=40)  # a new shape class: it would be measured
    timed = len(hook.points)
    assert _policy._policy_for_linear(x2, w2).linear_onednn_min_rows == 5
    assert len(hook.points) == timed and get_policy().linear_onednn_min_rows == 5
    assert policy_report()["mode"] == "fixed" and policy_report()["linear_source"] == "fixed"
    # kernel_only for a block, then the fixed policy again
    with kernel_policy(kernel_only=True):
        assert not linear_mod._use_torch_gemm(x2, w2)
        assert moe_mod._bf16_routes(torch.randn(8, 12).to(torch.bfloat16), *_bf16_experts()) == (0, 0, 0, 0)
    assert get_policy().linear_onednn_min_rows == 5 and len(hook.points) == timed
    # a block with a fixed policy inside the measured mode: the measured thresholds come back after it
    use()
    assert _policy._policy_for_linear(x, w).linear_onednn_min_rows == 1  # from the cache now
    with kernel_policy(DEFAULT_POLICY):
        assert get_policy() is DEFAULT_POLICY
    assert get_policy().linear_onednn_min_rows == 1 and policy_report()["mode"] == "measured"


def test_choices_are_deterministic_under_a_fixed_policy(measured, monkeypatch):
    """Outputs are bit-identical call after call under a fixed policy, whatever a measurement would say."""
    _, use = measured
    flip = iter(range(10**6))
    hook = _Timings({"cpp": lambda n: 1e-4 * (1 + next(flip) % 2), "onednn": lambda n: 1.5e-4})
    monkeypatch.setattr(_chooser, "_candidate_hook", hook)
    use()
    set_policy(DEFAULT_POLICY)
    x, w = _bf16_linear_args(n=33, k=20, m=5)
    gu, dn = _bf16_experts()
    hidden = torch.randn(9, 12).to(torch.bfloat16)
    wts, ids = lfm_kernels.moe_route(hidden, torch.randn(4, 12), None, 2)
    first = (lfm_kernels.linear(x, w), lfm_kernels.moe_experts(hidden, gu, dn, ids, wts))
    for _ in range(3):
        assert torch.equal(lfm_kernels.linear(x, w), first[0])
        assert torch.equal(lfm_kernels.moe_experts(hidden, gu, dn, ids, wts), first[1])
    assert hook.points == [] and get_policy() is DEFAULT_POLICY


def test_the_cache_is_reused_and_ignored_for_another_cpu_model(measured, monkeypatch):
    path, use = measured
    hook = _Timings({"cpp": lambda n: 1e-4 * n, "onednn": lambda n: 3.5e-4})
    monkeypatch.setattr(_chooser, "_candidate_hook", hook)
    use()
    x, w = _bf16_linear_args()
    assert _policy._policy_for_linear(x, w).linear_onednn_min_rows == 4
    timed = len(hook.points)
    data = json.loads(path.read_text())
    (entry,) = data["machines"].values()
    assert entry["identity"] == _chooser._cpu_identity() and len(entry["classes"]) == 1

    # same CPU model, a new process (a new chooser): read from the file, nothing timed
    ch = use()
    assert _policy._policy_for_linear(x, w).linear_onednn_min_rows == 4
    assert len(hook.points) == timed and ch.sources["linear"] == "cached"
    assert policy_report()["linear_source"] == "cached"

    # another CPU model: its own measurement (the first entry stays in the file)
    other = dict(_chooser._cpu_identity(), cpu="Some Other CPU 9000")
    monkeypatch.setattr(_chooser, "_cpu_identity", lambda: other)
    hook.times["onednn"] = lambda n: 1.5e-4
    ch = use()
    assert _policy._policy_for_linear(x, w).linear_onednn_min_rows == 2
    assert len(hook.points) > timed and ch.sources["linear"] == "measured"
    assert len(json.loads(path.read_text())["machines"]) == 2


@pytest.mark.parametrize("content", ["{not json", '["a list"]', '{"format": 1, "machines": {"x": 3}}',
                                     '{"format": 1, "machines": []}'])
def test_a_corrupt_cache_is_ignored_with_a_warning(measured, monkeypatch, content):
    path, use = measured
    path.write_text(content)
    hook = _Timings({"cpp": lambda n: 1e-4 * n, "onednn": lambda n: 3.5e-4})
    monkeypatch.setattr(_chooser, "_candidate_hook", hook)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        use()
        x, w = _bf16_linear_args()
        assert _policy._policy_for_linear(x, w).linear_onednn_min_rows == 4
    assert hook.points, "the corrupt cache was used instead of measuring"
    if content.startswith("{not") or content.startswith("["):
        assert any("ignoring the kernel-choice cache" in str(c.message) for c in caught), [str(c.message) for c in caught]
    # and replaced by a valid one
    assert json.loads(path.read_text())["format"] == _chooser.CACHE_FORMAT


def test_the_measurement_stays_within_its_budget(measured, monkeypatch):
    _, use = measured
    calls = []

    class FakeClock:  # the candidates "take" exactly their seconds: no scheduler noise on a loaded machine
        now = 0.0

        def perf_counter(self):
            return self.now

    clock = FakeClock()
    monkeypatch.setattr(_chooser, "time", clock)

    def sleeper(seconds):
        def fn():
            calls.append(seconds)
            clock.now += seconds
        return fn

    def hook(op, key, n):  # real (slept) timings, growing with the rows: the ladder cannot all fit
        if n == 0:
            return {"cpp": 0.0, "onednn": 0.0}
        return {"cpp": sleeper(1e-3 * n), "onednn": sleeper(1.2e-3 * n)}

    monkeypatch.setattr(_chooser, "_candidate_hook", hook)
    budget = 0.08
    ch = use(budget_s=budget)
    x, w = _bf16_linear_args()
    t0 = time.perf_counter()
    _policy._policy_for_linear(x, w)
    elapsed = time.perf_counter() - t0
    rows = policy_report()["classes"][next(iter(policy_report()["classes"]))]["rows"]
    assert rows and max(rows) < max(_chooser.LINEAR_LADDER), rows  # cut short by the budget
    assert ch.spent_s <= budget, (ch.spent_s, budget)
    assert sum(calls) <= budget
    assert elapsed < budget + 0.5  # plus the threshold search (no timing)
    # the budget is the process's: a second shape class gets what is left, if anything
    _policy._policy_for_linear(*_bf16_linear_args(n=48, k=16))
    assert ch.spent_s <= budget and sum(calls) <= budget

    # a zero budget times nothing and keeps the defaults
    calls.clear()
    ch = use(budget_s=0)
    _policy._policy_for_linear(*_bf16_linear_args(n=64, k=8))
    assert calls == [] and ch.policy == DEFAULT_POLICY and ch.sources["linear"] == "default"


def test_bad_arguments(measured):
    _, use = measured
    with pytest.raises(ValueError, match="budget_s"):
        use(budget_s=-1)
    with pytest.raises(ValueError, match="budget_s"):
        _policy.use_measured_policy(budget_s=float("nan"))


def test_one_valid_path_times_nothing(measured, monkeypatch):
    """On a CPU without AVX-512 and without native bf16 dot products every bf16 call has one path:
    nothing is timed (fp32 weights are timed everywhere: torch's fp32 GEMM is always a path)."""
    _, use = measured
    monkeypatch.setattr(_backend, "cpu_has_native_bf16_gemm", lambda: False)
    monkeypatch.setattr(_backend._C, "cpu_supports_avx512", lambda: False)
    ch = use()
    x, w = _bf16_linear_args()
    gu, dn = _bf16_experts()
    _policy._policy_for_linear(x, w)
    _policy._policy_for_moe(torch.randn(5, 12).to(torch.bfloat16), gu, dn)
    assert ch.spent_s == 0 and ch.report()["classes"] == {}
    assert set(ch.sources.values()) == {"default"}
    assert ch.policy == DEFAULT_POLICY
    # bf16 x on fp16 weights, fp16 x fp16: no choice either (fp32 weights always have two paths:
    # our kernels and torch's fp32 GEMM)
    monkeypatch.setattr(_backend, "cpu_has_native_bf16_gemm", lambda: True)
    _policy._policy_for_linear(x, w.half())
    _policy._policy_for_linear(x.half(), w.half())
    assert ch.spent_s == 0


def test_real_measurement_on_this_cpu(measured, monkeypatch):
    """The real candidates (our C++ kernels and oneDNN through torch), timed on this CPU with a
    small budget, then the ops' results under the measured policy against the references. On a CPU
    without native bf16 dot products oneDNN is not a path the ops take; it is made one here so the
    measurement runs (its choice is then only used in this test)."""
    if _backend._C is None:
        pytest.fail(f"CPU extension not loaded: {_backend._EXT_ERROR}")
    _, use = measured
    native = _backend.cpu_has_native_bf16_gemm()
    if not native:
        monkeypatch.setattr(_backend, "cpu_has_native_bf16_gemm", lambda: True)
        monkeypatch.setattr(linear_mod, "cpu_has_native_bf16_gemm", lambda: True)
        monkeypatch.setattr(moe_mod, "cpu_has_native_bf16_gemm", lambda: True)
    budget = 2.0  # oneDNN's bf16 GEMM without native bf16 can take 20 ms a call on a busy machine
    ch = use(budget_s=budget)
    x, w = _bf16_linear_args(n=96, k=136, m=5)
    assert_close(lfm_kernels.linear(x, w), reference.linear(x.float(), w.float()), torch.bfloat16)
    gu, dn = _bf16_experts(e=6, h=34, inter=22)
    hidden = torch.randn(17, 34).to(torch.bfloat16)
    wts, ids = lfm_kernels.moe_route(hidden, torch.randn(6, 34), None, 2)
    got = lfm_kernels.moe_experts(hidden, gu, dn, ids, wts)
    assert_close(got, reference.moe_experts(hidden, gu, dn, ids, wts), torch.bfloat16)
    rep = ch.report()
    assert {k.split(":")[0] for k in rep["classes"]} == {"linear", "moe"}, rep
    want = ["tiled", "dot", "outer", "onednn"] if _backend._C.cpu_supports_avx512bf16() else ["tiled", "onednn"]
    assert next(v for k, v in rep["classes"].items() if k.startswith("moe"))["routes"] == want
    assert ch.spent_s <= budget * 1.5, rep  # one point's misprediction at most
    assert rep["linear_source"] == "measured" and rep["moe_source"] == "measured"
    # the measurement draws its inputs from its own generator: the user's random stream is untouched
    xs, ws = _bf16_linear_args(n=24, k=72, m=1)
    ch = use(budget_s=budget)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    lfm_kernels.linear(xs, ws)
    assert torch.equal(torch.rand(3), expected)
    assert any(k.startswith("linear:bf16:N24:K72") for k in ch.report()["classes"])


def test_info_reports_the_thresholds_and_their_source(measured, monkeypatch, capsys):
    from lfm_kernels import cli

    info = lfm_kernels.backend_info()["kernel_policy"]
    assert info["mode"] == "fixed" and info["thresholds"]["linear_onednn_min_rows"] == 3
    _, use = measured
    monkeypatch.setattr(_chooser, "_candidate_hook",
                        _Timings({"cpp": lambda n: 1e-4 * n, "onednn": lambda n: 5.5e-4}))
    use()
    assert lfm_kernels.backend_info()["kernel_policy"]["linear_source"] == "default"
    _policy._policy_for_linear(*_bf16_linear_args())
    rep = lfm_kernels.backend_info()["kernel_policy"]
    assert rep["linear_source"] == "measured" and rep["moe_source"] == "default"
    assert rep["thresholds"]["linear_onednn_min_rows"] == 8
    assert cli.main(["info"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("kernel-path thresholds"))
    assert "linear: measured" in line and "linear_onednn_min_rows=8" in line and "moe: default" in line


def test_bench_forced_quantized_routes_take_effect():
    """The bench's runner-up candidates for quantized weights are the routes forced one by one: the
    AMX-INT8 tiles give the integer kernels' bits, the bf16 GEMM route a bf16 model's (different) bits."""
    from lfm_kernels import _policy as policy_mod
    from lfm_kernels.benchmark import linear as bench_linear, moe as bench_moe
    from lfm_kernels.quant import quantize

    if not policy_mod._quant_gemm_usable():
        pytest.skip("neither AMX nor AVX512-BF16 (oneDNN's native bf16): only the integer-dot route exists here")
    amx = ["amx-int8"] if policy_mod._amx_usable() else []  # the AMX-INT8 tiles need usable AMX
    torch.manual_seed(0)
    e, h, i, k, n = 8, 256, 128, 2, 48
    gu = quantize(torch.randn(e, 2 * i, h) / 16, "q8_0").to_layout("x8")
    dn = quantize(torch.randn(e, h, i) / 16, "q8_0").to_layout("x8")
    inputs = {"hidden": torch.randn(n, h).to(torch.bfloat16), "q_gate_up": gu, "q_down": dn,
              "ids": torch.stack([torch.randperm(e)[:k] for _ in range(n)]), "weights": torch.rand(n, k)}
    paths = bench_moe._forced_quant_experts("q8_0")
    assert sorted(paths) == amx + ["bf16-gemm", "x8"]
    ref = paths["x8"](inputs)
    if amx:
        assert torch.equal(paths["amx-int8"](inputs), ref)
    assert not torch.equal(paths["bf16-gemm"](inputs), ref)
    assert sorted(bench_moe._forced_quant_experts("q4_k")) == ["bf16-gemm", "x8"]
    qw = quantize(torch.randn(64, 256) / 16, "q4_0")
    li = {"x": torch.randn(32, 256).to(torch.bfloat16), "qweight": qw.to_layout("x8"), "qweight_rows": qw}
    lpaths = bench_linear._quant_paths("q4_0", 32)
    lref = lpaths["x8"](li)
    assert torch.equal(lpaths["rows"](li), lref)
    if amx:
        assert torch.equal(lpaths["amx-int8"](li), lref)
    assert not torch.equal(lpaths["bf16-gemm"](li), lref)


@pytest.mark.parametrize("amx, bf16", [(True, True), (False, True), (False, False)],
                         ids=["amx", "avx512bf16-only", "neither"])
def test_quantized_routes_follow_the_cpu(amx, bf16, monkeypatch):
    """Which quantized routes a CPU has: the AMX-INT8 tiles only with usable AMX (Q8_0 / Q4_0 in x8),
    the bf16 GEMM route with AMX or AVX512-BF16, nothing but the integer kernels without either;
    quant_routes under a fixed policy hands out no AMX threshold where AMX is missing."""
    if _backend._C is None:
        pytest.fail(f"CPU extension not loaded: {_backend._EXT_ERROR}")
    monkeypatch.setattr(_backend, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(_backend, "cpu_has_native_bf16_gemm", lambda: bf16)
    expected = {(True, True): ("x8", "amx", "gemm"), (False, True): ("x8", "gemm"), (False, False): ()}[(amx, bf16)]
    assert _chooser._quant_routes_here("linear_quant", "x8") == expected
    assert _chooser._quant_routes_here("moe_kquant", "x8") == tuple(r for r in expected if r != "amx")
    assert _chooser._quant_routes_here("linear_quant", "rows") == tuple(r for r in expected if r != "amx")
    lin, gu, dn = _quant_weights()
    x = torch.randn(32, 64).to(torch.bfloat16)
    with kernel_policy(DEFAULT_POLICY):
        gemm, amx_rows = _policy.quant_routes("linear", x, lin)
        assert gemm == (DEFAULT_POLICY.linear_quant_gemm_min_rows if bf16 else 0)
        assert amx_rows == (DEFAULT_POLICY.linear_quant_amx_min_rows if amx else 0)
        assert _policy.quant_routes("moe", x.new_zeros(4, 256), gu, dn) == (
            DEFAULT_POLICY.moe_kquant_gemm_min_rows if bf16 else 0, 0)
        assert _policy.quant_routes("linear", x.float(), lin) == (0, DEFAULT_POLICY.linear_quant_amx_min_rows if amx else 0)


def test_bench_reports_the_path_and_the_runner_up():
    from lfm_kernels.benchmark import runner
    from lfm_kernels.benchmark.core import Case

    slow = lambda i: time.sleep(0.004)  # noqa: E731
    case = Case(op="linear", name="x", dtype=torch.float32, device="cpu", make_inputs=dict,
                kernel=lambda i: None, baselines={"torch": lambda i: time.sleep(0.002)},
                path=lambda i: "cpp", paths={"cpp": lambda i: None, "onednn": "torch", "other": slow})
    row = {"times_s": {"kernel": 1e-4, "torch": 0.002}, "errors": {}}
    runner._time_paths(case, {}, row, 0.01)
    assert row["path"] == "cpp" and row["runner_up"] == "onednn" and row["runner_up_s"] == 0.002
    assert row["path_times_s"]["other"] >= 0.004
    assert runner._path_cell(row) == "cpp (onednn 2.00 ms)"
    assert runner._path_cell({"path": "tiled"}) == "tiled (only path)"
    assert runner._path_cell({}) == "-"
    assert "path (runner-up)" in runner._HEADERS


def test_the_avx512_gemv_is_chosen_only_where_it_is_faster(measured, monkeypatch):
    """The AVX-512 GEMV exists up to 2 rows: timed there only, and used up to the rows where it won."""
    _, use = measured
    # faster than the AVX2 kernel at 1 row, slower at 2; oneDNN from 4 rows
    hook = _Timings({"avx512": lambda n: 0.5e-4 if n == 1 else 3e-4, "cpp": lambda n: 1e-4 * n,
                     "onednn": lambda n: 3.5e-4 + 0.01e-4 * n})
    monkeypatch.setattr(_chooser, "_candidate_hook", hook)
    ch = use()
    x, w = _bf16_linear_args()
    p = _policy._policy_for_linear(x, w)
    assert (p.linear_avx512_max_rows, p.linear_onednn_min_rows) == (1, 4), p
    key = next(k for k in ch.report()["classes"] if k.startswith("linear"))
    points = ch._classes[key].points
    assert all(("avx512" in pt) == (n <= _chooser.AVX512_GEMV_MAX_ROWS) for n, pt in points.items()), points
    # a fake slow AVX-512 GEMV is never chosen, and one within noise of the AVX2 kernel keeps the default
    assert DEFAULT_POLICY.linear_avx512_max_rows == 0
    monkeypatch.setattr(_chooser, "_candidate_hook",
                        _Timings({"avx512": lambda n: 1e-2, "cpp": lambda n: 1e-4 * n, "onednn": lambda n: 1.0}))
    use(budget_s=10.0)
    x2, w2 = _bf16_linear_args(n=48, k=32)
    assert _policy._policy_for_linear(x2, w2).linear_avx512_max_rows == 0
    assert policy_report()["thresholds"]["linear_avx512_max_rows"] == 0


def test_the_linear_op_follows_the_avx512_threshold(monkeypatch):
    """linear's path at 1-2 rows follows linear_avx512_max_rows (and kernel_only) on an AVX-512 CPU."""
    if not _backend._C.cpu_supports_avx512():
        pytest.skip("needs AVX-512 (F/BW/VL/DQ): this CPU does not have it, so the AVX-512 GEMV cannot run here")
    x, w = _bf16_linear_args()
    dot = "avx512-bf16dot" if _backend._C.cpu_supports_avx512bf16() else "avx512"
    with kernel_policy(DEFAULT_POLICY, linear_avx512_max_rows=2):
        assert linear_mod._linear_path(x[:1], w) == dot and linear_mod._linear_path(x[:2], w) == dot
    with kernel_policy(DEFAULT_POLICY, linear_avx512_max_rows=1):
        assert linear_mod._linear_path(x[:1], w) == dot and linear_mod._linear_path(x[:2], w) == "avx2"
    with kernel_policy(DEFAULT_POLICY, linear_avx512_max_rows=0):
        assert linear_mod._linear_path(x[:1], w) == "avx2"
    with kernel_policy(DEFAULT_POLICY, linear_avx512_max_rows=2, kernel_only=True):
        assert linear_mod._linear_path(x[:1], w) == "avx2"
    with kernel_policy(DEFAULT_POLICY, linear_avx512_max_rows=2):  # fp32 x: the FMA twin, at 1 and 2 rows
        assert linear_mod._linear_path(x[:2].float(), w) == "avx512"
        assert linear_mod._linear_path(x[:1].float(), w) == "avx512"
    with kernel_policy(DEFAULT_POLICY, linear_avx512_max_rows=1):
        assert linear_mod._linear_path(x[:1].float(), w) == "avx512"
        assert linear_mod._linear_path(x[:2].float(), w) == "avx2"


def test_paths_within_noise_keep_the_defaults(measured, monkeypatch):
    """A path 1% faster does not move a threshold (it would flip between runs on a noisy machine)."""
    _, use = measured
    monkeypatch.setattr(_chooser, "_candidate_hook", _Timings(
        {"avx512": lambda n: 0.99e-4 * n, "cpp": lambda n: 1e-4 * n, "onednn": lambda n: 0.995e-4 * n}))
    use()
    x, w = _bf16_linear_args()
    p = _policy._policy_for_linear(x, w)
    assert (p.linear_avx512_max_rows, p.linear_onednn_min_rows) == (
        DEFAULT_POLICY.linear_avx512_max_rows, DEFAULT_POLICY.linear_onednn_min_rows)


def _quant_weights():
    from lfm_kernels import quantize

    lin = quantize(torch.randn(16, 64) / 8, "q8_0").to_layout("x8")
    gu = quantize(torch.randn(4, 32, 256) / 16, "q4_k").to_layout("x8")
    dn = quantize(torch.randn(4, 256, 16 * 16) / 16, "q6_k").to_layout("x8")
    return lin, gu, dn


def test_quantized_routes_follow_the_crossovers(measured, monkeypatch):
    _, use = measured
    # linear (rows 16, 64, 256): AMX-INT8 best at 16, the bf16 GEMM route from 64
    hook = _Timings({"x8": lambda n: 1e-4 * n, "amx": lambda n: 3e-5 * n, "gemm": lambda n: 1e-3 + 1e-6 * n})
    monkeypatch.setattr(_chooser, "_candidate_hook", hook)
    ch = use()
    lin, gu, dn = _quant_weights()
    x = torch.randn(3, 64).to(torch.bfloat16)
    ch.for_quant("linear_quant", x, lin)
    assert ch.policy.linear_quant_amx_min_rows <= 16 and ch.policy.linear_quant_gemm_min_rows == 64
    assert ch.sources["linear_quant"] == "measured"
    assert {k for k, _ in hook.points} == {"linear:quant:q8_0:x8:N16:K64:t%d" % torch.get_num_threads()}
    # K-quant experts (tokens 8..64): the GEMM route from 16 tokens; no AMX route exists for them
    monkeypatch.setattr(_chooser, "_candidate_hook", _Timings(
        {"x8": lambda n: 1e-3 * n, "gemm": lambda n: 1.2e-2 + 1e-4 * n}))
    ch.for_quant("moe_kquant", torch.randn(3, 256).to(torch.bfloat16), gu, dn)
    assert ch.policy.moe_kquant_gemm_min_rows == 16
    assert ch.policy.moe_quant_gemm_min_rows == DEFAULT_POLICY.moe_quant_gemm_min_rows  # another op: untouched


def test_a_rows_layout_weight_does_not_pull_the_x8_thresholds(measured, monkeypatch):
    # The AMX-INT8 tiles run on the x8 layout only: a Q8_0 weight left in GGUF's rows layout takes the
    # integer kernels wherever an x8 one would take AMX. Both layouts in one process (the bench times
    # the rows layout beside x8) must not be scored as if the rows weight could not run at all there:
    # that pushed the AMX threshold up (or the GEMM one down) for every x8 weight. Timings: AMX 1.25x
    # faster than the integer kernels at 16 rows, the GEMM route best from 64.
    _, use = measured
    times = {"x8": lambda n: 1e-4 * n, "amx": lambda n: 0.8e-4 * n, "gemm": lambda n: 3e-3 + 1e-6 * n}

    def hook(op, key, n):
        out = _Timings(times)(op, key, n)
        return {r: t for r, t in out.items() if r != "amx" or ":x8:" in key}  # rows: no AMX route

    monkeypatch.setattr(_chooser, "_candidate_hook", hook)
    ch = use()
    from lfm_kernels import quantize

    rows = quantize(torch.randn(16, 64) / 8, "q8_0")
    x8 = rows.to_layout("x8")
    x = torch.randn(3, 64).to(torch.bfloat16)
    ch.for_quant("linear_quant", x, x8)
    ch.for_quant("linear_quant", x, rows)
    assert {k.split(":")[3] for k in ch.report()["classes"] if k.startswith("linear:quant")} == {"x8", "rows"}
    assert ch.policy.linear_quant_amx_min_rows <= 16 and ch.policy.linear_quant_gemm_min_rows == 64


def test_expert_crossover_between_8_and_16_tokens_is_found(measured, monkeypatch):
    # A 128-token prompt gives the experts 9-25 tokens each: a crossover at ~10 tokens (the Q8_0
    # AMX-INT8 tiles on a Xeon) must not round up to 16, which leaves half the experts on the slower
    # integer kernels. x8 wins at 8 tokens, AMX from 12.
    _, use = measured
    monkeypatch.setattr(_chooser, "_candidate_hook", _Timings(
        {"x8": lambda n: 1e-4 * n, "amx": lambda n: 3e-4 + 7e-5 * n, "gemm": lambda n: 1e-2 + 1e-4 * n}))
    ch = use()
    from lfm_kernels import quantize

    gu = quantize(torch.randn(4, 64, 64) / 8, "q8_0").to_layout("x8")
    dn = quantize(torch.randn(4, 64, 32) / 8, "q8_0").to_layout("x8")
    ch.for_quant("moe_quant", torch.randn(3, 64).to(torch.bfloat16), gu, dn)
    assert ch.policy.moe_quant_amx_min_rows == 12
    assert ch.policy.moe_quant_gemm_min_rows > max(_chooser._LADDERS["moe_quant"])


def test_a_slow_quantized_route_is_never_chosen(measured, monkeypatch):
    _, use = measured
    # the AMX-INT8 tiles and the GEMM route both slower than the integer kernels everywhere
    monkeypatch.setattr(_chooser, "_candidate_hook", _Timings(
        {"x8": lambda n: 1e-5 * n, "amx": lambda n: 3e-5 * n, "gemm": lambda n: 5e-5 * n}))
    ch = use()
    lin, _, _ = _quant_weights()
    ch.for_quant("linear_quant", torch.randn(3, 64).to(torch.bfloat16), lin)
    p = ch.policy
    for n in _chooser._LADDERS["linear_quant"]:
        assert n < p.linear_quant_amx_min_rows and n < p.linear_quant_gemm_min_rows
    # fp32 tokens are never measured (the GEMM route needs bf16 tokens)
    before = len(ch._classes)
    ch.for_quant("linear_quant", torch.randn(3, 64), _quant_weights()[0].to_layout("rows"))
    assert len(ch._classes) == before


def test_the_x8_streams_follow_the_timings(measured, monkeypatch):
    """quant_x8_one_stream_max_rows: timed at one row per format and K on the first bf16 `linear` call
    of an x8 weight, set where one stream was faster, handed to the extension."""
    path, use = measured
    # one stream faster at one row
    hook = _Timings({"x8_one": lambda n: 0.8e-4 if n == 1 else 3e-4, "x8": lambda n: 1e-4 * n})
    monkeypatch.setattr(_chooser, "_candidate_hook", hook)
    ch = use()
    lin, gu, dn = _quant_weights()
    x = torch.randn(1, 64).to(torch.bfloat16)
    _policy.quant_routes("linear", x, lin)
    assert ch.policy.quant_x8_one_stream_max_rows == 1 and _backend._C.x8_one_stream_max_rows() == 1
    assert hook.points == [(f"quant:stream:q8_0:K64:t{torch.get_num_threads()}", 1)]
    assert policy_report()["thresholds"]["quant_x8_one_stream_max_rows"] == 1
    # fp32 x, the rows layout and the experts measure nothing more (one choice serves every x8 call)
    _policy.quant_routes("linear", x.float(), lin)
    _policy.quant_routes("linear", x, lin.to_layout("rows"))
    _policy.quant_routes("moe", torch.randn(1, 256).to(torch.bfloat16), gu, dn)
    assert len(hook.points) == 1
    # a slow single stream is never chosen, one within noise keeps the default
    for one in (lambda n: 1e-3, lambda n: 0.99e-4 * n):
        monkeypatch.setattr(_chooser, "_candidate_hook", _Timings({"x8_one": one, "x8": lambda n: 1e-4 * n}))
        path.unlink()  # measure again, not the timings cached above
        ch = use()
        _policy.quant_routes("linear", x, lin)
        assert ch.policy.quant_x8_one_stream_max_rows == DEFAULT_POLICY.quant_x8_one_stream_max_rows == 0
        assert _backend._C.x8_one_stream_max_rows() == 0
    # a fixed policy overrides the measurement and is handed over as it is
    hook = _Timings({"x8_one": lambda n: 1e-5, "x8": lambda n: 1e-4})
    monkeypatch.setattr(_chooser, "_candidate_hook", hook)
    use()
    with kernel_policy(DEFAULT_POLICY, quant_x8_one_stream_max_rows=2):
        _policy.quant_routes("linear", x, lin)
        assert _backend._C.x8_one_stream_max_rows() == 2
    assert hook.points == []


def test_real_x8_stream_measurement(measured):
    """The real candidates on this CPU: both read a zero weight streamed from memory, the extension's
    setting is the policy's after the measurement, and the result has the same bits either way."""
    if _backend._C is None:
        pytest.fail(f"CPU extension not loaded: {_backend._EXT_ERROR}")
    from lfm_kernels import quantize

    _, use = measured
    lin = quantize(torch.randn(24, 64) / 8, "q4_0").to_layout("x8")
    x = torch.randn(1, 64).to(torch.bfloat16)
    with kernel_policy(DEFAULT_POLICY):
        ref = lfm_kernels.linear(x, lin)
    ch = use(budget_s=5.0)
    out = lfm_kernels.linear(x, lin)
    rep = ch.report()
    key = f"quant:stream:q4_0:K64:t{torch.get_num_threads()}"
    assert key in rep["classes"] and rep["classes"][key]["rows"] == [1], rep
    assert rep["quant_source"] == "measured"
    assert _backend._C.x8_one_stream_max_rows() == ch.policy.quant_x8_one_stream_max_rows in (0, 1)
    assert torch.equal(out, ref)
    assert _chooser._stream_weights == {}  # the streamed weight is dropped after the measurement


def _tiny_quant_model(quant):
    from lfm_kernels.model import LfmModel, config_from_dict
    from lfm_kernels.model.weights import allocate, fill_random

    cfg = config_from_dict(dict(
        model_type="lfm2_moe", vocab_size=300, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        num_dense_layers=1, layer_types=["conv", "full_attention", "conv"],
    ))
    w, _, _ = allocate(cfg, torch.bfloat16, "cpu", quant=quant)
    fill_random(w, cfg, seed=5, progress=False, std=0.2)
    return LfmModel(cfg, w, torch.bfloat16)


@pytest.mark.parametrize("faster", ["interleaved", "one_stream"])
def test_replayed_decode_steps_decide_the_x8_streams(measured, monkeypatch, faster):
    """quant_x8_one_stream_max_rows from whole decode steps: a CPU-graph decode of one sequence times
    its replayed steps under both settings (alternating, 5 each), and that choice overrides the one
    timed on isolated `linear` streams (which said the opposite here), goes into the cache file, and
    changes no bits. A second process reads it from the file without a trial."""
    if not _backend.cpu_extension_available():
        pytest.fail(f"CPU extension not loaded: {_backend._EXT_ERROR}")
    path, use = measured
    isolated = 1 if faster == "interleaved" else 0  # the isolated timings pick the other setting
    monkeypatch.setattr(_chooser, "_candidate_hook", _Timings(
        {"x8_one": lambda n: (0.5e-4 if isolated else 2e-4), "x8": lambda n: 1e-4}))
    seen = []
    record = _chooser.DecodeStreamTrial.record

    def fake_record(self, setting, seconds):  # the step's own time replaced by the injected one
        seen.append((setting, _backend._C.x8_one_stream_max_rows()))
        slow = setting == (1 if faster == "interleaved" else 0)
        record(self, setting, 2e-3 if slow else 1e-3)

    monkeypatch.setattr(_chooser.DecodeStreamTrial, "record", fake_record)
    model = _tiny_quant_model("q4_k_m")
    ids = torch.randint(3, 300, (1, 5), generator=torch.Generator().manual_seed(0))
    with kernel_policy(DEFAULT_POLICY):
        ref = model.generate(ids, 16, temperature=0, repetition_penalty=1.0, eos_token_id=[], cpu_graph=True)
    ch = use()
    out = model.generate(ids, 16, temperature=0, repetition_penalty=1.0, eos_token_id=[], cpu_graph=True)
    assert torch.equal(out, ref), "the trial's settings change no bits"
    assert [s for s, _ in seen] == [0, 1, 1, 0, 0, 1, 1, 0, 0, 1], seen  # ABBA, 5 steps each, then no more
    assert all(s == in_force for s, in_force in seen), "each timed step ran under its own setting"
    want = 0 if faster == "interleaved" else 1
    assert ch.policy.quant_x8_one_stream_max_rows == want and _backend._C.x8_one_stream_max_rows() == want
    key = f"quant:stream-decode:q4_k+q6_k:t{torch.get_num_threads()}"
    rep = ch.report()
    assert rep["classes"][key]["source"] == "measured" and rep["quant_source"] == "measured"
    assert isolated != want and any(k.startswith("quant:stream:") for k in rep["classes"]), rep["classes"]
    assert key in json.loads(path.read_text())["machines"].popitem()[1]["classes"]
    # the next process: from the file, no trial; a batch of two never runs one
    seen.clear()
    ch = use()
    model.generate(ids, 16, temperature=0, repetition_penalty=1.0, eos_token_id=[], cpu_graph=True)
    assert seen == [] and ch.policy.quant_x8_one_stream_max_rows == want
    assert ch.report()["classes"][key]["source"] == "cached"
    assert _policy.decode_stream_trial(("q4_k", "q6_k"), 2) is None


def test_no_decode_trial_under_a_fixed_policy_or_without_x8_weights(measured, monkeypatch):
    _, use = measured
    with kernel_policy(DEFAULT_POLICY):
        assert _policy.decode_stream_trial(("q4_0",), 1) is None
    ch = use()
    assert _policy.decode_stream_trial((), 1) is None
    trial = _policy.decode_stream_trial(("q4_0",), 1)
    assert isinstance(trial, _chooser.DecodeStreamTrial) and ch.decode_stream_trial(("q4_0",)) is trial
