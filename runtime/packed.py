"""Matmuls on compressed weights without a dense copy of the layer.

    >>> cfg = QuantConfig(4, 32)                             # or QuantConfig(8, 32)
    >>> q = quantize(w, 0, cfg)                              # w: [in, out], grouped along in
    >>> buf = torch.empty(sum(packed_geometry(w.shape, cfg)), dtype=torch.uint8)
    >>> pack_for_kernel(q, buf)                              # once, when the compressed copy is built
    >>> y = x @ PackedWeight.view(buf, w.shape, cfg)         # x: [..., in] -> y: [..., out]
    >>> views = packed_layer_views(spec, layer, layer_buf, cfg)  # what the kernels compute on

torch's CPU kernel `_weight_int4pack_mm_for_cpu` reads a weight [out, in] repacked by
`_convert_weight_to_int4pack_for_cpu` (an opaque tiled nibble order, the same bytes as the codes) and a
[G, out, 2] table of (scale S, zero Z) per group, computing w = (code - 8) * S + Z; our scheme is
w = mn + code * s. The kernel is vectorized for bfloat16 only (float32 runs a scalar loop 30-60x slower:
bench/packed_kernels.py), so the table is bfloat16 (4 bytes a group, as float16 scale + minimum are: the
same size as runtime.quant's layout) and x is cast to bfloat16, the result back.
- 4 bits: S = s, Z = mn + 8 s.
- 8 bits: each code split into nibbles, code = 16 hi + lo; each group's hi nibbles then its lo nibbles go
  side by side along the kernel's input (a kernel group of 2 x group_size), and x enters as (16 x_g, x_g) per
  group (exact in bfloat16). One table entry serves both halves: 16 ((hi - 8) S + Z) + ((lo - 8) S + Z) =
  S code - 136 S + 17 Z = s code + mn with S = s, Z = (mn + 136 s) / 17. Same bytes as the 8-bit codes, one
  kernel call, twice the kernel's work per weight of 4 bits; as fast as two int4 calls (a table each) and
  5-10x faster than a per-group `_weight_int8pack_mm` (per-channel scales only) at 1 row.
Numerics: the weights the kernel uses are `PackedWeight.dequantize()`: S and Z rounded to bfloat16 (2**-9 of
their size; Z set against the rounded S, _scales_zeros), at most 2**-8 of the matrix's largest weight off the
FlexGen values at either bits (at 8 bits about half a quantization step at worst, unbiased), times bfloat16
activations, with a bfloat16 result: relative error about 1e-2 of a matmul's output (tests/test_packed.py).
Every matmul, prefill's too, runs the kernel: its layout is torch's private one and differs per dispatched CPU
capability (AVX-512, AVX2, scalar), so nothing here reads it. References read the kernel's codes through the
kernel itself (PackedWeight.kernel_codes), a packed copy is made for one capability (runtime.compressed), and
check_kernel refuses a CPU whose kernel does not compute what the codes say.
Matrices the kernel cannot take (out not a multiple of 16, in not a multiple of the group size, a group size
it lacks): `TiledWeight`, which dequantizes a block of output columns at a time into a small scratch and
multiplies it, never the whole matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexgen_graph.layout import (
    PACKED_TILE_BYTES,
    QuantConfig,
    packed_geometry,
    packed_kernel_fits,
    packed_kernel_group,
)
from flexgen_graph.errors import UserError
from flexgen_graph.spec import ModelSpec
from runtime.kernels import TORCH_DTYPES
from runtime.quant import QTensor, dequantize, quantize, unpack_from

STATS_DTYPE = torch.bfloat16  # the kernel's fast path: activations and stats in bfloat16
HI = 16  # 8 bits: code = HI * hi + lo
_HI_LO = torch.tensor([[HI], [1]], dtype=STATS_DTYPE)  # a group's input for its high, then low nibbles
CHECK_OUT = 80  # the self-check's output channels: a whole block of 64 (AVX-512), of 32 (AVX2, scalar) and a tail


def kernel_capability() -> str:
    """The CPU capability torch dispatches its kernels for (ATEN_CPU_CAPABILITY may lower it): the int4 kernel's
    packed layout depends on it, so a packed copy is made for one capability and read under that one only."""
    return torch.backends.cpu.get_cpu_capability().lower().replace(" ", "_")


def kernel_tag() -> dict[str, str]:
    """What a packed copy was packed for, in its manifest: the layout is private to torch's kernel."""
    return {"torch": torch.__version__.split("+")[0], "capability": kernel_capability()}


