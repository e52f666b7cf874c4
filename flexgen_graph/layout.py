"""Tensor layouts, dense and compressed: where each tensor of a layer sits in the layer's flat byte
buffer, and how many bytes a group-wise compressed tensor takes. One definition, torch-free: the
planner sizes the plan's buffers with it, the runtime views and fills those buffers with it.

    >>> t = (TensorSpec("w", (128, 96), linear=True), TensorSpec("b", (96,)))
    >>> [(s.name, s.offset, s.nbytes) for s in dense_layout(t, 2)]
    [('w', 0, 24576), ('b', 24576, 192)]
    >>> [(s.name, s.offset, s.nbytes, s.dim) for s in compressed_layout(t, 2, QuantConfig(4, 64))]  # 96 x 2 groups x 36
    [('w', 0, 6912, 0), ('b', 6912, 192, None)]

Every tensor starts ALIGN_BYTES-aligned. Compression (FlexGen's scheme, arithmetic in runtime.quant):
a matrix is grouped along its `quant_dim` in groups of `group_size` elements (a dim that is not a
multiple is padded to one), each group stored as float16 scale and minimum plus packed codes; vectors
(norms, biases) stay in the model dtype. A plan computing on packed weights (policy packed_weights) holds
the linear maps the CPU int4 kernel takes in that kernel's layout instead (packed_geometry; 8-bit codes as two
nibbles): the same bytes per tensor, so every size here holds for it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Iterable

from flexgen_graph.errors import UserError

ALIGN_BYTES = 64  # tensor offsets inside a flat layer buffer are aligned for vectorized kernels
STAT_BYTES = 2  # a compressed group's scale and its minimum are float16 each
SUPPORTED_BITS = (4, 8)
DEFAULT_BITS = 4  # FlexGen's
DEFAULT_GROUP_SIZE = 64
# a linear map the int4 kernel cannot take is dequantized a block of output columns at a time into a scratch of
# at most this many bytes (runtime.packed.TiledWeight)
PACKED_TILE_BYTES = 1 << 19


def ceil_div(n: int, m: int) -> int:
    """n / m rounded up, for non-negative n and positive m."""
    return -(-n // m)


def align_up(n: int, m: int = ALIGN_BYTES) -> int:
    """The least multiple of m that is >= n."""
    return ceil_div(n, m) * m


def dequant_scratch(dense_weight: int, cache_chunk: int, attends_on_cpu: bool) -> tuple[int, int]:
    """(compute-device bytes, host bytes) one compute op dequantizes into: its layer's dense weights
    (0 when they are not compressed, or packed), then, ALIGN_BYTES-aligned after them, the chunk of dense
    cache rows attention over a compressed cache restores at a time (attend_scratch_bytes; 0 when the cache
    is not compressed); on the host when it attends there. The plan's scratch buffers are the largest of this
    over their compute ops (one definition, for the planner and the runtime)."""
    if attends_on_cpu:
        return dense_weight, cache_chunk
    return (align_up(dense_weight) + cache_chunk if cache_chunk else dense_weight), 0


# attention over a compressed cache (runtime.qattention) restores this many bytes of dense cache rows at a time:
# on a 2-core CPU (bench/qattention.py) 3-6 MiB was fastest at batch 16 (128-256 rows) and 64 (32-64 rows) alike
ATTEND_CHUNK_BYTES = 4 << 20
ATTEND_CHUNK_ROW_MULTIPLE = 16


def attend_chunk_rows(kv_bytes_per_token: int, gpu_batch_size: int, target_bytes: int = ATTEND_CHUNK_BYTES) -> int:
    """Cache rows per chunk: as many as fit target_bytes of a gpu batch's dense cache, a multiple of 16 and at
    least 16 (kv_bytes_per_token: spec.kv_bytes_per_token())."""
    rows = target_bytes // (gpu_batch_size * kv_bytes_per_token)
    return max(ATTEND_CHUNK_ROW_MULTIPLE, rows - rows % ATTEND_CHUNK_ROW_MULTIPLE)


def attend_scratch_bytes(row_bytes: int, max_seq: int) -> int:
    """The chunk scratch of attention over a compressed cache whose dense rows (one token of a gpu batch) are
    row_bytes, max_seq of them: attend_chunk_rows rows, no more than the cache holds."""
    return min(max_seq, attend_chunk_rows(row_bytes, 1)) * row_bytes


def attend_chunk_bytes(kv_bytes_per_token: int, gpu_batch_size: int, chunk_rows: int) -> int:
    """Bytes of the scratch attention over a compressed cache restores one chunk of rows into: chunk_rows rows of
    a gpu batch's dense cache (pass min(chunk_rows, the plan's rows) when the cache is shorter than a chunk)."""
    return chunk_rows * gpu_batch_size * kv_bytes_per_token


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    linear: bool = False  # used as a linear map: stored input-major, [in, out] (spec.ModelSpec.layer_tensors)

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def quant_dim(self) -> int:
        """The dim compression groups along: a linear map's input dim (dim 0 of [in, out], as FlexGen
        groups), an embedding's hidden dim (its last). Only matrices are compressed."""
        return 0 if self.linear else -1


@dataclass(frozen=True, slots=True)
class TensorSlot:
    """Where one tensor of a layer sits in the layer's flat byte buffer; dim: the grouped dim of a
    compressed tensor (non-negative), None for a tensor kept in the model dtype."""

    name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    dim: int | None = None


class QuantError(UserError):
    """A quantization config, shape or buffer a caller supplied does not fit."""


