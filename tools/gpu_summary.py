#!/usr/bin/env python3
"""Write summary.md for bench/gpu_check.sh from whatever its steps have left so far.

    python tools/gpu_summary.py OUT_DIR STATUS_FILE

Reads OUT_DIR/{bench.json, e2e.json, moe_tune.json} and the step status lines (one "name: status"
per line in STATUS_FILE), writes OUT_DIR/summary.md. Run after every step, so a run cut short
still returns a summary of what it finished. Missing or partial files are reported, never fatal.
"""

from __future__ import annotations

import datetime
import json
import os
import sys


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _t(s):
    if not isinstance(s, (int, float)):
        return "-"
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def _n(x, spec, suffix=""):
    return "-" if not isinstance(x, (int, float)) else f"{x:{spec}}{suffix}"


def bench_section(data, device) -> list[str]:
    if data is None:
        return ["(no kernel benchmark results yet)"]
    m = data.get("machine", {})
    dev = data.get("devices", {}).get(device, {})
    bw = dev.get("bandwidth")
    out = [f"Kernels on {m.get('cuda_device') if device == 'cuda' else m.get('cpu')}, torch {m.get('torch')}, "
           f"triton {m.get('triton')}; measured copy bandwidth {_n(bw / 1e9 if bw else None, '.0f', ' GB/s')} "
           "(the floor is a case's fewest bytes over it)."]
    if not data.get("complete", True):
        out.append("(partial: the bench was cut short; these are the cases it finished)")
    out += ["", "| op | case | dtype | backend | kernel | share of floor | vs eager | vs best baseline | check |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in data.get("rows", []):
        if r.get("device") != device:
            continue
        if "failed" in r:
            out.append(f"| {r['op']} | {r.get('case')} | | | FAILED: {str(r['failed'])[:80]} | | | | |")
            continue
        kt = r.get("times_s", {}).get("kernel")
        share = r.get("share_of_floor")
        check = "ok" if r.get("check", {}).get("ok") else f"MISMATCH {r.get('check', {}).get('rel_err')}"
        out.append(
            f"| {r['op']} | {r['case']} | {r['dtype']} | {r.get('backend')} | {_t(kt)} | "
            f"{_n(100 * share if share else None, '.0f', '%')} | {_n(r.get('speedup_vs_eager'), '.2f', 'x')} | "
            f"{_n(r.get('speedup_vs_best'), '.2f', 'x')} ({r.get('best_baseline')}) | {check} |")
    graphed = [r for r in data.get("rows", []) if r.get("device") == device and r.get("graph_times_s")]
    if graphed:
        out += ["", "Replayed as CUDA graphs (device time, no launch cost; L2 flushed between replays):", "",
                "| op | case | eager call | graph | best baseline (graph) | vs best | share of floor | not capturable |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in graphed:
            g, best, share = r["graph_times_s"], r.get("best_baseline_graph"), r.get("share_of_floor_graph")
            out.append(
                f"| {r['op']} | {r['case']} | {_t(r.get('times_s', {}).get('kernel'))} | {_t(g.get('kernel'))} | "
                f"{_t(g.get(best)) + ' ' + best if best else '-'} | {_n(r.get('speedup_vs_best_graph'), '.2f', 'x')} | "
                f"{_n(100 * share if share else None, '.0f', '%')} | {', '.join(r.get('not_capturable', [])) or '-'} |")
    return out


def e2e_section(data) -> list[str]:
    if data is None:
        return ["(no end-to-end results yet)"]
    out = [f"End to end on {data.get('device')}"
           + (f", default model {data['weight_bytes'] / 1e9:.1f} GB built in {data.get('build_s', 0):.0f} s"
              if data.get("weight_bytes") else "")
           + (f", copy bandwidth {data['bandwidth'] / 1e9:.0f} GB/s" if data.get("bandwidth") else "") + ":",
           "", "| batch | prompt | prefill tok/s | decode step eager | graph | share of floor eager / graph | same tokens |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in data.get("rows", []):
        def pct(x):
            return _n(100 * x if x else None, ".0f", "%")

        out.append(f"| {r['batch']} | {r['prompt_len']} | {_n(r.get('prefill_tok_per_s'), '.0f')} | "
                   f"{_t(r.get('decode_step_s_eager'))} | {_t(r.get('decode_step_s_graph'))} | "
                   f"{pct(r.get('share_of_floor_eager'))} / {pct(r.get('share_of_floor_graph'))} | {r.get('same_tokens', '-')} |")
    for r in data.get("rows", []):
        for key in ("eager", "graph"):
            kp = r.get(f"kernels_{key}")
            if not kp:
                continue
            out += ["", f"Batch {r['batch']}, {key}: {kp['kernels_per_step']:.0f} kernels a step, "
                    f"{_t(kp['kernel_time_s'])} of kernel time in a {_t(kp['step_wall_s'])} step (profiled):", "",
                    "| device time a step | calls | kernel |", "| ---: | ---: | --- |"]
            out += [f"| {_t(k['s'])} | {k['calls']:.1f} | `{k['name']}` |" for k in kp["top"]]
    return out


def tune_section(data) -> list[str]:
    if not data or not data.get("rows"):
        return []
    out = ["", f"MoE block sizes ({data.get('key')}):", "", "| M | best | default | GB/s | config |",
           "| ---: | ---: | ---: | ---: | --- |"]
    for r in data["rows"]:
        c = r["config"]
        cfg = f"M{c.get('BLOCK_M')} N{c.get('BLOCK_N')} K{c.get('BLOCK_K')} w{c.get('num_warps')} s{c.get('num_stages')}"
        out.append(f"| {r['M']} | {_t(r['time_s'])} | {_t(r.get('default_time_s'))} | {_n(r.get('GBps'), '.0f')} | {cfg} |")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir, status_file = argv[0], argv[1]
    device = argv[2] if len(argv) > 2 else "cuda"
    try:
        with open(status_file) as f:
            status = [ln.rstrip("\n") for ln in f if ln.strip()]
    except OSError:
        status = []
    lines = [f"# GPU check, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
             + (" (DRY RUN on a CPU: the figures mean nothing)" if device != "cuda" else ""), "", "## Steps", ""]
    lines += [f"- {s}" for s in status] or ["- (none finished yet)"]
    lines += ["", "## Kernels", ""] + bench_section(_load(os.path.join(out_dir, "bench.json")), device)
    lines += ["", "## End to end", ""] + e2e_section(_load(os.path.join(out_dir, "e2e.json")))
    lines += tune_section(_load(os.path.join(out_dir, "moe_tune.json")))
    tmp = os.path.join(out_dir, ".summary.md.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(out_dir, "summary.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
