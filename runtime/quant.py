"""Group-wise asymmetric min-max quantization (FlexGen's scheme) for weights and the KV cache.

    >>> cfg = QuantConfig(bits=4, group_size=64)
    >>> q = quantize(w, dim=0, cfg=cfg)                       # w: [in, out], groups along `in`
    >>> buf = torch.empty(compressed_nbytes(w.shape, -1, cfg), dtype=torch.uint8)
    >>> pack_into(q, buf)                                     # one flat byte buffer per tensor
    >>> dequantize(unpack_from(buf, w.shape, -1, cfg), out=slot)   # into a preallocated slot

Scheme. Along `dim`, every `group_size` consecutive values form a group with a float16 minimum
`mn` and a float16 step `scale`; a value is stored as the code q = clamp(round((x - mn) / scale),
0, 2**bits - 1) and restored as x_hat = mn + q * scale (computed in float32). `mn` is the group's
minimum rounded down to float16 and `scale` is (max - mn) / (2**bits - 1) rounded to float16 and
widened by one float16 step where the rounding left the group's maximum uncovered, so every value
lies in [mn, mn + levels * scale] and |x - x_hat| <= scale / 2 plus float32 rounding (the tests
use scale / 2 + 8 * 2**-23 * (|mn| + levels * scale)). Quantizing a dequantized tensor again
gives it back exactly (its values are on their own grid). Values must lie within float16's range
(|x| <= 65504); there is no check, as a check would cost a host sync in the loop.

Padding. When the size of `dim` is not a multiple of `group_size`, the last group is padded with
copies of its last real value (never widening that group's range, unlike zeros); the padded codes
are stored and dropped again on dequantization, so a round trip returns the original shape.

Layout (sizes: flexgen_graph.layout, which the planner reads too): groups stay where `dim` is. With shape = (*pre, n, *post), G = ceil(n / group_size) groups
and R = numel / n, one quantized tensor is one flat uint8 buffer:
    [0, 2RG)            scale  float16 [*pre, G, *post]
    [2RG, 4RG)          mn     float16 [*pre, G, *post]
    [4RG, 4RG + RGb)    data   uint8   [*pre, G, b, *post], b = group_size * bits / 8
At 4 bits, byte i of a group holds the group's value i in its low nibble and value i + group_size / 2
in its high nibble. Keeping the grouped dim in place (no transpose) makes dequantization of a weight
grouped along its input dim, [in, out] grouped along dim 0, write its output contiguously, where a
transposed copy was the slowest pass on the CPU (`flexgen-graph profile` measures the resulting
dequantization rate). The buffer must start at an even byte offset (float16 views).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flexgen_graph.layout import (  # the layout and its sizes: one definition, shared with the planner
    STAT_BYTES,
    QuantConfig,
    QuantError,
    compressed_nbytes,
    quant_geometry,
)

__all__ = ["QTensor", "QuantConfig", "QuantError", "compressed_nbytes", "dequantize", "fake_quantize", "pack_into",
           "quantize", "unpack_from"]

STAT_DTYPE = torch.float16  # per-group scale and minimum (STAT_BYTES each)


@dataclass(frozen=True, slots=True, eq=False)
class QTensor:
    data: torch.Tensor  # uint8 [*pre, G, group_bytes, *post]: packed codes (shape = (*pre, n, *post))
    scale: torch.Tensor  # float16 [*pre, G, *post]: step between codes
    mn: torch.Tensor  # float16 [*pre, G, *post]: value of code 0
    shape: tuple[int, ...]  # the original tensor's shape
    dim: int  # the grouped dim, non-negative
    cfg: QuantConfig

    @property
    def nbytes(self) -> int:
        return compressed_nbytes(self.shape, self.dim, self.cfg)


def _round_half_down(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the largest float16 <= x."""
    h = x.to(STAT_DTYPE)
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -math.inf)), h)


