"""`lfm-kernels`: the command a user runs first.

    lfm-kernels info                 what this installation runs (extension, CPU ISA, versions, GPU)
    lfm-kernels bench                every kernel against eager PyTorch and this machine's limits

`bench` measures the machine's memory read bandwidth (and, with a GPU, its device-to-device copy
bandwidth) and a torch GEMM as the compute ceiling, checks each kernel against the eager baseline
once, times the kernel and every plain-PyTorch baseline of each case in
lfm_kernels/benchmark/<op>.py, and prints one table (the runner: lfm_kernels/benchmark/runner.py).
This module is the argument parsing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

# ------------------------------------------------------------------------------------------ info


def _info(args) -> int:
    from . import __version__
    from ._backend import backend_info
    from .benchmark.core import OPS

    if args.threads:
        from .benchmark.runner import _set_threads

        _set_threads(args.threads)
    info = backend_info()
    info["lfm_kernels"] = __version__
    avail = []
    for op in OPS:
        try:
            from .benchmark.core import load_case_module

            load_case_module(op)
            avail.append(op)
        except ImportError:
            pass
    info["benchmark_ops"] = avail
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    labels = {
        "lfm_kernels": "lfm-kernels",
        "extension_loaded": "CPU extension loaded",
        "extension_error": "extension error",
        "cpu_isa": "CPU kernel path",
        "cpu_supports_avx2_fma": "CPU has AVX2+FMA",
        "cpu": "CPU",
        "weight_stream_prefetch_bytes": "weight-stream prefetch (B)",
        "kquant_prefetch_bytes": "K-quant tile prefetch (B)",
        "threads": "torch threads",
        "torch": "torch",
        "triton": "triton",
        "triton_error": "triton error",
        "python": "python",
        "cuda_device": "CUDA device",
        "benchmark_ops": "ops with benchmark cases",
        "kernel_policy": "kernel-path thresholds",
        "kernel_choice_cached": "cached choice (this CPU)",
    }
    width = max(len(v) for v in labels.values())
    keys = list(labels) + [k for k in info if k not in labels]
    for key in keys:
        if key not in info:
            continue
        value = info[key]
        if value is None and key.endswith("_error"):
            continue  # no error to report
        if key == "kernel_policy":
            value = _policy_line(value)
        elif key == "kernel_choice_cached":
            value = _cached_line(value)
        elif isinstance(value, list):
            value = ", ".join(value) or "(none)"
        elif value is None:
            value = "-"
        print(f"{labels.get(key, key):<{width}}  {value}")
    return 0


def _cached_line(cached: dict | None) -> str:
    """The cache file's thresholds for this CPU model and thread count, and how many classes gave them."""
    if cached is None:
        return "nothing measured on this CPU model yet (the first calls of each shape measure it)"
    if "error" in cached:
        return f"unreadable ({cached['error']})"
    t = ", ".join(f"{k}={v}" for k, v in cached["thresholds"].items())
    return f"{t} (from {len(cached['classes'])} shape classes measured before)"


def _policy_line(report: dict) -> str:
    """The policy report in one line: where each op's thresholds came from, then the thresholds."""
    t = report["thresholds"]
    line = (f"{report['mode']} (linear: {report['linear_source']}, linear fp32: {report['linear_fp32_source']}, "
            f"moe: {report['moe_source']}, moe fp32: {report['moe_fp32_source']}); "
            + ", ".join(f"{k}={v}" for k, v in t.items()))
    if report.get("kernel_only"):
        line += ", kernel_only"
    if report.get("portable"):
        line += ", portable"
    if report["mode"] == "measured":
        line += f"; cache {report['cache']}"
    return line


# ------------------------------------------------------------------------------------------ main


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text}")
    return value


_QUANT_MODES = ("q8_0", "q4_0", "q4_k_m")  # lfm_kernels.model.weights.QUANT_MODES (not imported: keeps the CLI light)


