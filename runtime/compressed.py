"""Compressed weights and KV cache at run time: the byte layouts a plan's compressed buffers hold, and
the codecs that fill and read them (runtime.quant does the arithmetic).

    >>> cfg = QuantConfig(4, 64)
    >>> layers = compressed_layers(store, cfg)        # built once beside the store, then reused
    >>> layers.read_layer_into(1, buf)                # buf: spec.compressed_layer_bytes(1, cfg) bytes
    >>> decompress_layer(spec, 1, buf, cfg, dense)    # dense: spec.layer_bytes(1), kernels.layer_views(...)
    >>> codec = CacheCodec(spec, gpu_batch_size, cfg)
    >>> k, v = codec.store_new(cbuf, k, v, start)     # new tokens' rows compressed; k, v as they read back
    >>> codec.load(cbuf, dense_cache, n)              # rows [0, n) restored
    >>> codec.load_rows(cbuf, chunk, s)               # rows [s, s + len(chunk)) restored (runtime.qattention)

Compressed layer layout: spec.compressed_layer_layout (flexgen_graph.layout, the definition the planner
sizes buffers by): the tensors of spec.layer_layout in the same order, each starting ALIGN_BYTES-aligned;
a matrix is one runtime.quant buffer grouped along its quant_dim (a linear map's input dim, an
embedding's hidden dim), a vector stays in the model dtype.

Compressed cache layout: token-major records, one per cache row s (the [2, B, KV, D] keys and values
of one token): the runtime.quant buffer of that row grouped along D. A token range is then one byte
range, so the plan's cache copies move compressed rows exactly as they move dense ones.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from flexgen_graph.errors import UserError
from flexgen_graph.layout import STAT_BYTES, ceil_div, packed_kernel_fits
from flexgen_graph.spec import ModelSpec
from runtime.backend import read_file_into
from runtime.integrity import atomic_file, checksum, need_space
from runtime.kernels import TORCH_DTYPES, layer_views
from runtime.packed import kernel_tag, pack_for_kernel
from runtime.quant import (
    STAT_DTYPE,
    QTensor,
    QuantConfig,
    compressed_nbytes,
    dequantize,
    pack_into,
    quantize,
    unpack_from,
)


def compress_layer(spec: ModelSpec, layer: int, dense: torch.Tensor, cfg: QuantConfig, out: torch.Tensor,
                   packed: bool = False) -> None:
    """dense: the layer's flat buffer (spec.layer_layout) -> out: its compressed flat buffer. packed: the
    linear maps the CPU int4 kernel takes are written in its layout (runtime.packed; same bytes per slot)."""
    views = layer_views(spec, layer, dense)
    linear = {t.name for t in spec.layer_tensors(layer) if t.linear}
    for q in spec.compressed_layer_layout(layer, cfg):
        dst = out[q.offset:q.offset + q.nbytes]
        if q.dim is None:
            dst.copy_(views[q.name].reshape(-1).view(torch.uint8))
        elif packed and q.name in linear and packed_kernel_fits(q.shape, cfg):
            pack_for_kernel(quantize(views[q.name], q.dim, cfg), dst)
        else:
            pack_into(quantize(views[q.name], q.dim, cfg), dst)


def decompress_layer(spec: ModelSpec, layer: int, buf: torch.Tensor, cfg: QuantConfig, dense: torch.Tensor) -> None:
    """buf: a compressed layer buffer -> dense: the layer's flat buffer, ready for kernels.layer_views
    (dequantized on dense's device, in the model dtype)."""
    views = layer_views(spec, layer, dense)
    for q in spec.compressed_layer_layout(layer, cfg):
        src = buf[q.offset:q.offset + q.nbytes]
        if q.dim is None:
            views[q.name].reshape(-1).view(torch.uint8).copy_(src)
        else:
            dequantize(unpack_from(src, q.shape, q.dim, cfg), out=views[q.name])


# ---------------------------------------------------------------- the weight store's compressed copy

COMPRESSED_FORMAT = "flexgen-graph-compressed-weights"
COMPRESSED_VERSION = 2  # 2: groups kept in place along their dim (runtime.quant)
DONE = "compressed.json"


class CompressedLayers:
    """A weight store's layers compressed with one config: one file per layer, read whole into a
    buffer (the interface the backends call on a weight store). A layer file is checked against the
    checksum recorded when it was built on its first read in a process; one that changed since is
    rebuilt from the store (compression is deterministic) or refused by name."""

    def __init__(self, path: Path, spec: ModelSpec, cfg: QuantConfig, store=None,
                 checksums: dict[str, str] | None = None, packed: bool = False) -> None:
        self.path, self.spec, self.cfg, self.packed = path, spec, cfg, packed
        self.store, self.checksums = store, checksums if checksums is not None else {}
        self._verified: set[int] = set()

    def layer_nbytes(self, layer: int) -> int:
        return self.spec.compressed_layer_bytes(layer, self.cfg)

    def file(self, layer: int) -> Path:
        return self.path / f"{layer}.bin"

    def read_layer_into(self, layer: int, buf: torch.Tensor, drop_page_cache: bool = False) -> None:
        need = self.spec.compressed_layer_bytes(layer, self.cfg)
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.device.type != "cpu" or buf.numel() < need:
            raise UserError(f"layer {layer}: buffer must be a flat uint8 CPU tensor of at least {need} bytes "
                             f"(compressed), got {buf.dtype} {tuple(buf.shape)} on {buf.device}")
        path = self.file(layer)
        fd = os.open(path, os.O_RDONLY)
        if (size := os.fstat(fd).st_size) != need:
            os.close(fd)
            raise UserError(f"{path}: {size} bytes, expected {need}; delete {self.path} to rebuild the compressed copy")
        read_file_into(fd, buf[:need], str(path), drop_page_cache=drop_page_cache)
        if layer not in self._verified:  # once per process: re-reads cost nothing more
            self._verify(layer, buf[:need])

    def _verify(self, layer: int, data: torch.Tensor) -> None:
        want, path = self.checksums.get(str(layer)), self.file(layer)
        if checksum(data.numpy()) != want:
            out = torch.zeros(data.numel(), dtype=torch.uint8)
            if self.store is not None and want is not None:
                dense = torch.empty(self.spec.layer_bytes(layer), dtype=torch.uint8)
                self.store.read_layer_into(layer, dense)
                compress_layer(self.spec, layer, dense, self.cfg, out, self.packed)
            if want is None or checksum(out.numpy()) != want:
                raise UserError(f"{path} does not match the checksum recorded in {self.path / DONE} when it was "
                                f"built (a file changed since): delete {self.path} to rebuild the compressed copy")
            with atomic_file(path, out.numel()) as f:
                f.write(out.numpy())
            print(f"note: {path} had changed since it was built; rebuilt it from the weight store", file=sys.stderr)
            data.copy_(out)
        self._verified.add(layer)

    def check(self) -> None:
        for j in range(self.spec.num_graph_layers):
            size = self.file(j).stat().st_size if self.file(j).is_file() else None
            if size != self.spec.compressed_layer_bytes(j, self.cfg):
                raise UserError(f"{self.file(j)}: {'missing' if size is None else f'{size} bytes'}, expected "
                                 f"{self.spec.compressed_layer_bytes(j, self.cfg)}; delete {self.path} to rebuild it")


def compressed_layers(store, cfg: QuantConfig, packed: bool = False) -> CompressedLayers:
    """The store's compressed copy for cfg, built on first use (a folder inside the store, completed
    by a marker file written last, so an interrupted build is redone, never half used). packed: the
    copy whose linear maps are in the CPU int4 kernel's layout (compress_layer), a folder of its own."""
    spec = store.spec
    # the int4 kernel's layout is torch's own and differs per CPU capability: a copy per capability (a cache
    # shared by two machines keeps both), its torch version in the manifest (another one rebuilds it)
    tag = kernel_tag() if packed else {}
    path = Path(store.path) / f"compressed-{cfg.bits}bit-g{cfg.group_size}{'-int4cpu-' + tag['capability'] if packed else ''}"
    meta = {"format": COMPRESSED_FORMAT, "version": COMPRESSED_VERSION, "fingerprint": spec.fingerprint(),
            "bits": cfg.bits, "group_size": cfg.group_size, **({"packed": "int4-cpu", **tag} if packed else {})}
    done = path / DONE
    if done.is_file():
        try:
            got = json.loads(done.read_text())
            sums = got.pop("checksums", None)
            ok = got == meta and isinstance(sums, dict) and set(sums) == {str(j) for j in range(spec.num_graph_layers)}
        except (OSError, ValueError, AttributeError):
            ok = False
        if ok:
            layers = CompressedLayers(path, spec, cfg, store, sums, packed)
            layers.check()
            return layers
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    n = spec.num_graph_layers
    need_space(path, sum(spec.compressed_layer_bytes(j, cfg) for j in range(n)), f"the {cfg.bits}-bit copy of {spec.name}")
    sums: dict[str, str] = {}
    layers = CompressedLayers(path, spec, cfg, store, sums, packed)
    with tqdm(total=n, desc=f"compressing {spec.name} to {cfg.bits} bits", unit="layer",
              disable=not sys.stderr.isatty()) as bar:
        for j in range(n):
            dense = torch.empty(spec.layer_bytes(j), dtype=torch.uint8)
            store.read_layer_into(j, dense)
            out = torch.zeros(spec.compressed_layer_bytes(j, cfg), dtype=torch.uint8)
            compress_layer(spec, j, dense, cfg, out, packed)
            with atomic_file(layers.file(j), out.numel()) as f:
                f.write(out.numpy())
            sums[str(j)] = checksum(out.numpy())
            bar.update()
    with atomic_file(done) as f:  # the marker, written last, completes the copy
        f.write(json.dumps({**meta, "checksums": sums}).encode())
    return layers


# ---------------------------------------------------------------- the KV cache


class CacheCodec:
    """Token-major compressed rows of a [S, 2, B, KV, D] cache, grouped along D."""

    def __init__(self, spec: ModelSpec, gpu_batch_size: int, cfg: QuantConfig) -> None:
        self.spec, self.cfg = spec, cfg
        self.row_shape = (2, gpu_batch_size, spec.num_kv_heads, spec.head_dim)  # one token's keys and values
        rows = 2 * gpu_batch_size * spec.num_kv_heads
        self.groups = ceil_div(spec.head_dim, cfg.group_size)
        self._stat = rows * self.groups * STAT_BYTES  # bytes of one token's scales (and of its minimums)
        self.row_bytes = compressed_nbytes(self.row_shape, -1, cfg)
        assert self.row_bytes % STAT_BYTES == 0, "a record must keep the next one's float16 stats aligned"

    def _records(self, buf: torch.Tensor, start: int, n: int, batch: int) -> QTensor:
        """Views of records [start, start + n) of a flat compressed cache buffer, as one QTensor, narrowed to
        the first `batch` sequences of the gpu batch (strided then: a record holds all B)."""
        r = buf[start * self.row_bytes:(start + n) * self.row_bytes].view(n, self.row_bytes)
        g, s = self.groups, self._stat
        lead = self.row_shape[:-1]
        scale = r[:, :s].view(STAT_DTYPE).view(n, *lead, g)[:, :, :batch]
        mn = r[:, s:2 * s].view(STAT_DTYPE).view(n, *lead, g)[:, :, :batch]
        data = r[:, 2 * s:].view(n, *lead, g, self.cfg.group_bytes)[:, :, :batch]
        shape = (n, 2, batch) + self.row_shape[2:]
        return QTensor(data, scale, mn, shape, len(self.row_shape), self.cfg)

    def store(self, buf: torch.Tensor, rows: torch.Tensor, start: int) -> QTensor:
        """Compress rows ([n, 2, b, KV, D], b <= B sequences, any device) into buf's records [start, start + n);
        returns them quantized."""
        q = quantize(rows, -1, self.cfg)
        rec = self._records(buf, start, rows.shape[0], rows.shape[2])
        rec.scale.copy_(q.scale)
        rec.mn.copy_(q.mn)
        rec.data.copy_(q.data)
        return q

    def store_kv(self, buf: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> QTensor:
        """Compress new tokens' k and v ([B, T, KV, D]) into records [start, start + T); returns them quantized."""
        return self.store(buf, torch.stack((k, v)).permute(2, 0, 1, 3, 4), start)  # [T, 2, B, KV, D]

    def store_new(self, buf: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress new tokens' k and v ([B, T, KV, D]) into records [start, start + T); returns them as
        they read back, so a token attends to the same values now as at every later step."""
        back = dequantize(self.store_kv(buf, k, v, start), dtype=k.dtype)
        return back[:, 0].transpose(0, 1), back[:, 1].transpose(0, 1)

    def load(self, buf: torch.Tensor, dense: torch.Tensor, n: int) -> None:
        """Restore rows [0, n) of dense ([S, 2, b, KV, D], its first b <= B sequences) from buf's records, on
        dense's device."""
        if n > 0:
            self.load_rows(buf, dense[:n], 0)

    def load_rows(self, buf: torch.Tensor, out: torch.Tensor, start: int) -> None:
        """Restore records [start, start + n) into out ([n, 2, b, KV, D], the first b <= B sequences), on
        out's device: a chunk of the cache, as load restores it."""
        rec = self._records(buf, start, out.shape[0], out.shape[2])
        if rec.data.device != out.device:
            rec = QTensor(rec.data.to(out.device), rec.scale.to(out.device), rec.mn.to(out.device),
                          rec.shape, rec.dim, rec.cfg)
        dequantize(rec, out=out)


def dense_cache_view(buf: torch.Tensor, max_seq: int, gpu_batch_size: int, spec: ModelSpec) -> torch.Tensor:
    """A [S, 2, B, KV, D] typed view over the start of a flat uint8 buffer."""
    shape = (max_seq, 2, gpu_batch_size, spec.num_kv_heads, spec.head_dim)
    n = max_seq * 2 * gpu_batch_size * spec.num_kv_heads * spec.head_dim * spec.dtype_bytes
    return buf[:n].view(TORCH_DTYPES[spec.dtype]).view(shape)
