#!/usr/bin/env python3
"""Block-size search for the Triton MoE expert kernels at LFM2.5-8B-A1B's shape.

For each token count M it times a few dozen launch configurations of
`lfm_kernels.triton.moe.moe_experts_triton` (E=32 experts, intermediate N=1792, hidden H=2048,
top-4, bf16; triton.testing.do_bench, median), rejects any configuration whose output disagrees
with the eager reference, and writes the fastest per M to lfm_kernels/triton/moe_configs.json:

    {"E=32,N=1792,H=2048,dtype=bf16": {"1": {"BLOCK_M": 16, "BLOCK_N": 64, ...}, "4": {...}, ...}}

The kernel uses the entry whose tuned M is nearest to its own token count on a log scale, if it is
within a factor of two; otherwise its built-in configs (lfm_kernels.triton.moe.get_config), so a
table tuned only for small M never reaches a large prefill. The file is merged (other shapes'
entries are kept) and rewritten after every M, so a run cut short by a time limit still leaves
what it found.

    python bench/moe_tune.py                           # the default token list, on the GPU
    python bench/moe_tune.py --tokens 1,16,256 --budget-s 120
    python bench/moe_tune.py --dry-run                 # list the configurations, run nothing
    # plumbing check without a GPU (Triton interpreter, tiny shape, not a real search):
    python bench/moe_tune.py --device cpu --shape 4,32,64 --tokens 2,8 --max-configs 2 --out /tmp/c.json

Adapting to the kernel: `run_config` below is the one place that calls it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit is created

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a bare checkout

DEFAULT_SHAPE = (32, 1792, 2048)  # E, N (expert intermediate), H (hidden)
TOP_K = 4
DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "lfm_kernels", "triton", "moe_configs.json")
SMEM_LIMIT = 227 * 1024  # shared memory one block may use on an H100/H200 (sm_90)


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def table_key(num_experts: int, n: int, h: int, dtype: torch.dtype) -> str:
    return f"E={num_experts},N={n},H={h},dtype={_DTYPE_NAMES[dtype]}"


def run_config(inputs: dict, config: dict | None) -> torch.Tensor:
    """THE ADAPTATION POINT: run the Triton MoE experts once with `config` and return [M, H].

    Adjust this one function if the kernel's entry point, argument order or config keys change
    (e.g. separate configs for the gate_up and down GEMMs: pass {"gate_up": config, "down": ...})."""
    from lfm_kernels.triton.moe import moe_experts_triton

    return moe_experts_triton(inputs["hidden"], inputs["gate_up_proj"], inputs["down_proj"],
                              inputs["topk_ids"], inputs["topk_weights"], config=config)


def smem_bytes(config: dict, dtype_bytes: int = 2) -> int:
    """Shared memory the software pipeline needs: num_stages copies of each k-step's tiles. The
    gate_up kernel loads the token tile and *two* weight tiles (gate and up) per step, the down
    kernel one of each; the larger of the two counts."""
    c = config
    gate_up = (c["BLOCK_M"] * c["BLOCK_K"] + 2 * c["BLOCK_K"] * c["BLOCK_N"]) * dtype_bytes * c["num_stages"]
    d = {**c, **c.get("down", {})}
    down = (d["BLOCK_M"] * d["BLOCK_K"] + d["BLOCK_K"] * d["BLOCK_N"]) * dtype_bytes * d["num_stages"]
    return max(gate_up, down)


def candidate_configs(m_tokens: int, num_experts: int, top_k: int = TOP_K, dtype_bytes: int = 2) -> list[dict]:
    """A few dozen configurations suited to M tokens: BLOCK_M follows the expected rows per expert
    (M * top_k / E), the rest is a small grid without the configs whose pipeline would need more
    shared memory than a block may have (smem_bytes)."""
    rows = m_tokens * top_k / num_experts
    if rows <= 16:
        grid = dict(BLOCK_M=[16], BLOCK_N=[32, 64, 128], BLOCK_K=[64, 128, 256], num_warps=[4], num_stages=[2, 3, 4])
    elif rows <= 64:
        grid = dict(BLOCK_M=[16, 32, 64], BLOCK_N=[64, 128], BLOCK_K=[64, 128], num_warps=[4, 8], num_stages=[3])
    else:
        grid = dict(BLOCK_M=[64, 128], BLOCK_N=[64, 128, 256], BLOCK_K=[64, 128], num_warps=[4, 8], num_stages=[3, 4])
    out = []
    for values in itertools.product(*grid.values()):
        c = dict(zip(grid.keys(), values))
        if smem_bytes(c, dtype_bytes) <= SMEM_LIMIT:
            out.append(c)
    return out


def make_inputs(m_tokens: int, num_experts: int, n: int, h: int, dtype: torch.dtype, device: str) -> dict:
    """Random routing (top-k distinct experts per token, uniform), weights scaled like a trained
    layer so bf16 outputs stay well inside range."""
    hidden = torch.randn(m_tokens, h, device=device).to(dtype)
    gate_up = (torch.randn(num_experts, 2 * n, h, device=device) * h**-0.5).to(dtype)
    down = (torch.randn(num_experts, h, n, device=device) * n**-0.5).to(dtype)
    scores = torch.rand(m_tokens, num_experts, device=device)
    weights, ids = scores.topk(TOP_K, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return {"hidden": hidden, "gate_up_proj": gate_up, "down_proj": down, "topk_ids": ids,
            "topk_weights": weights.to(torch.float32)}


def bytes_moved(inputs: dict) -> int:
    """Fewest bytes: the selected experts' weights once each, the tokens in, the output out."""
    used = inputs["topk_ids"].unique().numel()
    e_size = inputs["gate_up_proj"][0].numel() + inputs["down_proj"][0].numel()
    h = inputs["hidden"]
    return (used * e_size + 2 * h.numel()) * h.element_size()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    if out.shape != ref.shape or not torch.isfinite(out64).all():
        return math.inf
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def time_config(fn, device: str) -> float:
    if device.startswith("cuda"):
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") / 1e3
    from lfm_kernels.benchmark.core import time_adaptive

    return time_adaptive(fn, device, min_time=0.01, min_repeats=1)[0]


