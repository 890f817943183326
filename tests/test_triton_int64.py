"""64-bit offsets in the Triton kernels: launches whose element offsets pass 2^31.

Each case views a few rows of a buffer of more than 2^31 elements (allocated but never touched as a
whole, so it costs a few pages of memory) with strides that put the last rows past 2^31, runs the
kernel under the Triton interpreter (which computes int32 offsets as the GPU does: they wrap) and
compares with the reference on a compact copy. A wrapped offset reads or writes the wrong address:
a mismatch, or a crash. The cases run in one child process so that a crash fails these tests, not
the whole session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import HAS_TRITON

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = 2**30 + 64  # a stride: index 2 x BIG passes 2^31, and BIG itself still fits in int32
CASES = ("short_conv_batch_stride", "short_conv_time_stride", "short_conv_decode", "short_conv_output",
         "decode_attention_head_stride", "decode_attention_position_stride", "moe_token_stride")


# ----------------------------------------------------------------------------------------- child side


def _huge(n_elems: int, dtype) -> torch.Tensor:
    return torch.empty(n_elems, dtype=dtype)  # virtual memory: only the pages written are backed


def _view(buf, shape, strides, offset=0):
    v = buf.as_strided(shape, strides, offset)
    v.copy_(torch.randn(shape).to(buf.dtype))
    return v


def _rel(out, ref):
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def _case(name):
    from lfm_kernels import reference
    from lfm_kernels.triton.decode_attention import decode_attention_triton
    from lfm_kernels.triton.moe import moe_experts_triton, moe_route_triton
    from lfm_kernels.triton.short_conv import _short_conv_prefill_kernel, short_conv_triton

    dt = torch.bfloat16
    D = 40  # channels: one BLOCK_D tile, with a tail
    if name.startswith("short_conv") and name != "short_conv_output":
        if name == "short_conv_batch_stride":  # bcx rows 2 x BIG apart: batch 2 starts past 2^31
            B, T, strides = 3, 5, (BIG, 3 * D, 1)
        elif name == "short_conv_time_stride":  # time step 2 starts past 2^31 (prefill and state kernels)
            B, T, strides = 1, 3, (3 * BIG, BIG, 1)
        else:  # the decode kernel (T = 1 with a state), batch rows 2 x BIG apart
            B, T, strides = 3, 1, (BIG, 3 * D, 1)
        buf = _huge((B - 1) * strides[0] + (T - 1) * strides[1] + 3 * D, dt)
        bcx = _view(buf, (B, T, 3 * D), strides)
        w = torch.randn(D, 3).to(dt)
        state = torch.randn(B, D, 3).to(dt)
        ref_state = state.clone()
        ref = reference.short_conv(bcx.clone(), w, None, ref_state, None)
        out = torch.full((B, T, D), float("nan"), dtype=dt)
        short_conv_triton(bcx, w, None, state, None, out=out)
        return {"rel_err": _rel(out, ref), "state_equal": bool(torch.equal(state, ref_state)), "tol": 1e-2}
    if name == "short_conv_output":
        # y is [B, T, D] contiguous: (b * T + t) * D passes 2^31 for b = 1 when T * D does. A launch of
        # the first time tile of both rows (T is only a bound here) writes rows 1's first 32 steps there.
        B, T_tile, T = 2, 32, 2**31 // D + 7
        bcx = torch.randn(B, T_tile, 3 * D).to(dt)
        w = torch.randn(D, 3).to(dt)
        state = torch.randn(B, D, 3).to(dt)
        ref = reference.short_conv(bcx, w, None, state.clone(), None)
        y = _huge(T * D + T_tile * D, dt)
        y[: T_tile * D].fill_(float("nan"))
        y[T * D :].fill_(float("nan"))
        _short_conv_prefill_kernel[(B, 1, 1)](
            bcx, w, y, state, y, y, T, D, *bcx.stride(), *state.stride(), 0, 0,
            L=3, HAS_BIAS=False, HAS_STATE=True, HAS_MASK=False, BLOCK_T=T_tile, BLOCK_D=128,
        )
        out = torch.stack([y[: T_tile * D].view(T_tile, D), y[T * D :].view(T_tile, D)])
        return {"rel_err": _rel(out, ref), "tol": 1e-2}
    if name.startswith("decode_attention"):
        B, Hkv, G, S, Dh = 1, 3, 2, 3, 16
        if name == "decode_attention_head_stride":  # KV head 2 starts past 2^31
            strides, v_off = (3 * BIG, BIG, Dh, 1), S * Dh
            size = (Hkv - 1) * BIG + 2 * S * Dh
        else:  # [B, S, H, D] memory seen as [B, H, S, D]: position 2 starts past 2^31
            strides, v_off = (S * BIG, Dh, BIG, 1), Hkv * Dh
            size = (S - 1) * BIG + 2 * Hkv * Dh
        buf = _huge(size, dt)
        k = _view(buf, (B, Hkv, S, Dh), strides)
        v = _view(buf, (B, Hkv, S, Dh), strides, v_off)
        q = torch.randn(B, Hkv * G, Dh).to(dt)
        lens = torch.tensor([S], dtype=torch.int32)
        ref = reference.decode_attention(q, k.clone(), v.clone(), lens, Dh**-0.5)
        out = decode_attention_triton(q, k, v, lens, Dh**-0.5)
        return {"rel_err": _rel(out, ref), "tol": 1e-2}
    if name == "moe_token_stride":  # token 2 starts past 2^31
        N, H, E, I, k = 3, 32, 4, 16, 2
        buf = _huge(2 * BIG + H, dt)
        hidden = _view(buf, (N, H), (BIG, 1))
        gate = torch.randn(E, H).to(dt)
        gate_up = (torch.randn(E, 2 * I, H) * 0.2).to(dt)
        down = (torch.randn(E, H, I) * 0.2).to(dt)
        weights, ids = moe_route_triton(hidden, gate, None, k)
        ref_w, ref_ids = reference.moe_route(hidden.clone(), gate, None, k)
        out = moe_experts_triton(hidden, gate_up, down, ids, weights)
        ref = reference.moe_experts(hidden.clone(), gate_up, down, ref_ids, ref_w)
        return {"rel_err": _rel(out, ref), "ids_equal": bool(torch.equal(ids, ref_ids)), "tol": 1e-2}
    raise ValueError(name)


def _child(names):
    for name in names:
        try:
            res = _case(name)
        except MemoryError as exc:
            res = {"no_memory": str(exc)}
        except RuntimeError as exc:
            if "alloc" in str(exc).lower() or "memory" in str(exc).lower():
                res = {"no_memory": str(exc).splitlines()[0]}
            else:
                raise
        print("RESULT " + json.dumps({"case": name, **res}), flush=True)


# ----------------------------------------------------------------------------------------- test side


@pytest.fixture(scope="module")
def results():
    """case -> its result dict, or {"crashed": ...} for a case during which the child process died
    (the rest then run in a new child)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    got, todo = {}, list(CASES)
    while todo:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *todo],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                r = json.loads(line[len("RESULT "):])
                got[r.pop("case")] = r
        todo = [c for c in todo if c not in got]
        if todo:
            got[todo.pop(0)] = {"crashed": f"rc={proc.returncode}; stderr tail:\n{proc.stderr[-2000:]}"}
    return got


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("case", CASES)
def test_offsets_past_2_31(case, results):
    r = results[case]
    if "crashed" in r:
        pytest.fail(f"{case}: the kernel crashed the process (a wrapped 32-bit offset reads far outside the buffer): {r['crashed']}")
    if "no_memory" in r:
        pytest.skip(f"this machine refused a >4 GiB virtual allocation (untouched, needs overcommit): {r['no_memory']}")
    assert r["rel_err"] < r["tol"], f"{case}: relative error {r['rel_err']:.3g} (a 32-bit offset wrapped?)"
    assert r.get("state_equal", True), f"{case}: conv state differs from the reference"
    assert r.get("ids_equal", True), f"{case}: router ids differ from the reference"


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    _child(sys.argv[1:] or CASES)
