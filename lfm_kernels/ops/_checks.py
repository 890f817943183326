"""Input validation shared by the ops: every message names the argument and what was expected."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None, shape_hint: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{_hint(shape_hint)}, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions{_hint(shape_hint)}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, expected: tuple, shape_hint: str = "") -> None:
    """expected may hold None for a free dimension."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want}{_hint(shape_hint)}, got {tuple(t.shape)}")


def check_same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put them on one device")


def check_same_dtype(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def _hint(shape_hint: str) -> str:
    return f" {shape_hint}" if shape_hint else ""


def check_no_grad(op: str, **tensors) -> None:
    """The ops are for inference and have no autograd formula: with grad mode on and any input that
    requires grad, raise (on every path, before dispatch) instead of returning a result whose
    backward would silently give None gradients."""
    if not torch.is_grad_enabled():
        return
    names = [n for n, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    if names:
        raise RuntimeError(
            f"lfm_kernels.{op} has no autograd (inference only), but {', '.join(names)} "
            f"{'requires' if len(names) == 1 else 'require'} grad; call it under torch.no_grad() or "
            "torch.inference_mode(), or pass detached tensors"
        )


def _surely_non_overlapping(t: torch.Tensor) -> bool:
    """No two elements share memory, by a sufficient test (the same as the C++ ops'): with the dims of
    size > 1 sorted by stride, each stride exceeds the span of the dims before it."""
    span = 0
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= span:
            return False
        span += stride * (size - 1)
    return True


def check_no_internal_overlap(name: str, t: torch.Tensor) -> None:
    """For a tensor an op writes in place: refuse overlapping elements (an expanded, stride-0 tensor),
    as torch's own in-place ops do; interleaved layouts the stride test cannot prove safe count too."""
    if not t.is_contiguous() and not _surely_non_overlapping(t):
        raise ValueError(
            f"{name} has overlapping elements (strides {tuple(t.stride())} for shape {tuple(t.shape)}, e.g. "
            "an expanded tensor); it is updated in place, so pass a tensor whose elements are distinct "
            "(.contiguous() gives one)"
        )


def _address_range(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses t's elements span (data_ptr already includes the offset)."""
    lo = hi = 0
    for stride, size in zip(t.stride(), t.shape):
        ext = stride * (size - 1)
        if ext < 0:
            lo += ext
        else:
            hi += ext
    base, es = t.data_ptr(), t.element_size()
    return base + lo * es, base + (hi + 1) * es


def check_no_shared_memory(name: str, t: torch.Tensor, **others) -> None:
    """A tensor an op writes in place must not share memory with its inputs (address ranges that
    intersect count as shared, even when the elements interleave without meeting)."""
    if t.numel() == 0 or t.device.type == "meta":
        return
    lo, hi = _address_range(t)
    for other_name, o in others.items():
        if o is None or o.numel() == 0 or o.device != t.device:
            continue
        olo, ohi = _address_range(o)
        if lo < ohi and olo < hi:
            raise ValueError(f"{name} shares memory with {other_name}; {name} is updated in place, pass a separate tensor")
