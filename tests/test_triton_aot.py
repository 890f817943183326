"""Every Triton kernel compiles for sm_90 at the launchers' real shapes, without spills and within the
shared memory a block may use (tools/triton_aot_check.py; no GPU needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "triton_aot_check.py")
sys.path.insert(0, os.path.join(ROOT, "tools"))

import triton_aot_check  # noqa: E402


def test_every_kernel_compiles_for_sm90(tmp_path):
    why = triton_aot_check.cuda_backend_missing()
    if why:
        pytest.skip(f"no ahead-of-time compile for sm_90 here: {why}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, never interpret
    out = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, TOOL, "--jobs", "2", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    print(proc.stdout)  # the table, shown with -s or on failure
    if proc.returncode == 2:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, f"ahead-of-time check failed (rc={proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    rows = json.loads(out.read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    want = {
        "_short_conv_prefill_kernel", "_short_conv_state_kernel", "_short_conv_decode_kernel",
        "_moe_router_logits_kernel", "_moe_route_topk_kernel", "_moe_align_kernel", "_moe_gate_up_kernel",
        "_moe_down_kernel", "_moe_combine_kernel", "_add_rms_norm_kernel",
        "_decode_attn_stage1", "_decode_attn_stage2",
    }
    assert want <= kernels, f"kernels never compiled: {sorted(want - kernels)}"
    for dtype in ("bf16", "fp16", "fp32"):
        assert any(r["case"].endswith(dtype) for r in rows), f"no {dtype} case compiled"


def test_check_flags_spills_and_shared_memory():
    ok = {"kernel": "k", "case": "c", "spill_stores": 0, "spill_loads": 0, "shared": 1024}
    assert triton_aot_check.problems(ok) == []
    spill = dict(ok, spill_stores=13820, spill_loads=19972)
    assert any("spills" in p for p in triton_aot_check.problems(spill))
    smem = dict(ok, shared=triton_aot_check.SM90_SMEM_LIMIT + 1)
    assert any("shared memory" in p for p in triton_aot_check.problems(smem))
    err = dict(ok, error="CompilationError: bad")
    assert triton_aot_check.problems(err) == ["CompilationError: bad"]
