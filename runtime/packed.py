"""Matmuls on compressed weights without a dense copy of the layer.

    >>> cfg = QuantConfig(4, 32)
    >>> q = quantize(w, 0, cfg)                              # w: [in, out], grouped along in
    >>> buf = torch.empty(sum(int4_packed_geometry(w.shape, cfg)), dtype=torch.uint8)
    >>> pack_into_int4(q, buf)                               # once, when the compressed copy is built
    >>> y = x @ Int4Weight.view(buf, w.shape, cfg)           # x: [..., in] -> y: [..., out]
    >>> views = packed_layer_views(spec, layer, layer_buf, cfg)  # what the kernels compute on

4 bits: torch's CPU kernel `_weight_int4pack_mm_for_cpu` reads a weight [out, in] repacked by
`_convert_weight_to_int4pack_for_cpu` (an opaque tiled nibble order, the same bytes as the codes) and a
[G, out, 2] table of (scale, zero) per group, computing w = (code - 8) * scale + zero; our scheme is
w = mn + code * scale, so zero = mn + 8 * scale. The kernel is vectorized for bfloat16 only (float32 runs
a scalar loop 30-60x slower: bench/packed_kernels.py), so the table is bfloat16 (4 bytes a group, as
float16 scale + minimum are: the same size as runtime.quant's layout) and x is cast to bfloat16, the
result back. Numerics: the weights the kernel uses are `Int4Weight.dequantize()` (scale and zero rounded
to bfloat16: at most 2**-9 of their size off the FlexGen values), times bfloat16 activations, with a
bfloat16 result: relative error about 1e-2 of a matmul's output (tests/test_packed.py). A matmul of many
rows (prefill) instead restores its matrix to bfloat16 with the kernel and runs a dense GEMM (int4_matmul).
4-bit matrices the kernel cannot take (out not a multiple of 16, in not a multiple of the group size;
8 bits has no packed kernel, bench/packed_kernels.py): `TiledWeight`, which dequantizes a block of output columns at a time into a small scratch
and multiplies it, never the whole matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexgen_graph.layout import QuantConfig, int4_kernel_fits, int4_packed_geometry
from flexgen_graph.spec import ModelSpec
from runtime.kernels import TORCH_DTYPES
from runtime.quant import QTensor, dequantize, unpack_from

STATS_DTYPE = torch.bfloat16  # the kernel's fast path: activations and stats in bfloat16
TILE_BYTES = 1 << 19
# rows per input element above which restoring the matrix to bfloat16 and a dense GEMM beat the int4 kernel
# (SmolLM2 shapes: 2.3-3.4x faster at 2816 rows, slower at 512 rows of a 576-wide input)
DENSE_ROWS_PER_IN = 1.5  # a dequantized tile stays within a core's L2 (measured: bench/packed_kernels.py)


def _codes(q: QTensor) -> torch.Tensor:
    """The codes of a 2-d QTensor grouped along dim 0: int32 [G * g, out] (padded rows included)."""
    assert q.dim == 0 and len(q.shape) == 2, f"packed: a [in, out] matrix grouped along in, got {q.shape} dim {q.dim}"
    if q.cfg.codes_per_byte == 1:
        c = q.data
    else:
        c = torch.cat((q.data & q.cfg.levels, q.data >> q.cfg.bits), 1)  # [G, g, out]
    return c.flatten(0, 1).int()


def pack_into_int4(q: QTensor, buf: torch.Tensor) -> None:
    """Write q (4-bit, [in, out] grouped along in) into buf in the int4 kernel's layout:
    [0, S): scales and zeros bfloat16 [G, out, 2]; [S, S + out * in / 2): the repacked codes [out, in / 2]."""
    cfg = q.cfg
    assert int4_kernel_fits(q.shape, cfg), f"pack_into_int4: {q.shape} at group size {cfg.group_size} does not fit"
    sz_bytes, code_bytes = int4_packed_geometry(q.shape, cfg)
    assert buf.numel() == sz_bytes + code_bytes, f"pack_into_int4: buffer {buf.numel()} != {sz_bytes + code_bytes}"
    s, mn = q.scale.float(), q.mn.float()  # [G, out]
    buf[:sz_bytes].view(STATS_DTYPE).view(*s.shape, 2).copy_(torch.stack((s, mn + 8 * s), -1))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(_codes(q).t().contiguous(), 1)  # [out, in / 2]
    buf[sz_bytes:].copy_(packed.view(torch.uint8).reshape(-1))


@dataclass(frozen=True, slots=True, eq=False)
class Int4Weight:
    """Views into a layer buffer holding one matrix in the int4 kernel's layout; `x @ w` computes on it."""

    codes: torch.Tensor  # uint8 [out, in / 2], the kernel's nibble order
    scales_zeros: torch.Tensor  # bfloat16 [G, out, 2]
    shape: tuple[int, int]  # (in, out) of the dense matrix
    group_size: int

    @classmethod
    def view(cls, buf: torch.Tensor, shape: tuple[int, int], cfg: QuantConfig) -> Int4Weight:
        sz_bytes, code_bytes = int4_packed_geometry(shape, cfg)
        k, n = shape
        sz = buf[:sz_bytes].view(STATS_DTYPE).view(k // cfg.group_size, n, 2)
        return cls(buf[sz_bytes:sz_bytes + code_bytes].view(n, k // 2), sz, (int(k), int(n)), cfg.group_size)

    def __rmatmul__(self, x: torch.Tensor) -> torch.Tensor:
        return int4_matmul(x, self)

    def dense_bf16(self) -> torch.Tensor:
        """The [in, out] matrix the kernel multiplies by, rounded to bfloat16: the kernel applied to the identity."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(self.shape[0], dtype=STATS_DTYPE), self.codes,
                                                          self.group_size, self.scales_zeros)

    def dequantize(self) -> torch.Tensor:
        """The float32 [in, out] matrix the kernel multiplies by (tests and references; not on the hot path)."""
        k = self.shape[0]
        ones = torch.ones_like(self.scales_zeros)
        ones[..., 1] = 8  # scale 1, zero 8: the kernel on the identity returns the codes themselves (exact in bf16)
        codes = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(k, dtype=STATS_DTYPE), self.codes,
                                                           self.group_size, ones).float()  # [in, out]
        s, z = (self.scales_zeros[..., i].float().repeat_interleave(self.group_size, 0) for i in (0, 1))
        return (codes - 8) * s + z


def int4_matmul(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x: [..., in] -> x @ w: [..., out] in x's dtype (computed in bfloat16). Beyond DENSE_ROWS_PER_IN x in rows
    (prefill) the kernel is compute bound at 2-3x a bfloat16 GEMM's time, so the matrix (only this one) is
    restored to bfloat16 by the kernel itself and multiplied densely: measured in bench/packed_kernels.py."""
    lead, k = x.shape[:-1], w.shape[0]
    x2 = x.reshape(-1, k).to(STATS_DTYPE)
    if x2.shape[0] > DENSE_ROWS_PER_IN * k:
        y = x2 @ w.dense_bf16()
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w.codes, w.group_size, w.scales_zeros)
    return y.to(x.dtype).view(*lead, w.shape[1])


@dataclass(frozen=True, slots=True, eq=False)
class TiledWeight:
    """A QTensor [in, out] grouped along in, multiplied a block of output columns at a time: each block is
    dequantized into a scratch of at most TILE_BYTES and multiplied, so no dense copy of the matrix exists."""

    q: QTensor
    cols: int  # output columns per tile

    @classmethod
    def from_qtensor(cls, q: QTensor) -> TiledWeight:
        k, n = q.shape
        return cls(q, max(16, min(n, TILE_BYTES // (4 * k) // 16 * 16)))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.q.shape
        lead, x2 = x.shape[:-1], x.reshape(-1, k)
        y = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
        q = self.q
        for c0 in range(0, n, self.cols):
            c1 = min(n, c0 + self.cols)
            part = QTensor(q.data[..., c0:c1], q.scale[:, c0:c1], q.mn[:, c0:c1], (k, c1 - c0), 0, q.cfg)
            y[:, c0:c1] = x2 @ dequantize(part, dtype=x.dtype)
        return y.view(*lead, n)

    def __rmatmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


def packed_int4(q: QTensor) -> Int4Weight:
    """q in the int4 kernel's layout, in a buffer of its own (benchmarks and tests)."""
    sz, code = int4_packed_geometry(q.shape, q.cfg)
    buf = torch.empty(sz + code, dtype=torch.uint8)
    pack_into_int4(q, buf)
    return Int4Weight.view(buf, q.shape, q.cfg)


@dataclass(frozen=True, slots=True, eq=False)
class RowTable:
    """An embedding table [V, H] compressed along H: `table[ids]` dequantizes the rows it reads, no others."""

    q: QTensor
    dtype: torch.dtype

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.q  # data: [V, G, b], scale, mn: [V, G]
        rows = QTensor(q.data[ids], q.scale[ids], q.mn[ids], (*ids.shape, q.shape[-1]), ids.dim(), q.cfg)
        return dequantize(rows, dtype=self.dtype)  # [*ids.shape, H]


def packed_layer_views(spec: ModelSpec, layer: int, buf: torch.Tensor, cfg: QuantConfig) -> dict[str, object]:
    """What the kernels compute on, one per tensor name, over a compressed layer buffer written with
    packed=True (runtime.compressed.compress_layer): a linear map the int4 kernel takes as an Int4Weight,
    any other linear map as a TiledWeight, an embedding table as a RowTable, a vector as a typed view.
    None of them copies the layer: `x @ w` and `table[ids]` read the compressed bytes."""
    dtype = TORCH_DTYPES[spec.dtype]
    linear = {t.name for t in spec.layer_tensors(layer) if t.linear}
    out: dict[str, object] = {}
    for s in spec.compressed_layer_layout(layer, cfg):
        src = buf[s.offset:s.offset + s.nbytes]
        if s.dim is None:
            out[s.name] = src.view(dtype).view(s.shape)
        elif s.name in linear and int4_kernel_fits(s.shape, cfg):
            out[s.name] = Int4Weight.view(src, s.shape, cfg)
        elif s.name in linear:
            out[s.name] = TiledWeight.from_qtensor(unpack_from(src, s.shape, s.dim, cfg))
        else:
            out[s.name] = RowTable(unpack_from(src, s.shape, s.dim, cfg), dtype)
    return out