def _quant_list(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    bad = [f for f in formats if f not in _QUANT_MODES]
    if not formats or bad:
        raise argparse.ArgumentTypeError(
            f"--quant takes one or more of {', '.join(_QUANT_MODES)}, comma-separated (got {text!r})")
    return tuple(dict.fromkeys(formats))


def _writable_file(text: str) -> str:
    """A path the run can write at the end: checked now, so a long run does not fail at its last step."""
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, expected a file name")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: directory {folder!r} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(text) and not os.access(text, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: permission denied")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lfm-kernels", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    pi = sub.add_parser("info", help="what this installation runs: extension, CPU ISA, versions, GPU")
    pi.add_argument("--json", action="store_true", help="print JSON instead of a list")
    pi.add_argument("--threads", type=_positive_int, help="torch threads (as bench --threads)")

    pb = sub.add_parser("bench", help="time every kernel against eager PyTorch and the hardware floor",
                        description="Check, then time every kernel at the LFM2.5-8B-A1B shapes against the eager "
                                    "baseline, the best plain-PyTorch alternative and this machine's measured limits.")
    pb.add_argument("--ops", help="comma-separated ops (default: all with cases: short_conv,moe,decode_attention,"
                                  "linear; 'none' for none)")
    pb.add_argument("--device", choices=("cpu", "cuda"), help="only this device (default: cpu, and cuda when present)")
    pb.add_argument("--quick", action="store_true", help="small shapes and short timings (plumbing checks)")
    pb.add_argument("--threads", type=_positive_int, help="torch / kernel threads (default: torch's default)")
    pb.add_argument("--min-time", type=_seconds,
                    help="seconds of runs per measurement (default 0.25, 0.02 with --quick; repeats adapt to it)")
    pb.add_argument("--portable", action="store_true", help="run the portable C++ path instead of AVX2")
    pb.add_argument("--json", metavar="FILE", type=_writable_file,
                    help="write every figure and the machine description as JSON")
    pb.add_argument("--plot", metavar="FILE.png", type=_writable_file,
                    help="draw speedups and share of the floor (needs matplotlib)")
    pb.add_argument("--e2e", action="store_true", help="also run the whole model end to end (our wrapper)")
    pb.add_argument("--patched", action="store_true", help="also run transformers patched vs unpatched")
    pb.add_argument("--num-layers", dest="num_layers", type=_positive_int, help="layers for --e2e/--patched")
    pb.add_argument("--prompt-len", dest="prompt_len", type=_positive_int, help="prompt tokens for --e2e/--patched")
    pb.add_argument("--new-tokens", dest="new_tokens", type=_positive_int, help="decoded tokens for --e2e/--patched")
    pb.add_argument("--quant", type=_quant_list, metavar="FORMATS",
                    help="--e2e also on quantized weights: q8_0, q4_0, q4_k_m (comma-separated), each beside bf16")
    pb.add_argument("--model", metavar="FILE",
                    help="--e2e on this model instead of the random default: a .gguf file or a checkpoint directory")
    pb.add_argument("--no-transformers", action="store_true", help="--e2e without the transformers comparison")

    from . import chat_cli

    chat_cli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench" and args.quant and not args.e2e:
        parser.error("--quant applies to the end-to-end run: add --e2e")
    if args.command == "bench" and args.model is not None:
        if not args.e2e:
            parser.error("--model applies to the end-to-end run: add --e2e")
        if not os.path.exists(args.model):
            parser.error(f"--model {args.model!r}: no such file or directory")
        if args.num_layers is not None:
            parser.error("--num-layers sets the random default's depth; a --model keeps its own")
        from .model.gguf import is_gguf_path

        if args.quant and is_gguf_path(args.model):
            parser.error("--quant quantizes a float checkpoint while loading; a .gguf file keeps its own formats "
                         "(drop --quant, or pass a checkpoint directory)")
    if args.command == "info":
        return _info(args)
    if args.command == "chat":
        return args.func(args)
    from .benchmark.runner import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
