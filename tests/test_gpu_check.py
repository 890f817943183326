"""bench/gpu_check.sh rehearsed on this machine (--dry-run): every step runs, the summary exists, and the
files it would bring back fit the lease's limits (at most 8 files, names of letters, digits, '.', '_',
'-'). Also the MoE tuner's shared-memory filter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(out), PYTHON=sys.executable)
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)
    took = time.perf_counter() - t0
    print(proc.stdout[-4000:])
    print(f"dry run: {took:.0f} s wall")
    files = sorted(p.name for p in out.iterdir())
    assert "summary.md" in files, f"no summary (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
    assert len(files) <= 8, f"more than 8 files to bring back: {files}"
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert all(p.is_file() for p in out.iterdir()), "only plain files come back"
    assert set(files) == {"summary.md", "logs.tgz", "bench.json", "e2e.json", "moe_tune.json", "moe_configs.json"}, (
        f"{files}\n{proc.stdout[-3000:]}")
    summary = (out / "summary.md").read_text()
    for step in ("cuda_tests: ok", "bench: ok", "e2e: ok", "moe_tune: ok"):
        assert step in summary, f"{step!r} missing from the summary:\n{summary}"
    assert proc.returncode == 0, proc.stdout[-3000:]
    import tarfile

    with tarfile.open(out / "logs.tgz") as tar:
        names = tar.getnames()
    assert any(n.endswith("cuda_tests.log") for n in names) and any(n.endswith("cuda_tests.xml") for n in names), names


def test_gpu_check_rejects_unknown_arguments():
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--bogus"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument" in proc.stderr


def test_moe_tune_candidates_fit_shared_memory():
    """gate_up keeps a token tile and two weight tiles per pipeline stage: candidates that need more
    than the 227 KB a block may use on sm_90 are dropped (the one-tile count used to let 24 through)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import moe_tune

    assert moe_tune.SMEM_LIMIT == 227 * 1024
    c = dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3)
    assert moe_tune.smem_bytes(c) == (64 * 64 + 2 * 64 * 256) * 2 * 3
    seen = 0
    for m in (1, 16, 64, 512, 4096):
        for cfg in moe_tune.candidate_configs(m, 32):
            seen += 1
            assert moe_tune.smem_bytes(cfg) <= moe_tune.SMEM_LIMIT, cfg
            gate_up = (cfg["BLOCK_M"] * cfg["BLOCK_K"] + 2 * cfg["BLOCK_K"] * cfg["BLOCK_N"]) * 2 * cfg["num_stages"]
            assert gate_up <= 227 * 1024, cfg
    assert seen > 20