def write_table(path: str, key: str, entries: dict) -> None:
    table = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                table = json.load(f)
        except (OSError, ValueError):
            print(f"warning: {path} was unreadable; rewriting it", file=sys.stderr)
    table[key] = {str(m): c for m, c in sorted(entries.items())}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def tune(tokens, shape=DEFAULT_SHAPE, dtype=torch.bfloat16, device="cuda", out=DEFAULT_OUT,
         max_configs=None, budget_s=None, run=run_config, log=print) -> list[dict]:
    from lfm_kernels import reference
    from lfm_kernels.benchmark.core import measure_read_bandwidth

    num_experts, n, h = shape
    key = table_key(num_experts, n, h, dtype)
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    bandwidth = measure_read_bandwidth(device, nbytes=256 << 20) if device.startswith("cuda") else None
    start = time.perf_counter()
    best_per_m: dict[int, dict] = {}
    summary = []
    for m in tokens:
        inputs = make_inputs(m, num_experts, n, h, dtype, device)
        ref = reference.moe_experts(inputs["hidden"], inputs["gate_up_proj"], inputs["down_proj"],
                                    inputs["topk_ids"], inputs["topk_weights"])
        configs = candidate_configs(m, num_experts)[: max_configs or None]
        default_t = None
        try:
            if rel_err(run(inputs, None), ref) <= tol:
                default_t = time_config(lambda: run(inputs, None), device)
        except Exception as exc:  # noqa: BLE001
            log(f"  M={m}: the default config failed: {type(exc).__name__}: {exc}")
        best = None
        for i, config in enumerate(configs):
            if budget_s is not None and time.perf_counter() - start > budget_s:
                log(f"  time budget of {budget_s:.0f} s spent: M={m} stops after {i} of {len(configs)} configs")
                break
            try:
                err = rel_err(run(inputs, config), ref)
            except Exception as exc:  # noqa: BLE001 - out of resources, unsupported shape: not a candidate
                log(f"  M={m} {config}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
                continue
            if err > tol:
                log(f"  !! M={m} {config}: WRONG OUTPUT (rel err {err:.3g}): a kernel bug at this config")
                continue
            t = time_config(lambda c=config: run(inputs, c), device)
            if best is None or t < best[0]:
                best = (t, config)
        if best is None:
            log(f"M={m}: no working config found")
            continue
        best_per_m[m] = best[1]
        write_table(out, key, best_per_m)
        nbytes = bytes_moved(inputs)
        row = {"M": m, "config": best[1], "time_s": best[0], "default_time_s": default_t,
               "GBps": nbytes / best[0] / 1e9,
               "share_of_copy_bw": nbytes / best[0] / bandwidth if bandwidth else None}
        summary.append(row)
        log(f"M={m:>5}: {best[0] * 1e6:9.1f} us  {row['GBps']:7.1f} GB/s"
            + (f"  ({100 * row['share_of_copy_bw']:.0f}% of copy bw)" if bandwidth else "")
            + (f"  default {default_t * 1e6:.1f} us" if default_t else "")
            + f"  {best[1]}")
        del inputs, ref
        if budget_s is not None and time.perf_counter() - start > budget_s:
            log(f"time budget spent after M={m}; {out} holds the M values tuned so far")
            break
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)), help="comma-separated token counts M")
    p.add_argument("--shape", default=",".join(map(str, DEFAULT_SHAPE)), help="E,N,H (default 32,1792,2048)")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"config table to update (default {DEFAULT_OUT})")
    p.add_argument("--max-configs", type=int, help="at most this many configs per M")
    p.add_argument("--budget-s", type=float, help="stop searching after this many seconds (keeps what it found)")
    p.add_argument("--dry-run", action="store_true", help="print the candidate configs and exit")
    p.add_argument("--summary-json", help="also write the per-M results (time, GB/s, share) here")
    args = p.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",") if t]
    shape = tuple(int(x) for x in args.shape.split(","))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.dry_run:
        for m in tokens:
            configs = candidate_configs(m, shape[0])[: args.max_configs or None]
            print(f"M={m}: {len(configs)} configs")
            for c in configs:
                print(f"    {c}")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device (use --device cpu for an interpreter plumbing check)", file=sys.stderr)
        return 2
    try:
        import lfm_kernels.triton.moe  # noqa: F401
    except ImportError as exc:
        print(f"error: the Triton MoE kernel is not importable ({exc}); nothing to tune", file=sys.stderr)
        return 2
    print(f"MoE block-size search: {table_key(*shape, dtype)}, top-{TOP_K}, device {args.device}"
          + (f" ({torch.cuda.get_device_name(0)})" if args.device.startswith("cuda") else " (Triton interpreter)"))
    summary = tune(tokens, shape, dtype, args.device, args.out, args.max_configs, args.budget_s)
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump({"key": table_key(*shape, dtype), "device": args.device,
                       "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
                       "rows": summary}, f, indent=2)
    print(f"wrote {args.out}" if summary else "nothing tuned")
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
