#!/usr/bin/env python3
"""Compile every Triton kernel ahead of time for sm_90 (H100/H200) without a GPU, and check it.

The launchers themselves run (lfm_kernels.triton.*), on meta tensors of the real shapes, with a stub
driver that reports an sm_90 target: every `kernel[grid](...)` they issue is compiled, not launched,
with exactly the signature, specialisations, constexprs, num_warps and num_stages a GPU run would
use. ptxas (from the Triton wheel) reports each kernel's registers, spills and stack frame; Triton's
metadata its shared memory. The check fails on a compile error, on spills above MAX_SPILL_BYTES or
on shared memory over the 227 KB a block may use on sm_90, and prints one table row per compiled
kernel.

    python tools/triton_aot_check.py              # every case; exit 1 on a failure, 2 if no CUDA backend
    python tools/triton_aot_check.py --quick      # one dtype (bf16) only
    python tools/triton_aot_check.py --dtypes fp32 --json r.json
    python tools/triton_aot_check.py --jobs 2     # the dtypes split over two processes

Shapes (LFM2.5-8B-A1B): short conv D=2048 at T=1 (decode) and T=512 (prefill), batch 1 and 64;
MoE E=32, H=2048, I=1792, top-4 at 1, 16 and 512 tokens with the configs the launcher picks (the
shipped table, and the fp32 table for fp32); decode attention 32/8 heads, D=64, contexts 1k to 128k
at batch 1 and 64; in bf16, fp16 and fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

SM90_SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
MAX_SPILL_BYTES = 0  # every kernel compiles without spills today; any spill is a regression
TARGET = ("cuda", 90, 32)


def cuda_backend_missing() -> str | None:
    """None when this Triton can compile for NVIDIA GPUs here, else why not."""
    try:
        import triton  # noqa: F401
        from triton.backends import backends
    except Exception as exc:  # noqa: BLE001
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if "nvidia" not in backends:
        return f"this Triton has no NVIDIA backend (backends: {sorted(backends)})"
    try:
        from triton import knobs

        ptxas = knobs.nvidia.ptxas.path
    except Exception as exc:  # noqa: BLE001
        return f"Triton's ptxas was not found ({type(exc).__name__}: {exc})"
    if not ptxas or not os.path.exists(ptxas):
        return f"Triton's ptxas was not found ({ptxas!r})"
    return None


class _StubDriver:
    """What JITFunction.run asks the active driver for, answered for an sm_90 device that is not there."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget(*TARGET)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