def _convert(nibbles_t: torch.Tensor) -> torch.Tensor:
    """The kernel's own repacking of int32 [out, in'] nibbles (the one place its layout is made)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles_t, 1)


def _codes(q: QTensor) -> torch.Tensor:
    """The codes of a 2-d QTensor grouped along dim 0: int32 [G * g, out] (padded rows included)."""
    assert q.dim == 0 and len(q.shape) == 2, f"packed: a [in, out] matrix grouped along in, got {q.shape} dim {q.dim}"
    if q.cfg.codes_per_byte == 1:
        c = q.data
    else:
        c = torch.cat((q.data & q.cfg.levels, q.data >> q.cfg.bits), 1)  # [G, g, out]
    return c.flatten(0, 1).int()


def _nibbles(q: QTensor) -> torch.Tensor:
    """The kernel's input rows of q's codes, int32 [in x bits / 4, out]: 4 bits, the codes; 8 bits, per group
    its high nibbles then its low ones (the kernel's group is both)."""
    c = _codes(q)
    if q.cfg.bits == 4:
        return c
    g, n = q.cfg.group_size, c.shape[1]
    return torch.stack(((c >> 4).view(-1, g, n), (c & 15).view(-1, g, n)), 1).reshape(-1, n)


def _scales_zeros(q: QTensor) -> torch.Tensor:
    """(S, Z) float32 [G, out, 2] such that the kernel's weights are FlexGen's (module docstring). Z is taken
    against S as rounded to bfloat16 and centres that rounding's error over the codes (at 8 bits 255 x S's
    rounding reaches half a step; centred, a quarter)."""
    s, mn = q.scale.float(), q.mn.float()
    sb = s.to(STATS_DTYPE).float()
    centre = (mn + q.cfg.levels / 2 * (s - sb))  # the minimum that centres code x (s - sb) over the codes
    zero = centre + 8 * sb if q.cfg.bits == 4 else (centre + 8 * (HI + 1) * sb) / (HI + 1)
    return torch.stack((sb, zero), -1)


def pack_for_kernel(q: QTensor, buf: torch.Tensor) -> None:
    """Write q (4 or 8 bits, [in, out] grouped along in) into buf in the int4 kernel's layout: [0, T): scales and
    zeros bfloat16 [G, out, 2]; [T, T + out * in * bits / 8): the repacked nibbles [out, in * bits / 8]."""
    cfg = q.cfg
    assert packed_kernel_fits(q.shape, cfg), f"pack_for_kernel: {q.shape} at {cfg} does not fit"
    sz_bytes, code_bytes = packed_geometry(q.shape, cfg)
    assert buf.numel() == sz_bytes + code_bytes, f"pack_for_kernel: buffer {buf.numel()} != {sz_bytes + code_bytes}"
    sz = _scales_zeros(q)
    buf[:sz_bytes].view(STATS_DTYPE).view(sz.shape).copy_(sz)
    packed = _convert(_nibbles(q).t().contiguous())
    buf[sz_bytes:].copy_(packed.view(torch.uint8).reshape(-1))


@dataclass(frozen=True, slots=True, eq=False)
class PackedWeight:
    """Views into a layer buffer holding one matrix in the int4 kernel's layout; `x @ w` computes on it."""

    codes: torch.Tensor  # uint8 [out, in * bits / 8], the kernel's nibble order
    scales_zeros: torch.Tensor  # bfloat16 [G, out, 2]
    shape: tuple[int, int]  # (in, out) of the dense matrix
    group_size: int
    bits: int

    @classmethod
    def view(cls, buf: torch.Tensor, shape: tuple[int, int], cfg: QuantConfig) -> PackedWeight:
        sz_bytes, code_bytes = packed_geometry(shape, cfg)
        k, n = shape
        sz = buf[:sz_bytes].view(STATS_DTYPE).view(k // cfg.group_size, n, 2)
        codes = buf[sz_bytes:sz_bytes + code_bytes].view(n, code_bytes // n)
        return cls(codes, sz, (int(k), int(n)), cfg.group_size, cfg.bits)

    @property
    def kernel_group(self) -> int:
        return packed_kernel_group(QuantConfig(self.bits, self.group_size))

    def kernel_input(self, x2: torch.Tensor) -> torch.Tensor:
        """x2: [rows, in] -> the kernel's bfloat16 input: x2 (4 bits), or (16 x_g, x_g) per group (8 bits; x16
        commutes with the rounding to bfloat16). One op either way: decode calls this per matmul."""
        if self.bits == 4:
            return x2.to(STATS_DTYPE)
        rows, g = x2.shape[0], self.group_size
        out = torch.empty(rows, x2.shape[1] // g, 2, g, dtype=STATS_DTYPE)
        return torch.mul(x2.reshape(rows, -1, 1, g), _HI_LO, out=out).view(rows, -1)

    def kernel(self, x2: torch.Tensor, scales_zeros: torch.Tensor | None = None) -> torch.Tensor:
        """The kernel on its own input rows x2 (kernel_input), bfloat16 [rows, out]."""
        sz = self.scales_zeros if scales_zeros is None else scales_zeros
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.codes, self.kernel_group, sz)

    def __rmatmul__(self, x: torch.Tensor) -> torch.Tensor:
        return packed_matmul(x, self)

    def kernel_codes(self, r0: int, r1: int) -> torch.Tensor:
        """The codes of the kernel's input rows [r0, r1), float32 [r1 - r0, out], read through the kernel itself
        (its layout is torch's private one, different per CPU capability): those rows of the identity times a
        table of S = 1, Z = 8, so each weight is its code, exact in bfloat16. Costs the kernel's work on
        r1 - r0 rows: for tests and references, not for the hot path."""
        width = self.codes.shape[1] * 2  # the kernel's input rows
        eye = torch.zeros(r1 - r0, width, dtype=STATS_DTYPE)
        eye[torch.arange(r1 - r0), torch.arange(r0, r1)] = 1
        unit = torch.empty_like(self.scales_zeros)
        unit[..., 0], unit[..., 1] = 1, 8
        return self.kernel(eye, unit).float()

    def dequantize(self) -> torch.Tensor:
        """The float32 [in, out] matrix the kernel multiplies by, (code - 8) S + Z per its own table (tests and
        references): a group's codes at a time, each group through kernel_codes."""
        k, n = self.shape
        g, kg = self.group_size, self.kernel_group
        out = torch.empty(k, n)
        step = max(1, (1 << 22) // (4 * kg * n))  # groups per block: a few MiB of codes
        for g0 in range(0, k // g, step):
            g1 = min(k // g, g0 + step)
            codes = self.kernel_codes(g0 * kg, g1 * kg).view(g1 - g0, kg, n)
            sz = self.scales_zeros[g0:g1, None].float()  # [groups, 1, out, 2]
            w = torch.addcmul(sz[..., 1] - 8 * sz[..., 0], codes, sz[..., 0])  # the kernel's (code - 8) S + Z
            if self.bits == 8:
                w = w[:, :g].mul_(HI).add_(w[:, g:])  # a group's high nibbles, then its low ones
            out[g0 * g:g1 * g] = w.reshape(-1, n)
        return out


def packed_matmul(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """x: [..., in] -> x @ w: [..., out] in x's dtype (computed in bfloat16), through the kernel at any number
    of rows: a dense restore would have to read the kernel's private layout (bench/packed_kernels.py times it
    against dense float32)."""
    lead, k = x.shape[:-1], w.shape[0]
    y = w.kernel(w.kernel_input(x.reshape(-1, k)))
    return y.to(x.dtype).view(*lead, w.shape[1])


def check_kernel(cfg: QuantConfig) -> None:
    """Refuse, in one line, a CPU on which the kernel and its repacking do not compute what our codes say: a
    random probe of CHECK_OUT output channels, quantized, packed and multiplied, against the same rows times its
    FlexGen-dequantized weights (float32), within bfloat16 rounding (the bound tests/test_packed.py holds)."""
    key = (kernel_capability(), cfg)
    if key in _CHECKED:
        return
    gen = torch.Generator().manual_seed(0)
    k = 2 * packed_kernel_group(cfg) * 4 // cfg.bits  # two kernel groups
    w = torch.randn(k, CHECK_OUT, generator=gen) * 0.05
    x = torch.randn(3, k, generator=gen)
    q = quantize(w, 0, cfg)
    wq = dequantize(q)
    got = packed_matmul(x, packed_weight(q))
    err = float((got - x @ wq).abs().max())
    bound = 2 ** -6 * float((x.abs() @ wq.abs()).max())
    if not err <= bound:  # not <=: a NaN fails too
        raise UserError(f"packed weights: torch {torch.__version__}'s int4 kernel on this CPU (capability "
                        f"{kernel_capability()}) computes {err:.3g} off a {cfg.bits}-bit probe (bfloat16 rounding allows "
                        f"{bound:.3g}); run without --packed (ATEN_CPU_CAPABILITY=default may dispatch a kernel that works)")
    _CHECKED.add(key)


_CHECKED: set[tuple[str, QuantConfig]] = set()


@dataclass(frozen=True, slots=True, eq=False)
class TiledWeight:
    """A QTensor [in, out] grouped along in, multiplied a block of output columns at a time: each block is
    dequantized into a scratch of at most PACKED_TILE_BYTES and multiplied, so no dense copy of the matrix exists."""

    q: QTensor
    cols: int  # output columns per tile

    @classmethod
    def from_qtensor(cls, q: QTensor) -> TiledWeight:
        k, n = q.shape
        return cls(q, max(16, min(n, PACKED_TILE_BYTES // (4 * k) // 16 * 16)))

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


def packed_weight(q: QTensor) -> PackedWeight:
    """q in the int4 kernel's layout, in a buffer of its own (benchmarks and tests)."""
    sz, code = packed_geometry(q.shape, q.cfg)
    buf = torch.empty(sz + code, dtype=torch.uint8)
    pack_for_kernel(q, buf)
    return PackedWeight.view(buf, q.shape, q.cfg)


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
    packed=True (runtime.compressed.compress_layer): a linear map the int4 kernel takes as a PackedWeight,
    any other linear map as a TiledWeight, an embedding table as a RowTable, a vector as a typed view.
    None of them copies the layer: `x @ w` and `table[ids]` read the compressed bytes."""
    dtype = TORCH_DTYPES[spec.dtype]
    linear = {t.name for t in spec.layer_tensors(layer) if t.linear}
    out: dict[str, object] = {}
    for s in spec.compressed_layer_layout(layer, cfg):
        src = buf[s.offset:s.offset + s.nbytes]
        if s.dim is None:
            out[s.name] = src.view(dtype).view(s.shape)
        elif s.name in linear and packed_kernel_fits(s.shape, cfg):
            out[s.name] = PackedWeight.view(src, s.shape, cfg)
        elif s.name in linear:
            out[s.name] = TiledWeight.from_qtensor(unpack_from(src, s.shape, s.dim, cfg))
        else:
            out[s.name] = RowTable(unpack_from(src, s.shape, s.dim, cfg), dtype)
    return out