@dataclass(frozen=True, slots=True)
class QuantConfig:
    bits: int = DEFAULT_BITS
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QuantError(f"QuantConfig.bits is {self.bits!r}, supported: {SUPPORTED_BITS}")
        if type(self.group_size) is not int or self.group_size < 1 or self.group_size % self.codes_per_byte:
            raise QuantError(f"QuantConfig.group_size is {self.group_size!r}: must be a positive multiple of "
                             f"{self.codes_per_byte} (codes per byte at {self.bits} bits)")

    @property
    def codes_per_byte(self) -> int:
        return 8 // self.bits

    @property
    def levels(self) -> int:
        """The largest code (2**bits - 1)."""
        return (1 << self.bits) - 1

    @property
    def group_bytes(self) -> int:
        """Bytes of packed codes per group."""
        return self.group_size // self.codes_per_byte


def quant_geometry(shape: tuple[int, ...], dim: int, cfg: QuantConfig) -> tuple[int, tuple[int, ...], int, int]:
    """(dim made non-negative, rows = shape without dim, size of dim, groups per row)."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise QuantError("cannot quantize a 0-dim tensor: it has no dim to group along")
    if not -len(shape) <= dim < len(shape):
        raise QuantError(f"dim {dim} is out of range for shape {shape}")
    d = dim % len(shape)
    n = shape[d]
    return d, shape[:d] + shape[d + 1:], n, ceil_div(n, cfg.group_size)


def compressed_nbytes(shape: tuple[int, ...], dim: int, cfg: QuantConfig) -> int:
    """Exact bytes of a tensor compressed along dim in its flat layout (scales + minimums + packed codes)."""
    _, rows, _, groups = quant_geometry(tuple(shape), dim, cfg)
    return prod(rows) * groups * (2 * STAT_BYTES + cfg.group_bytes)


INT4_KERNEL_OUT_MULTIPLE = 16  # torch's CPU int4 kernel packs output channels in tiles of 16
INT4_KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes (along its input) the kernel takes


def packed_kernel_group(cfg: QuantConfig) -> int:
    """The int4 kernel's group size for a matrix packed at cfg: 8-bit codes are split into their high and low
    nibbles, a group's two halves side by side along the kernel's input (runtime.packed), so 2 x group_size."""
    return cfg.group_size * cfg.bits // 4


_PACKED_GROUP_CANDIDATES = tuple(sorted({g // m for g in INT4_KERNEL_GROUP_SIZES for m in (1, 2)}))


def packed_group_fits(cfg: QuantConfig) -> bool:
    """Whether the int4 kernel takes matrices packed at cfg's bits and group size at all."""
    return packed_kernel_group(cfg) in INT4_KERNEL_GROUP_SIZES


def packed_groups_text() -> str:
    """The group sizes the kernel takes, per bits, for messages."""
    def sizes(bits: int) -> str:
        return ", ".join(str(g) for g in _PACKED_GROUP_CANDIDATES if packed_group_fits(QuantConfig(bits, g)))
    return "; ".join(f"{b} bits: {sizes(b)}" for b in SUPPORTED_BITS)


def packed_kernel_fits(shape: tuple[int, ...], cfg: QuantConfig) -> bool:
    """Whether a [in, out] matrix grouped along in can be held in the CPU int4 kernel's packed layout (4 or
    8 bits): in a multiple of the group size (the kernel has no padding), out a multiple of 16, a group size
    the kernel takes."""
    return (len(shape) == 2 and shape[0] % cfg.group_size == 0 and shape[1] % INT4_KERNEL_OUT_MULTIPLE == 0
            and packed_group_fits(cfg))


def packed_geometry(shape: tuple[int, ...], cfg: QuantConfig) -> tuple[int, int]:
    """(bytes of the bfloat16 (scale, zero) table [G, out, 2], bytes of the codes [out, in x bits / 8]) of a
    matrix in the int4 kernel's layout (runtime.packed): in all, compressed_nbytes of the same matrix."""
    k, n = shape
    return (k // cfg.group_size) * n * 2 * STAT_BYTES, n * k * cfg.bits // 8


def _pack(entries: Iterable[tuple[str, tuple[int, ...], int, int | None]]) -> tuple[TensorSlot, ...]:
    out, off = [], 0
    for name, shape, nbytes, dim in entries:
        out.append(TensorSlot(name, shape, off, nbytes, dim))
        off += align_up(nbytes)
    return tuple(out)


def dense_layout(tensors: Iterable[TensorSpec], dtype_bytes: int) -> tuple[TensorSlot, ...]:
    """The tensors in order, each in the model dtype."""
    return _pack((t.name, t.shape, t.numel * dtype_bytes, None) for t in tensors)


def compressed_layout(tensors: Iterable[TensorSpec], dtype_bytes: int, cfg: QuantConfig) -> tuple[TensorSlot, ...]:
    """The tensors in the same order, matrices compressed along their quant_dim, vectors in the model dtype."""
    def entry(t: TensorSpec) -> tuple[str, tuple[int, ...], int, int | None]:
        if len(t.shape) < 2:
            return t.name, t.shape, t.numel * dtype_bytes, None
        d = t.quant_dim % len(t.shape)
        return t.name, t.shape, compressed_nbytes(t.shape, d, cfg), d

    return _pack(entry(t) for t in tensors)


def layout_bytes(slots: tuple[TensorSlot, ...]) -> int:
    """Bytes of the flat buffer a layout fills (aligned): what a buffer holding it must hold."""
    last = slots[-1]
    return align_up(last.offset + last.nbytes)