class _Recorder:
    """Compiles (never launches) every kernel[grid](...) call and keeps one row per compiled kernel."""

    def __init__(self):
        self.rows: list[dict] = []
        self._seen: dict[int, dict] = {}
        self.case = ""

    def launch(self, fn, grid, args, kwargs):
        buf = io.StringIO()
        row = {"kernel": fn.fn.__name__, "case": self.case, "grid": list(grid) if not callable(grid) else None}
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(buf):
                compiled = fn.run(*args, grid=grid, warmup=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a compile error is a finding, reported in the table
            row.update(error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}")
            self.rows.append(row)
            return
        first = self._seen.get(id(compiled))
        if first is not None:  # the same specialisation as an earlier launch: same binary
            return
        log = buf.getvalue()
        md = compiled.metadata
        stats = {
            "num_warps": md.num_warps,
            "num_stages": md.num_stages,
            "shared": md.shared,
            "regs": _int(_RE_REGS, log, 1),
            "stack": _int(_RE_SPILL, log, 1),
            "spill_stores": _int(_RE_SPILL, log, 2),
            "spill_loads": _int(_RE_SPILL, log, 3),
            "compile_s": round(time.perf_counter() - t0, 2),
        }
        if stats["regs"] is None:
            stats["error"] = "no ptxas report captured (was the kernel found in a cache?)"
        row.update(stats)
        self._seen[id(compiled)] = row
        self.rows.append(row)


def _int(rx, text, group):
    m = rx.search(text)
    return int(m.group(group)) if m else None


@contextlib.contextmanager
def _aot_mode(recorder: _Recorder):
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    saved_getitem = JITFunction.__getitem__
    saved_dump, saved_cache = knobs.nvidia.dump_ptxas_log, knobs.cache.dir
    saved_driver = driver._active  # None until first use; reset_active() would fail without a GPU
    with tempfile.TemporaryDirectory(prefix="lfmk-aot-") as cache:
        knobs.nvidia.dump_ptxas_log = True  # Triton runs ptxas -v; this prints its report (captured)
        knobs.cache.dir = cache  # a fresh cache: every kernel really compiles and reports
        driver.set_active(_StubDriver())
        JITFunction.__getitem__ = lambda self, grid: (lambda *a, **k: recorder.launch(self, grid, a, k))
        try:
            yield
        finally:
            JITFunction.__getitem__ = saved_getitem
            knobs.nvidia.dump_ptxas_log, knobs.cache.dir = saved_dump, saved_cache
            driver._active = saved_driver


# ------------------------------------------------------------------------------------------- the cases

H, E, I, TOP_K = 2048, 32, 1792, 4
HQ, HKV, HEAD_D = 32, 8, 64


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def cases(dtypes):
    """(name, callable) pairs: each calls a launcher the way the ops layer does, on meta tensors."""
    from lfm_kernels.triton.decode_attention import decode_attention_triton
    from lfm_kernels.triton.moe import moe_experts_triton, moe_route_triton
    from lfm_kernels.triton.rms_norm import add_rms_norm_triton
    from lfm_kernels.triton.short_conv import short_conv_triton

    out = []
    for dt in dtypes:
        name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dt]
        for batch in (1, 64):
            for seqlen in (1, 512):
                out.append((
                    f"short_conv B={batch} T={seqlen} {name}",
                    lambda b=batch, t=seqlen, d=dt: short_conv_triton(
                        _meta(b, t, 3 * H, dtype=d), _meta(H, 3, dtype=d), None, _meta(b, H, 3, dtype=d), None),
                ))
        out.append((
            f"short_conv B=4 T=512 masked {name}",
            lambda d=dt: short_conv_triton(
                _meta(4, 512, 3 * H, dtype=d), _meta(H, 3, dtype=d), None, _meta(4, H, 3, dtype=d),
                _meta(4, 512, dtype=torch.uint8)),
        ))
        for n in (1, 16, 512):
            def moe_case(n=n, d=dt):
                hidden = _meta(n, H, dtype=d)
                w, ids = moe_route_triton(hidden, _meta(E, H, dtype=d), _meta(E, dtype=torch.float32), TOP_K)
                moe_experts_triton(hidden, _meta(E, 2 * I, H, dtype=d), _meta(E, H, I, dtype=d), ids, w)

            out.append((f"moe N={n} {name}", moe_case))
        for rows, width, heads in ((1, H, 0), (512, H, 0), (1, HEAD_D, HQ + HKV)):
            def norm_case(rows=rows, width=width, heads=heads, d=dt):
                shape = (rows, heads, width) if heads else (rows, width)
                w = _meta(heads, width, dtype=d) if heads else _meta(width, dtype=d)
                add_rms_norm_triton(_meta(*shape, dtype=d), None if heads else _meta(*shape, dtype=d), w, 1e-5)

            out.append((f"rms_norm rows={rows} D={width}{' per-head' if heads else ''} {name}", norm_case))
        for batch in (1, 64):
            for ctx in (1024, 8192, 32768, 131072):
                out.append((
                    f"decode_attention B={batch} S={ctx} {name}",
                    lambda b=batch, s=ctx, d=dt: decode_attention_triton(
                        _meta(b, HQ, HEAD_D, dtype=d), _meta(b, HKV, s, HEAD_D, dtype=d),
                        _meta(b, HKV, s, HEAD_D, dtype=d), _meta(b, dtype=torch.int64), HEAD_D**-0.5),
                ))
    return out


