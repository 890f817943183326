"""The measured kernel-path choice: the policy's thresholds timed on the machine at hand.

(Also the quantized routes on CPUs with AMX: the integer-dot kernels, the AMX-INT8 tiles and the bf16
GEMM route, per quantized shape class with bf16 tokens; `Chooser.for_quant`. And on every CPU, how
many 8-row groups the x8 integer tiles stream at once at one row, per format and K on weights
streamed from memory, `Chooser.for_quant_stream`; once a model decodes one sequence through the
CPU graph, timed on its own replayed steps instead, `Chooser.decode_stream_trial`.)

The thresholds in `KernelPolicy` say from how many rows a bf16 call leaves our C++ kernels for
another path (oneDNN for `linear`; our AVX512-BF16 dot / outer-product tiles, then oneDNN, for the
MoE experts), and up to how many rows `linear` takes its AVX-512 GEMV rather than the AVX2 one. Where they lie depends on the CPU, its memory and the thread count, so instead of
trusting the numbers measured on one machine, the chooser times the candidate paths:

- per op and shape class (`linear`: bf16 x on bf16 weights, or fp32 weights, and the weight's [N, K];
  experts: H and I), lazily, at the first
  call of that class, on the call's own weights (a slice of at most 8 Mi elements of a big `linear`
  weight; one expert at a time for the MoE, a different one each run, as decode reads them), except
  `linear` at 1-2 rows: a zero weight of 4x the last-level cache, so the GEMVs stream from memory as
  in decode instead of timing the cores on a cache-resident slice;
- only where the CPU has more than one valid path: on a CPU without AVX-512 and without native bf16
  dot products (no AVX512-BF16, no AMX) every bf16 call has one path, nothing is timed and the
  defaults stay;
- at row counts from a fixed ladder, each candidate once untimed, then the median of three runs
  (a class's first point is abandoned after the untimed runs if the timed ones would not fit);
  a path is dropped once the path that follows it (tiled -> dot -> outer product -> oneDNN) has
  beaten it at two ladder points in a row, and timing stops when one path is left;
- within a budget for the whole process (0.5 s by default): a point whose predicted cost (the
  last time of each path, scaled by the row ratio, with a 1.5x margin) does not fit in what is
  left is not started, and a later process goes on from the points already in the cache. The
  first point of a class is predicted from the cheapest first point of its op so far, and dropped
  when its untimed runs show that it does not fit: the budget is overrun by at most one untimed
  run of each path at one row.

The thresholds are then the ones under which the measured points cost least, summed over the
shape classes in use as time relative to the fastest path at each point (so one slow shape does
not outvote the others); thresholds the points cannot tell apart, or that would save less than 3%
of that sum, keep their defaults.

The timings are cached per CPU model (brand string, a hash of the CPU flags, torch and package
versions; thread count in the shape class) in a small JSON file, by default
~/.cache/lfm_kernels/kernel_choice.json: delete it to measure again. A corrupt file is ignored
with a warning, an entry of another CPU model is never used.

`lfm_kernels._policy` owns the switch (the measured choice is on by default; `set_policy` with an
explicit policy or `kernel_only=True` fixes it) and reports where the thresholds came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import platform
import statistics
import threading
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import _backend, _memory
from ._policy import QUANT_ROUTE_FIELDS, _amx_usable, _quant_gemm_usable

# A threshold no row count reaches: the path after it is never taken.
NEVER = 1 << 30
DEFAULT_BUDGET_S = 0.5
CACHE_FORMAT = 3  # 3: linear classes time the AVX-512 GEMV ("avx512") apart from the AVX2 kernel ("cpp"), on streamed weights at 1-2 rows

LINEAR_LADDER = (1, 2, 3, 4, 8, 16, 32, 64)
MOE_LADDER = (1, 2, 3, 4, 8, 16, 32, 64, 128)
# Each path in the order its row counts come (the C++ experts kernel's order).
LINEAR_ROUTES = ("avx512", "cpp", "onednn")
AVX512_GEMV_MAX_ROWS = 2  # csrc/linear.cpp: the AVX-512 GEMV exists up to this many rows
MOE_ROUTES = ("tiled", "dot", "outer", "onednn")
# The experts on fp32 weights (any token dtype): our fp32 tiles, then torch's fp32 GEMM from moe_fp32_torch_min_rows on
MOE_FP32_ROUTES = ("tiled", "torch")
# `linear` on fp32 weights (any x dtype): our kernels, then torch's fp32 GEMM from linear_fp32_torch_min_rows rows on
LINEAR_FP32_ROUTES = ("cpp", "torch")
# Quantized weights (bf16 tokens) on CPUs with AMX or AVX512-BF16: the integer-dot kernels ("x8", on either
# layout), then the AMX-INT8 tiles (Q8_0 / Q4_0 in x8; AMX only), then the bf16 GEMM route; K-quants have no
# AMX-INT8 tiles (_quant_routes_here).
QUANT_ROUTES = ("x8", "amx", "gemm")
KQUANT_ROUTES = ("x8", "gemm")
# Quantized x8 weights at 1-2 rows (every CPU): the integer tiles reading one 8-row group at a time
# per thread ("x8_one", up to quant_x8_one_stream_max_rows rows), then several interleaved ("x8").
QUANT_STREAM_ROUTES = ("x8_one", "x8")
# "quant_stream_decode": the same choice timed on whole replayed decode steps of a model (a CPU
# graph, one sequence); where a model's decode has been timed, it decides instead of the isolated
# `linear` streams (it comes after "quant_stream" here, so its threshold wins in _derive).
_ROUTES = {"linear": LINEAR_ROUTES, "linear_fp32": LINEAR_FP32_ROUTES, "moe": MOE_ROUTES, "moe_fp32": MOE_FP32_ROUTES,
           "linear_quant": QUANT_ROUTES, "linear_kquant": KQUANT_ROUTES, "moe_quant": QUANT_ROUTES,
           "moe_kquant": KQUANT_ROUTES, "quant_stream": QUANT_STREAM_ROUTES,
           "quant_stream_decode": QUANT_STREAM_ROUTES}
# How each op's shape-class keys begin (the cache's keys; the shape and thread count follow)
_CLASS_TAG = {"linear": "linear:bf16", "linear_fp32": "linear:fp32", "moe": "moe:bf16", "moe_fp32": "moe:fp32",
              "linear_quant": "linear:quant", "linear_kquant": "linear:kquant", "moe_quant": "moe:quant",
              "moe_kquant": "moe:kquant", "quant_stream": "quant:stream", "quant_stream_decode": "quant:stream-decode"}
# fp32 weights at 4, 16 and 64 rows only: at 1-2 rows both stream the weight at the same speed
# (measured equal on a Xeon; timing them would stream a 256 MiB weight, half the budget), and the
# GEMMs' crossover needs no finer grid, so a model's few fp32 shapes fit the budget of one process.
_LADDERS = {"linear": LINEAR_LADDER, "linear_fp32": (4, 16, 64), "moe": MOE_LADDER,
            # fp32 experts: one expert's weights are 44 MB at the real shape, so few points
            "moe_fp32": (8, 16, 32, 64),
            # quantized: rows of the call / tokens of one expert, around the routes' crossovers. A
            # 128-token prompt gives experts 9-25 tokens (16 on average), so the experts' ladder is
            # finer there: on a Xeon the Q8_0 AMX-INT8 crossover sits at 9-10 tokens, and with points
            # only at 8 and 16 the tie at 8 kept 16, leaving half the experts on the integer kernels
            # (a 128-token MoE call 48-55 ms instead of 40).
            "linear_quant": (16, 64, 256), "linear_kquant": (16, 64, 256),
            "moe_quant": (8, 12, 16, 24, 32, 64), "moe_kquant": (8, 12, 16, 24, 32, 64),
            # the x8 tiles' streams, at one row (decode of one sequence; the multi-group tiles also
            # exist at 2 rows, which keep the default unless fixed): a point per format costs ~30 ms
            "quant_stream": (1,), "quant_stream_decode": (1,)}
# The C++ experts kernel's thresholds that put every expert on one route.
_FORCE_MOE = {
    "tiled": (0, 1, 1, 1),
    "dot": (1, NEVER, NEVER, NEVER),
    "outer": (1, 1, NEVER, NEVER),
    "onednn": (1, 1, 1, 1),
}
# ... and, for fp32 experts, those (bf16 routes off, then fp32_torch_min_rows) of the fp32 routes.
_FORCE_MOE_FP32 = {"tiled": (0, 0, 0, 0, 0), "torch": (0, 0, 0, 0, 1)}
_REPEATS = 3
_LINEAR_SLICE_ELEMS = 8 << 20
# A point starts only if its predicted cost times this fits: the warm-up run, timer and sleep
# overshoot cost more than the medians the prediction is made of.
_MARGIN = 1.5
_DROP_AFTER = 2  # ladder points in a row a later path must win before the earlier one is dropped
# Thresholds other than the base's are taken only when they cost this much less over the measured
# points: paths within noise of each other (a 2-core machine's timings drift by several percent)
# keep the base instead of flipping from one measurement to the next.
_SWITCH_MARGIN = 0.03

# Private test hook: f(op, shape_class, rows) -> {route: callable or seconds} replaces the real
# candidates and their validity check (rows 0: only the route names are read), so tests can time
# fake paths, or inject their timings (a float: taken as the median, counted as 4 runs of the
# budget), on any CPU.
_candidate_hook: Callable[[str, str, int], dict[str, Callable[[], object] | float]] | None = None


def default_cache_path() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "lfm_kernels", "kernel_choice.json")


def _cpu_identity() -> dict:
    """What makes two machines the same CPU model for the cache."""
    brand, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not brand and line.startswith("model name"):
                    brand = line.split(":", 1)[1].strip()
                elif not flags and line.startswith("flags"):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                if brand and flags:
                    break
    except OSError:
        pass
    from . import __version__

    identity = {
        "cpu": brand or platform.processor() or platform.machine(),
        "flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "torch": torch.__version__,
        "lfm_kernels": __version__,
        # timings cached before the paths were timed in turns (_interleaved_medians) are measured again
        "timing": "interleaved",
        # bumped when a path's implementation changes enough to move its timings (2: the K-quant experts'
        # bf16 GEMM route on AMX-BF16 tiles of our own; 3: `linear`'s too; 4: those tiles 32 rows at a
        # time), so that timings of the old one are not reused
        "paths": 4,
    }
    # the weight streams' prefetch distance (csrc/common.h) moves the decode GEMVs' times: when this
    # CPU's default distance changes, its cached timings are measured again (a distance set at run
    # time for an experiment is not part of the key)
    if _backend._C is not None and hasattr(_backend._C, "default_stream_ahead"):
        identity["stream_ahead"] = int(_backend._C.default_stream_ahead())
    # ... and the K-quant tiles' own distance (the same rule)
    if _backend._C is not None and hasattr(_backend._C, "default_kquant_ahead"):
        identity["kquant_ahead"] = int(_backend._C.default_kquant_ahead())
    return identity


def _machine_key(identity: dict) -> str:
    return json.dumps(identity, sort_keys=True)


def _quant_routes_here(op: str, layout: str) -> tuple:
    """The routes a quantized op class has on this CPU: the integer kernels ("x8", either layout),
    the bf16 GEMM route where oneDNN has native bf16 (AMX-BF16 or AVX512-BF16: on 2 Zen 5 cores it
    beat the K-quant integer GEMM 1.2-1.4x from 64 rows, Q8_0 / Q4_0 at 512), and the AMX-INT8 tiles
    (Q8_0 / Q4_0 in x8) where AMX is usable; () where only the integer kernels run. The one place
    this rule lives: the policy's thresholds and the bench's forced routes follow it."""
    if not _quant_gemm_usable():
        return ()
    routes = _ROUTES[op] if layout == "x8" else KQUANT_ROUTES
    return routes if _amx_usable() else tuple(r for r in routes if r != "amx")


@dataclasses.dataclass
class _Class:
    """One op and shape class: its valid paths and the median seconds per path per measured row count."""

    op: str
    routes: tuple[str, ...]
    pairs_fit: bool = True  # MoE: H and I even (the outer product's condition)
    points: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    source: str = "measured"  # or "cached": every point came from the file


class DecodeStreamTrial:
    """Times replayed decode steps under both x8 stream settings, alternating (0, 1, 1, 0, ...: a
    drift of the machine's speed weighs on both alike), and hands the medians of STEPS steps each to
    the chooser. The setting changes no bits (the x8 tiles' results do not depend on how many groups
    a tile reads), so the steps timed are the caller's own."""

    STEPS = 5

    def __init__(self, chooser: "Chooser", key: str):
        self._chooser, self.key = chooser, key
        self.times: dict[int, list[float]] = {0: [], 1: []}

    def setting(self) -> int:
        return (0, 1, 1, 0)[(len(self.times[0]) + len(self.times[1])) % 4]

    def record(self, setting: int, seconds: float) -> None:
        self.times[setting].append(float(seconds))
        if min(len(t) for t in self.times.values()) >= self.STEPS:
            self._chooser._finish_decode_trial(self)


class Chooser:
    """The measured policy of one process (see the module docstring)."""

    def __init__(self, cache_path: str | None = None, budget_s: float = DEFAULT_BUDGET_S, base=None):
        from ._policy import DEFAULT_POLICY

        if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not budget_s >= 0:
            raise ValueError(f"budget_s must be a number of seconds >= 0, got {budget_s!r}")
        self.cache_path = default_cache_path() if cache_path is None else os.fspath(cache_path)
        self.budget_s = float(budget_s)
        self.spent_s = 0.0
        self.base = DEFAULT_POLICY if base is None else base
        self.policy = self.base
        self.sources = dict.fromkeys(_ROUTES, "default")
        self._classes: dict[str, _Class] = {}
        self._seen: set[tuple] = set()  # (op, shape..., threads) already looked at
        self._lock = threading.RLock()
        self._busy = False
        self._first_point_s: dict[str, float] = {}  # per op: the cheapest first point of a class
        self._trials: dict[str, DecodeStreamTrial | None] = {}  # per decode class: on, or None once decided
        self._identity = _cpu_identity()
        self._cached = self._load()

    # ---------------------------------------------------------------- lookups from the ops

    def for_linear(self, x: torch.Tensor, weight: torch.Tensor):
        if weight.dim() != 2:
            return self.policy
        if weight.dtype == torch.float32:  # any x: the fp32 hand-off computes in fp32
            op = "linear_fp32"
        elif x.dtype == weight.dtype == torch.bfloat16:
            op = "linear"
        else:
            return self.policy
        seen = (op, weight.shape[0], weight.shape[1], torch.get_num_threads())
        if seen not in self._seen:
            self._first_sight(seen, f"{_CLASS_TAG[op]}:N{seen[1]}:K{seen[2]}:t{seen[3]}", weight=weight)
        return self.policy

    def for_moe(self, hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor | None = None):
        if gate_up_proj.dim() != 3 or down_proj is None:
            return self.policy  # down_proj None: a label lookup, not a call to measure for
        if gate_up_proj.dtype == torch.float32:  # any hidden: fp32 experts compute in fp32
            op = "moe_fp32"
        elif hidden.dtype == gate_up_proj.dtype == torch.bfloat16:
            op = "moe"
        else:
            return self.policy
        seen = (op, gate_up_proj.shape[2], gate_up_proj.shape[1] // 2, torch.get_num_threads())
        if seen not in self._seen:
            self._first_sight(seen, f"{_CLASS_TAG[op]}:H{seen[1]}:I{seen[2]}:t{seen[3]}", gate_up_proj=gate_up_proj,
                              down_proj=down_proj)
        return self.policy

    def for_quant(self, op: str, x: torch.Tensor, weight, down=None):
        """op: a key of QUANT_ROUTE_FIELDS; weight: the QuantizedTensor (`linear`) or gate_up (experts, with
        down). Measured for bf16 tokens (a model's); other tokens use the thresholds as they stand."""
        if x.dtype != torch.bfloat16:
            return self.policy
        threads = torch.get_num_threads()
        if op.startswith("linear"):
            seen = (op, weight.format, weight.layout, weight.shape[0], weight.shape[1], threads)
        else:
            seen = (op, weight.format, down.format, weight.layout, weight.shape[2], weight.shape[1] // 2, threads)
        if seen not in self._seen:  # a decode step asks this about 75 times: the key string only once
            if op.startswith("linear"):
                key = f"{_CLASS_TAG[op]}:{weight.format}:{weight.layout}:N{seen[3]}:K{seen[4]}:t{threads}"
            else:
                key = f"{_CLASS_TAG[op]}:{seen[1]}+{seen[2]}:{seen[3]}:H{seen[4]}:I{seen[5]}:t{threads}"
            self._first_sight(seen, key, weight=weight, down=down)
        return self.policy

    def for_quant_stream(self, x: torch.Tensor, weight):
        """`linear` on an x8 QuantizedTensor with bf16 x: the first call of each format and K times the
        x8 tiles' one-stream and interleaved reads at one row (quant_x8_one_stream_max_rows) on weights
        of that format and shape streamed from memory; the choice serves every x8 call, the experts'
        included."""
        threads = torch.get_num_threads()
        seen = ("quant_stream", weight.format, weight.shape[1], threads)
        if seen not in self._seen:
            self._first_sight(seen, f"{_CLASS_TAG['quant_stream']}:{weight.format}:K{seen[2]}:t{threads}", weight=weight)
        return self.policy

    def decode_stream_trial(self, formats) -> "DecodeStreamTrial | None":
        """For a CPU-graph decode of one sequence whose x8 weights have these formats: the trial that
        times replayed steps with the x8 tiles reading one stream per thread and several interleaved
        (quant_x8_one_stream_max_rows 1 or 0), while it is on; None once this class is decided (in
        this process or in the cache file). A whole step is what the setting is for: timed alone on
        one shape, the single stream won by up to 30% on a 2-core Zen 3 where whole steps ran 5-10%
        faster interleaved (every Q4_K matrix and the experts)."""
        if _backend._C is None or not hasattr(_backend._C, "set_x8_one_stream_max_rows") or not formats:
            return None
        key = f"{_CLASS_TAG['quant_stream_decode']}:{'+'.join(sorted(formats))}:t{torch.get_num_threads()}"
        with self._lock:
            if key in self._trials:
                return self._trials[key]
            cached = self._cached.get(key)
            if cached:
                self._classes[key] = _Class("quant_stream_decode", QUANT_STREAM_ROUTES, points=dict(cached),
                                            source="cached")
                self._trials[key] = None
                self._derive()
                return None
            self._trials[key] = DecodeStreamTrial(self, key)
            return self._trials[key]

    def _finish_decode_trial(self, trial: "DecodeStreamTrial") -> None:
        from ._policy import _sync_x8_streams

        with self._lock:
            if self._trials.get(trial.key) is not trial:
                return
            points = {1: {"x8": statistics.median(trial.times[0]), "x8_one": statistics.median(trial.times[1])}}
            cls = _Class("quant_stream_decode", QUANT_STREAM_ROUTES, points=points)
            self._classes[trial.key] = cls
            self._trials[trial.key] = None
            self._save(trial.key, cls)
            before = self.policy
            self._derive()
            if self.policy == before:
                self.policy = before  # the same thresholds: the same object, so no graph records again
            _sync_x8_streams(self.policy.quant_x8_one_stream_max_rows)

    def report(self) -> dict:
        """Thresholds, their source per op, the shape classes measured and the time spent."""
        p = self.policy
        return {
            "mode": "measured",
            "linear_source": self.sources["linear"],
            "linear_fp32_source": self.sources["linear_fp32"],
            "moe_source": self.sources["moe"],
            "moe_fp32_source": self.sources["moe_fp32"],
            "quant_source": _combined_source([self.sources[op] for op in (*QUANT_ROUTE_FIELDS, "quant_stream",
                                                                          "quant_stream_decode")]),
            "thresholds": _thresholds(p),
            "classes": {k: {"routes": list(c.routes), "rows": sorted(c.points), "source": c.source}
                        for k, c in self._classes.items()},
            "spent_s": round(self.spent_s, 4),
            "budget_s": self.budget_s,
            "cache": self.cache_path,
        }

    # ---------------------------------------------------------------- measuring

    def _first_sight(self, seen: tuple, key: str, **tensors) -> None:
        if torch.compiler.is_compiling():
            return  # the trace sees the current policy; the real call measures
        op = seen[0]
        with self._lock:
            if seen in self._seen or self._busy:
                return
            self._seen.add(seen)
            cls = self._make_class(op, key, **tensors)
            if cls is None:
                return  # one valid path: nothing to choose
            self._classes[key] = cls
            cached = self._cached.get(key)
            if cached:
                cls.points.update(cached)
            ladder = _LADDERS[op]
            missing = [n for n in ladder if n not in cls.points]
            measured_now = False
            if missing and not self._decided(cls, missing[0]):
                self._busy = True
                try:
                    measured_now = self._measure(cls, key, missing, **tensors)
                finally:
                    self._busy = False
                    _stream_weights.clear()
            cls.source = "measured" if measured_now else ("cached" if cached else "measured")
            if measured_now:
                self._save(key, cls)
            self._derive()

    def _make_class(self, op: str, key: str, **tensors) -> _Class | None:
        if _candidate_hook is not None:
            routes = tuple(r for r in _ROUTES[op] if r in _candidate_hook(op, key, 0))
            pairs_fit = True
        elif op in ("linear_fp32", "moe_fp32"):
            if _backend._C is None:
                return None
            routes, pairs_fit = _ROUTES[op], True
        elif op == "quant_stream":
            if _backend._C is None or not hasattr(_backend._C, "set_x8_one_stream_max_rows"):
                return None
            routes, pairs_fit = QUANT_STREAM_ROUTES, True
        elif op in QUANT_ROUTE_FIELDS:
            routes, pairs_fit = _quant_routes_here(op, tensors["weight"].layout), True
        elif op == "linear":
            if _backend._C is None:
                return None
            routes = tuple(r for r, ok in (("avx512", bool(_backend._C.cpu_supports_avx512())), ("cpp", True),
                                           ("onednn", _backend.cpu_has_native_bf16_gemm())) if ok)
            pairs_fit = True
        else:
            if not (_backend.cpu_has_native_bf16_gemm() and _backend._C is not None):
                return None
            gu = tensors["gate_up_proj"]
            pairs_fit = gu.shape[2] % 2 == 0 and (gu.shape[1] // 2) % 2 == 0
            if _backend._C.cpu_supports_avx512bf16():
                routes = ("tiled", "dot") + (("outer",) if pairs_fit else ()) + ("onednn",)
            else:  # AMX only: the C++ kernel hands every bf16 expert to oneDNN
                routes = ("tiled", "onednn")
        if len(routes) < 2:
            return None
        return _Class(op, routes, pairs_fit)

    def _candidates(self, cls: _Class, key: str, n: int, tensors: dict) -> dict[str, Callable[[], object]]:
        if _candidate_hook is not None:
            return _candidate_hook(cls.op, key, n)
        g = torch.Generator(device="cpu").manual_seed(n)  # never the user's random stream
        if cls.op in QUANT_ROUTE_FIELDS:
            return _quant_candidates(cls, n, tensors, g)
        if cls.op == "quant_stream":
            return _quant_stream_candidates(n, tensors["weight"], g)
        if cls.op in ("linear", "linear_fp32"):
            w = tensors["weight"].detach()
            n_rows, k = w.shape
            if n <= AVX512_GEMV_MAX_ROWS:
                # decode rows: the GEMVs stream weights from memory, as in a decode step where every
                # layer's weights pass once; slices of one weight would stay in the last-level cache
                # and time the cores instead (the AVX-512 GEMV measured faster there on a Zen 4 and
                # 10% slower end to end). A zero weight of several cache sizes stands in for it.
                slices = [_streaming_weight(k, w.dtype)]
            else:
                rows = max(1, min(n_rows, _LINEAR_SLICE_ELEMS // max(k, 1)))
                slices = [w[i * rows:(i + 1) * rows] for i in range(max(1, min(4, n_rows // rows)))]
            x = torch.randn(n, k, generator=g, device="cpu").to(w.dtype)
            turn = itertools.count()

            def avx512():
                return torch.ops.lfm_kernels_cpu.linear(x, slices[next(turn) % len(slices)], None, AVX512_GEMV_MAX_ROWS)

            def cpp():
                return torch.ops.lfm_kernels_cpu.linear(x, slices[next(turn) % len(slices)], None, 0)

            def torch_gemm():  # oneDNN for bf16, torch's fp32 GEMM for fp32 weights
                return F.linear(x, slices[next(turn) % len(slices)])

            fns = {"avx512": avx512, "cpp": cpp, "onednn": torch_gemm, "torch": torch_gemm}
            return {r: fns[r] for r in cls.routes if _valid(cls.op, r, n)}
        gu, dn = tensors["gate_up_proj"].detach(), tensors["down_proj"].detach()
        n_exp, h = gu.shape[0], gu.shape[2]
        hidden = torch.randn(n, h, generator=g, device="cpu").to(gu.dtype)
        weights = torch.ones(n, 1, device="cpu")
        ids = [torch.full((n, 1), e, dtype=torch.int64, device="cpu") for e in range(min(n_exp, 8))]
        turn = itertools.count()

        def run(route):
            # one expert per run, a different one each time: its weights come from memory, as in decode
            force = _FORCE_MOE_FP32 if cls.op == "moe_fp32" else _FORCE_MOE
            return lambda: torch.ops.lfm_kernels_cpu.moe_experts(
                hidden, gu, dn, ids[next(turn) % len(ids)], weights, *force[route])

        return {r: run(r) for r in cls.routes}

    def _live(self, cls: _Class, n: int) -> list[str]:
        """The paths still worth timing at n rows: those that exist at n rows, less those dropped for
        good once a path that follows it has been faster at _DROP_AFTER measured points in a row."""
        live = list(cls.routes)
        streak = dict.fromkeys(cls.routes, 0)
        for m in sorted(m for m in cls.points if m < n):
            point = cls.points[m]
            for i, route in enumerate(cls.routes[:-1]):
                if route not in live:
                    continue
                if route not in point:
                    live.remove(route)  # not timed there: it had been dropped
                    continue
                beaten = any(point.get(r, float("inf")) < point[route] for r in cls.routes[i + 1:])
                streak[route] = streak[route] + 1 if beaten else 0
                if streak[route] >= _DROP_AFTER:
                    live.remove(route)
        return [r for r in live if _valid(cls.op, r, n)]

    def _decided(self, cls: _Class, n: int) -> bool:
        return len(self._live(cls, n)) < 2

    def _measure(self, cls: _Class, key: str, missing: list[int], **tensors) -> bool:
        measured = False
        with torch.no_grad():
            for n in missing:
                live = self._live(cls, n)
                if len(live) < 2:
                    break
                left = self.budget_s - self.spent_s
                if left <= 0 or self._predict(cls, live, n) * _MARGIN > left:
                    break
                fns = self._candidates(cls, key, n, tensors)
                point = {}
                t_start = time.perf_counter()
                injected = 0.0
                try:
                    real = [r for r in live if not isinstance(fns[r], float)]
                    for route in real:
                        fns[route]()  # untimed: oneDNN creates its primitive, pages fault in
                    warm = time.perf_counter() - t_start
                    if not cls.points and warm * _REPEATS * _MARGIN > left - warm:
                        break  # no prediction for this point, and its warm-up says it does not fit
                    point.update(_interleaved_medians({r: fns[r] for r in real}))
                    for route in live:
                        if route not in real:
                            point[route] = fns[route]
                            injected += fns[route] * (_REPEATS + 1)
                finally:
                    cost = time.perf_counter() - t_start + injected
                    self.spent_s += cost
                if not cls.points:
                    self._first_point_s[cls.op] = min(cost, self._first_point_s.get(cls.op, cost))
                cls.points[n] = point
                measured = True
        return measured

    def _predict(self, cls: _Class, live: list[str], n: int) -> float:
        """Seconds of a point at n rows (the untimed and the timed runs of each live path), from the
        paths' last measured points scaled by the row ratio; a path not timed yet is guessed as the
        slowest known one, and a class's first point as the cheapest first point of its op so far."""
        if not cls.points:
            return self._first_point_s.get(cls.op, 0.0)
        known = []
        for route in live:
            prev = [m for m in sorted(cls.points) if route in cls.points[m]]
            known.append(cls.points[prev[-1]][route] * n / prev[-1] if prev else None)
        guess = max([t for t in known if t is not None], default=0.0)
        return sum(guess if t is None else t for t in known) * (_REPEATS + 1)

    # ---------------------------------------------------------------- thresholds from points

    def _derive(self) -> None:
        changes = {}
        for op in _ROUTES:
            classes = [c for c in self._classes.values() if c.op == op and c.points]
            if not classes:
                continue
            changes.update(_best_thresholds(op, classes, self.base))
            self.sources[op] = "measured" if any(c.source == "measured" for c in classes) else "cached"
        self.policy = dataclasses.replace(self.base, **changes)

    # ---------------------------------------------------------------- the cache file

    def _load(self) -> dict[str, dict[int, dict[str, float]]]:
        try:
            with open(self.cache_path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            warnings.warn(f"lfm_kernels: ignoring the kernel-choice cache {self.cache_path} ({exc}); "
                          "the paths are measured again", RuntimeWarning, stacklevel=2)
            return {}
        try:
            entry = data["machines"].get(_machine_key(self._identity)) if data.get("format") == CACHE_FORMAT else None
            if entry is None:
                return {}
            out = {}
            for key, points in entry["classes"].items():
                out[str(key)] = {int(n): {str(r): float(t) for r, t in p.items() if float(t) > 0}
                                 for n, p in points.items()}
            return out
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            warnings.warn(f"lfm_kernels: ignoring the kernel-choice cache {self.cache_path} (unexpected "
                          f"content: {type(exc).__name__}: {exc}); the paths are measured again",
                          RuntimeWarning, stacklevel=2)
            return {}

    def _save(self, key: str, cls: _Class) -> None:
        self._cached[key] = dict(cls.points)
        try:
            try:
                with open(self.cache_path) as f:
                    data = json.load(f)
                if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(
                        data.get("machines"), dict):
                    raise ValueError("not ours")
            except (OSError, ValueError):
                data = {"format": CACHE_FORMAT, "machines": {}}
            mkey = _machine_key(self._identity)
            entry = data["machines"].get(mkey)
            if not isinstance(entry, dict) or not isinstance(entry.get("classes"), dict):
                entry = {"identity": self._identity, "classes": {}}
            entry["classes"][key] = {str(n): p for n, p in sorted(cls.points.items())}
            data["machines"][mkey] = entry
            os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
            tmp = f"{self.cache_path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.cache_path)
        except OSError as exc:
            _backend._warn_once("chooser-cache", f"lfm_kernels: could not write the kernel-choice cache "
                                                  f"{self.cache_path} ({exc}); measurements stay in this process")


def cached_choice(cache_path: str | None = None, base=None) -> dict | None:
    """What the cache file says for this CPU model at the current thread count, without measuring:
    the thresholds its shape classes give (per op, as the chooser derives them) and those classes;
    None when it holds nothing for this machine. For `lfm-kernels info`: a process only uses the
    classes it meets, so this is the choice for the shapes measured before."""
    from ._policy import DEFAULT_POLICY

    ch = Chooser(cache_path=cache_path, budget_s=0.0, base=DEFAULT_POLICY if base is None else base)
    suffix = f":t{torch.get_num_threads()}"
    keys = sorted(k for k in ch._cached if k.endswith(suffix) and ch._cached[k])
    if not keys:
        return None
    changes = {}
    for op, tag in _CLASS_TAG.items():
        classes = []
        for k in keys:
            if k.startswith(tag + ":"):
                routes = tuple(r for r in _ROUTES[op] if any(r in p for p in ch._cached[k].values()))
                classes.append(_Class(op, routes, points=dict(ch._cached[k]), source="cached"))
        if classes:
            changes.update(_best_thresholds(op, classes, ch.base))
    return {"thresholds": _thresholds(dataclasses.replace(ch.base, **changes)), "classes": keys}


def _last_level_cache_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        return int(text.rstrip("KMG")) * scale
    except (OSError, ValueError):
        return 32 << 20


_stream_weights: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def _streaming_weight(k: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A [rows, k] zero weight of 4x the last-level cache (64-256 MiB), made once per (k, dtype) and
    dropped when the class's measurement ends (Chooser._first_sight)."""
    if (k, dtype) not in _stream_weights:
        nbytes = min(max(4 * _last_level_cache_bytes(), 64 << 20), 256 << 20)
        size = torch.tensor([], dtype=dtype).element_size()
        _stream_weights[k, dtype] = torch.zeros(max(1, nbytes // (size * max(k, 1))), k, dtype=dtype)
    return _stream_weights[k, dtype]


def _valid(op: str, route: str, n: int) -> bool:
    """Whether the path exists for n rows (the AVX-512 GEMV only up to AVX512_GEMV_MAX_ROWS)."""
    return not (op == "linear" and route == "avx512" and n > AVX512_GEMV_MAX_ROWS)


def _interleaved_medians(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """The median of _REPEATS timed runs of each path, the paths taking turns (the order rotating
    each round) rather than one path's runs after another's: a 2-core VM's memory bandwidth can
    change by 1.8x within seconds and stay there, and timed back to back one path could get the slow
    state and the other the fast one. Measured on a Zen 4 VM: the one-stream and interleaved x8
    reads, timed one after the other, were cached as 1.32x apart; alternated, they came out within 5%."""
    names = list(fns)
    samples: dict[str, list[float]] = {r: [] for r in names}
    for i in range(_REPEATS if names else 0):
        for r in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            fns[r]()
            samples[r].append(time.perf_counter() - t0)
    return {r: statistics.median(v) for r, v in samples.items()}


def _thresholds(p) -> dict:
    names = ("linear_onednn_min_rows", "linear_avx512_max_rows", "linear_fp32_torch_min_rows", "moe_fp32_torch_min_rows",
             "moe_bf16_min_rows",
             "moe_bf16_outer_min_rows", "moe_bf16_outer_onednn_min_rows", "moe_bf16_dot_onednn_min_rows",
             "linear_quant_amx_min_rows", "linear_quant_gemm_min_rows", "linear_kquant_gemm_min_rows",
             "moe_quant_amx_min_rows", "moe_quant_gemm_min_rows", "moe_kquant_gemm_min_rows",
             "quant_x8_one_stream_max_rows")
    return {n: getattr(p, n) for n in names}


def moe_route(n: int, a: int, b: int, c: int, d: int, own_bf16: bool, pairs_fit: bool) -> str:
    """The C++ experts kernel's route for an expert with n tokens (csrc/moe_experts.cpp, choose_route)."""
    if n < a:
        return "tiled"
    if not own_bf16:
        return "onednn"
    if pairs_fit and n >= b:
        return "outer" if n < c else "onednn"
    return "dot" if n < d else "onednn"


def _best_thresholds(op: str, classes: list[_Class], base) -> dict:
    """The threshold values (among the measured row counts, plus one beyond them) under which the
    measured points cost least, as time relative to each point's fastest path; ties keep the base."""
    rows = sorted({n for c in classes for n in c.points})
    beyond = max(rows) + 1

    def values(default):
        # the base first, so points that cannot tell values apart keep it
        vals = [default] + [n for n in rows if n != default]
        return vals + ([max(default, beyond)] if max(default, beyond) not in vals else [])

    # per measured point: (rows, the class's pairs_fit, time of each path relative to the fastest);
    # a path not timed at a point was dropped after losing: it counts as twice the fastest
    points = []
    for c in classes:
        for n, point in c.points.items():
            if point:
                best = min(point.values())
                points.append((n, c.pairs_fit, {r: point.get(r, 2 * best) / best for r in c.routes}))

    if op in QUANT_ROUTE_FIELDS:
        amx_f, gemm_f = QUANT_ROUTE_FIELDS[op]
        has = {r for c in classes for r in c.routes}
        base_t = (getattr(base, amx_f) if amx_f else None, getattr(base, gemm_f))
        a_vals = values(base_t[0]) if amx_f and "amx" in has else [base_t[0]]
        g_vals = values(base_t[1]) if "gemm" in has else [base_t[1]]

        def quant_route(n, a, g_, rel):
            # the route a call takes; a class without the AMX route (a Q8_0 / Q4_0 weight in the rows
            # layout) stays on the integer kernels where x8 weights take AMX, as quant._linear_route
            # and the C++ experts do
            if "gemm" in has and n >= g_:
                return "gemm"
            return "amx" if a is not None and "amx" in rel and n >= a else "x8"

        def cost(a, g_):
            return sum(rel.get(quant_route(n, a, g_, rel), 2.0) for n, _, rel in points)

        best, best_cost = base_t, None
        for a in a_vals:
            for g_ in g_vals:
                c_ = cost(a, g_)
                if best_cost is None or c_ < best_cost - 1e-9:
                    best, best_cost = (a, g_), c_
        if best_cost > cost(*base_t) * (1 - _SWITCH_MARGIN):
            best = base_t
        return {gemm_f: best[1], **({amx_f: best[0]} if amx_f else {})}

    if op in ("quant_stream", "quant_stream_decode"):
        base_t = base.quant_x8_one_stream_max_rows
        vals = [base_t] + [v for v in range(max(rows) + 1) if v != base_t]
        cost = {v: sum(rel.get("x8_one" if n <= v else "x8", 2.0) for n, _, rel in points) for v in vals}
        best = min(vals, key=lambda v: cost[v])  # min keeps the first of equals: the base
        if cost[best] > cost[base_t] * (1 - _SWITCH_MARGIN):
            best = base_t
        return {"quant_x8_one_stream_max_rows": best}

    if op in ("linear_fp32", "moe_fp32"):
        field, ours = ("linear_fp32_torch_min_rows", "cpp") if op == "linear_fp32" else ("moe_fp32_torch_min_rows", "tiled")
        base_t = getattr(base, field)
        cost = {t: sum(rel.get("torch" if n >= t else ours, 2.0) for n, _, rel in points) for t in values(base_t)}
        best = min(cost, key=lambda t: (cost[t], t != base_t))
        if cost[best] > cost[base_t] * (1 - _SWITCH_MARGIN):
            best = base_t
        return {field: best}

    if op == "linear":
        has = {r for c in classes for r in c.routes}
        # the row counts up to which the AVX-512 GEMV runs (the base first: ties keep it)
        avx512_vals = ([base.linear_avx512_max_rows] + [a for a in range(AVX512_GEMV_MAX_ROWS + 1)
                                                         if a != base.linear_avx512_max_rows]
                       if "avx512" in has else [base.linear_avx512_max_rows])
        onednn_vals = values(base.linear_onednn_min_rows) if "onednn" in has else [base.linear_onednn_min_rows]

        def route(n, t, a):
            if "onednn" in has and n >= t:
                return "onednn"
            return "avx512" if n <= min(a, AVX512_GEMV_MAX_ROWS) and "avx512" in has else "cpp"

        base_t = (base.linear_onednn_min_rows, base.linear_avx512_max_rows)
        best, best_cost = base_t, None
        for t in onednn_vals:
            for a in avx512_vals:
                cst = sum(rel.get(route(n, t, a), 2.0) for n, _, rel in points)
                if best_cost is None or cst < best_cost - 1e-9:
                    best, best_cost = (t, a), cst
        base_cost = sum(rel.get(route(n, *base_t), 2.0) for n, _, rel in points)
        if best_cost > base_cost * (1 - _SWITCH_MARGIN):
            best = base_t
        return {"linear_onednn_min_rows": best[0], "linear_avx512_max_rows": best[1]}

    own_bf16 = any("dot" in c.routes for c in classes)
    defaults = base.moe_bf16_routes()
    grids = [values(v) for v in defaults]
    if not own_bf16:
        grids[1:] = [[v] for v in defaults[1:]]  # only the first threshold matters without our bf16 tiles
    best, best_cost = defaults, None
    for a in grids[0]:
        for b in grids[1]:
            if own_bf16 and b < a:
                continue
            for c_ in grids[2]:
                if own_bf16 and c_ < b:
                    continue
                for d in grids[3]:
                    cst = sum(rel.get(moe_route(n, a, b, c_, d, own_bf16, pf), 2.0) for n, pf, rel in points)
                    if best_cost is None or cst < best_cost - 1e-9:
                        best, best_cost = (a, b, c_, d), cst
    base_cost = sum(rel.get(moe_route(n, *defaults, own_bf16, pf), 2.0) for n, pf, rel in points)
    if best_cost > base_cost * (1 - _SWITCH_MARGIN):
        best = defaults
    names = ("moe_bf16_min_rows", "moe_bf16_outer_min_rows", "moe_bf16_outer_onednn_min_rows",
             "moe_bf16_dot_onednn_min_rows")
    return dict(zip(names, best))


def _combined_source(sources: list[str]) -> str:
    for s in ("measured", "cached"):
        if s in sources:
            return s
    return "default"


def _quant_candidates(cls: _Class, n: int, tensors: dict, g: torch.Generator) -> dict:
    """The quantized routes at n rows (`linear`: a slice of at most 8 Mi weights; experts: one expert
    with n tokens, a different one each run), each forced through the ops' thresholds."""
    ops = torch.ops.lfm_kernels_cpu
    if cls.op.startswith("linear"):
        w = tensors["weight"]
        n_rows, k = w.shape
        rows = min(n_rows, max(8, _LINEAR_SLICE_ELEMS // max(k, 1) // 8 * 8))
        data = w.data.reshape(n_rows, -1)[:rows]
        x = torch.randn(n, k, generator=g).to(torch.bfloat16)
        fmt, layout = w.format, w.layout
        kq = cls.op == "linear_kquant"

        def integer():
            if layout == "x8":
                return ops.linear_kquant_x8(x, data, fmt, rows, k, None) if kq else ops.linear_quant_x8(
                    x, data, fmt, rows, k, None, 0)
            return (ops.linear_kquant if kq else ops.linear_quant)(x, data, fmt, rows, k, None)

        fns = {"x8": integer,
               "amx": lambda: ops.linear_quant_x8(x, data, fmt, rows, k, None, 1),
               "gemm": lambda: ops.linear_quant_dequant_gemm(x, data, fmt, layout, rows, k, None)}
        return {r: fns[r] for r in cls.routes}
    gu, dn = tensors["weight"], tensors["down"]
    n_exp, h, inter = gu.shape[0], gu.shape[2], gu.shape[1] // 2
    hidden = torch.randn(n, h, generator=g).to(torch.bfloat16)
    weights = torch.ones(n, 1)
    ids = [torch.full((n, 1), e, dtype=torch.int64) for e in range(min(n_exp, 8))]
    turn = itertools.count()
    kq = cls.op == "moe_kquant"
    name = ("moe_experts_kquant" if kq else "moe_experts_quant") + ("_x8" if gu.layout == "x8" else "")
    fmts = (gu.format, dn.format) if kq else (gu.format,)
    forced = {"x8": (0, 0), "amx": (0, 1), "gemm": (1, 0)}

    def run(route):
        gemm, amx = forced[route]
        extra = (gemm,) if kq else (gemm, amx)
        return lambda: getattr(ops, name)(hidden, gu.data, dn.data, *fmts, n_exp, inter,
                                          ids[next(turn) % len(ids)], weights, *extra)

    return {r: run(r) for r in cls.routes}


def _quant_stream_candidates(n: int, weight, g: torch.Generator) -> dict:
    """The x8 tiles at n rows reading one group at a time or several, as a decode step calls them: many
    short calls, each on a weight of a few MB streamed from memory. A run is one call on each of
    several zero copies of the class's weight (format, K and rows; at most half the total) adding up
    to 2x the last-level cache (64-128 MiB; fewer bytes for weights under 1-2 MiB, at most 64 copies);
    the extension's setting is put back after each run."""
    from .quant import _K_FORMATS, _row_bytes

    ops = torch.ops.lfm_kernels_cpu
    fmt, k = weight.format, int(weight.shape[-1])
    row_bytes = _row_bytes(fmt, k)
    total = min(max(2 * _last_level_cache_bytes(), 64 << 20), 128 << 20)
    rows = max(8, min(int(weight.shape[-2]), total // 2 // row_bytes) // 8 * 8)
    key = (k, fmt, rows)
    if key not in _stream_weights:
        copies = max(2, min(64, -(-total // (rows * row_bytes))))  # a small weight: at most 64 calls
        # on huge pages, as the model keeps its weights (lfm_kernels/_memory.py): on 4 KiB pages the
        # single stream stalls at every page and the choice flips (measured on a Zen 4)
        _stream_weights[key] = _memory.empty(copies, rows, row_bytes, dtype=torch.uint8).zero_()
    data = _stream_weights[key]
    x = torch.randn(n, k, generator=g).to(torch.bfloat16)
    kq = fmt in _K_FORMATS
    setter, in_force = _backend._C.set_x8_one_stream_max_rows, _backend._C.x8_one_stream_max_rows()

    def run(one_stream_rows):
        def f():
            setter(one_stream_rows)
            try:
                for w in data:
                    if kq:
                        ops.linear_kquant_x8(x, w, fmt, rows, k, None)
                    else:
                        ops.linear_quant_x8(x, w, fmt, rows, k, None, 0)
            finally:
                setter(in_force)  # what the policy handed over, whatever it is
        return f

    return {"x8_one": run(n), "x8": run(0)}
