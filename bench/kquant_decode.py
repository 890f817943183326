"""K-quant `linear` decode and prefill rates on this machine, in one process.

    PYTHONPATH=. python bench/kquant_decode.py [--layouts rows,x8] [--prefill]

(from the repository root: PYTHONPATH makes it time this checkout's package, not an installed one).

Prints, for Q4_K / Q5_K / Q6_K weights of the shapes a decoded LFM2.5-8B-A1B token reads ([N, K]:
2048 x 2048 attention / conv projections, 3584 x 2048 an expert's gate_up, 2048 x 1792 its down):
single-thread M = 1 and M = 2 rates in G weights/s, and the 2-thread M = 1 rate in GB/s of weight
bytes beside the read bandwidth measured in the same process (their ratio is the share of the
floor). `--prefill` adds 2-thread M = 128 / 512 times. Layouts other than "rows" are compared in the
same process (an A/B ratio; absolute figures on a shared machine are noisy).
"""

from __future__ import annotations

import argparse
import time

import torch

import lfm_kernels
from lfm_kernels.benchmark.core import measure_read_bandwidth

SHAPES = ((2048, 2048), (3584, 2048), (2048, 1792))


def _time(fn, min_time=0.3, repeats=5):
    fn()
    best = float("inf")
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            t = time.perf_counter() - t0
            if t >= min_time / repeats:
                break
        best = min(best, t / n)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", default="rows")
    ap.add_argument("--formats", default="q4_k,q5_k,q6_k")
    ap.add_argument("--prefill", action="store_true")
    args = ap.parse_args()
    layouts = args.layouts.split(",")
    torch.manual_seed(0)
    torch.set_num_threads(2)
    bw = measure_read_bandwidth()
    print(f"read bandwidth (2 threads): {bw / 1e9:.1f} GB/s")
    for fmt in args.formats.split(","):
        for n, k in SHAPES:
            qw = lfm_kernels.quantize(torch.randn(n, k) * 0.02, fmt)
            ws = {lay: (qw if lay == "rows" else qw.to_layout(lay)) for lay in layouts}
            for lay, w in ws.items():
                row = [f"{fmt} [{n} x {k}] {lay:4s}"]
                torch.set_num_threads(1)
                for m in (1, 2):
                    x = torch.randn(m, k)
                    t = _time(lambda: lfm_kernels.linear(x, w))
                    row.append(f"M={m} 1t {n * k / t / 1e9:5.2f} Gw/s")
                torch.set_num_threads(2)
                x = torch.randn(1, k)
                t = _time(lambda: lfm_kernels.linear(x, w))
                row.append(f"M=1 2t {w.nbytes / t / 1e9:5.2f} GB/s ({w.nbytes / t / bw:4.0%} of read bw)")
                if args.prefill:
                    for m in (128, 512):
                        x = torch.randn(m, k)
                        t = _time(lambda: lfm_kernels.linear(x, w), min_time=0.5, repeats=3)
                        row.append(f"M={m} 2t {t * 1e3:6.2f} ms")
                print("  ".join(row), flush=True)


if __name__ == "__main__":
    main()
