"""The kernel-choice policy: which code runs an op on the CPU, decided in one place.

Most CPU calls have one path, our C++ kernels (AVX2+FMA+F16C, or their portable C++ twins on CPUs
without AVX2). Where the CPU has native bf16 dot products (AVX512-BF16 or AMX), bf16 x bf16 work with
enough rows runs faster on those units, so two ops choose per call:

- `linear` (bf16 x and bf16 weight): from `linear_onednn_min_rows` rows on, torch's oneDNN GEMM
  (F.linear; a bias is then added in bf16, as F.linear does); fewer rows stay on the C++ kernel,
  which streams the weight once.
- `linear` on fp32 weights (any x dtype, computed in fp32): from `linear_fp32_torch_min_rows` rows on, torch's fp32 GEMM
  (F.linear); by default never, the chooser sets it where torch's GEMM is measured faster.
- `linear` on a CPU with AVX-512 (any weight dtype): calls of up to `linear_avx512_max_rows` rows
  (at most 2; 0: none) take the AVX-512 GEMV (with AVX512-BF16 for bf16 x on bf16 weights, an FMA
  GEMV on fp32 / fp16 weights: measured on the bf16 model's weights, the choice of 512-bit streaming
  serves every weight dtype), the others the AVX2 kernels. Both read the weight once; which streams faster depends on the core
  (on a Zen 4 the AVX2 GEMV wins end to end, hence the default 0; the chooser measures it).
- `moe_experts` / `moe` on fp32 weights (any token dtype, computed in fp32): experts with at least
  `moe_fp32_torch_min_rows` tokens run on torch's fp32 GEMM (two per expert, our SwiGLU between);
  by default never, the chooser sets it where torch's GEMM is measured faster.
- `moe_experts` / `moe` (bf16 tokens and bf16 weights): per expert, from the number of tokens that
  chose it in the call. Below `moe_bf16_min_rows` tokens the expert stays on the AVX2 tiles (act in
  fp32). From there, with AVX512-BF16:
    * `moe_bf16_outer_min_rows` up to `moe_bf16_outer_onednn_min_rows` - 1 tokens: our outer-product
      kernel (tokens in the vector lanes, each weight read once per 16 tokens; H and I even);
    * fewer tokens than that, or H or I odd, below `moe_bf16_dot_onednn_min_rows`: our dot-product tile;
    * the rest: two oneDNN bf16 GEMMs per expert with our SwiGLU between them.
  Our two AVX512-BF16 kernels keep gate and up in fp32 and round the SwiGLU product to bf16 once;
  they give the same bits for any thread count. oneDNN rounds gate, up, the product and the expert
  output to bf16, as a bf16 transformers model does, and may split its sums differently for another
  thread count. Without AVX512-BF16 (AMX only, or the portable path forced) every bf16 expert from
  `moe_bf16_min_rows` tokens on runs on oneDNN.

- quantized weights in the x8 layout (every CPU): calls of up to `quant_x8_one_stream_max_rows`
  activation rows (default 0: none) read one 8-row group at a time per thread instead of several
  interleaved; the same bits, a different pace on different memory systems (the chooser times it).

The thresholds are data, not code: the C++ experts kernel receives them as arguments and has none
of its own, so a chooser that times the candidate paths on the machine in use (once, cached per CPU
model) can fill the same fields and install them with `set_policy`. The defaults were measured on a
Zen 4 CPU (AVX512-BF16, 2 threads, LFM2.5-8B-A1B shapes); see the notes at `KernelPolicy`.

Two switches change which code runs regardless of the thresholds:

- `kernel_only=True`: every op stays on our AVX2 / portable kernels (no AVX-512 GEMVs, no AVX512-BF16
  kernels, no oneDNN hand-off): one numerics everywhere, e.g. for comparing machines.
- `portable=True`: our portable C++ kernels instead of the AVX2 and AVX512-BF16 ones (tests compare
  both; the bf16 experts then take oneDNN as above).

The thresholds are measured on the machine at hand by default (lfm_kernels/_chooser.py): at the
first call of a bf16 shape class that has more than one valid path on this CPU, the candidates are
timed in turns (0.5 s at most per process, cached per CPU model in
~/.cache/lfm_kernels/kernel_choice.json) and the thresholds under which they cost least are used.
On a CPU with one path per op (no AVX-512, no AVX512-BF16, no AMX) nothing is timed. A user who wants
the same code on every run fixes the policy: `set_policy(...)` / `kernel_policy(...)` with an explicit
`KernelPolicy` or changes (`kernel_only=True`, explicit thresholds) stop the measurement and are
deterministic; `set_policy(DEFAULT_POLICY)` fixes the defaults. `use_measured_policy(cache_path=...,
budget_s=...)` turns the measurement back on; `policy_report()` says which thresholds are in force
and where they came from ("default", "measured", "cached" or "fixed").

Use `kernel_policy(...)` as a context manager for a block, `set_policy(...)` to change it for the
process, `get_policy()` to read it. On purpose there is no environment variable: nothing outside
the program silently changes which code runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import torch

from . import _backend

__all__ = [
    "KernelPolicy", "DEFAULT_POLICY", "get_policy", "set_policy", "kernel_policy", "use_measured_policy",
    "policy_report",
]


# Thresholds that may be 0 ("never"); every other row count is >= 1.
_MIN_ROWS = {"linear_avx512_max_rows": 0, "quant_x8_one_stream_max_rows": 0}


@dataclasses.dataclass(frozen=True)
class KernelPolicy:
    """Switches and thresholds of the kernel choice (see the module docstring). Rows are tokens of
    the call (`linear`) or tokens that chose one expert (`moe_*`)."""

    kernel_only: bool = False
    portable: bool = False
    # Zen 4, 1 thread: the C++ GEMV is as fast or faster at M = 1, 2 (64 vs 48 GFLOP/s at M = 2,
    # N = K = 2048; ~2x on the 128k-row lm_head at M = 1); oneDNN is 1.2-1.5x faster at M = 3, 4 and ~2x
    # from M = 5 to 512.
    linear_onednn_min_rows: int = 3
    # Rows up to which `linear` takes the AVX-512 GEMV where the CPU has AVX-512 (0: never). Zen 4, 2
    # threads, full-size bf16 decode end to end (two runs, alternated): AVX2 GEMVs 7.73 and 9.57 tok/s,
    # the AVX512-BF16 GEMV 7.29 and 8.55 (512-bit loads stream ~12% slower from DRAM there), so the
    # default is AVX2 and the chooser switches where the AVX-512 GEMV streams faster.
    linear_avx512_max_rows: int = 0
    # Zen 4, 2 threads, one expert at the real shape, weights from DRAM: the AVX2 tiles are faster at 1
    # token (0.83 vs 1.22 ms for oneDNN) and at 2; from 3 tokens bf16 dot products win (1.3x at 3, 1.7x
    # at 16, 2.3x at 64).
    moe_bf16_min_rows: int = 3
    # Zen 4, 2 threads, 32 experts at H 2048, I 1792, every expert with n tokens (ms per call):
    #   n = 3: dot-product tile 29, outer product 33 (both memory-bound; the dot tile overlaps better)
    #   n = 6: 33 vs 31; n = 16: 55 vs 41; n = 24: 63 vs 50
    #   n = 64: outer product 127, oneDNN 134; n = 128: 297 vs 248 (oneDNN's weight packing is paid off)
    moe_bf16_outer_min_rows: int = 4
    moe_bf16_outer_onednn_min_rows: int = 64
    # the dot-product tile alone (H or I odd): 16 tokens 55 ms for both, 64 tokens 157 vs 130 for oneDNN
    moe_bf16_dot_onednn_min_rows: int = 32
    # `linear` on fp32 weights (any x dtype): from this many rows on, torch's fp32 GEMM (F.linear: MKL /
    # oneDNN, with AVX-512 where the CPU has it) instead of our AVX2 kernels. Default: never (the value
    # no row count reaches); the chooser measures it at 4, 16 and 64 rows. A 2-core Xeon (AVX-512), 2
    # threads: torch 1.4-1.6x faster from 128 rows (in_proj 6144 x 2048 at 512 rows: 42 vs 64 ms).
    linear_fp32_torch_min_rows: int = 1 << 30
    # The experts on fp32 weights (any token dtype): from this many tokens per expert on, torch's fp32
    # GEMM instead of our fp32 tiles. Default: never; the chooser measures one expert at 8-64 tokens.
    # A 2-core Xeon (AVX-512), 2 threads, 32 experts at H 2048, I 1792 with n tokens each (ms; ours /
    # torch per expert): n 2: 56 / 64, n 16: 137 / 182, n 64: 341 / 266.
    moe_fp32_torch_min_rows: int = 1 << 30
    # Quantized weights (GGUF blocks) on CPUs with usable AMX or AVX512-BF16. Two routes leave our integer-dot
    # kernels (AVX2 / VNNI) for many rows, both counted in rows of the call (`linear`) or tokens per
    # expert (`moe_experts` / `moe`):
    #   * AMX-INT8 tiles (Q8_0 / Q4_0 in the x8 layout, any x dtype): the same integer dots and the
    #     same bits as the integer kernels, from `*_quant_amx_min_rows` on;
    #   * bf16 GEMM (bf16 x, any format; AMX or AVX512-BF16): the weight dequantized to bf16 panel by
    #     panel and multiplied by oneDNN (a bf16 model's numerics on the dequantized weights), from
    #     `*_quant_gemm_min_rows` (Q8_0 / Q4_0) or `*_kquant_gemm_min_rows` (Q4_K / Q5_K / Q6_K) on;
    #     where both apply, this one wins.
    # A 2-core Xeon with AMX, 2 threads (ms; integer kernels / AMX-INT8 / bf16 GEMM route; bf16 weights):
    #   linear 6144 x 2048, Q8_0:  16 rows 1.4 / 0.74 / 1.6 (0.85); 128 rows 10.1 / 2.9 / 3.2 (1.8);
    #                              512 rows 41 / 10.3 / 7.3 (5.5); Q4_0 the same within 20%
    #   linear 6144 x 2048, Q4_K:  16 rows 2.5 / - / 1.9; 64 rows 5.8 / - / 4.5
    #   experts, 32 of H 2048, I 1792, 4 of 32 per token, N tokens (16 per expert at N = 128):
    #     N 128: Q8_0 47 / 34 / 56, Q4_0 29 / 31 / 50, Q4_K + Q6_K 63 / - / 64 (bf16 36)
    #     N 512: Q8_0 174 / 86 / 83, Q4_0 103 / 78 / 73, Q4_K + Q6_K 228 / - / 94 (bf16 60)
    #   since then the experts' bf16 GEMM route on AMX runs on AMX-BF16 tiles of our own
    #   (csrc/quant/amx_bf16.h); a 2-core Emerald Rapids Xeon (a noisier, slower VM; one run each):
    #     N 512: Q4_0 220 / 161 / 120, Q4_K + Q6_K 191 / - / 71; N 128: Q4_K + Q6_K 45 / - / 38
    # A 2-core Zen 5 (AVX512-BF16, no AMX), 2 threads, linear 6144 x 2048 (ms; integer kernels / bf16
    # GEMM route; bf16 weights): Q4_K 16 rows 1.28 / 1.44 (0.80), 64 rows 2.86 / 2.56 (1.95), 128 rows
    # 5.0 / 4.0 (3.4); Q6_K 128 rows 5.4 / 4.2, 512 rows 19.8 / 13.9; Q4_0 512 rows 15.8 / 13.2.
    # Without AMX or AVX512-BF16 neither route is taken (oneDNN's bf16 GEMM would run at a fraction of
    # the rate). Where a route exists the chooser times them per shape class (bf16 tokens; `linear` at
    # 16, 64, 256 rows, one expert at 8-64 tokens) and these defaults stand where it cannot tell them apart.
    linear_quant_amx_min_rows: int = 16
    linear_quant_gemm_min_rows: int = 256
    linear_kquant_gemm_min_rows: int = 16
    moe_quant_amx_min_rows: int = 16
    moe_quant_gemm_min_rows: int = 64
    moe_kquant_gemm_min_rows: int = 32
    # Quantized weights in the x8 layout (Q8_0 / Q4_0 / K-quants, every CPU): calls of up to this many
    # activation rows (tokens per expert for the experts) read one 8-row group at a time per thread,
    # a single sequential stream, instead of several interleaved (four at one row, two at two rows
    # and, in the experts' tiles, at three and four; K-quants two at one row). The same bits either
    # way; only the pace changes, and which is faster
    # depends on the memory system. A 2-core Zen 4, full-size decode steps alternated in one process
    # (10 rounds each): one stream 10-13% faster a token for Q4_0, Q8_0 and Q4_K_M (Q4_0 44.6 vs
    # 51.2 ms), and 15% slower (47.8 vs 41.6 ms) in the same A/B half an hour later, the VM's memory
    # then being faster. An AVX2-only EPYC: four streams 10-20% faster than two. Default 0 (never);
    # the chooser times both at one row on weights that stream from memory.
    quant_x8_one_stream_max_rows: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise TypeError(f"{f.name} must be a bool, got {type(value).__name__}")
            elif isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{f.name} must be an int (a row count), got {type(value).__name__}")
            elif value < _MIN_ROWS.get(f.name, 1):
                raise ValueError(f"{f.name} must be >= {_MIN_ROWS.get(f.name, 1)} (a row count), got {value}")

    def moe_bf16_routes(self) -> tuple[int, int, int, int]:
        """The thresholds the C++ experts kernel takes, in its argument order."""
        return (
            self.moe_bf16_min_rows,
            self.moe_bf16_outer_min_rows,
            self.moe_bf16_outer_onednn_min_rows,
            self.moe_bf16_dot_onednn_min_rows,
        )


DEFAULT_POLICY = KernelPolicy()
# A fixed policy (set_policy / kernel_policy), or None: the measured one (the chooser's).
_fixed: KernelPolicy | None = None
_chooser = None  # lfm_kernels._chooser.Chooser of the measured policy, made at first use
_chooser_args: dict = {}


def _measured():
    global _chooser
    if _chooser is None:
        from ._chooser import Chooser

        _chooser = Chooser(**_chooser_args)
    return _chooser


def allow_measuring(budget_s: float) -> bool:
    """In the measured mode, lets this process spend up to `budget_s` seconds in all measuring the
    paths (never less than it may already); False, changing nothing, when a policy is fixed. For the
    bench: it meets dozens of shape classes, and past the default budget the later ones would run on
    the defaults, which a model's few classes do not (they are measured within a process or two,
    through the cache)."""
    if _fixed is not None:
        return False
    ch = _measured()
    ch.budget_s = max(ch.budget_s, float(budget_s))
    return True


def get_policy() -> KernelPolicy:
    """The policy the next op call follows (the measured thresholds so far, unless one is fixed)."""
    if _fixed is not None:
        return _fixed
    return _chooser.policy if _chooser is not None else DEFAULT_POLICY


def route_token() -> tuple:
    """What a cached route depends on: the fixed policy, the chooser and the policy in force. A route
    asked under one token is valid while every element is the same object (hold the token: its
    objects then cannot be freed and their ids reused): set_policy, use_measured_policy and every
    change the chooser makes replace one of them."""
    return (_fixed, _chooser, get_policy())


def same_route_token(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and a[1] is b[1] and a[2] is b[2]


def _policy_for_linear(x: torch.Tensor, weight: torch.Tensor) -> KernelPolicy:
    """get_policy() for a linear call; in the measured mode the first call of a weight shape
    measures its paths first."""
    if _fixed is not None:
        return _fixed
    return _measured().for_linear(x, weight)


def _policy_for_moe(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> KernelPolicy:
    """get_policy() for an experts call; in the measured mode the first call of an expert shape
    measures its paths first."""
    if _fixed is not None:
        return _fixed
    return _measured().for_moe(hidden, gate_up_proj, down_proj)


# Per quantized op (the chooser's op classes): the policy fields of its AMX-INT8 and bf16 GEMM
# thresholds (K-quants have no AMX-INT8 tiles).
QUANT_ROUTE_FIELDS = {
    "linear_quant": ("linear_quant_amx_min_rows", "linear_quant_gemm_min_rows"),
    "linear_kquant": (None, "linear_kquant_gemm_min_rows"),
    "moe_quant": ("moe_quant_amx_min_rows", "moe_quant_gemm_min_rows"),
    "moe_kquant": (None, "moe_kquant_gemm_min_rows"),
}


@torch.compiler.assume_constant_result
def _amx_usable() -> bool:
    # a constant of the process: torch.compile folds it instead of tracing into the extension
    return bool(_backend.cpu_extension_available() and _backend.cpu_has_amx())


@torch.compiler.assume_constant_result
def _quant_gemm_usable() -> bool:
    # the bf16 GEMM route needs oneDNN on AMX-BF16 or AVX512-BF16 (a constant of the process, as above)
    return bool(_backend.cpu_extension_available() and _backend.cpu_has_native_bf16_gemm())


def quant_routes(op: str, x: torch.Tensor, weight, down=None) -> tuple[int, int]:
    """(bf16 GEMM route from, AMX-INT8 tiles from) in rows ("linear") or tokens per expert ("moe") for
    the quantized weight (the experts' gate_up, with down) and this x; 0: never (neither AMX nor
    AVX512-BF16 for the GEMM route, no AMX for the tiles, `kernel_only`,
    x not on the CPU, no extension; the GEMM route also needs bf16 x, the AMX tiles Q8_0 / Q4_0). In
    the measured mode the first call of a shape class times the routes (bf16 x only)."""
    from .quant import _K_FORMATS

    policy = get_policy()
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        if _fixed is None and op == "linear" and x.dtype == torch.bfloat16 and weight.layout == "x8":
            policy = _measured().for_quant_stream(x, weight)
        _sync_x8_streams(policy.quant_x8_one_stream_max_rows)
    if policy.kernel_only or x.device.type != "cpu" or not _quant_gemm_usable():
        return 0, 0
    name = f"{'linear' if op == 'linear' else 'moe'}_{'kquant' if weight.format in _K_FORMATS else 'quant'}"
    if _fixed is None and not torch.compiler.is_compiling():
        policy = _measured().for_quant(name, x, weight, down)
    amx_field, gemm_field = QUANT_ROUTE_FIELDS[name]
    gemm = getattr(policy, gemm_field) if x.dtype == torch.bfloat16 else 0
    return gemm, getattr(policy, amx_field) if amx_field and _amx_usable() else 0


def decode_stream_trial(formats, batch: int):
    """The chooser's x8 stream trial for a CPU-graph decode (lfm_kernels/_chooser.py,
    DecodeStreamTrial) while one is on for these x8 weight formats; None under a fixed policy, for a
    batch of more than one sequence (the setting decides at one row) or once decided."""
    if _fixed is not None or batch != 1 or not formats:
        return None
    return _measured().decode_stream_trial(formats)


def _sync_x8_streams(rows: int) -> None:
    """Hands the policy's quant_x8_one_stream_max_rows to the extension (a process-wide setting of the
    x8 tiles, like the portable switch) when it differs; every quantized call passes here first."""
    ext = _backend._C
    if ext is not None and hasattr(ext, "set_x8_one_stream_max_rows") and ext.x8_one_stream_max_rows() != rows:
        ext.set_x8_one_stream_max_rows(rows)


def set_policy(policy: KernelPolicy | None = None, **changes) -> KernelPolicy:
    """Fixes the policy for the whole process: `policy` (default: the one in force now, measured
    or not) with `changes` applied; no more measuring until `use_measured_policy()`. Returns the
    previous policy. `set_policy(DEFAULT_POLICY)` fixes the defaults."""
    global _fixed
    base = get_policy() if policy is None else policy
    if not isinstance(base, KernelPolicy):
        raise TypeError(f"policy must be a KernelPolicy, got {type(base).__name__}")
    names = {f.name for f in dataclasses.fields(KernelPolicy)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise TypeError(f"unknown policy field(s) {unknown}; the fields are {sorted(names)}")
    new = dataclasses.replace(base, **changes) if changes else base
    _apply_portable(new.portable)
    previous, _fixed = get_policy(), new
    return previous


def _apply_portable(portable: bool) -> None:
    if portable:
        if _backend._C is None:
            raise RuntimeError(f"portable=True needs the CPU extension, which is not loaded: {_backend._EXT_ERROR}")
        _backend._C.set_force_portable(True)
    elif _backend._C is not None:
        _backend._C.set_force_portable(False)


def use_measured_policy(cache_path: str | os.PathLike | None = None, *, budget_s: float | None = None) -> None:
    """Measure the thresholds on this machine (the default at import): at the first call of each
    bf16 shape class with more than one valid path, within `budget_s` seconds for the process
    (default 0.5), cached per CPU model in `cache_path` (default
    ~/.cache/lfm_kernels/kernel_choice.json). Measurements made so far are dropped (those in the
    cache are read again)."""
    global _fixed, _chooser, _chooser_args
    from ._chooser import DEFAULT_BUDGET_S, Chooser

    args = {"cache_path": None if cache_path is None else os.fspath(cache_path),
            "budget_s": DEFAULT_BUDGET_S if budget_s is None else budget_s}
    chooser = Chooser(**args)  # validates the arguments before anything changes
    _apply_portable(False)
    _chooser_args, _chooser, _fixed = args, chooser, None


def policy_report() -> dict:
    """The thresholds in force and where they came from: per op "default" (nothing to measure on
    this CPU, or not measured yet), "measured" (timed in this process), "cached" (timings read from
    the cache file) or "fixed" (set_policy / kernel_policy)."""
    from ._chooser import _thresholds

    if _fixed is not None:
        return {"mode": "fixed", "linear_source": "fixed", "linear_fp32_source": "fixed", "moe_source": "fixed",
                "moe_fp32_source": "fixed",
                "quant_source": "fixed",
                "thresholds": _thresholds(_fixed),
                "kernel_only": _fixed.kernel_only, "portable": _fixed.portable}
    if _chooser is None:
        from ._chooser import DEFAULT_BUDGET_S, default_cache_path

        return {"mode": "measured", "linear_source": "default", "linear_fp32_source": "default", "moe_source": "default",
                "moe_fp32_source": "default",
                "quant_source": "default",
                "thresholds": _thresholds(DEFAULT_POLICY), "classes": {}, "spent_s": 0.0,
                "budget_s": _chooser_args.get("budget_s", DEFAULT_BUDGET_S),
                "cache": _chooser_args.get("cache_path") or default_cache_path()}
    return _chooser.report()


@contextlib.contextmanager
def kernel_policy(policy: KernelPolicy | None = None, **changes) -> Iterator[KernelPolicy]:
    """`set_policy(policy, **changes)` inside the block; after it, the previous state (a fixed
    policy, or the measured one with what it measured) is back."""
    global _fixed
    saved = _fixed
    set_policy(policy, **changes)
    try:
        yield _fixed
    finally:
        _fixed = saved
        _apply_portable(get_policy().portable)
