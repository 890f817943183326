#!/usr/bin/env python3
"""End-to-end prefill and decode of the full-size default model (LFM2.5-8B-A1B shapes, seeded random
bf16 weights, about 17 GB) on a CUDA device, decode both eager and replayed as a CUDA graph.

For each batch: prefill time (and tokens/s) of a `--prompt-len` prompt per row, then the median
time of one decode step over `--steps` steps, eager and with the graph; the decode floor is the
weight bytes a step reads (lfm_kernels.model.LfmModel.bytes_per_decoded_token) over the copy
bandwidth measured in the same run, and the share of it is floor / time. Greedy tokens from both
decode paths are compared (they must agree).

    python tools/gpu_e2e.py --json e2e.json                 # batch 1 and 64
    python tools/gpu_e2e.py --dry-run --json e2e.json       # a tiny model on the CPU: plumbing only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _tiny_model():
    from lfm_kernels.model import LfmModel, config_from_dict
    from lfm_kernels.model.weights import allocate, fill_random

    cfg = config_from_dict(dict(
        model_type="lfm2_moe", vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        num_dense_layers=2, layer_types=["conv", "conv", "full_attention", "conv"],
    ))
    w, _, _ = allocate(cfg, torch.float32, "cpu")
    fill_random(w, cfg, seed=0, progress=False)
    return LfmModel(cfg, w, torch.float32)


_PROFILE_STEPS = 4


def _kernel_profile(step, tok, dev, steps: int = _PROFILE_STEPS, top: int = 12) -> dict:
    """Device time per decode step by kernel name (torch.profiler over `steps` steps): where a step's
    time goes, and how much of the step no kernel covers (launch gaps, syncs)."""
    from torch.profiler import ProfilerActivity, profile

    _sync(dev)
    t0 = time.perf_counter()
    cuda = dev.type == "cuda"  # on the CPU (the dry run): the ops' CPU time, to rehearse the plumbing
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            tok = step(tok).argmax(-1)
        _sync(dev)
    wall = (time.perf_counter() - t0) / steps
    rows = []
    for e in prof.key_averages():
        if cuda:
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = getattr(e, "self_cuda_time_total", 0)
            wanted = "CUDA" in str(getattr(e, "device_type", ""))
        else:
            t, wanted = e.self_cpu_time_total, e.key.startswith(("lfm_kernels", "aten::"))
        if t and wanted:
            rows.append((t / steps / 1e6, e.count / steps, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    return {"step_wall_s": wall, "kernel_time_s": total, "kernels_per_step": sum(r[1] for r in rows),
            "top": [{"name": n[:90], "s": t, "calls": c} for t, c, n in rows[:top]]}


def run_batch(model, batch, prompt_len, steps, graph_modes, log=print, profile=False):
    from lfm_kernels.model.cuda_graph import decode_stepper

    dev = model.device
    V = model.config.vocab_size
    ids = torch.randint(0, V, (batch, prompt_len), device=dev)
    lens = torch.full((batch,), prompt_len, dtype=torch.int64)
    row = {"batch": batch, "prompt_len": prompt_len, "steps": steps}
    tokens = {}
    for graph in graph_modes:
        # room for the profiled steps too: the decode loop skips the "state is full" check
        state = model.new_state(batch, prompt_len + steps + 2 + (_PROFILE_STEPS if profile else 0))
        _sync(dev)
        t0 = time.perf_counter()
        logits = model.prefill(ids, lens, state)
        _sync(dev)
        prefill_s = time.perf_counter() - t0
        step = decode_stepper(model, state, cuda_graph=graph)
        tok = logits.argmax(-1)
        t0 = time.perf_counter()
        tok = step(tok).argmax(-1)  # the first step compiles / captures: timed apart
        _sync(dev)
        first_s = time.perf_counter() - t0
        times, seq = [], [tok]
        for _ in range(steps - 1):
            t0 = time.perf_counter()
            tok = step(tok).argmax(-1)
            _sync(dev)
            times.append(time.perf_counter() - t0)
            seq.append(tok)
        tokens[graph] = torch.stack(seq, 1).cpu()
        key = "graph" if graph else "eager"
        if profile:
            row[f"kernels_{key}"] = _kernel_profile(step, tok, dev)
        row[f"prefill_s_{key}"] = prefill_s
        row[f"first_step_s_{key}"] = first_s
        row[f"decode_step_s_{key}"] = statistics.median(times) if times else None
        log(f"  B={batch} {key}: prefill {prefill_s * 1e3:.1f} ms ({batch * prompt_len / prefill_s:.0f} tok/s), "
            f"first step {first_s * 1e3:.1f} ms, decode step median {row[f'decode_step_s_{key}'] * 1e3:.3f} ms")
        del state
    row["prefill_tok_per_s"] = batch * prompt_len / min(row[f"prefill_s_{'graph' if g else 'eager'}"] for g in graph_modes)
    if len(graph_modes) == 2:
        row["same_tokens"] = bool(torch.equal(tokens[True], tokens[False]))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,64")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--num-layers", type=int, default=None, help="default: all 24")
    p.add_argument("--json")
    p.add_argument("--dry-run", action="store_true", help="a tiny fp32 model on the CPU (no graphs): plumbing only")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    result = {"dry_run": args.dry_run, "rows": []}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    if args.dry_run:
        torch.set_num_threads(1)  # a rehearsal: no figures to take, and no thread pool to contend
        model = _tiny_model()
        result["device"] = "cpu (dry run)"
        graph_modes = [False]
        prompt_len, steps = 8, 4
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device (use --dry-run for a CPU plumbing check)", file=sys.stderr)
            return 2
        from lfm_kernels.benchmark.core import measure_read_bandwidth
        from lfm_kernels.model import default_model

        dev = torch.device("cuda")
        result["device"] = torch.cuda.get_device_name(dev)
        result["bandwidth"] = measure_read_bandwidth("cuda", nbytes=1 << 30)
        print(f"{result['device']}: copy bandwidth {result['bandwidth'] / 1e9:.0f} GB/s (read + written)")
        t0 = time.perf_counter()
        model = default_model(args.num_layers, device="cuda", progress=False)
        result["build_s"] = time.perf_counter() - t0
        result["weight_bytes"] = model.weight_bytes()
        print(f"default model: {model.config.num_hidden_layers} layers, {model.weight_bytes() / 1e9:.1f} GB, "
              f"built in {result['build_s']:.1f} s")
        graph_modes = [False, True]
        prompt_len, steps = args.prompt_len, args.steps
    save()
    for b in batches:
        row = run_batch(model, b, prompt_len, steps, graph_modes, profile=(b == batches[0]))
        nbytes = model.bytes_per_decoded_token(b)
        row["bytes_per_step"] = nbytes
        bw = result.get("bandwidth")
        for key in ("eager", "graph"):
            t = row.get(f"decode_step_s_{key}")
            if t and bw:  # floor: the step's bytes over the measured copy rate, as `lfm-kernels bench` counts
                row[f"share_of_floor_{key}"] = (nbytes / bw) / t
        result["rows"].append(row)
        save()
    print("| batch | prefill tok/s | decode eager | decode graph | share of floor (eager / graph) | same tokens |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for r in result["rows"]:
        def ms(x):
            return f"{x * 1e3:.3f} ms" if x else "-"

        def pct(x):
            return f"{100 * x:.0f}%" if x else "-"

        print(f"| {r['batch']} | {r['prefill_tok_per_s']:.0f} | {ms(r.get('decode_step_s_eager'))} | "
              f"{ms(r.get('decode_step_s_graph'))} | {pct(r.get('share_of_floor_eager'))} / {pct(r.get('share_of_floor_graph'))} | "
              f"{r.get('same_tokens', '-')} |")
    for r in result["rows"]:
        for key in ("eager", "graph"):
            kp = r.get(f"kernels_{key}")
            if not kp:
                continue
            print(f"\nB={r['batch']} {key}: {kp['kernels_per_step']:.0f} kernels a step, {kp['kernel_time_s'] * 1e3:.3f} ms "
                  f"of kernel time in a {kp['step_wall_s'] * 1e3:.3f} ms step (profiled)")
            for k in kp["top"]:
                print(f"  {k['s'] * 1e6:8.1f} us  {k['calls']:5.1f}x  {k['name']}")
    bad = [r for r in result["rows"] if r.get("same_tokens") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
