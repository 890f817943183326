"""Which backend runs an op: the compiled CPU extension, Triton on CUDA, or the eager reference."""

from __future__ import annotations

import functools
import platform
import warnings

import torch

import importlib
import importlib.util

_EXT_ERROR: str | None = None
_C = None
if importlib.util.find_spec(f"{__package__}._C") is None:
    _EXT_ERROR = "lfm_kernels._C was not built (no compiled extension in the installed package)"
else:
    try:
        # loads the extension, which registers torch.ops.lfm_kernels_cpu
        _C = importlib.import_module(f"{__package__}._C")
    except Exception as exc:  # noqa: BLE001 - any load failure (bad ABI, missing symbol) means fall back
        _EXT_ERROR = f"lfm_kernels._C failed to load: {type(exc).__name__}: {exc}"

try:
    import triton  # noqa: F401

    _TRITON_ERROR: str | None = None
except Exception as exc:  # noqa: BLE001
    triton = None
    _TRITON_ERROR = f"{type(exc).__name__}: {exc}"

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def cpu_extension_available() -> bool:
    """True when the compiled CPU kernels can run; warns once (per process) when they can't."""
    if _C is None:
        _warn_once(
            "cpu",
            f"lfm_kernels: the compiled CPU extension is not available ({_EXT_ERROR}); "
            "CPU ops run the eager PyTorch references instead (correct, but slow). "
            "Reinstall with `pip install --no-build-isolation .` and a C++ compiler to get the kernels.",
        )
        return False
    return True


def eager_cpu_fast_path(t: torch.Tensor) -> bool:
    """True when an op may run its custom op's body directly instead of through the registered op: a
    CPU tensor, the extension loaded, and not being traced by torch.compile (which must see the
    registered op). The custom-op wrapper costs about 10 us per call, as much as a small
    decode-step op itself."""
    return t.device.type == "cpu" and _C is not None and not torch.compiler.is_compiling()


def triton_available() -> bool:
    """True when Triton kernels can run on CUDA tensors; warns once when they can't."""
    if triton is None:
        _warn_once(
            "triton",
            f"lfm_kernels: Triton is not available ({_TRITON_ERROR}); CUDA ops run the eager "
            "PyTorch references instead.",
        )
        return False
    return True


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16_gemm() -> bool:
    """True when torch's oneDNN runs bf16 GEMMs with AVX512-BF16 or AMX instructions on this CPU (and
    ONEDNN_MAX_CPU_ISA does not forbid them). Without them its bf16 GEMM is several times slower than
    the C++ kernels; with them it is about twice as fast (linear and moe hand it their big bf16 GEMMs)."""
    try:
        native = torch.cpu._is_avx512_bf16_supported() or cpu_has_amx()
        return bool(native and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - private APIs: any failure means "don't rely on it"
        return False


@functools.lru_cache(maxsize=None)
def cpu_has_amx() -> bool:
    """True when this process may run AMX-BF16/INT8 instructions: the CPU has them and the OS enabled
    and granted the tile state (a VM can advertise AMX without that). Asked of the extension, which
    makes the kernel's permission request; without the extension, torch's CPUID-only answer."""
    if _C is not None and hasattr(_C, "cpu_supports_amx"):
        return bool(_C.cpu_supports_amx())
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # noqa: BLE001 - private API: any failure means "don't rely on it"
        return False


def cpu_isa() -> str:
    """The CPU path the next call takes: 'avx512' (the AVX-512 decode GEMVs; everything else AVX2),
    'avx2', 'portable' or 'reference'."""
    return _C.cpu_isa() if _C is not None else "reference"


def backend_for(t: torch.Tensor) -> str:
    """Label of the backend an op takes for tensors on t's device (for benchmarks and info)."""
    if t.device.type == "cuda":
        return "triton" if triton is not None else "reference"
    return cpu_isa()


def force_portable_cpu():
    """Run the portable (non-AVX2) C++ kernels inside the block: the kernel policy's
    `kernel_policy(portable=True)` (see lfm_kernels/_policy.py), kept under this name for the tests
    and the command."""
    from ._policy import kernel_policy

    return kernel_policy(portable=True)


def backend_info() -> dict:
    """What this installation will run: extension status, CPU features, versions, CUDA device."""
    info = {
        "extension_loaded": _C is not None,
        "extension_error": _EXT_ERROR,
        "cpu_isa": cpu_isa(),
        "cpu_supports_avx2_fma": bool(_C.cpu_supports_avx2()) if _C is not None else None,
        "cpu_supports_avx512": bool(_C.cpu_supports_avx512()) if _C is not None else None,
        "cpu_supports_avx512bf16": bool(_C.cpu_supports_avx512bf16()) if _C is not None else None,
        "cpu_amx_usable": cpu_has_amx(),
        "cpu_native_bf16_gemm": cpu_has_native_bf16_gemm(),
        # bytes ahead that the bf16 / fp32 weight streams prefetch (csrc/common.h): 4 KiB on Intel, 1 KiB elsewhere
        "weight_stream_prefetch_bytes": int(_C.stream_ahead()) if _C is not None and hasattr(_C, "stream_ahead") else None,
        "kquant_prefetch_bytes": int(_C.kquant_ahead()) if _C is not None and hasattr(_C, "kquant_ahead") else None,
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", None),
        "triton_error": _TRITON_ERROR,
        "python": platform.python_version(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    from ._policy import policy_report  # imports this module

    # the thresholds in force and where they came from (default / measured / cached / fixed)
    info["kernel_policy"] = policy_report()
    if _C is not None:
        from ._chooser import cached_choice

        try:
            info["kernel_choice_cached"] = cached_choice()
        except Exception as exc:  # noqa: BLE001 - a report must not fail on a bad cache file
            info["kernel_choice_cached"] = {"error": f"{type(exc).__name__}: {exc}"}
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
