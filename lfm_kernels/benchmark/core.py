"""Benchmark plumbing shared by `lfm-kernels bench` and the pytest-benchmark suites in bench/.

Each op contributes a module lfm_kernels/benchmark/<op>.py with `cases(device, quick) -> list[Case]`
and is listed in OPS; the command and bench/ both time exactly those cases, so their figures agree.

A case's kernel and baselines take the dict from make_inputs() and return comparable outputs (a
tensor or a tuple of tensors, same order): `check_case` compares the kernel with the "eager"
baseline (else the first one) before anything is timed, including every input the baseline
updates in place (states, caches). Name the eager transformers-equivalent path "eager", our slow
parity oracle "reference" (timed with fewer runs), others by what they are ("sdpa", "grouped_mm").
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Case:
    op: str  # "short_conv", "moe", ...
    name: str  # readable shape id, e.g. "decode-B1-T1-D2048"
    dtype: torch.dtype
    device: str
    make_inputs: Callable[[], dict]  # fresh random inputs (never zeros)
    kernel: Callable[[dict], Any]  # our op
    baselines: dict[str, Callable[[dict], Any]] = field(default_factory=dict)  # "eager", "sdpa", ...
    bytes_moved: int = 0  # fewest bytes read + written through memory
    flops: int = 0
    compute_bound: bool = False  # report GFLOP/s against compute rather than GB/s against bandwidth
    backend: str = ""  # which implementation `kernel` runs: avx2 / portable / triton / reference
    # Where the kernel-choice policy picks between paths (see lfm_kernels/_policy.py): `path(inputs)`
    # names the one `kernel` takes (asked after the kernel has run, so a measured choice is made),
    # `paths` runs each valid path by name; the bench times the others and reports the runner-up.
    path: Callable[[dict], str] | None = None
    paths: dict[str, Callable[[dict], Any]] = field(default_factory=dict)
    # Candidates that wait for the host (data-dependent shapes, `.tolist()`): on CUDA the bench does
    # not try to capture them as a graph (a capture they break is torn down, which is best avoided).
    host_sync: frozenset = frozenset()
    # The check's relative-error bound when CHECK_TOL[dtype] does not describe the comparison (None:
    # CHECK_TOL): quantized weights are checked against our bf16 op on their dequantized values, and
    # the int8 activations (per 32, K-quants per 256) add their own rounding to bf16's.
    check_tol: float | None = None


def time_cpu(fn: Callable[[], Any], *, repeats: int = 20, warmup: int = 3, min_time: float = 0.0) -> float:
    """Median wall time of fn() in seconds over `repeats` runs (after `warmup`)."""
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < repeats or (time.perf_counter() - start) < min_time:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 10 * repeats:
            break
    return statistics.median(samples)


def time_cuda(fn: Callable[[], Any]) -> float:
    """Median device time in seconds (CUDA events through triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def time_cuda_graph(fn: Callable[[], Any], *, replays: int = 60) -> float | None:
    """Median device time in seconds of fn() captured once as a CUDA graph and replayed, the L2 cache
    flushed between replays (outside the timed span); None when fn cannot be captured (it waits for
    the host, e.g. a `.item()`, or copies to it).

    This is the kernels' own time: a decode step replayed as a graph pays no launch or Python cost
    per op. A single eager call of a small op is bound by its launch (tens of microseconds of host
    work against a few of device work), which `time_adaptive` measures; the bench reports both."""
    fn()  # compiles and allocates outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            fn()
    except Exception:  # noqa: BLE001 - not capturable: the caller keeps the eager figure
        torch.cuda.synchronize()
        return None
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")  # several times any GPU's L2 (H200: 50 MB)
    graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    del graph, flush
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


def read_probe_buffer(nbytes: int) -> torch.Tensor:
    """A CPU buffer of about nbytes (float32) for the read probes, on huge pages where the OS grants
    them, as the model's weights are (lfm_kernels._memory)."""
    from .. import _memory

    return _memory.empty(nbytes // 4, dtype=torch.float32).uniform_()


def extension_read_probes(buf: torch.Tensor) -> list:
    """Callables that each read every byte of buf once: the extension's read probe without and with
    the GEMVs' software prefetch (none without the compiled extension)."""
    from .. import _backend

    if _backend._C is None:
        return []
    return [lambda: torch.ops.lfm_kernels_cpu._read_probe(buf), lambda: torch.ops.lfm_kernels_cpu._read_probe(buf, True)]


def measure_read_bandwidth(device: str = "cpu", nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second this machine reads from memory, with all threads, over a buffer far larger than
    the last-level cache. On the CPU: the fastest of three reads of the buffer, each the median of
    `repeats`, alternated so a drift of the machine's bandwidth hits all: the extension's read probe
    (256-bit loads, 1 MiB pieces claimed in turn by the threads, as the GEMVs read weights) without and
    with the software prefetch the GEMVs use, and torch's amax. torch's reductions alone read 15-35%
    below what the GEMVs stream on a 2-core Zen 4, and a read without prefetch stays below what a
    2-core Xeon delivers: either would understate the floor. The buffer sits on huge pages where the
    OS grants them, as the model's weights do (lfm_kernels._memory): on 4 KiB pages the same reads
    measured 5-7% slower on a 2-core Xeon, and slower still once memory was fragmented, which would
    understate the floor for weights that stream from huge pages. On CUDA: device-to-device copy,
    bytes read + written."""
    if device.startswith("cuda"):
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        t = time_cuda(lambda: dst.copy_(src))
        return 2 * nbytes / t
    buf = read_probe_buffer(nbytes)
    probes = [lambda: buf.amax(), *extension_read_probes(buf)]
    samples = [[] for _ in probes]
    for probe in probes:
        probe()  # warm-up
    for _ in range(repeats):
        for probe, out in zip(probes, samples):
            t0 = time.perf_counter()
            probe()
            out.append(time.perf_counter() - t0)
    return nbytes / min(statistics.median(s) for s in samples)


# --------------------------------------------------------------------------------------------
# Shared by the command (lfm_kernels/cli.py) and the pytest-benchmark suites (bench/), so both
# discover, check and measure the same cases the same way.
# --------------------------------------------------------------------------------------------

import importlib  # noqa: E402
import math  # noqa: E402

# Every op with a case module, in the order the table lists them.
OPS = ("short_conv", "moe", "decode_attention", "linear")

# The kernel is checked once against the eager baseline before it is timed. Both sides round (the
# eager baseline computes in the model dtype, the kernels in float32), so the bound is the sum of two
# rounding errors, a little above the tests' bound against the float32/float64 references.
CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
# Quantized-weight cases against bf16 on the dequantized weights: int8 activation rounding (one scale
# per 32 or 256 values, the K-quant cases' random blocks have wide value ranges) measured 1-2.5%
# relative error on top of bf16's; the tests bound the kernels tightly against references that
# quantize the activations the same way (tests/test_quant*.py, test_kquant*.py).
QUANT_CHECK_TOL = 5e-2


def forced_quant_paths(op: str, fmt: str, call) -> dict:
    """For a quantized `linear` ("linear") or experts ("moe") call in format fmt: the routes other than
    the integer-dot kernels that exist on this CPU (`_chooser._quant_routes_here`: the AMX-INT8 tiles,
    not for K-quants, and the bf16 GEMM route), each as a runner-up path: call(inputs) under the policy
    changes that put every call / expert on that route (the policy's own fields,
    `_policy.QUANT_ROUTE_FIELDS`)."""
    from .._chooser import NEVER, _quant_routes_here
    from .._policy import DEFAULT_POLICY, QUANT_ROUTE_FIELDS, kernel_policy
    from ..quant import _K_FORMATS

    name = f"{op}_{'kquant' if fmt in _K_FORMATS else 'quant'}"
    here = _quant_routes_here(name, "x8")
    amx_field, gemm_field = QUANT_ROUTE_FIELDS[name]
    routes = {}
    if "amx" in here:
        routes["amx-int8"] = {amx_field: 1, gemm_field: NEVER}
    if "gemm" in here:
        routes["bf16-gemm"] = {gemm_field: 1}

    def forced(changes):
        def run(i):
            with kernel_policy(DEFAULT_POLICY, **changes):
                return call(i)
        return run

    return {route: forced(changes) for route, changes in routes.items()}

# Inputs larger than this are not cloned for the check: they are weights, which no op writes.
_CLONE_LIMIT_BYTES = 256 << 20


def load_case_module(op: str):
    """The module lfm_kernels.benchmark.<op>, or raise ImportError (op unknown, or its imports failed)."""
    if op not in OPS:
        raise ImportError(f"no benchmark cases for op {op!r} (known: {', '.join(OPS)})")
    return importlib.import_module(f"lfm_kernels.benchmark.{op}")


def discover_cases(ops=OPS, device: str = "cpu", quick: bool = False):
    """(cases, skipped): every Case of every op, and {op: reason} for ops whose cases could not be built."""
    found, skipped = [], {}
    for op in ops:
        try:
            module = load_case_module(op)
        except ImportError as exc:  # e.g. a baseline's optional dependency is missing
            skipped[op] = f"import failed: {exc}"
            continue
        try:
            found.extend(module.cases(device, quick=quick))
        except Exception as exc:  # noqa: BLE001 - one broken case module must not hide the others
            skipped[op] = f"cases() failed: {type(exc).__name__}: {exc}"
    return found, skipped


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _clone_small(inputs: dict) -> dict:
    return {
        k: v.clone() if isinstance(v, torch.Tensor) and v.numel() * v.element_size() <= _CLONE_LIMIT_BYTES else v
        for k, v in inputs.items()
    }


def _flatten(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return []


def _difference(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ||out - ref|| / ||ref|| for floats (inf on NaN/Inf or a shape mismatch);
    the fraction of differing elements for integer/bool tensors (routing ids)."""
    if out.shape != ref.shape:
        return math.inf
    if not (out.is_floating_point() or out.is_complex()):
        return (out != ref).double().mean().item() if out.numel() else 0.0
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return math.inf
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denom if denom > 0 else 1.0)


@dataclass
class CheckResult:
    ok: bool
    error: float  # worst relative error over outputs and in-place updated inputs
    tol: float
    against: str  # the baseline compared with
    detail: str = ""  # which output disagreed, or why the check could not run
    checked: bool = True  # False: nothing to compare with (the kernel ran, but is unverified)


def check_case(case: Case) -> CheckResult:
    """Run the kernel and its eager baseline once on copies of the same fresh inputs and compare
    every output, and every input the eager baseline updates in place (states, caches)."""
    tol = case.check_tol if case.check_tol is not None else CHECK_TOL.get(case.dtype, 1e-2)
    if not case.baselines:
        return CheckResult(True, 0.0, tol, "", "no baseline to check against", checked=False)
    inputs = case.make_inputs()
    mine = _clone_small(inputs)
    try:
        out = _flatten(case.kernel(mine))
    except Exception as exc:  # noqa: BLE001
        return CheckResult(False, math.inf, tol, "", f"kernel raised {type(exc).__name__}: {exc}")
    # The eager baseline first; another one if it cannot run here (e.g. an op torch lacks on this device).
    order = sorted(case.baselines, key=lambda name: name != "eager")
    failures = []
    for against in order:
        theirs = _clone_small(inputs)
        try:
            ref = _flatten(case.baselines[against](theirs))
            break
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{against}: {type(exc).__name__}: {exc}")
    else:
        return CheckResult(True, 0.0, tol, "", "no baseline could run: " + "; ".join(failures), checked=False)
    if len(out) != len(ref):
        return CheckResult(False, math.inf, tol, against, f"{len(out)} outputs vs {len(ref)}")
    worst, detail = 0.0, ""
    pairs = [(f"output {i}", o, r) for i, (o, r) in enumerate(zip(out, ref))]
    for key, original in inputs.items():
        # An input the baseline changed is state the kernel must update the same way.
        changed = isinstance(original, torch.Tensor) and theirs[key] is not original
        if changed and not torch.equal(theirs[key], original):
            pairs.append((f"in-place {key}", mine[key], theirs[key]))
    for what, o, r in pairs:
        err = _difference(o, r)
        if not err <= worst:
            worst, detail = err, what
    return CheckResult(worst <= tol, worst, tol, against, detail if worst > tol else "")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_adaptive(
    fn: Callable[[], Any],
    device: str = "cpu",
    *,
    min_time: float = 0.25,
    min_repeats: int = 3,
    max_repeats: int = 500,
    slow: float = 0.5,
) -> tuple[float, int]:
    """(median seconds, timed runs) of fn(), with as many runs as fit in about `min_time`.

    One untimed warm-up run estimates the cost; a function slower than `slow` seconds (on a second
    try) is timed that once and left there (slow references would otherwise dominate the run).
    On CUDA, fast functions go through triton.testing.do_bench (CUDA events, median; it flushes
    the L2 cache between runs); slow ones are timed with synchronised wall clock.
    """

    def once() -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    first = once()
    if first >= slow:
        # The first call may pay one-off costs (Triton compilation, oneDNN primitive creation, page
        # faults of fresh buffers): estimate from a second call before calling the function slow.
        first = once()
    if device.startswith("cuda") and first < slow:
        try:
            import triton.testing
        except ImportError:
            pass
        else:
            ms = triton.testing.do_bench(fn, warmup=max(5.0, min_time * 100), rep=max(20.0, min_time * 400),
                                         return_mode="median")
            return ms / 1e3, -1  # do_bench picks its own count
    if first >= slow:
        return first, 1
    if first < min_time / 20:  # a second warm-up for cheap functions (allocator, caches)
        fn()
    repeats = int(min(max_repeats, max(min_repeats, math.ceil(min_time / max(first, 1e-7)))))
    return statistics.median(once() for _ in range(repeats)), repeats


def measure_compute_peak(device: str = "cpu", quick: bool = False) -> tuple[float, str]:
    """(FLOP/s, what) of a large torch GEMM on this machine: the ceiling for compute-bound cases.
    CPU: fp32 GEMM (torch's BLAS, all threads). CUDA: bf16 GEMM, the dtype the GPU cases run."""
    if device.startswith("cuda"):
        n, dtype, what = 8192, torch.bfloat16, "torch bf16 GEMM 8192^3"
    else:
        n = 512 if quick else 1536
        dtype, what = torch.float32, f"torch fp32 GEMM {n}^3"
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    t, _ = time_adaptive(lambda: a @ b, device, min_time=0.1 if quick else 0.5)
    return 2 * n**3 / t, what


def gbps(case: Case, seconds: float) -> float:
    return case.bytes_moved / seconds / 1e9 if case.bytes_moved and seconds > 0 else float("nan")


def gflops(case: Case, seconds: float) -> float:
    return case.flops / seconds / 1e9 if case.flops and seconds > 0 else float("nan")


def floor_seconds(case: Case, bandwidth: float, compute_peak: float | None = None) -> float:
    """The hardware lower bound for one call: bytes_moved / bandwidth, or flops / compute_peak for
    compute-bound cases. NaN when the case does not count what it needs."""
    if case.compute_bound:
        return case.flops / compute_peak if case.flops and compute_peak else float("nan")
    return case.bytes_moved / bandwidth if case.bytes_moved and bandwidth else float("nan")