def _pack(codes: torch.Tensor, cfg: QuantConfig, axis: int) -> torch.Tensor:
    """codes: uint8 < 2**bits with the group_size values of a group along `axis` -> bytes, b per group."""
    if cfg.codes_per_byte == 1:
        return codes
    half = cfg.group_size // 2
    return codes.narrow(axis, 0, half) | (codes.narrow(axis, half, half) << cfg.bits)


def _unpack(data: torch.Tensor, cfg: QuantConfig, axis: int) -> torch.Tensor:
    if cfg.codes_per_byte == 1:
        return data
    return torch.cat((data & cfg.levels, data >> cfg.bits), axis)


def quantize(x: torch.Tensor, dim: int, cfg: QuantConfig) -> QTensor:
    """Quantize x in groups of cfg.group_size along dim, on x's device."""
    d, rows, n, groups = quant_geometry(tuple(x.shape), dim, cfg)
    g, levels = cfg.group_size, cfg.levels
    xf = x.float()  # xf: [*pre, n, *post]
    pad = groups * g - n
    if pad:
        # replicate the last value: the padding stays inside the last group's range
        last = xf.narrow(d, n - 1, 1)
        xf = torch.cat([xf, last.expand(*last.shape[:d], pad, *last.shape[d + 1:])], d)
    xg = xf.unflatten(d, (groups, g))  # xg: [*pre, G, g, *post]
    lo, hi = torch.aminmax(xg, dim=d + 1)  # lo, hi: [*pre, G, *post]
    mn = _round_half_down(lo)
    mn32 = mn.float()
    scale = ((hi - mn32) / levels).to(STAT_DTYPE)
    # nearest rounding may shrink the step so the top code falls short of the maximum: widen by one ulp
    short = mn32 + scale.float() * levels < hi
    scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
    s32 = scale.float()
    safe = torch.where(s32 > 0, s32, torch.ones_like(s32))  # a constant group has step 0: all codes 0
    codes = ((xg - mn32.unsqueeze(d + 1)) / safe.unsqueeze(d + 1)).round_().clamp_(0, levels).to(torch.uint8)
    return QTensor(_pack(codes, cfg, d + 1), scale, mn, tuple(int(s) for s in x.shape), d, cfg)


