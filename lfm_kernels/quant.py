"""Quantized weights in GGUF's Q8_0 and Q4_0 block layouts, for the CPU kernels.

Both formats cut each weight row (the K dimension) into blocks of 32 values:

* ``q8_0``: 34 bytes per block: an fp16 scale ``d`` then 32 int8 ``q``; ``w = d * q``.
* ``q4_0``: 18 bytes per block: an fp16 scale ``d`` then 16 bytes; byte j holds element j in its
  low nibble and element j + 16 in its high nibble; ``w = d * (q - 8)``.

The bytes are exactly llama.cpp's (GGUF files store these blocks as they are), and `quantize` is
ggml's reference round-to-nearest: it gives the same bytes as ``gguf.quants.quantize``, and
`QuantizedTensor.dequantize` the same values as ``gguf.quants.dequantize``.

Edge cases (the same as ggml's, except the first):

* A weight that is NaN or infinite is rejected with a ValueError: ggml would store an undefined
  block for it (its float -> int conversion of NaN has no defined result).
* A block whose scale overflows fp16 (|w| above 65504 * 127 for q8_0, 65504 * 8 for q4_0) stores an
  infinite scale, as ggml does; it dequantizes to +-inf (and NaN where q is 0).
* An all-zero block stores scale 0 and dequantizes to zeros.

Two byte layouts hold the same blocks (``QuantizedTensor.layout``):

* ``"rows"`` (the default): GGUF's, row n's blocks in K order, rows in N order. Everything that
  reads or writes GGUF files uses it.
* ``"x8"`` (``q8_0`` / ``q4_0`` with N a multiple of 8; a stack [E, N, K] interleaves each matrix on
  its own): rows interleaved in groups of 8, made once at load (`QuantizedTensor.to_layout`, exact
  both ways) because the decode kernels on it run at several times the rate of the GGUF layout's.
  For each group of 8 rows (in N order), for each 32-block (in K order), ``8 * block_bytes`` bytes:
  the 8 rows' fp16 scales (16 bytes, row r at bytes 2r, 2r + 1), then the quants as 32-byte
  vectors that each hold 4 consecutive k of the 8 rows (row r in bytes 4r .. 4r + 3 of the vector):
  for ``q8_0`` 8 vectors, vector j = the int8 elements 4j .. 4j + 3; for ``q4_0`` 4 vectors, vector
  j = GGUF bytes 4j .. 4j + 3 of each row's block, i.e. low nibbles = elements 4j .. 4j + 3 and high
  nibbles = elements 16 + 4j .. 16 + 4j + 3. No byte changes value: x8 is a shuffle of 4-byte pieces,
  with the same total size, and a group occupies exactly the bytes its 8 rows occupy in ``"rows"``.
  One vector load then feeds 8 rows' dot products (lane r = row r, no horizontal sums) and one
  128-bit load brings 8 scales.

  For the K-quants (``q4_k`` / ``q5_k`` / ``q6_k``, any N) ``"x8"`` interleaves each group of 8 rows
  super-block by super-block (``8 * block_bytes`` bytes each), keeping the block's fields in GGUF's
  order: the field at byte offset o of length L fills bytes [8o, 8o + 8L), in pieces of p bytes
  (p = 2 for the fp16 ``d`` / ``dmin``, 4 for the scales and quants): byte o + p * j + i of row r
  goes to 8o + 8p * j + p * r + i. So the 8 rows' ``d`` are 8 consecutive fp16, and their scales
  and quants vectors of 32 bytes with row r in bytes 4r .. 4r + 3. Where N is not a multiple of 8
  the last N % 8 rows stay in GGUF's row layout after the groups (row n starts at byte
  n * row_bytes in either layout).

At run time the activations are quantized too, per block of 32 along K, to int8 with an fp32 scale
(``d = max|x| / 127``, ``q = round-half-even(x / d)``), so the kernels' dot products are integer;
`_quantize_activations` is the reference for that step.
"""

from __future__ import annotations

import torch

from . import _backend, _memory, _policy
from .ops._checks import FLOAT_DTYPES, check_tensor

BLOCK = 32
# K-quants: super-blocks of 256 weights
QK_K = 256
# format name -> bytes per block (of 32 weights; of 256 for the K-quants)
_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_k": 144, "q5_k": 176, "q6_k": 210}
_BLOCK_SIZE = {"q8_0": BLOCK, "q4_0": BLOCK, "q4_k": QK_K, "q5_k": QK_K, "q6_k": QK_K}
_K_FORMATS = ("q4_k", "q5_k", "q6_k")
FORMATS = tuple(_BLOCK_BYTES)


def _check_format(fmt) -> str:
    if fmt not in _BLOCK_BYTES:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return fmt


def _row_bytes(fmt: str, k: int) -> int:
    return k // _BLOCK_SIZE[fmt] * _BLOCK_BYTES[fmt]