def run(dtypes) -> list[dict]:
    rec = _Recorder()
    with _aot_mode(rec):
        for name, fn in cases(dtypes):
            rec.case = name
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - a launcher that fails before compiling
                rec.rows.append({"kernel": "(launcher)", "case": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
    for r in rec.rows:
        r["problems"] = problems(r)
    return rec.rows


def problems(r: dict) -> list[str]:
    if "error" in r:
        return [r["error"]]
    p = []
    spill = (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0)
    if spill > MAX_SPILL_BYTES:
        p.append(f"spills {r['spill_stores']} B stored / {r['spill_loads']} B loaded per thread (bound {MAX_SPILL_BYTES})")
    if (r.get("shared") or 0) > SM90_SMEM_LIMIT:
        p.append(f"shared memory {r['shared']} B > {SM90_SMEM_LIMIT} B")
    return p


def table(rows) -> str:
    lines = [
        "| kernel | first case | warps | stages | regs | spill st/ld (B) | stack (B) | smem (KB) | compile (s) | status |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        status = "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['case']} | | | | | | | | {status} |")
            continue
        lines.append(
            f"| {r['kernel']} | {r['case']} | {r['num_warps']} | {r['num_stages']} | {r['regs']} | "
            f"{r['spill_stores']}/{r['spill_loads']} | {r['stack']} | {r['shared'] / 1024:.1f} | {r['compile_s']} | {status} |"
        )
    return "\n".join(lines)


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _run_split(names: list[str], jobs: int) -> list[dict]:
    """The dtypes spread over `jobs` child processes (compiling is CPU-bound and single-threaded)."""
    import subprocess

    groups = [names[i::jobs] for i in range(jobs) if names[i::jobs]]
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i, g in enumerate(groups):
            path = os.path.join(tmp, f"{i}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--dtypes", ",".join(g), "--json", path, "--jobs", "1"]
            procs.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), path, g))
        rows = []
        for proc, path, g in procs:
            log, _ = proc.communicate()
            try:
                with open(path) as f:
                    rows += json.load(f)["rows"]
            except (OSError, ValueError):
                rows.append({"kernel": "(child)", "case": ",".join(g), "problems": [f"child rc={proc.returncode}"],
                             "error": log[-2000:]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="bf16 only")
    p.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma-separated, of bf16, fp16, fp32")
    p.add_argument("--jobs", type=int, default=1, help="compile the dtypes in this many processes")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if "lfm_kernels.triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        p.error("the kernels were already created for the interpreter in this process; run this as a script")
    # compiled, not interpreted: this must hold before any @triton.jit of ours is created
    os.environ.pop("TRITON_INTERPRET", None)
    why = cuda_backend_missing()
    if why:
        print(f"SKIP: cannot compile for sm_90 here: {why}")
        return 2
    import triton

    names = ["bf16"] if args.quick else [n for n in args.dtypes.split(",") if n]
    for n in names:
        if n not in _DTYPES:
            p.error(f"--dtypes: unknown dtype {n!r} (expected bf16, fp16 or fp32)")
    t0 = time.perf_counter()
    if args.jobs > 1 and len(names) > 1:
        rows = _run_split(names, args.jobs)
    else:
        rows = run([_DTYPES[n] for n in names])
    took = time.perf_counter() - t0
    print(f"Triton {triton.__version__}, target sm_90 (GPUTarget{TARGET}), {len(rows)} compiled kernels in {took:.0f} s; "
          f"bounds: spills <= {MAX_SPILL_BYTES} B, shared memory <= {SM90_SMEM_LIMIT} B")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "target": list(TARGET), "rows": rows}, f, indent=1)
    bad = [r for r in rows if r["problems"]]
    if bad:
        print(f"\n{len(bad)} kernel(s) FAILED the check")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
