"""The runner behind `lfm-kernels bench`: measure the machine, check and time every case, print one table.

Progress goes to stderr, the table to stdout; `run(args)` takes the parsed command-line arguments
(see lfm_kernels/cli.py) and returns the command's exit status.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from contextlib import nullcontext

# Baselines named like this are our own eager references: the parity oracle, written for clarity,
# often far slower than anything a user would run. When the case has another baseline they are
# timed with a smaller budget, so one slow reference cannot dominate the run.
_SLOW_BASELINES = ("reference",)

# Seconds the kernel-choice policy may spend measuring paths in one bench run (a model process: 0.5 s,
# then the cache): the bench meets dozens of shape classes, and one left unmeasured would run on the
# defaults and show a path no model would take.
BENCH_CHOICE_BUDGET_S = 60.0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)  # for anything that starts a pool later


def _fmt_time(seconds) -> str:
    if seconds is None or not isinstance(seconds, (int, float)) or math.isnan(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def _fmt_num(x, spec: str = ".1f", suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "-"
    return f"{x:{spec}}{suffix}"


def _table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _measure_machine(device: str, quick: bool) -> dict:
    from .core import measure_compute_peak, measure_read_bandwidth

    m = {}
    if device == "cpu":
        _log("measuring CPU memory read bandwidth ...")
        nbytes = (256 << 20) if quick else (1 << 30)
        m["bandwidth"] = measure_read_bandwidth("cpu", nbytes=nbytes)
        m["bandwidth_what"] = (f"measured CPU read bandwidth: sum of a {nbytes >> 20} MiB buffer on huge pages "
                               "(as the weights), all threads")
    else:
        _log("measuring CUDA device-to-device copy bandwidth ...")
        m["bandwidth"] = measure_read_bandwidth(device, nbytes=(256 << 20) if quick else (1 << 30))
        m["bandwidth_what"] = "measured CUDA device-to-device copy, bytes read + written"
    _log("measuring the compute ceiling (torch GEMM) ...")
    m["compute_peak"], m["compute_peak_what"] = measure_compute_peak(device, quick=quick)
    _log(f"  {device}: {m['bandwidth'] / 1e9:.1f} GB/s, "
         f"{m['compute_peak'] / 1e9:.0f} GFLOP/s ({m['compute_peak_what']})")
    return m


def _bench_case(case, machine: dict, min_time: float) -> dict:
    from .core import check_case, dtype_name, floor_seconds, gflops, time_adaptive

    row = {
        "op": case.op,
        "case": case.name,
        "dtype": dtype_name(case.dtype),
        "device": case.device,
        "backend": case.backend or "?",
        "bytes_moved": case.bytes_moved,
        "flops": case.flops,
        "compute_bound": case.compute_bound,
        "times_s": {},
        "repeats": {},
        "errors": {},
    }
    check = check_case(case)
    row["check"] = {"ok": check.ok, "checked": check.checked, "rel_err": check.error, "tol": check.tol,
                    "against": check.against, "detail": check.detail}
    inputs = case.make_inputs()
    candidates = [("kernel", case.kernel)] + list(case.baselines.items())
    others = [n for n in case.baselines if n not in _SLOW_BASELINES]
    for name, fn in candidates:
        cheap = name in _SLOW_BASELINES and others  # a slow oracle: a few runs are enough
        try:
            t, n = time_adaptive(lambda fn=fn: fn(inputs), case.device, min_time=min_time / 5 if cheap else min_time,
                                 min_repeats=1 if cheap else 3)
        except Exception as exc:  # noqa: BLE001 - e.g. a baseline torch lacks on this device
            row["errors"][name] = f"{type(exc).__name__}: {exc}"
            continue
        row["times_s"][name] = t
        row["repeats"][name] = n
    _time_paths(case, inputs, row, min_time)
    if case.device.startswith("cuda"):
        _time_graphs(case, candidates, inputs, row)
    del inputs
    floor = floor_seconds(case, machine["bandwidth"], machine["compute_peak"])
    floor = None if math.isnan(floor) else floor
    kt = row["times_s"].get("kernel")
    row["best_baseline"], row["speedup_vs_best"], row["GBps"], row["share_of_floor"] = _against(
        case, row["times_s"], floor)
    row["speedup_vs_eager"] = row["times_s"]["eager"] / kt if kt and "eager" in row["times_s"] else None
    if kt:
        row["GFLOPs"] = gflops(case, kt) if case.flops else None
        row["floor_s"] = floor
    if row.get("graph_times_s", {}).get("kernel"):
        (row["best_baseline_graph"], row["speedup_vs_best_graph"], row["GBps_graph"],
         row["share_of_floor_graph"]) = _against(case, row["graph_times_s"], floor)
    return row


def _against(case, times: dict, floor: float | None) -> tuple:
    """(best baseline, its time / the kernel's, the kernel's GB/s, floor / the kernel's time) from one
    set of times (eager calls, or graph replays); None where a figure has nothing to stand on."""
    from .core import gbps

    kt = times.get("kernel")
    base = {k: v for k, v in times.items() if k != "kernel"}
    best = min(base, key=base.get) if base else None
    if not kt:
        return best, None, None, None
    return (best, base[best] / kt if best else None, gbps(case, kt) if case.bytes_moved else None,
            None if floor is None else floor / kt)


def _time_graphs(case, candidates, inputs: dict, row: dict) -> None:
    """On CUDA, each candidate's device time replayed as a CUDA graph (no launch cost), beside the
    eager call times; a candidate that cannot be captured (it syncs with the host, by the case's
    `host_sync` or by failing its capture) is left out and named in row["not_capturable"]. The slow
    oracle is not replayed."""
    from .core import time_cuda_graph

    row["graph_times_s"], row["not_capturable"] = {}, [n for n, _ in candidates if n in case.host_sync]
    for name, fn in candidates:
        if name not in row["times_s"] or name in _SLOW_BASELINES or name in case.host_sync:
            continue
        try:
            t = time_cuda_graph(lambda fn=fn: fn(inputs))
        except Exception as exc:  # noqa: BLE001 - report and go on
            row["errors"][f"graph {name}"] = f"{type(exc).__name__}: {exc}"
            continue
        if t is None:
            row["not_capturable"].append(name)
        else:
            row["graph_times_s"][name] = t


def _time_paths(case, inputs: dict, row: dict, min_time: float) -> None:
    """The path the kernel took and the fastest other valid path (the runner-up) with its time."""
    from .core import time_adaptive

    if case.path is None:
        return
    row["path"] = case.path(inputs)
    others = {}
    for name, fn in case.paths.items():
        if name == row["path"]:
            continue
        if isinstance(fn, str):  # the same call as that baseline: its time
            if fn in row["times_s"]:
                others[name] = row["times_s"][fn]
            continue
        try:
            others[name], _ = time_adaptive(lambda fn=fn: fn(inputs), case.device, min_time=min_time)
        except Exception as exc:  # noqa: BLE001 - report and go on
            row["errors"][f"path {name}"] = f"{type(exc).__name__}: {exc}"
    row["path_times_s"] = others
    if others:
        row["runner_up"] = min(others, key=others.get)
        row["runner_up_s"] = others[row["runner_up"]]


def _path_cell(r: dict) -> str:
    if not r.get("path"):
        return "-"
    if not r.get("runner_up"):
        return f"{r['path']} (only path)"
    return f"{r['path']} ({r['runner_up']} {_fmt_time(r['runner_up_s'])})"


_GRAPH_HEADERS = ["op", "shape", "dtype", "eager call", "graph", "best baseline (graph)", "vs best", "GB/s", "floor"]


def _graph_cells(r: dict) -> list[str]:
    g = r["graph_times_s"]
    best = r.get("best_baseline_graph")
    share = r.get("share_of_floor_graph")
    return [
        r["op"],
        r["case"],
        f"{r['dtype']} {r['device']}",
        _fmt_time(r["times_s"].get("kernel")),
        _fmt_time(g.get("kernel")),
        f"{_fmt_time(g[best])} {best}" if best else "-",
        _fmt_num(r.get("speedup_vs_best_graph"), ".2f", "x"),
        _fmt_num(r.get("GBps_graph"), ".1f", " GB/s"),
        _fmt_num(100 * share if share is not None else None, ".0f", "%"),
    ]


def _row_cells(r: dict) -> list[str]:
    t = r["times_s"]
    if not r["check"].get("checked", True):
        check = "UNCHECKED"
    elif r["check"]["ok"]:
        check = "ok" if r["check"]["against"] == "eager" else f"ok vs {r['check']['against']}"
    else:
        check = f"MISMATCH {_fmt_num(r['check']['rel_err'], '.1e')}"
        if r["check"]["detail"]:
            check += f" ({r['check']['detail']})"
    if "kernel" in r["errors"]:
        check = "KERNEL FAILED"
    if r.get("compute_bound"):
        rate = _fmt_num(r.get("GFLOPs"), ".1f", " GFLOP/s")
    else:
        rate = _fmt_num(r.get("GBps"), ".2f" if (r.get("GBps") or 0) < 10 else ".1f", " GB/s")
    best = r.get("best_baseline")
    return [
        r["op"],
        r["case"],
        r["dtype"] if r["device"] == "cpu" else f"{r['dtype']} {r['device']}",
        r["backend"],
        _fmt_time(t.get("eager")),
        f"{_fmt_time(t[best])} {best}" if best else "-",
        _fmt_time(t.get("kernel")),
        _path_cell(r),
        _fmt_num(r.get("speedup_vs_eager"), ".2f", "x"),
        _fmt_num(r.get("speedup_vs_best"), ".2f", "x"),
        rate,
        _fmt_num(100 * r["share_of_floor"] if r.get("share_of_floor") is not None else None, ".0f", "%"),
        check,
    ]


_HEADERS = ["op", "shape", "dtype", "backend", "eager", "best baseline", "kernel", "path (runner-up)", "vs eager",
            "vs best", "GB/s | GFLOP/s", "floor", "check"]


def _e2e_table(rows: list[dict]) -> str:
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(cell(x) for x in v) + "]"
        return "-" if v is None else str(v)

    if len(keys) <= 8:
        return _table(keys, [[cell(r.get(k)) for k in keys] for r in rows])
    # Many figures per row (tokens/s, floor, bandwidth, ...): one line per figure reads better.
    return _table(["", *[f"[{i}]" for i in range(len(rows))]], [[k, *[cell(r.get(k)) for r in rows]] for k in keys],
                  right=set(range(1, len(rows) + 1)))


def _run_e2e_file(path: str, quants, kw: dict, run_e2e) -> list[dict]:
    """--e2e --model PATH: the file (or checkpoint) as stored, then (a checkpoint only) each --quant
    mode quantized while loading; one model in memory at a time."""
    from ..model import from_pretrained

    rows = []
    for fmt in (None, *quants):
        _log(f"end to end (our model wrapper) on {path}" + (f", quantized to {fmt} while loading" if fmt else "") + " ...")
        model = from_pretrained(path, quant=fmt, progress=False, tokenizer=False)
        rows += run_e2e(**{**kw, "model": model, **({"quant": fmt, "compare_transformers": False} if fmt else {})})
        del model
        gc.collect()
    return rows


def _run_e2e(args, out: dict) -> list[str]:
    sections = []
    progress = lambda msg: _log(f"  {msg}")  # noqa: E731
    try:
        from .e2e import run_e2e
    except ImportError as exc:
        _log(f"note: --e2e skipped, the end-to-end benchmark is not available ({exc})")
        out["e2e_skipped"] = str(exc)
    else:
        kw = {"threads": args.threads, "progress": progress}
        if args.quick:
            kw.update(num_layers=2, prompt_len=16, new_tokens=4, paired_steps=4)
        for k in ("num_layers", "prompt_len", "new_tokens"):
            if getattr(args, k) is not None:
                kw[k] = getattr(args, k)
        if args.no_transformers:
            kw["compare_transformers"] = False
        path = getattr(args, "model", None)
        if path is not None:
            rows = _run_e2e_file(path, getattr(args, "quant", None) or (), kw, run_e2e)
        else:
            _log("end to end (our model wrapper) ...")
            rows = run_e2e(**kw)
            # One model at a time: the bf16 default is about 17 GB, so the quantized ones are built after it is freed.
            for fmt in getattr(args, "quant", None) or ():
                _log(f"end to end (our model wrapper, {fmt} weights) ...")
                rows += run_e2e(**{**kw, "quant": fmt, "compare_transformers": False})
        out["e2e"] = rows
        sections.append("End to end, our model wrapper:\n" + _e2e_table(rows))
    if args.patched:
        try:
            from .patch_e2e import run_patch_bench
        except ImportError as exc:
            _log(f"note: --patched skipped, the patched-transformers benchmark is not available ({exc})")
            out["patched_skipped"] = str(exc)
        else:
            kw = {"progress": progress}
            if args.quick:
                kw.update(num_layers=2, prompt_len=16, new_tokens=4)
            for k in ("num_layers", "prompt_len", "new_tokens"):
                if getattr(args, k) is not None:
                    kw[k] = getattr(args, k)
            _log("end to end (transformers, patched vs unpatched) ...")
            rows = run_patch_bench(**kw)
            out["patched"] = rows
            sections.append("End to end, transformers patched with lfm_kernels.patch():\n" + _e2e_table(rows))
    return sections


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["times_s"].get("kernel")]
    labels = [f"{r['op']} {r['case']} {r['dtype']}" + ("" if r["device"] == "cpu" else f" {r['device']}") for r in rows]
    ops = sorted({r["op"] for r in rows})
    colors = {op: f"C{i}" for i, op in enumerate(ops)}
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 0.45 * len(rows) + 3), 9), sharex=True)
    x = range(len(rows))
    w = 0.4
    ax1.bar([i - w / 2 for i in x], [r.get("speedup_vs_eager") or 0 for r in rows], w,
            color=[colors[r["op"]] for r in rows], label="vs eager")
    ax1.bar([i + w / 2 for i in x], [r.get("speedup_vs_best") or 0 for r in rows], w,
            color=[colors[r["op"]] for r in rows], alpha=0.45, hatch="//", label="vs best baseline")
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_yscale("log")
    ax1.set_ylabel("speedup (x)")
    ax1.legend(loc="upper left")
    ax1.set_title("lfm-kernels: speedup (solid: vs eager, hatched: vs best plain-PyTorch baseline)")
    ax2.bar(list(x), [100 * (r.get("share_of_floor") or 0) for r in rows], color=[colors[r["op"]] for r in rows])
    ax2.axhline(100, color="k", lw=0.8, ls="--")
    from matplotlib.patches import Patch

    ax2.legend(handles=[Patch(color=colors[op], label=op) for op in ops], loc="upper left")
    ax2.set_ylabel("% of hardware floor")
    ax2.set_title("share of the floor (bytes / measured bandwidth, or FLOPs / measured GEMM peak)")
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    """`lfm-kernels bench` with parsed arguments: 0 when every kernel agreed with its baseline, else 1 (2: bad usage)."""
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            _log("error: --plot needs matplotlib, which is not installed: pip install matplotlib "
                 "(or pip install 'lfm-kernels[plot]')")
            return 2
    if args.threads:
        _set_threads(args.threads)

    import torch

    from .. import _backend, _policy
    from .core import OPS, discover_cases

    if args.ops is None:
        ops = OPS
    else:
        ops = tuple(o.strip() for o in args.ops.split(",") if o.strip() and o.strip() != "none")
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        _log(f"error: unknown op(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")
        return 2
    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda:
        _log("error: --device cuda but torch sees no CUDA device")
        return 2
    devices = [args.device] if args.device else (["cpu", "cuda"] if has_cuda else ["cpu"])
    if args.portable and _backend._C is None:
        _log("error: --portable needs the CPU extension, which is not loaded: " + str(_backend._EXT_ERROR))
        return 2

    start = time.perf_counter()
    info = _backend.backend_info()
    out = {"machine": info, "args": vars(args), "devices": {}, "rows": [], "skipped_ops": {}, "complete": False}
    try:
        out["load_average"] = os.getloadavg()
    except OSError:
        out["load_average"] = None
    cores = os.cpu_count() or 1
    if out["load_average"] and out["load_average"][0] > 1.5 * cores:
        _log(f"note: this machine is busy (load {out['load_average'][0]:.1f} on {cores} cores): CPU timings "
             "will be noisy (--threads 1 is steadier on a shared machine)")
    if not info["extension_loaded"]:
        _log(f"note: the CPU extension is not loaded ({info['extension_error']}); CPU rows run the references")
    min_time = args.min_time if args.min_time is not None else (0.02 if args.quick else 0.25)
    if not args.quick and _policy.allow_measuring(BENCH_CHOICE_BUDGET_S):
        # every case's path as a model process gets it once its classes are measured
        out["choice_budget_s"] = BENCH_CHOICE_BUDGET_S
    rows: list[dict] = []
    portable = _backend.force_portable_cpu() if args.portable else nullcontext()
    with portable:
        for device in devices:
            machine = _measure_machine(device, args.quick)
            out["devices"][device] = machine
            if not ops:
                continue
            cases, skipped = discover_cases(ops, device, quick=args.quick)
            for op, why in skipped.items():
                _log(f"note: {op}: skipped on {device}, {why}")
                out["skipped_ops"].setdefault(op, {})[device] = why
            for i, case in enumerate(cases, 1):
                label = f"[{device} {i}/{len(cases)}] {case.op} {case.name} {torch.finfo(case.dtype).bits}-bit"
                _log(f"{label} ({case.backend}) ...")
                t0 = time.perf_counter()
                try:
                    row = _bench_case(case, machine, min_time)
                except Exception as exc:  # noqa: BLE001 - report and go on with the other cases
                    _log(f"  FAILED: {type(exc).__name__}: {exc}")
                    rows.append({"op": case.op, "case": case.name, "device": device,
                                 "failed": f"{type(exc).__name__}: {exc}"})
                    continue
                finally:
                    gc.collect()
                rows.append(row)
                if args.json:  # kept current, so a run cut short (a time limit) still leaves its figures
                    out["rows"] = rows
                    _write_json(args.json, out)
                t = row["times_s"]
                msg = f"  kernel {_fmt_time(t.get('kernel'))}, " + ", ".join(
                    f"{k} {_fmt_time(v)}" for k, v in t.items() if k != "kernel")
                if not row["check"]["ok"]:
                    msg += f"  !! MISMATCH vs {row['check']['against']}: rel err {row['check']['rel_err']:.3g}"
                for name, err in row["errors"].items():
                    msg += f"  ({name} failed: {err})"
                _log(msg + f"  [{time.perf_counter() - t0:.1f} s]")
            if device == "cuda":
                torch.cuda.empty_cache()
    out["rows"] = rows
    out["kernel_policy_after"] = _policy.policy_report()  # machine.kernel_policy is the state before the cases

    sections = []
    if args.e2e or args.patched:
        sections = _run_e2e(args, out)
    out["elapsed_s"] = time.perf_counter() - start

    # ---- the table (stdout)
    nthreads = f"{info['threads']} thread" + ("s" if info["threads"] != 1 else "")
    print(f"lfm-kernels bench  ({info['cpu']}, {nthreads}, torch {info['torch']}"
          + (f", {info['cuda_device']}" if info.get("cuda_device") and "cuda" in devices else "") + ")")
    if out["load_average"] and out["load_average"][0] > 1.5 * (os.cpu_count() or 1):
        print(f"  note: load average {out['load_average'][0]:.1f} on {os.cpu_count()} cores while measuring: "
              "CPU figures are noisy")
    for device, m in out["devices"].items():
        print(f"  {device}: floor = bytes / {m['bandwidth'] / 1e9:.1f} GB/s ({m['bandwidth_what']})")
        print(f"  {device}: compute ceiling {m['compute_peak'] / 1e9:.0f} GFLOP/s (measured {m['compute_peak_what']})")
    if out.get("choice_budget_s"):
        spent = out["kernel_policy_after"].get("spent_s", 0.0)
        print(f"  kernel choice: measured per shape class on this CPU ({spent:.1f} s spent of the run's "
              f"{out['choice_budget_s']:.0f} s; a model process has 0.5 s and goes on from the cache)")
    good = [r for r in rows if "failed" not in r]
    if good:
        print()
        print(_table(_HEADERS, [_row_cells(r) for r in good], right={4, 6, 8, 9, 10, 11}))
        print("\npath: the path the kernel-choice policy took, and the fastest other valid path on this CPU with its "
              "time\n(only path: nothing to choose here).")
        print("vs eager / vs best: eager time / kernel time, best baseline time / kernel time (medians).\n"
              "floor: the hardware lower bound (bytes / bandwidth, or FLOPs / GEMM peak) as a share of the kernel "
              "time;\nover 100% means the data stayed in cache between runs.")
        graphed = [r for r in good if r.get("graph_times_s")]
        if graphed:
            print()
            print(_table(_GRAPH_HEADERS, [_graph_cells(r) for r in graphed], right={3, 4, 5, 6, 7}))
            print("graph: each call captured once as a CUDA graph and replayed (L2 flushed between replays): the\n"
                  "device time without launch or Python cost, as a decode step replayed as a graph runs it; eager call:\n"
                  "the kernel column above. Baselines that sync with the host cannot be captured and are left out.")
    for r in rows:
        if "failed" in r:
            print(f"FAILED {r['op']} {r['case']} on {r['device']}: {r['failed']}")
    for op, per_dev in out["skipped_ops"].items():
        print(f"skipped {op}: " + "; ".join(f"{d}: {why}" for d, why in per_dev.items()))
    for section in sections:
        print()
        print(section)
    bad = [r for r in good if not r["check"]["ok"] or "kernel" in r["errors"]]
    if bad:
        print()
        print("!" * 78)
        print(f"!! {len(bad)} kernel(s) DISAGREE with their baseline (or failed): their timings are meaningless:")
        for r in bad:
            c = r["check"]
            why = r["errors"].get("kernel") or f"rel err {c['rel_err']:.3g} > {c['tol']:g} vs {c['against']}"
            print(f"!!   {r['op']} {r['case']} {r['dtype']} {r['device']} ({r['backend']}): {why}")
        print("!" * 78)
    _log(f"done in {out['elapsed_s']:.0f} s")

    if args.json:
        out["complete"] = True
        _write_json(args.json, out)
        _log(f"wrote {args.json}")
    if args.plot:
        _plot(good, args.plot)
        _log(f"wrote {args.plot}")
    return 1 if bad or any("failed" in r for r in rows) else 0


def _write_json(path: str, out: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(_json_safe(out), f, indent=2, default=str)
    os.replace(tmp, path)


def _json_safe(obj):
    """Standard JSON: non-finite floats (an infinite error of a NaN output) become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