class QuantizedTensor:
    """A weight matrix [N, K] (or a stack of them, [E, N, K]) in GGUF's Q8_0 or Q4_0 blocks.

    Attributes:
        data: uint8 tensor [..., N, K // 32 * block_bytes], contiguous: in layout "rows", row n's
            blocks in K order; in layout "x8", the same bytes shuffled (see the module docstring).
        format: "q8_0" or "q4_0" (or a K-quant).
        shape: the logical shape (of the float weight it stands for), a torch.Size.
        layout: "rows" (GGUF's) or "x8" (K-quants; q8_0 / q4_0 with N a multiple of 8; `to_layout` converts).

    A plain object, not a tensor: it keeps one uint8 tensor, so a module that holds it as an
    attribute (or registers `data` as a buffer and rebuilds the object from it) stores the bytes
    once; `.to(device)` makes a copy on another device. Ops take it as its three parts (the uint8
    tensor, the format string and the shape), which is how it passes through torch.library ops.
    """

    __slots__ = ("data", "format", "shape", "layout")

    def __init__(self, data: torch.Tensor, format: str, shape, layout: str = "rows") -> None:
        _check_format(format)
        shape = torch.Size(int(s) for s in shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"shape must be [N, K] or [E, N, K], got {tuple(shape)}")
        if any(s <= 0 for s in shape):
            raise ValueError(f"shape must have positive dimensions, got {tuple(shape)}")
        k = shape[-1]
        bs = _BLOCK_SIZE[format]
        if k % bs:
            raise ValueError(f"K (the last dimension of shape) must be a multiple of {bs} for {format}, got K={k}")
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"data must be a torch.Tensor of uint8, got {type(data).__name__}")
        if data.dtype != torch.uint8:
            raise TypeError(f"data must have dtype uint8, got {data.dtype}")
        expected = (*shape[:-1], _row_bytes(format, k))
        if tuple(data.shape) != expected:
            raise ValueError(
                f"data must have shape {list(expected)} ({format} blocks of shape {list(shape)}: "
                f"{_BLOCK_BYTES[format]} bytes per {bs} weights), got {list(data.shape)}"
            )
        _check_layout(layout, format, shape)
        self.data = data.contiguous()
        self.format = format
        self.shape = shape
        self.layout = layout

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized blocks (what a pass over the weight reads)."""
        return self.data.numel()

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device) -> "QuantizedTensor":
        return QuantizedTensor(self.data.to(device), self.format, self.shape, self.layout)

    def to_layout(self, layout: str) -> "QuantizedTensor":
        """The same blocks in `layout` ("rows" or "x8"; see the module docstring): self when already
        in it, else a new tensor (exact both ways). "x8" needs a K-quant, or q8_0 / q4_0 with N a
        multiple of 8 (ValueError otherwise)."""
        _check_layout(layout, self.format, self.shape)
        if layout == self.layout:
            return self

        if self.format in _K_FORMATS:
            mats, n, k = self.shape[:-2].numel(), self.shape[-2], self.shape[-1]
            if self.device.type == "cpu" and _backend.cpu_extension_available() and hasattr(torch.ops.lfm_kernels_cpu, "kquant_relayout"):
                data = torch.ops.lfm_kernels_cpu.kquant_relayout(self.data, self.format, mats, n, k, layout)
            else:
                data = _krelayout_reference(self.data, self.format, mats, n, k, layout)
            return QuantizedTensor(data, self.format, self.shape, layout)
        rows = self.shape[:-1].numel()
        if self.device.type == "cpu" and _backend.cpu_extension_available() and hasattr(torch.ops.lfm_kernels_cpu, "quant_relayout"):
            data = torch.ops.lfm_kernels_cpu.quant_relayout(self.data, self.format, rows, self.shape[-1], layout)
        else:
            data = _relayout_reference(self.data, self.format, rows, self.shape[-1], layout)
        return QuantizedTensor(data, self.format, self.shape, layout)

    def _row_blocks(self, ids: torch.Tensor) -> torch.Tensor:
        """GGUF ("rows") blocks of rows `ids` [n] of a [N, K] weight -> uint8 [n, K // 32 * block_bytes],
        in either layout, reading only those rows' bytes (an embedding lookup)."""
        if self.layout == "rows":
            return self.data.index_select(0, ids)
        if self.format in _K_FORMATS:
            return _krow_blocks(self.data, self.format, self.shape[0], self.shape[1], ids)
        n, nb, bb = ids.numel(), self.shape[-1] // BLOCK, _BLOCK_BYTES[self.format]
        v = (bb - 2) // 4
        grp = self.data.view(self.shape[0] // 8, nb, 8 * bb).index_select(0, ids // 8)  # [n, nb, 8 bb]
        pick = (torch.arange(n, device=ids.device), ids % 8)
        scales = grp[:, :, :16].reshape(n, nb, 8, 2).permute(0, 2, 1, 3)[pick]  # [n, nb, 2]
        quants = grp[:, :, 16:].reshape(n, nb, v, 8, 4).permute(0, 3, 1, 2, 4)[pick]  # [n, nb, v, 4]
        return torch.cat([scales, quants.reshape(n, nb, 4 * v)], dim=2).reshape(n, nb * bb)

    def _rows_op(self, dtype: torch.dtype) -> bool:
        """Whether _dequantize_rows runs as the C++ lookup (a CPU [N, K] weight, float32 / bfloat16 out)."""
        return (len(self.shape) == 2 and self.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
                and _backend.cpu_extension_available() and hasattr(torch.ops.lfm_kernels_cpu, "quant_embedding"))

    def _dequantize_rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows `ids` (int64, any shape) of a [N, K] weight dequantized -> [*ids.shape, K] in `dtype` (an
        embedding lookup), the values of `dequantize()`; an id outside [0, N) is an IndexError. On the
        CPU one C++ op in either layout (`quant_embedding`): it never reads an id into Python, so a
        recorded decode step holds it, and it costs one dispatch per decoded token."""
        n, k = self.shape
        if self._rows_op(dtype):
            return torch.ops.lfm_kernels_cpu.quant_embedding(self.data, ids, self.format, self.layout, n, k, dtype)
        blocks = self._row_blocks(ids.reshape(-1))
        return QuantizedTensor(blocks, self.format, (blocks.shape[0], k)).dequantize(dtype).view(*ids.shape, k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight the blocks stand for, in `dtype` (values exact in float32; bfloat16 is the
        float32 value rounded to nearest even)."""

        if (self.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
                and _backend.cpu_extension_available() and hasattr(torch.ops.lfm_kernels_cpu, "quant_dequantize")):
            n, k = self.shape[-2], self.shape[-1]
            mats = 1
            for e in self.shape[:-2]:
                mats *= e
            out = torch.ops.lfm_kernels_cpu.quant_dequantize(self.data, self.format, self.layout, mats, n, k, dtype)
            return out.reshape(self.shape)
        return self._dequantize_torch(dtype)

    def _dequantize_torch(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """dequantize in torch operations: the reference for the C++ op (and the path without it)."""
        if self.layout != "rows":
            return self.to_layout("rows")._dequantize_torch(dtype)
        if self.format in _K_FORMATS:
            return _dequantize_k(self.data.reshape(-1, _BLOCK_BYTES[self.format]), self.format).reshape(self.shape).to(dtype)
        blocks = self.data.reshape(-1, _BLOCK_BYTES[self.format])
        d = blocks[:, :2].contiguous().view(torch.float16).float()  # [nb, 1]
        if self.format == "q8_0":
            q = blocks[:, 2:].contiguous().view(torch.int8).float()
        else:
            qs = blocks[:, 2:]
            q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float() - 8.0
        return (d * q).reshape(self.shape).to(dtype)

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(format={self.format!r}, shape={list(self.shape)}, layout={self.layout!r}, "
            f"nbytes={self.nbytes}, device={self.device})"
        )


LAYOUTS = ("rows", "x8")
_X8_FORMATS = ("q8_0", "q4_0")


def _check_layout(layout, fmt: str, shape) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "x8" and fmt not in _K_FORMATS:
        if fmt not in _X8_FORMATS:
            raise ValueError(
                f"layout 'x8' is for formats {_X8_FORMATS + _K_FORMATS}, got format {fmt!r} (keep layout 'rows')"
            )
        if shape[-2] % 8:
            raise ValueError(
                f"layout 'x8' needs N (the second-to-last dimension of shape) to be a multiple of 8, got shape "
                f"{list(shape)} (keep layout 'rows')"
            )


def _relayout_reference(data: torch.Tensor, fmt: str, rows: int, k: int, layout: str) -> torch.Tensor:
    """The layout conversion in torch (the reference for the C++ op quant_relayout): `rows` rows (a
    multiple of 8, never straddling two stacked matrices since each N is) of K in `fmt` blocks ->
    the same bytes in `layout` ("x8": from "rows"; "rows": from "x8"), data's shape."""
    nb, bb = k // BLOCK, _BLOCK_BYTES[fmt]
    v = (bb - 2) // 4
    if layout == "x8":
        blk = data.reshape(rows // 8, 8, nb, bb)
        scales = blk[..., :2].permute(0, 2, 1, 3).reshape(rows // 8, nb, 16)
        quants = blk[..., 2:].reshape(rows // 8, 8, nb, v, 4).permute(0, 2, 3, 1, 4).reshape(rows // 8, nb, 32 * v)
    else:
        grp = data.reshape(rows // 8, nb, 8 * bb)
        scales = grp[..., :16].reshape(rows // 8, nb, 8, 2).permute(0, 2, 1, 3)
        quants = grp[..., 16:].reshape(rows // 8, nb, v, 8, 4).permute(0, 3, 1, 2, 4).reshape(rows // 8, 8, nb, 4 * v)
    return torch.cat([scales, quants], dim=-1).reshape(data.shape).contiguous()


def _kernel_layout(qt):
    """The layout the CPU kernels run fastest on: `qt` in "x8" where that applies (`_wants_x8`), else
    `qt` itself (any other weight too)."""
    return qt.to_layout("x8") if _wants_x8(qt) else qt


def _kernel_layout_on_huge_pages(qt):
    """_kernel_layout(qt), its blocks written straight onto huge pages (lfm_kernels/_memory.py), for
    weights the decode kernels stream: the model wrapper's loader and `patch(model, quant=...)`.

    The relayout runs on about 1 MiB of rows at a time: x8 is 8-row groups in row order, so a chunk's
    output is a contiguous span of the whole's. Relayouting the whole tensor and copying it onto huge
    pages passed a tensor-sized temporary through the C heap per weight, and glibc kept up to 50 MB of
    those freed temporaries resident after a load (in one run of eight, same file)."""
    if not _wants_x8(qt):
        return qt
    n, k = int(qt.shape[-2]), int(qt.shape[-1])
    if n % 8:  # a K-quant's last group is partial: whole, as before
        return _memory.on_huge_pages(qt.to_layout("x8"))
    src = qt.data.reshape(-1, qt.data.shape[-1])
    dest = _memory.empty(*qt.data.shape, dtype=torch.uint8)
    flat = dest.view(-1, dest.shape[-1])
    step = max(8, (1 << 20) // src.shape[1] // 8 * 8)
    for r0 in range(0, src.shape[0], step):
        r1 = min(src.shape[0], r0 + step)
        flat[r0:r1].copy_(QuantizedTensor(src[r0:r1], qt.format, (r1 - r0, k)).to_layout("x8").data)
    return QuantizedTensor(dest, qt.format, qt.shape, "x8")


def _wants_x8(qt) -> bool:
    """Whether the CPU kernels run `qt` faster in "x8": a QuantizedTensor on the CPU in "rows", a K-quant,
    or q8_0 / q4_0 with N a multiple of 8."""
    return (
        isinstance(qt, QuantizedTensor)
        and qt.layout == "rows"
        and (qt.format in _K_FORMATS or (qt.format in _X8_FORMATS and qt.shape[-2] % 8 == 0))
        and qt.device.type == "cpu"
    )


# K-quant x8 (module docstring): per format, the block's fields as (byte offset, length, piece bytes)
_KX8_FIELDS = {
    "q4_k": ((0, 2, 2), (2, 2, 2), (4, 12, 4), (16, 128, 4)),
    "q5_k": ((0, 2, 2), (2, 2, 2), (4, 12, 4), (16, 32, 4), (48, 128, 4)),
    "q6_k": ((0, 128, 4), (128, 64, 4), (192, 16, 4), (208, 2, 2)),
}


def _kx8_from_rows(rows: torch.Tensor, fmt: str) -> torch.Tensor:
    """Groups of 8 GGUF rows uint8 [G, 8, nsb, block_bytes] -> their x8 bytes [G, nsb, 8 * block_bytes]."""
    g, _, nsb, _ = rows.shape
    parts = [
        rows[..., o : o + n].reshape(g, 8, nsb, n // p, p).permute(0, 2, 3, 1, 4).reshape(g, nsb, 8 * n)
        for o, n, p in _KX8_FIELDS[fmt]
    ]
    return torch.cat(parts, dim=-1)


def _kx8_to_rows(groups: torch.Tensor, fmt: str) -> torch.Tensor:
    """The inverse of _kx8_from_rows: [G, nsb, 8 * block_bytes] -> [G, 8, nsb, block_bytes]."""
    g, nsb, _ = groups.shape
    parts = [
        groups[..., 8 * o : 8 * (o + n)].reshape(g, nsb, n // p, 8, p).permute(0, 3, 1, 2, 4).reshape(g, 8, nsb, n)
        for o, n, p in _KX8_FIELDS[fmt]
    ]
    return torch.cat(parts, dim=-1)


def _krelayout_reference(data: torch.Tensor, fmt: str, mats: int, n: int, k: int, layout: str) -> torch.Tensor:
    """The K-quant layout conversion in torch (the reference for the C++ op kquant_relayout): `mats`
    stacked [n, k] matrices in the other layout -> the same bytes in `layout`, data's shape."""
    nsb, bb = k // QK_K, _BLOCK_BYTES[fmt]
    d = data.reshape(mats, n, nsb * bb)
    out = d.clone()
    full = n // 8 * 8
    if full:
        body = d[:, :full]
        if layout == "x8":
            conv = _kx8_from_rows(body.reshape(-1, 8, nsb, bb), fmt)
        else:
            conv = _kx8_to_rows(body.reshape(-1, nsb, 8 * bb), fmt)
        out[:, :full] = conv.reshape(mats, full, nsb * bb)
    return out.reshape(data.shape)


def _krow_blocks(data: torch.Tensor, fmt: str, n: int, k: int, ids: torch.Tensor) -> torch.Tensor:
    """GGUF blocks of rows `ids` of a K-quant [n, k] weight in layout x8 (reading only their groups)."""
    nsb, bb = k // QK_K, _BLOCK_BYTES[fmt]
    d = data.reshape(n, nsb * bb)
    full = n // 8 * 8
    out = torch.empty(ids.numel(), nsb * bb, dtype=torch.uint8, device=data.device)
    tail = ids >= full
    if tail.any():
        out[tail] = d.index_select(0, ids[tail])
    body = ids[~tail]
    if body.numel():
        grp = d[:full].reshape(full // 8, 8 * nsb * bb).index_select(0, body // 8).reshape(-1, nsb, 8 * bb)
        rows = _kx8_to_rows(grp, fmt)  # [n, 8, nsb, bb]
        out[~tail] = rows[torch.arange(body.numel(), device=data.device), body % 8].reshape(-1, nsb * bb)
    return out


def _k_scale_min(sc12: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's twelve scale bytes [nb, 12] -> the eight 6-bit scales and mins, each [nb, 8]."""
    s = sc12.to(torch.int32).reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _dequantize_k(blocks: torch.Tensor, fmt: str) -> torch.Tensor:
    """K-quant super-blocks uint8 [nb, block_bytes] -> fp32 [nb, 256], with the same fp32 operations
    (and so the same values) as gguf.quants' decoders."""
    nb = blocks.shape[0]
    f16 = lambda b: b.contiguous().view(torch.float16).float()  # noqa: E731
    shifts = torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    if fmt == "q6_k":
        ql, qh, sc, d = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208], f16(blocks[:, 208:210])
        d = (d * sc.contiguous().view(torch.int8).float()).reshape(nb, 16, 1)
        lo = ((ql.reshape(nb, 2, 1, 64) >> shifts) & 0x0F).reshape(nb, -1, 32)
        hi = ((qh.reshape(nb, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 0x03)
        q = (lo | (hi.reshape(nb, -1, 32) << 4)).float() - 32.0
        return (d * q.reshape(nb, 16, 16)).reshape(nb, QK_K)
    d, dmin = f16(blocks[:, 0:2]), f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    d = (d * sc.float()).reshape(nb, 8, 1)
    dm = (dmin * mn.float()).reshape(nb, 8, 1)
    if fmt == "q4_k":
        qs = blocks[:, 16:144]
        q = ((qs.reshape(nb, -1, 1, 32) >> shifts) & 0x0F).reshape(nb, 8, 32)
    else:
        qh, qs = blocks[:, 16:48], blocks[:, 48:176]
        ql = ((qs.reshape(nb, -1, 1, 32) >> shifts) & 0x0F).reshape(nb, 8, 32)
        bits = torch.arange(8, dtype=torch.uint8).reshape(1, 1, 8, 1)
        q = ql | (((qh.reshape(nb, 1, 1, 32) >> bits) & 0x01).reshape(nb, 8, 32) << 4)
    return (d * q.float() - dm).reshape(nb, QK_K)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    # C's roundf, computed the way gguf's numpy port does (floor of the fraction doubled), which is
    # exact in fp32 where floor(|v| + 0.5) is not (0.49999997 + 0.5 rounds up to 1).
    a = v.abs()
    fl = torch.floor(a)
    return torch.sign(v) * (fl + torch.floor(2 * (a - fl)))


def _fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    """fp32 [nb, 1] -> its fp16 (round to nearest even, overflow to inf) as 2 little-endian bytes."""
    return d.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _quantize_blocks(blocks: torch.Tensor, fmt: str) -> torch.Tensor:
    """fp32 [nb, 32] -> uint8 [nb, block_bytes], step for step as ggml's reference quantizers."""
    if fmt == "q8_0":
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = _round_half_away(blocks * inv).to(torch.int8).view(torch.uint8)
        return torch.cat([_fp16_bytes(d), q], dim=1)
    # q4_0: the scale maps the value of largest magnitude (the first one, sign kept) to -8
    imax = blocks.abs().argmax(dim=1, keepdim=True)
    d = blocks.gather(1, imax) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(blocks * inv + 8.5).clamp_(0, 15).to(torch.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)
    return torch.cat([_fp16_bytes(d), packed], dim=1)


def _non_finite_error(chunk: torch.Tensor, r0: int, fmt: str) -> ValueError:
    bad = (~torch.isfinite(chunk)).nonzero()[0]
    return ValueError(
        f"weight must be finite to quantize to {fmt}; it has {chunk[tuple(bad)].item()} at flat row "
        f"{r0 + int(bad[0])}, column {int(bad[1])}"
    )


def _cpp_quantizer_available(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and _backend._C is not None
            and hasattr(torch.ops.lfm_kernels_cpu, "quantize_rows"))


def quantize(weight: torch.Tensor, format: str) -> QuantizedTensor:
    """Quantizes a float weight [N, K] or [E, N, K] (K a multiple of 32) to GGUF's Q8_0 or Q4_0,
    or (K a multiple of 256) to Q4_K / Q5_K / Q6_K with llama.cpp's search (lfm_kernels/kquants.py).

    Byte-identical to ``gguf.quants.quantize`` (ggml's reference round-to-nearest) for Q8_0 / Q4_0,
    to `kquants.quantize` for the K-quants. NaN or infinite weights raise a ValueError (see the
    module docstring for the other edge cases). Works on the rows a few thousand at a time, so
    quantizing a large matrix needs little memory beyond the result.

    Cost: on CPU tensors, with the compiled extension, a C++ pass over the rows in parallel (the
    same bytes); Q8_0 / Q4_0 about as fast as reading the weight, the K-quants' search some hundred
    times slower per weight. Elsewhere (no extension, or a CUDA weight) the torch / numpy
    references run, one to two orders of magnitude slower than the C++ pass.
    """
    _check_weight(weight, format)
    return _quantize_checked(weight, format, _cpp_quantizer_available(weight))


def _check_weight(weight, format: str) -> None:
    _check_format(format)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"weight must have dtype float32, bfloat16 or float16, got {weight.dtype}")
    if weight.dim() not in (2, 3):
        raise ValueError(f"weight must have shape [N, K] or [E, N, K], got {tuple(weight.shape)}")
    k = weight.shape[-1]
    bs = _BLOCK_SIZE[format]
    if k % bs:
        raise ValueError(f"weight's K (last dimension) must be a multiple of {bs} for {format}, got K={k}")
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")


def _quantize_checked(weight: torch.Tensor, format: str, cpp: bool) -> QuantizedTensor:
    """quantize() after its argument checks; cpp picks the C++ op (True) or the references."""
    k = weight.shape[-1]
    rows = weight.reshape(-1, k)
    # ~16 MiB of fp32 (a copy only where the rows are not contiguous, or the fp32 temporaries of the
    # torch reference); the C++ op reads bf16 / fp16 as they are
    step = max(1, (1 << 22) // k)
    if cpp:
        op = torch.ops.lfm_kernels_cpu.quantize_rows
        out = None
        for r0 in range(0, rows.shape[0], step):
            chunk = rows[r0 : r0 + step].contiguous()
            try:
                blocks = op(chunk, format)
            except ValueError:
                if torch.isfinite(chunk).all():
                    raise
                raise _non_finite_error(chunk, r0, format) from None
            if r0 == 0 and blocks.shape[0] == rows.shape[0]:
                out = blocks
                break
            if out is None:
                out = torch.empty(rows.shape[0], _row_bytes(format, k), dtype=torch.uint8)
            out[r0 : r0 + step] = blocks
        return QuantizedTensor(out.reshape(*weight.shape[:-1], -1), format, weight.shape)
    if format in _K_FORMATS:
        from . import kquants

        if not torch.isfinite(weight).all():
            raise _non_finite_error(rows, 0, format)
        if weight.device.type != "cpu":
            raise ValueError(f"weight must be on the CPU to quantize to {format} (numpy quantizer), got {weight.device}")
        blocks = torch.from_numpy(kquants.quantize(weight, format.upper()))
        return QuantizedTensor(blocks, format, weight.shape)
    out = torch.empty(rows.shape[0], _row_bytes(format, k), dtype=torch.uint8, device=weight.device)
    for r0 in range(0, rows.shape[0], step):
        chunk = rows[r0 : r0 + step].float()
        if not torch.isfinite(chunk).all():
            raise _non_finite_error(chunk, r0, format)
        out[r0 : r0 + step] = _quantize_blocks(chunk.reshape(-1, BLOCK), format).reshape(chunk.shape[0], -1)
    return QuantizedTensor(out.reshape(*weight.shape[:-1], -1), format, weight.shape)


def _quantize_reference(weight: torch.Tensor, format: str) -> QuantizedTensor:
    """`quantize` on the torch (Q8_0 / Q4_0) / numpy (K-quants) references, never the C++ op: the
    tests' and benchmarks' other side (the same argument checks)."""
    _check_weight(weight, format)
    return _quantize_checked(weight, format, False)


def _quantize_activations(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation quantization, as a reference: x [M, K] (K a multiple of `block`) ->
    (q int8 [M, K], d float32 [M, K // block]) with x ~= d * q per block: 32 for Q8_0 / Q4_0 weights,
    256 for the K-quants (whose kernels also sum q per 16, exactly, for the mins and offsets).

    d = max|x| / 127 in fp32, q = round-half-even(x * (1 / d)) (0 where d is 0), so |q| <= 127. A
    block holding NaN or inf gets d = NaN and q = 0, so the outputs it feeds come out NaN."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // block, block)
    finite = torch.isfinite(blocks).all(dim=2, keepdim=True)
    blocks = torch.where(finite, blocks, torch.zeros_like(blocks))
    d = blocks.abs().amax(dim=2, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.round(blocks * inv).to(torch.int8)
    d = torch.where(finite, d, torch.full_like(d, float("nan")))
    return q.reshape(m, k), d.reshape(m, k // block)


def _linear_reference(x: torch.Tensor, qweight: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the quantized linear computes, in float64: the weight dequantized, x quantized as the
    kernels do, then exact products; the kernels differ only in summing in fp32 (their order).
    x [M, K] -> [M, N] float64."""
    bs = _BLOCK_SIZE[qweight.format]
    q, d = _quantize_activations(x, bs)
    m, k = x.shape
    xd = (q.double().reshape(m, k // bs, bs) * d.double().unsqueeze(-1)).reshape(m, k)
    out = xd @ qweight.dequantize(torch.float64).T
    if bias is not None:
        out = out + bias.double()
    return out


# ------------------------------------------------------------------------------------------------
# linear on a QuantizedTensor: the op behind lfm_kernels.linear(x, qweight).


def _linear_quant_impl(x: torch.Tensor, qweight: torch.Tensor, format: str, n: int, k: int, bias: torch.Tensor | None) -> torch.Tensor:
    if _backend.cpu_extension_available():
        op = torch.ops.lfm_kernels_cpu.linear_kquant.default if format in _K_FORMATS else torch.ops.lfm_kernels_cpu.linear_quant.default
        return op(x, qweight, format, n, k, bias)
    # no compiled extension: the float64 reference, after the one warning
    qt = QuantizedTensor(qweight, format, (n, k))
    return _linear_reference(x, qt, bias).to(x.dtype)


_linear_quant_op = torch.library.custom_op("lfm_kernels::linear_quant", _linear_quant_impl, mutates_args=())


@_linear_quant_op.register_fake
def _(x, qweight, format, n, k, bias):
    return x.new_empty(x.shape[0], n)


def _linear_quant_x8_impl(x: torch.Tensor, qweight: torch.Tensor, format: str, n: int, k: int, bias: torch.Tensor | None,
                          amx_min_rows: int = 0) -> torch.Tensor:
    name = "linear_kquant_x8" if format in _K_FORMATS else "linear_quant_x8"
    if _backend.cpu_extension_available() and hasattr(torch.ops.lfm_kernels_cpu, name):
        if format in _K_FORMATS:
            return torch.ops.lfm_kernels_cpu.linear_kquant_x8.default(x, qweight, format, n, k, bias)
        return torch.ops.lfm_kernels_cpu.linear_quant_x8.default(x, qweight, format, n, k, bias, amx_min_rows)
    qt = QuantizedTensor(qweight.reshape(n, -1), format, (n, k), "x8")
    return _linear_reference(x, qt, bias).to(x.dtype)


_linear_quant_x8_op = torch.library.custom_op("lfm_kernels::linear_quant_x8", _linear_quant_x8_impl, mutates_args=())


@_linear_quant_x8_op.register_fake
def _(x, qweight, format, n, k, bias, amx_min_rows=0):
    return x.new_empty(x.shape[0], n)


def _register_cpp_fakes() -> None:
    """Shapes of the C++ ops (lfm_kernels_cpu::linear_quant / quantize_activations) for tracing."""

    if _backend._C is None or not hasattr(torch.ops.lfm_kernels_cpu, "linear_quant"):
        return  # no extension, or one built before these ops existed

    @torch.library.register_fake("lfm_kernels_cpu::linear_quant")
    def _(x, qweight, format, n, k, bias):
        return x.new_empty(x.shape[0], n)

    if hasattr(torch.ops.lfm_kernels_cpu, "linear_kquant"):

        @torch.library.register_fake("lfm_kernels_cpu::linear_kquant")
        def _(x, qweight, format, n, k, bias):
            return x.new_empty(x.shape[0], n)

    if hasattr(torch.ops.lfm_kernels_cpu, "linear_quant_x8"):

        @torch.library.register_fake("lfm_kernels_cpu::linear_quant_x8")
        def _(x, qweight, format, n, k, bias, amx_min_rows=0):
            return x.new_empty(x.shape[0], n)

    if hasattr(torch.ops.lfm_kernels_cpu, "linear_kquant_x8"):

        @torch.library.register_fake("lfm_kernels_cpu::linear_kquant_x8")
        def _(x, qweight, format, n, k, bias):
            return x.new_empty(x.shape[0], n)

    if hasattr(torch.ops.lfm_kernels_cpu, "linear_quant_dequant_gemm"):

        @torch.library.register_fake("lfm_kernels_cpu::linear_quant_dequant_gemm")
        def _(x, qweight, format, layout, n, k, bias):
            return x.new_empty(x.shape[0], n)

        @torch.library.register_fake("lfm_kernels_cpu::quant_dequantize")
        def _(data, format, layout, mats, n, k, dtype):
            return data.new_empty(mats, n, k, dtype=dtype)

    @torch.library.register_fake("lfm_kernels_cpu::quantize_activations")
    def _(x):
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], x.shape[1] // BLOCK, dtype=torch.float32)


_register_cpp_fakes()


def _linear_route(x: torch.Tensor, qweight: QuantizedTensor) -> str:
    """The code a CPU call on these inputs runs now (x [M, K]), for the bench: "bf16-gemm" (dequantized
    bf16 panels through oneDNN), "amx-int8" (AMX tiles on the x8 layout), or the integer-dot kernels
    on the weight's layout, "x8" / "rows"."""
    gemm_rows, amx_rows = _policy.quant_routes("linear", x, qweight)
    m = x.shape[0]
    if gemm_rows and m >= gemm_rows:
        return "bf16-gemm"
    if amx_rows and m >= amx_rows and qweight.layout == "x8":
        return "amx-int8"
    return qweight.layout


def _linear(x: torch.Tensor, qweight: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """lfm_kernels.linear with a QuantizedTensor weight [N, K]: x [..., K] float32 / bfloat16 / float16
    -> [..., N] in x's dtype. CPU only."""

    check_tensor("x", x, dtypes=FLOAT_DTYPES, shape_hint="[..., K]")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., K], got a 0-d tensor")
    if len(qweight.shape) != 2:
        raise ValueError(f"weight must be a quantized [N, K] matrix for linear, got shape {list(qweight.shape)}")
    n, k = qweight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., K={k}] (K = the quantized weight's last dimension), got {tuple(x.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, shape_hint=f"[N={n}]")
        if bias.shape[0] != n:
            raise ValueError(f"bias must have shape [N={n}] (N = weight's first dimension), got {tuple(bias.shape)}")
    for name, t in (("x", x), ("weight", qweight.data), ("bias", bias)):
        if t is not None and t.device.type != "cpu":
            raise NotImplementedError(
                f"quantized weights run on the CPU only ({qweight.format} kernels are C++); {name} is on {t.device}"
            )
    flat = x.dim() == 2  # [M, K] as the kernels take it: no reshape either way (about 3 us each)
    x2 = x if flat else x.reshape(-1, k)
    if k > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    if not _backend.eager_cpu_fast_path(x2):
        out = _linear_on_route(x2, qweight, bias, _linear_route(x2, qweight))
        return out if flat else out.reshape(*x.shape[:-1], n)
    out = _eager_linear_call(x2, qweight)(x2, qweight.data, bias)
    return out if flat else out.reshape(*x.shape[:-1], n)


# The calls of eager CPU `linear` on quantized weights, per shape class: (route token, call). A call's
# route depends only on the format, layout, shape, rows, x's dtype, the threads and the policy, so
# it is asked once per class and policy instead of on every call (about 5 us of policy lookups and
# 20 us of Python layers on a 2-core EPYC against a 17 us op, for every projection of a model patched
# into transformers). Bounded, so calls at many row counts (prefills) cannot grow it without end.
_PUBLIC_CALLS: dict = {}
_PUBLIC_CALLS_MAX = 256


def _eager_linear_call(x2: torch.Tensor, qweight: QuantizedTensor):
    """`_linear_call` along the route a call with x2 [M, K] (on the eager CPU path) takes now, from
    _PUBLIC_CALLS while the policy state it was asked under holds (`lfm_kernels.linear` and the
    model's decode step both take it from here)."""
    n, k = qweight.shape
    key = (qweight.format, qweight.layout, n, k, x2.shape[0], x2.dtype, torch.get_num_threads())
    hit = _PUBLIC_CALLS.get(key)
    if hit is None or not _policy.same_route_token(hit[0], _policy.route_token()):
        call = _linear_call(qweight, _linear_route(x2, qweight), True)
        if len(_PUBLIC_CALLS) >= _PUBLIC_CALLS_MAX:
            _PUBLIC_CALLS.clear()
        # the token after the route: asking it may have measured a first-seen class
        hit = _PUBLIC_CALLS[key] = (_policy.route_token(), call)
    return hit[1]


def _linear_on_route(x2: torch.Tensor, qweight: QuantizedTensor, bias: torch.Tensor | None, route: str) -> torch.Tensor:
    """`_linear` on checked arguments, x2 [M, K], along `route` (`_linear_route(x2, qweight)`)."""
    if qweight.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return _linear_call(qweight, route, _backend.eager_cpu_fast_path(x2))(x2, qweight.data, bias)


def _linear_call(qweight: QuantizedTensor, route: str, eager: bool):
    """The call `_linear_on_route` makes along `route` for weights of qweight's format, layout and
    shape: a function (x2, blocks, bias) -> out of x2 [M, K] with unit stride along K and a weight's
    blocks. The model's decode step asks it once per shape class and step and calls it for every
    weight of that class (model/direct.py): the same op with the same arguments, without the Python
    layers in between. eager: run the custom ops' bodies instead of the registered ops (which
    torch.compile must see)."""
    n, k = qweight.shape
    fmt, layout = qweight.format, qweight.layout
    if route == "bf16-gemm" and hasattr(torch.ops.lfm_kernels_cpu, "linear_quant_dequant_gemm"):
        gemm = torch.ops.lfm_kernels_cpu.linear_quant_dequant_gemm.default
        return lambda x2, blocks, bias: gemm(x2, blocks, fmt, layout, n, k, bias)
    if layout == "x8":
        f = _linear_quant_x8_impl if eager else _linear_quant_x8_op
        amx_min_rows = int(route == "amx-int8")  # the op's AMX threshold: every row of this call, or none
        return lambda x2, blocks, bias: f(x2, blocks, fmt, n, k, bias, amx_min_rows)
    f = _linear_quant_impl if eager else _linear_quant_op
    return lambda x2, blocks, bias: f(x2, blocks, fmt, n, k, bias)