def dequantize(q: QTensor, out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor q stands for, of shape q.shape: written into `out` when given (its dtype wins over
    `dtype`), else a new contiguous tensor of `dtype` on q's device. Arithmetic is float32."""
    d, rows, n, groups = quant_geometry(q.shape, q.dim, q.cfg)
    if out is not None and tuple(out.shape) != q.shape:
        raise QuantError(f"dequantize: out has shape {tuple(out.shape)}, the quantized tensor is {q.shape}")
    if out is not None and out.dtype == torch.float32 and out.device.type == "cpu":
        _dequantize_cpu(q, d, n, out)
        return out
    mn, scale = q.mn.float().unsqueeze(d + 1), q.scale.float().unsqueeze(d + 1)
    codes = _unpack(q.data, q.cfg, d + 1)  # codes: [*pre, G, g, *post] uint8
    if out is not None and out.dtype == torch.float32 and out.is_contiguous() and groups * q.cfg.group_size == n:
        torch.addcmul(mn, codes, scale, out=out.view(codes.shape))  # one pass, in place
        return out
    x = torch.addcmul(mn, codes, scale).flatten(d, d + 1).narrow(d, 0, n)  # mn + code * scale: q.shape
    if out is None:
        return x.to(dtype).contiguous()
    return out.copy_(x)


def _dequantize_cpu(q: QTensor, d: int, n: int, out: torch.Tensor) -> None:
    """dequantize into a float32 `out` on the CPU, in place: the codes are widened straight into out, then scaled
    and shifted there (the CPU's addcmul on uint8 codes takes a slow mixed-dtype path; code * scale is exact in
    float32, 8-bit code by 11-bit mantissa, so this rounds as addcmul does). A padded last group is written
    apart, so a group size that does not divide the dim costs what one that does costs."""
    g, full = q.cfg.group_size, n // q.cfg.group_size
    mn, scale = q.mn.float().unsqueeze(d + 1), q.scale.float().unsqueeze(d + 1)

    def fill(o: torch.Tensor, first: int, count: int, width: int) -> None:
        """Groups [first, first + count) of q, their first `width` values, into o: [*pre, count, width, *post]."""
        data = q.data.narrow(d, first, count)
        if q.cfg.codes_per_byte == 1:
            o.copy_(data.narrow(d + 1, 0, width))
        else:  # byte i of a group: value i in its low nibble, value i + g / 2 in its high one (see Layout)
            half = g // 2
            lo = min(width, half)
            o.narrow(d + 1, 0, lo).copy_(data.narrow(d + 1, 0, lo) & q.cfg.levels)
            if width > half:
                o.narrow(d + 1, half, width - half).copy_(data.narrow(d + 1, 0, width - half) >> q.cfg.bits)
        o.mul_(scale.narrow(d, first, count)).add_(mn.narrow(d, first, count))

    if full:
        fill(out.narrow(d, 0, full * g).unflatten(d, (full, g)), 0, full, g)
    if n > full * g:
        fill(out.narrow(d, full * g, n - full * g).unsqueeze(d), full, 1, n - full * g)


def fake_quantize(x: torch.Tensor, dim: int, cfg: QuantConfig) -> torch.Tensor:
    """dequantize(quantize(x)) in x's dtype: what a consumer of the compressed tensor computes on."""
    return dequantize(quantize(x, dim, cfg), dtype=x.dtype)


def _check_buf(buf: torch.Tensor, nbytes: int, what: str) -> None:
    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        raise QuantError(f"{what}: buffer must be a flat contiguous uint8 tensor, "
                         f"got {buf.dtype} of shape {tuple(buf.shape)}")
    if buf.numel() != nbytes:
        raise QuantError(f"{what}: buffer holds {buf.numel()} bytes, the quantized tensor is {nbytes}")
    if buf.storage_offset() % STAT_BYTES:
        raise QuantError(f"{what}: buffer starts at odd byte offset {buf.storage_offset()}; "
                         "the float16 scales need an even one")


def pack_into(q: QTensor, buf: torch.Tensor) -> None:
    """Copy q into buf, a flat uint8 buffer of exactly q.nbytes bytes (any device), in the module's layout."""
    _check_buf(buf, q.nbytes, "pack_into")
    ng = q.scale.numel()
    buf[:ng * STAT_BYTES].view(STAT_DTYPE).copy_(q.scale.reshape(-1))
    buf[ng * STAT_BYTES:2 * ng * STAT_BYTES].view(STAT_DTYPE).copy_(q.mn.reshape(-1))
    buf[2 * ng * STAT_BYTES:].copy_(q.data.reshape(-1))


def unpack_from(buf: torch.Tensor, shape: tuple[int, ...] | torch.Size, dim: int, cfg: QuantConfig) -> QTensor:
    """A QTensor whose fields are views into buf (no copies), as pack_into laid it out."""
    d, rows, _, groups = quant_geometry(tuple(shape), dim, cfg)
    _check_buf(buf, compressed_nbytes(shape, dim, cfg), "unpack_from")
    ng = math.prod(rows) * groups
    pre, post = tuple(shape[:d]), tuple(shape[d + 1:])
    scale = buf[:ng * STAT_BYTES].view(STAT_DTYPE).view(*pre, groups, *post)
    mn = buf[ng * STAT_BYTES:2 * ng * STAT_BYTES].view(STAT_DTYPE).view(*pre, groups, *post)
    data = buf[2 * ng * STAT_BYTES:].view(*pre, groups, cfg.group_bytes, *post)
    return QTensor(data, scale, mn, tuple(int(s) for s in shape), d, cfg)
