"""The kernel-choice policy: its fields, the ways to set it, and that both ops read it."""

import dataclasses

import pytest
import torch

from lfm_kernels import _backend, _policy
from lfm_kernels._policy import DEFAULT_POLICY, KernelPolicy, get_policy, kernel_policy, set_policy
from lfm_kernels.ops import linear as linear_mod
from lfm_kernels.ops import moe as moe_mod


def test_defaults_and_the_cpp_argument_order():
    p = KernelPolicy()
    assert p == DEFAULT_POLICY and not p.kernel_only and not p.portable
    assert p.moe_bf16_routes() == (
        p.moe_bf16_min_rows, p.moe_bf16_outer_min_rows, p.moe_bf16_outer_onednn_min_rows, p.moe_bf16_dot_onednn_min_rows
    )
    assert (p.linear_onednn_min_rows, p.moe_bf16_min_rows, p.moe_bf16_outer_min_rows) == (3, 3, 4)
    assert (p.moe_bf16_outer_onednn_min_rows, p.moe_bf16_dot_onednn_min_rows) == (64, 32)


def test_context_manager_restores_and_nests():
    before = get_policy()
    with kernel_policy(kernel_only=True, moe_bf16_min_rows=5) as p:
        assert get_policy() is p and p.kernel_only and p.moe_bf16_min_rows == 5
        with kernel_policy(linear_onednn_min_rows=7):
            assert get_policy().linear_onednn_min_rows == 7 and get_policy().moe_bf16_min_rows == 5
        assert get_policy() is p
    assert get_policy() is before


def test_set_policy_returns_the_previous_one():
    before = get_policy()
    try:
        previous = set_policy(moe_bf16_outer_onednn_min_rows=100)
        assert previous is before and get_policy().moe_bf16_outer_onednn_min_rows == 100
        set_policy(DEFAULT_POLICY)
        assert get_policy() == DEFAULT_POLICY
    finally:
        set_policy(before)


@pytest.mark.parametrize(
    "changes,exc,name",
    [
        ({"moe_bf16_min_rows": 0}, ValueError, "moe_bf16_min_rows"),
        ({"linear_onednn_min_rows": -1}, ValueError, "linear_onednn_min_rows"),
        ({"moe_bf16_outer_min_rows": 4.0}, TypeError, "moe_bf16_outer_min_rows"),
        ({"moe_bf16_dot_onednn_min_rows": True}, TypeError, "moe_bf16_dot_onednn_min_rows"),
        ({"kernel_only": 1}, TypeError, "kernel_only"),
        ({"no_such_field": 1}, TypeError, "no_such_field"),
    ],
)
def test_bad_fields_name_the_field(changes, exc, name):
    before = get_policy()
    with pytest.raises(exc, match=name):
        set_policy(**changes)
    assert get_policy() is before
    with pytest.raises(TypeError, match="KernelPolicy"):
        set_policy("kernel")


def test_portable_switch_is_the_policy():
    if _backend._C is None:
        pytest.fail(f"CPU extension not loaded: {_backend._EXT_ERROR}")
    before = _backend.cpu_isa()
    with kernel_policy(portable=True):
        assert _backend.cpu_isa() == "portable" and get_policy().portable
        with _backend.force_portable_cpu():
            assert _backend.cpu_isa() == "portable"
        assert _backend.cpu_isa() == "portable"
    assert _backend.cpu_isa() == before and not get_policy().portable


def test_both_ops_read_it():
    x = torch.empty(8, 16, dtype=torch.bfloat16)
    native = _backend.cpu_has_native_bf16_gemm()
    with kernel_policy(DEFAULT_POLICY):
        assert linear_mod._use_torch_gemm(x, x) == native
        assert moe_mod._bf16_routes(x, x) == (DEFAULT_POLICY.moe_bf16_routes() if native else (0, 0, 0, 0))
        with kernel_policy(linear_onednn_min_rows=9, moe_bf16_min_rows=9):
            assert not linear_mod._use_torch_gemm(x, x)
            assert moe_mod._bf16_routes(x, x) == (0, 0, 0, 0)
        with kernel_policy(kernel_only=True):
            assert not linear_mod._use_torch_gemm(x, x)
            assert moe_mod._bf16_routes(x, x) == (0, 0, 0, 0)


def test_a_measured_table_fills_the_same_fields():
    """A chooser that measured other thresholds installs them as data, field by field."""
    measured = {"moe_bf16_min_rows": 2, "moe_bf16_outer_min_rows": 6, "moe_bf16_outer_onednn_min_rows": 96}
    with kernel_policy(KernelPolicy(**measured)) as p:
        assert p.moe_bf16_routes() == (2, 6, 96, DEFAULT_POLICY.moe_bf16_dot_onednn_min_rows)
    assert set(measured) <= {f.name for f in dataclasses.fields(KernelPolicy)}
    assert _policy.__doc__ and "moe_bf16_outer_min_rows" in _policy.__doc__


def test_allow_measuring_raises_the_budget_only_in_the_measured_mode(tmp_path):
    before = get_policy()
    try:
        # a fixed policy (the tests' own) stays fixed: nothing to measure for
        assert _policy.allow_measuring(30.0) is False
        assert get_policy() is before
        _policy.use_measured_policy(tmp_path / "choice.json", budget_s=2.0)
        assert _policy.allow_measuring(30.0) is True
        assert _policy.policy_report()["budget_s"] == 30.0
        assert _policy.allow_measuring(1.0) is True  # never lowered
        assert _policy.policy_report()["budget_s"] == 30.0
    finally:
        set_policy(before)


def test_route_token_changes_with_every_policy_change(tmp_path):
    """Cached routes (the public quantized `linear`) are valid while the token is the same: every way
    to change the policy gives a new one, a call under an unchanged policy keeps it."""
    saved = get_policy()
    try:
        set_policy(DEFAULT_POLICY)
        t0 = _policy.route_token()
        assert _policy.same_route_token(t0, _policy.route_token())
        with kernel_policy(DEFAULT_POLICY):  # the very same policy: the same routes
            assert _policy.same_route_token(t0, _policy.route_token())
        with kernel_policy(DEFAULT_POLICY, linear_onednn_min_rows=DEFAULT_POLICY.linear_onednn_min_rows + 1):
            assert not _policy.same_route_token(t0, _policy.route_token())
        assert _policy.same_route_token(t0, _policy.route_token())
        _policy.use_measured_policy(tmp_path / "choices.json", budget_s=0.0)
        t1 = _policy.route_token()
        assert not _policy.same_route_token(t0, t1)
        set_policy(DEFAULT_POLICY)
        assert not _policy.same_route_token(t1, _policy.route_token())
    finally:
        set_policy(saved)


@pytest.mark.skipif(_backend._C is None, reason="needs the compiled CPU extension")
def test_public_quantized_linear_caches_routes_boundedly():
    from lfm_kernels import linear, quantize
    from lfm_kernels import quant

    w = quantize(torch.randn(16, 64), "q4_0").to_layout("x8")
    with kernel_policy(DEFAULT_POLICY):
        ref = [linear(torch.ones(m, 64), w) for m in (1, 2)]
        for m in range(1, quant._PUBLIC_CALLS_MAX + 40):  # more row counts than the cache holds
            linear(torch.ones(m, 64), w)
        assert 0 < len(quant._PUBLIC_CALLS) <= quant._PUBLIC_CALLS_MAX
        # cached or not, the same call: the same bits (3-D x takes the reshaping path)
        assert torch.equal(linear(torch.ones(1, 64), w), ref[0])
        assert torch.equal(linear(torch.ones(1, 2, 64), w)[0], ref[1])
