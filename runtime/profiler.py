"""Measure this machine into a HardwareProfile (`flexgen-graph profile`), in a few minutes.

    from runtime.profiler import measure
    profile, notes = measure(Path("/tmp/offload"), models=[spec])

Capacities: GPU memory (or, without a GPU, a third of RAM as the "GPU" tier), RAM, free disk
of the offload folder. The scalar rates (what FlexGen's cost model reads): host<->GPU copies,
disk read/write, matmul and attention rates, the matmul row count below which small batches stop
paying off, memory bandwidth, 4-bit dequantization, the link between pipeline stages.

And a Calibration (flexgen_graph.hardware), what the cost model needs at the shapes that matter:
- for each model asked for, its embedding, decoder and head kernels (runtime.kernels, as the
  engine calls them) timed against rows at the model's own shapes, decode attention against
  sequences x context on the compute device and on the host, prefill attention against
  sequences x prompt_len^2, 4- and 8-bit dequantization of its weights, 4-bit of its cache, and (without a
  GPU) the same kernels with the cores split between two processes (a pipeline's stages sharing the machine);
- a generic matmul curve (seconds per FLOP against rows) for layers of other models;
- copy curves per link and disk reads cold (evicted from the page cache, as the engine's cold reads)
  and warm, and disk writes, against the bytes of one transfer;
- the fixed hand-off an op pays when the streams run on worker threads (the backends' workers),
- and the share of a copy's or a read's time that a compute running beside it loses.
Every figure is the median of a few repeats (_typical_time): what a run's many calls take on this
machine, its jitter included.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flexgen_graph.hardware import (
    PACKED_BITS,
    Calibration,
    Curve,
    HardwareProfile,
    LayerCurve,
    machine_id,
    packed_suffix,
    usable_cores,
)
from flexgen_graph.ir import LayerKind
from flexgen_graph.spec import ModelSpec

DISK_TEST_BYTES = 256 << 20
LAYER_ORDER = ("embed", "decoder", "head")  # _engine_ops' order
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
POINT_BUDGET_S = 0.25  # a curve stops growing once one call takes this long (beyond: proportional)
# the curves that only refine a choice (packed weights, a pipeline's paired stages) stop sooner: on an AVX2 CPU the
# int4 kernel at a prefill's rows took seconds a call, and a profile must stay within a few minutes
SIDE_POINT_BUDGET_S = 0.08
GROW_PASSES = 3  # a curve is measured this many times over (_grow)
DEQUANT_CALLS = 15  # a dequantization rate is the median of this many restores
COPY_SIZES = (1 << 12, 1 << 16, 1 << 20, 1 << 23, 1 << 26, 1 << 28)
DISK_SIZES = (1 << 16, 1 << 20, 1 << 24, DISK_TEST_BYTES)
GENERIC = 2048  # the generic matmul curve's weight is GENERIC x GENERIC
# the engine runs layer after layer, each reading weights no cache holds: a kernel is timed on copies of its
# layer cycled through, at least this many bytes of them, so its weights come from memory as in a run
ROTATE_BYTES = 256 << 20


def _sync_for(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _typical_time(fn, repeats: int = 5, sync=lambda: None) -> float:
    """The median of `repeats` timed calls (after one untimed). The median, not the best: calls on a shared
    machine vary (a 2-core VM, bench/machine_noise.py: +-20% around a median 30% above its best call), and a run's
    thousands of calls take the typical time, so best-of figures priced runs 10-25% fast."""
    fn()
    sync()
    times: list[float] = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine(device: torch.device | None = None) -> str:
    """This machine's identity (flexgen_graph.hardware.machine_id) with its GPU's name and kernels' capability."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    from runtime.packed import kernel_capability

    return machine_id(gpu, kernel_capability())


# ---------------------------------------------------------------- scalar rates (FlexGen's constants)


def matmul_rate(device: torch.device, dtype: torch.dtype, rows: int, k: int = 2048, n: int = 2048) -> float:
    x = torch.randn(rows, k, device=device, dtype=dtype)
    w = torch.randn(k, n, device=device, dtype=dtype)  # input-major, as the engine stores linear weights
    return 2 * rows * k * n / _typical_time(lambda: x @ w, sync=_sync_for(device))


def min_rows(device: torch.device, dtype: torch.dtype) -> tuple[int, float]:
    """(rows below which a matmul costs about as much as this many, peak rate)."""
    peak = matmul_rate(device, dtype, 512)
    for rows in (8, 16, 32, 64, 128, 256):
        if matmul_rate(device, dtype, rows) >= 0.5 * peak:
            return rows, peak
    return 512, peak


def attention_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Decode attention: one query per sequence over a long cache (bandwidth-bound on purpose)."""
    b, h, s, d = 16, 16, 1024, 64
    q = torch.randn(b, h, 1, d, device=device, dtype=dtype)
    k = torch.randn(b, h, s, d, device=device, dtype=dtype)
    v = torch.randn(b, h, s, d, device=device, dtype=dtype)
    return 4 * b * h * s * d / _typical_time(lambda: F.scaled_dot_product_attention(q, k, v), sync=_sync_for(device))


def memory_bandwidth(device: torch.device) -> float:
    x = torch.ones(256 << 20 >> 2, device=device)  # 256 MiB of float32
    return x.numel() * 4 / _typical_time(lambda: x.sum(), sync=_sync_for(device))


def dequant_rate(device: torch.device) -> float:
    """Dense float32 bytes per second that 4-bit dequantization (runtime.quant, as the runtime calls
    it on a weight grouped along its input dim) writes on the device."""
    from runtime.quant import QuantConfig, dequantize, quantize

    w = torch.randn(2048, 2048, device=device)
    q, out = quantize(w, 0, QuantConfig(4, 64)), torch.empty_like(w)
    return w.numel() * 4 / _typical_time(lambda: dequantize(q, out=out), sync=_sync_for(device))


def op_overhead(device: torch.device) -> float:
    """Fixed cost of one small layer op (dispatch), per op."""
    x = torch.randn(1, 64, device=device)
    w = torch.randn(64, 64, device=device)

    def ops():
        for _ in range(100):
            F.linear(x, w)
    return _typical_time(ops, sync=_sync_for(device)) / 100 * 10  # ~10 torch calls per layer op


def _link_peer(rank: int, store: str, n: int, result: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        t = torch.zeros(n, dtype=torch.uint8)

        def hop() -> None:
            dist.send(t, 1) if rank == 0 else dist.recv(t, 0)
        rate = n / _typical_time(hop, repeats=5)  # both ranks must hop the same number of times
        if rank == 1:
            Path(result).write_text(repr(rate))
    finally:
        dist.destroy_process_group()


def copy_rates(device: torch.device) -> tuple[float, float]:
    n = 256 << 20
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device=device)
    sync = torch.cuda.synchronize
    h2d = n / _typical_time(lambda: dev.copy_(host, non_blocking=True), sync=sync)
    d2h = n / _typical_time(lambda: host.copy_(dev, non_blocking=True), sync=sync)
    return h2d, d2h


def stage_link_rate(device: torch.device) -> tuple[float, str]:
    """Bytes/s of handing a hidden state to the next pipeline stage, and how it was measured."""
    n = 8 << 20  # the hidden states of a large gpu batch in prefill are megabytes
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        a = torch.empty(n, dtype=torch.uint8, device="cuda:0")
        b = torch.empty(n, dtype=torch.uint8, device="cuda:1")
        return n / _typical_time(lambda: b.copy_(a), sync=torch.cuda.synchronize), "a copy cuda:0 -> cuda:1"
    if device.type == "cuda":
        return copy_rates(device)[1], "one GPU: hidden states would leave through the host (device -> host rate)"
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "rate")
        mp.spawn(_link_peer, args=(os.path.join(tmp, "store"), n, result), nprocs=2)
        return float(Path(result).read_text()), "gloo send/recv between two processes of this machine"


# ---------------------------------------------------------------- curves: transfers


def copy_curves(device: torch.device) -> tuple[Curve, Curve]:
    """(to the compute device, back to the host): seconds against the bytes of one copy, as the backend
    copies (pinned host memory with a GPU; without one, a host memcpy both ways)."""
    n = COPY_SIZES[-1]
    if device.type != "cuda":
        a, b = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
        a.fill_(1)
        c = monotone(Curve(COPY_SIZES, tuple(_typical_time(lambda m=m: b[:m].copy_(a[:m])) for m in COPY_SIZES)))
        return c, c
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device=device)
    sync = torch.cuda.synchronize
    up = tuple(_typical_time(lambda m=m: dev[:m].copy_(host[:m], non_blocking=True), sync=sync) for m in COPY_SIZES)
    down = tuple(_typical_time(lambda m=m: host[:m].copy_(dev[:m], non_blocking=True), sync=sync) for m in COPY_SIZES)
    return monotone(Curve(COPY_SIZES, up)), monotone(Curve(COPY_SIZES, down))


def _open_test_file(folder: Path) -> tuple[int, Path, mmap.mmap]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".flexgen-graph-disk-test"
    buf = mmap.mmap(-1, DISK_TEST_BYTES)  # page-aligned
    buf.write(os.urandom(1 << 20) * (DISK_TEST_BYTES >> 20))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    return fd, path, buf


def disk_curves(folder: Path) -> tuple[Curve, Curve, Curve, float, float]:
    """(cold read, warm read, write) seconds against bytes of one transfer of the folder's filesystem,
    and the cold read and the write rate of the largest. Reads as the engine reads: pread into memory;
    cold ones after the file's pages are evicted (posix_fadvise), as the engine's cold weight reads do.
    Writes as the engine writes scratch: pwrite, no fsync (the rates use one fsync'd write)."""
    fd, path, buf = _open_test_file(folder)
    view = memoryview(buf)
    try:
        t = time.perf_counter()
        os.pwrite(fd, buf, 0)
        os.fsync(fd)
        write_rate = DISK_TEST_BYTES / (time.perf_counter() - t)

        def read(n: int, cold: bool) -> float:
            if cold:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            done = 0
            while done < n:
                got = os.preadv(fd, [view[done:n]], done)
                if got <= 0:
                    break
                done += got
            return time.perf_counter() - t0

        cold = tuple(min(read(n, True) for _ in range(2)) for n in DISK_SIZES)
        read(DISK_TEST_BYTES, False)
        warm = tuple(min(read(n, False) for _ in range(3)) for n in DISK_SIZES)

        def write(n: int) -> float:
            t0 = time.perf_counter()
            os.pwrite(fd, view[:n], 0)
            return time.perf_counter() - t0

        writes = tuple(min(write(n) for _ in range(2)) for n in DISK_SIZES)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
        view.release()
        buf.close()
    return (monotone(Curve(DISK_SIZES, cold)), monotone(Curve(DISK_SIZES, warm)), monotone(Curve(DISK_SIZES, writes)),
            DISK_SIZES[-1] / cold[-1], write_rate)


# ---------------------------------------------------------------- curves: compute


_STARTED = [time.perf_counter()]  # when the running measurement began (progress lines count from it)


def progress(what: str, start: bool = False) -> None:
    """One line on stderr as each stage of a measurement begins, with the time since it started: a profile
    takes minutes, and a user must see that it moves and where."""
    if start:
        _STARTED[0] = time.perf_counter()
    print(f"  [{time.perf_counter() - _STARTED[0]:4.0f} s] measuring {what} ...", file=sys.stderr, flush=True)


def monotone(c: Curve) -> Curve:
    """The curve with each point lowered to the least time at any larger size: more work never takes less
    time, so a point above a later one was slowed by something else (another job's turn on the cores)."""
    ys, low = [], float("inf")
    for y in reversed(c.ys):
        low = min(low, y)
        ys.append(low)
    return Curve(c.xs, tuple(reversed(ys)))


def _grow(fn, rows: tuple[int, ...] = ROWS, limit: int = ROWS[-1], sync=lambda: None,
          budget_s: float = POINT_BUDGET_S) -> Curve:
    """fn(rows) timed at growing rows until one call takes budget_s or rows pass limit, GROW_PASSES times
    over; each point the median of its passes (then made monotone): a few seconds of another job's work on the
    cores slow one pass's points, not the curve."""
    passes = []
    for _ in range(GROW_PASSES):
        ys = []
        for r in rows:
            if r > limit:
                break
            ys.append(_typical_time(lambda: fn(r), sync=sync))
            if ys[-1] > budget_s:
                break
        passes.append(ys)
    n = min(len(ys) for ys in passes)  # the points every pass reached
    return monotone(Curve(tuple(float(r) for r in rows[:n]), tuple(statistics.median(ys[i] for ys in passes)
                                                                  for i in range(n))))


def matmul_curve(device: torch.device, dtype: torch.dtype) -> Curve:
    """Seconds per FLOP of x @ w (w GENERIC x GENERIC, input-major as the engine stores it) against rows."""
    k = GENERIC
    w = torch.randn(k, k, device=device, dtype=dtype)
    x = torch.randn(ROWS[-1], k, device=device, dtype=dtype)
    c = _grow(lambda r: x[:r] @ w, sync=_sync_for(device))  # times, monotone; then per FLOP
    return Curve(c.xs, tuple(t / (2 * r * k * k) for r, t in zip(c.xs, c.ys)))


def _layer(spec: ModelSpec, layer: int, device: torch.device) -> dict[str, torch.Tensor]:
    from runtime.kernels import layer_views

    buf = torch.empty(spec.layer_bytes(layer), dtype=torch.uint8, device=device)
    views = layer_views(spec, layer, buf)
    g = torch.Generator(device="cpu").manual_seed(layer)
    for t in views.values():  # small values: no overflow in half precision, no denormal slow paths
        t.copy_((torch.randn(t.shape, generator=g) * 0.02).to(t.dtype))
    return views


def _rotation(nbytes: int) -> int:
    """How many copies of nbytes to cycle through: ROTATE_BYTES of them (no cache-resident replay), 1 to 16."""
    return max(1, min(16, -(-ROTATE_BYTES // nbytes)))


def _copies(spec: ModelSpec, layer: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Random copies of a layer, _rotation of them."""
    return [_layer(spec, layer, device) for _ in range(_rotation(spec.layer_bytes(layer)))]


def _engine_ops(spec: ModelSpec, embs: list, decs: list, heads: list, device: torch.device):
    """(embed, decoder, head) ops of r rows as the engine calls them (runtime.kernels; a decode step: one new
    token per sequence, nothing cached before it), each cycling through its layer's copies (dense or packed
    views), so no call finds the last one's weights in the CPU's caches."""
    from runtime import kernels

    dtype, top = kernels.TORCH_DTYPES[spec.dtype], ROWS[-1]
    turn = [0]

    def next_of(ws: list) -> dict:
        turn[0] += 1
        return ws[turn[0] % len(ws)]
    ids = torch.randint(3, spec.vocab, (top, 1), device=device)
    pos = torch.zeros(top, 1, dtype=torch.long, device=device)
    hidden = torch.randn(top, 1, spec.hidden, device=device, dtype=dtype) * 0.1
    sink = torch.empty(top, 1, spec.hidden, device=device, dtype=dtype)
    cache = torch.zeros(2, 2, top, spec.num_kv_heads, spec.head_dim, device=device, dtype=dtype)
    mask = torch.ones(top, 1, dtype=torch.bool, device=device)

    def embed(r: int) -> None:
        sink[:r].copy_(kernels.embed(spec, next_of(embs), ids[:r], pos[:r]))

    def decoder(r: int) -> None:
        sink[:r].copy_(kernels.decoder(spec, next_of(decs), hidden[:r], cache[:, :, :r], 0, pos[:r], mask[:r]))

    def head(r: int) -> None:
        kernels.head(spec, next_of(heads), hidden[:r]).argmax(dim=-1)
    return embed, decoder, head


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of y against x (with an intercept), at least 0."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var else 0.0


def qcache_rates(spec: ModelSpec, codec, cbuf: torch.Tensor, dense: torch.Tensor, sync) -> tuple[float, float]:
    """(seconds per dense byte of cache attended, seconds per decode op) that attention over a compressed cache
    (runtime.qattention, as the engine calls it) costs beyond attention over the dense cache (kernels.attend):
    the extra time at two contexts, its slope per byte and its intercept (storing the new row, fixed costs)."""
    from runtime import kernels
    from runtime.qattention import attend_quantized

    n_max, b = dense.shape[0], dense.shape[2]
    q = torch.randn(b, 1, spec.num_heads, spec.head_dim, device=dense.device, dtype=dense.dtype)
    k = torch.randn(b, 1, spec.num_kv_heads, spec.head_dim, device=dense.device, dtype=dense.dtype)
    mask = torch.ones(b, n_max, dtype=torch.bool, device=dense.device)

    def extra(n: int) -> float:
        quant = _typical_time(lambda: attend_quantized(spec, codec, q, k, k, cbuf, n - 1, mask[:, :n]), sync=sync)
        return quant - _typical_time(lambda: kernels.attend(spec, q, k, k, dense, n - 1, mask[:, :n]), sync=sync)
    points = [(n * dense[0].numel() * dense.element_size(), extra(n)) for n in (n_max // 8, n_max)]
    (x0, y0), (x1, y1) = points
    per_byte = max(0.0, (y1 - y0) / (x1 - x0))
    return per_byte, max(0.0, y0 - per_byte * x0)


def layer_curves(spec: ModelSpec, device: torch.device) -> list[LayerCurve]:
    """The model's embedding, decoder and head kernels timed as the engine calls them (runtime.engine),
    on random weights of the model's shapes and dtype, cycling through copies of each layer (ROTATE_BYTES)."""
    from runtime import kernels
    from runtime.compressed import CacheCodec, compress_layer, decompress_layer
    from runtime.quant import QuantConfig

    dtype, sync, host = kernels.TORCH_DTYPES[spec.dtype], _sync_for(device), torch.device("cpu")
    KV, D = spec.num_kv_heads, spec.head_dim
    out = []
    n_layers = spec.num_graph_layers

    embs, decs, heads = (_copies(spec, j, device) for j in (0, 1, n_layers - 1))
    dec = decs[0]
    embed, decoder, head_op = _engine_ops(spec, embs, decs, heads, device)
    out.append(LayerCurve("embed", spec.layer_bytes(0), spec.name, _grow(embed, sync=sync)))
    rows = _grow(decoder, sync=sync)

    def attend_slope(dev: torch.device, b: int = LayerCurve.ATTN_SEQS) -> float:
        """Decode attention: seconds per sequence per context token (kernels.attend at growing context)."""
        ctxs = (64, 512, 1024) if b <= LayerCurve.ATTN_SEQS else (64, 256, 512)  # (a wide cache: its size bounded)
        c = torch.zeros(ctxs[-1], 2, b, KV, D, device=dev, dtype=dtype)
        q = torch.randn(b, 1, spec.num_heads, D, device=dev, dtype=dtype)
        kv = torch.randn(b, 1, KV, D, device=dev, dtype=dtype)
        m = torch.ones(b, ctxs[-1], dtype=torch.bool, device=dev)
        ts = [_typical_time(lambda n=n: kernels.attend(spec, q, kv, kv, c, n - 1, m[:, :n]), sync=_sync_for(dev))
              for n in ctxs]
        return _slope([b * n for n in ctxs], ts)

    def prefill_slope() -> float:
        """Prefill attention over T new tokens: seconds per sequence per T^2 (T = 64, 256)."""
        pts = []
        for b, t in ((4, 64), (1, 256)):
            c = torch.zeros(t, 2, b, KV, D, device=device, dtype=dtype)
            q = torch.randn(b, t, spec.num_heads, D, device=device, dtype=dtype)
            kv = torch.randn(b, t, KV, D, device=device, dtype=dtype)
            m = torch.ones(b, t, dtype=torch.bool, device=device)
            pts.append((b * t * t, _typical_time(lambda: kernels.attend(spec, q, kv, kv, c, 0, m), sync=sync)))
        return sum(x * y for x, y in pts) / sum(x * x for x, _ in pts)  # through the origin

    cfg = QuantConfig(4, 64)

    def dequant(layer: int, views: dict[str, torch.Tensor], bits: int = 4) -> float:
        """Seconds per dense byte of restoring the layer's weights of `bits` (runtime.compressed, as the engine),
        cycling through compressed copies (ROTATE_BYTES of dense weights' worth) as the engine restores each
        layer from memory, not from the CPU's caches; the median of DEQUANT_CALLS restores."""
        cfg = QuantConfig(bits, 64)
        src = torch.empty(spec.layer_bytes(layer), dtype=torch.uint8, device=device)
        for name, t in kernels.layer_views(spec, layer, src).items():
            t.copy_(views[name])
        packed = torch.empty(spec.compressed_layer_bytes(layer, cfg), dtype=torch.uint8, device=device)
        compress_layer(spec, layer, src, cfg, packed)
        n = _rotation(spec.layer_bytes(layer))
        sources, dense, turn = [packed] + [packed.clone() for _ in range(n - 1)], torch.empty_like(src), [0]

        def restore() -> None:
            turn[0] += 1
            decompress_layer(spec, layer, sources[turn[0] % n], cfg, dense)
        return _typical_time(restore, repeats=DEQUANT_CALLS, sync=sync) / spec.layer_bytes(layer)
    w_deq = dequant(1, dec)
    b, n = 8, 512
    codec = CacheCodec(spec, b, cfg)
    cbuf = torch.zeros(n * codec.row_bytes, dtype=torch.uint8, device=device)
    rows_kv = torch.randn(n, 2, b, KV, D, device=device, dtype=dtype)
    codec.store(cbuf, rows_kv, 0)
    c_deq, c_store = qcache_rates(spec, codec, cbuf, rows_kv, sync)
    t = 64  # prefill: a prompt's rows compressed and read back, per dense byte (well above the per-call cost)
    prompt_k = torch.randn(b, t, KV, D, device=device, dtype=dtype)
    c_quant = _typical_time(lambda: codec.store_new(cbuf, prompt_k, prompt_k, 0), sync=sync) \
        / (2 * prompt_k.numel() * prompt_k.element_size())
    on_dev = attend_slope(device)
    out.append(LayerCurve("decoder", spec.layer_bytes(1), spec.name, rows, attn_s=on_dev,
                          attn_cpu_s=on_dev if device.type == "cpu" else attend_slope(host),
                          prefill_attn_s=prefill_slope(), dequant_s_per_byte=w_deq,
                          dequant8_s_per_byte=dequant(1, dec, 8), cache_dequant_s_per_byte=c_deq,
                          cache_store_s=c_store, cache_quant_s_per_byte=c_quant,
                          attn_wide_s=attend_slope(device, LayerCurve.ATTN_WIDE_SEQS)))
    out.append(LayerCurve("head", spec.layer_bytes(n_layers - 1), spec.name, _grow(head_op, sync=sync),
                          dequant_s_per_byte=dequant(n_layers - 1, heads[0]),
                          dequant8_s_per_byte=dequant(n_layers - 1, heads[0], 8)))
    out[0] = dataclasses.replace(out[0], dequant_s_per_byte=dequant(0, embs[0]))
    assert spec.layer_kind(n_layers - 1) is LayerKind.HEAD
    return out


PACKED_GROUP_SIZE = 32  # the packed curves are timed at groups of 32 (the accuracy-keeping size) and priced for any


def packed_layer_curves(spec: ModelSpec, device: torch.device, bits: int = 4) -> list[LayerCurve]:
    """The model's embedding, decoder and head timed on packed weights of `bits` (runtime.packed, as an engine of
    a packed_weights plan computes), against rows: LayerCurves of kinds "<kind>" + packed_suffix(bits), weight_bytes
    the dense layer's, so the planner finds them beside the dense ones. CPU only (the kernel is the CPU's)."""
    from runtime import kernels
    from runtime.compressed import compress_layer
    from runtime.packed import packed_layer_views
    from runtime.quant import QuantConfig

    assert device.type == "cpu", "packed_layer_curves: the int4 kernel is the CPU's"
    cfg, n_layers = QuantConfig(bits, PACKED_GROUP_SIZE), spec.num_graph_layers

    def copies(layer: int) -> list[dict]:
        """Packed copies of the layer, enough to rotate through ROTATE_BYTES of them (no cache-resident replay)."""
        dense = torch.empty(spec.layer_bytes(layer), dtype=torch.uint8)
        src = _layer(spec, layer, device)
        for name, t in kernels.layer_views(spec, layer, dense).items():
            t.copy_(src[name])
        first = torch.empty(spec.compressed_layer_bytes(layer, cfg), dtype=torch.uint8)
        compress_layer(spec, layer, dense, cfg, first, packed=True)
        n = _rotation(first.numel())
        return [packed_layer_views(spec, layer, b, cfg) for b in [first] + [first.clone() for _ in range(n - 1)]]
    ops = _engine_ops(spec, copies(0), copies(1), copies(n_layers - 1), device)
    return [LayerCurve(f"{kind}{packed_suffix(bits)}", spec.layer_bytes(j), spec.name,
                       _grow(fn, budget_s=SIDE_POINT_BUDGET_S))
            for (kind, j), fn in zip((("embed", 0), ("decoder", 1), ("head", n_layers - 1)), ops)]


PAIR_WAIT_S = 300.0  # a twin must finish an op within this (its start, weights built, included)


def _twin(folder: str) -> None:
    """The other process of a pair (paired_curves; run as a fresh interpreter): the decoder of the model pickled
    in folder/spec at the rows in folder/flags[0], over and over, on folder/threads torch threads, counting its
    ops in flags[1], until the rows are < 0."""
    import pickle

    d = Path(folder)
    spec = pickle.loads((d / "spec").read_bytes())
    torch.set_num_threads(int((d / "threads").read_text()))
    flags = torch.from_file(str(d / "flags"), shared=True, size=2, dtype=torch.int64)
    cpu = torch.device("cpu")
    _, decoder, _ = _engine_ops(spec, [], _copies(spec, 1, cpu), [], cpu)
    while (r := int(flags[0])) >= 0:
        decoder(max(r, 1))
        flags[1] += 1  # one writer: the parent only reads it


def paired_curves(spec: ModelSpec, cores: int | None = None) -> dict[str, Curve]:
    """The model's embed, decoder and head ops (CPU) timed against rows with the cores split between
    LayerCurve.PAIRED processes, the others running its decoder at the same rows meanwhile: what each stage
    of a pipeline whose stages share this machine computes at (planner.pipeline.stage_share). Two 1-thread
    processes on 2 cores are not one 2-thread process at half speed: at a few rows a thread is as fast as two,
    at many the pair shares the memory bandwidth. {} where there are fewer cores than processes."""
    import pickle
    import subprocess
    import sys
    import tempfile

    n = LayerCurve.PAIRED
    cores = usable_cores() if cores is None else cores  # as a pipeline's processes count them
    if cores < n:
        return {}
    threads, cpu, last = cores // n, torch.device("cpu"), spec.num_graph_layers - 1
    before = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="flexgen-pair-") as tmp:
        d = Path(tmp)
        (d / "spec").write_bytes(pickle.dumps(spec))
        (d / "threads").write_text(str(threads))
        (d / "flags").write_bytes(bytes(16))
        flags = torch.from_file(str(d / "flags"), shared=True, size=2, dtype=torch.int64)
        flags[0] = 1
        root = str(Path(__file__).resolve().parents[1])  # this checkout, whatever the caller's sys.path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
        cmd = [sys.executable, "-c", "import sys; from runtime.profiler import _twin; _twin(sys.argv[1])", tmp]
        errs = [open(d / f"err{i}", "wb") for i in range(n - 1)]  # a file, not a pipe: a full pipe would stall it
        twins = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=e) for e in errs]
        try:
            torch.set_num_threads(threads)
            ops = _engine_ops(spec, _copies(spec, 0, cpu), _copies(spec, 1, cpu), _copies(spec, last, cpu), cpu)
            now = [0]

            def beside_twins(fn):
                def at(r: int) -> None:
                    if r != now[0]:  # the twins move to r rows: wait until they have finished ops begun at r
                        flags[0] = r
                        seen, deadline = int(flags[1]), time.monotonic() + PAIR_WAIT_S
                        while int(flags[1]) < seen + 2 * len(twins):
                            if any(t.poll() is not None for t in twins) or time.monotonic() > deadline:
                                err = b"".join((d / f"err{i}").read_bytes() for i in range(n - 1))
                                raise RuntimeError(f"paired_curves: the process running {spec.name}'s decoder beside "
                                                   f"this one stopped or stalled: {err.decode()[-400:]}")
                            time.sleep(0.001)
                        now[0] = r
                    fn(r)
                return at
            return {kind: _grow(beside_twins(fn), budget_s=SIDE_POINT_BUDGET_S) for kind, fn in zip(LAYER_ORDER, ops)}
        finally:
            flags[0] = -1
            for t in twins:
                try:
                    t.wait(30)
                except subprocess.TimeoutExpired:
                    t.kill()
                    t.wait()
            for e in errs:
                e.close()
            torch.set_num_threads(before)


# ---------------------------------------------------------------- how streams interact


def handoff(device: torch.device) -> float:
    """What an op costs more when the streams run on worker threads (runtime.backend's workers) than
    inline: a chain of small compute ops alternating between two streams, each waiting on the last."""
    from flexgen_graph.ir import Tier
    from flexgen_graph.program import Stream
    from runtime.backend import CpuBackend

    x = torch.randn(16, 576, device=device)
    w = torch.randn(576, 576, device=device)
    n = 200
    streams = (Stream.COMPUTE, Stream.LOAD)
    sync = _sync_for(device)

    def chain(backend: CpuBackend) -> float:
        events = backend.new_events(n)

        def run() -> None:
            for ev in events:
                ev.clear()
            for i in range(n):
                backend.submit(streams[i % 2], lambda: x @ w, [events[i - 1]] if i else [], events[i])
            backend.drain(events)
        return _typical_time(run, sync=sync)

    budget = {t: 1 << 40 for t in Tier}
    threaded, inline = CpuBackend(budget, Path("."), overlap=True), CpuBackend(budget, Path("."), overlap=False)
    try:
        return max(0.0, (chain(threaded) - chain(inline)) / n)
    finally:
        threaded.close()
        inline.close()


def _busy_loop(device: torch.device, seconds: float = 0.15):
    """A compute workload of about `seconds` on the device (matmuls, as a layer's), returned as a callable."""
    k = 1024
    x, w = torch.randn(256, k, device=device), torch.randn(k, k, device=device)
    one = _typical_time(lambda: x @ w, sync=_sync_for(device))
    reps = max(1, int(seconds / max(one, 1e-6)))

    def work() -> None:
        for _ in range(reps):
            x @ w
        _sync_for(device)()
    return work


def share_of(transfer, work) -> float:
    """The compute time lost per second of transfer running beside it (0: no interference, 1: they take
    turns), where `transfer()` does one unit and returns its isolated seconds."""
    alone = _typical_time(work)
    unit = _typical_time(transfer)
    stop, done = threading.Event(), [0]

    def background() -> None:
        while not stop.is_set():
            transfer()
            done[0] += 1
    losses = []
    for _ in range(3):
        done[0] = 0
        stop.clear()
        th = threading.Thread(target=background, daemon=True)
        th.start()
        t = time.perf_counter()
        work()
        wall = time.perf_counter() - t
        stop.set()
        th.join()
        if done[0]:
            losses.append(max(0.0, wall - alone) / (done[0] * unit))
    return min(1.0, min(losses)) if losses else 0.0


def interference(device: torch.device, folder: Path) -> tuple[float, float, float]:
    """(copy share, warm and cold disk-read shares): what compute loses to host copies and to disk reads
    (from the page cache, and evicted from it first) beside it."""
    work = _busy_loop(device)
    n = 16 << 20
    if device.type == "cuda":
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(n, dtype=torch.uint8, device=device)

        def copy() -> None:
            dev.copy_(host, non_blocking=True)
            torch.cuda.current_stream().synchronize()
    else:
        a, b = torch.ones(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)

        def copy() -> None:
            b.copy_(a)
    copy_share = share_of(copy, work)
    fd, path, buf = _open_test_file(folder)
    try:
        os.pwrite(fd, buf, 0)
        os.fsync(fd)
        view = memoryview(buf)

        def read(cold: bool = True) -> None:
            if cold:
                os.posix_fadvise(fd, 0, n, os.POSIX_FADV_DONTNEED)
            os.preadv(fd, [view[:n]], 0)
        cold_share = share_of(read, work)
        warm_share = share_of(lambda: read(False), work)
        view.release()
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
        buf.close()
    return copy_share, warm_share, cold_share


def available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# ---------------------------------------------------------------- the profile


def model_curves(spec: ModelSpec, device: torch.device) -> list[LayerCurve]:
    """A model's layer curves: dense, and on packed 4- and 8-bit weights where a plan may compute on them."""
    progress(f"{spec.name}'s layers ({spec.dtype})")
    curves = layer_curves(spec, device)
    if device.type == "cpu":  # a pipeline's stages share this machine's cores
        progress(f"{spec.name}'s layers with two processes sharing the cores")
        paired = paired_curves(spec)
        curves = [dataclasses.replace(c, paired_rows=paired.get(c.kind)) for c in curves]
    if device.type == "cpu" and spec.dtype == "float32":
        for bits in PACKED_BITS:
            progress(f"{spec.name}'s layers on packed {bits}-bit weights (the int4 kernel, {torch.backends.cpu.get_cpu_capability()})")
            curves += packed_layer_curves(spec, device, bits)
    return curves


def calibrate(device: torch.device, dtype: torch.dtype, folder: Path, models: list[ModelSpec] = (),
              notes: list[str] | None = None, disk: tuple | None = None) -> Calibration:
    """The Calibration of this machine, with layer curves for each model (disk: disk_curves(folder)'s
    result when the caller has it)."""
    notes = notes if notes is not None else []
    t = time.perf_counter()
    progress("copy curves")
    to_dev, to_host = copy_curves(device)
    if disk is None:
        progress("disk curves")
    cold, warm, write, _, _ = disk if disk is not None else disk_curves(folder)
    progress("how copies and disk reads slow compute beside them")
    copy_share, disk_share, cold_share = interference(device, folder)
    layers = [c for spec in models for c in model_curves(spec, device)]
    progress(f"the generic matmul curve ({dtype}) and the streams' hand-off")
    cal = Calibration(
        method="curves", matmul_s_per_flop=matmul_curve(device, dtype), gpu_from_cpu_s=to_dev, cpu_from_gpu_s=to_host,
        disk_read_cold_s=cold, disk_read_warm_s=warm, disk_write_s=write, op_s=0.0, handoff_s=handoff(device),
        copy_share=copy_share, disk_share=disk_share, cold_disk_share=cold_share, page_cache_bytes=available_ram() // 2, layers=tuple(layers))
    notes.append(f"calibration ({time.perf_counter() - t:.0f} s): hand-off {cal.handoff_s * 1e6:.0f} us per op, compute "
                 f"loses {copy_share:.2f} s per s of host copy, {disk_share:.2f} per s of warm and {cold_share:.2f} "
                 "per s of cold disk read beside it"
                 + "".join(f"; {s.name} ({s.dtype}) layers timed" for s in models))
    return cal


def measure(offload_dir: Path, name: str = "measured", models: list[ModelSpec] = ()) -> tuple[HardwareProfile, list[str]]:
    """This machine's profile; `models`: the models whose layers the calibration times at their shapes."""
    notes: list[str] = []
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    disk_free = shutil.disk_usage(offload_dir if offload_dir.exists() else offload_dir.parent).free
    cpu = torch.device("cpu")
    progress("the CPU's matmul, memory and disk rates", start=True)
    cpu_rows, cpu_peak = min_rows(cpu, torch.float32)
    cpu_bw = memory_bandwidth(cpu)
    disk = disk_curves(offload_dir)
    read, write = disk[3], disk[4]
    notes.append("disk rates measured with page-cache evicted reads (posix_fadvise), as the engine's cold reads")
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        rows, peak = min_rows(dev, torch.float16)
        h2d, d2h = copy_rates(dev)
        link, link_how = stage_link_rate(dev)
        prof = HardwareProfile(
            name=name, has_gpu=True, gpu_bytes=torch.cuda.get_device_properties(dev).total_memory,
            cpu_bytes=int(ram * 0.8), disk_bytes=int(disk_free * 0.8),
            gpu_from_cpu_bytes_per_s=h2d, cpu_from_gpu_bytes_per_s=d2h, cpu_from_disk_bytes_per_s=read,
            disk_from_cpu_bytes_per_s=write, gpu_matmul_flops_per_s=peak,
            gpu_attn_flops_per_s=attention_rate(dev, torch.float16), cpu_matmul_flops_per_s=cpu_peak,
            cpu_mem_bytes_per_s=cpu_bw, gpu_mem_bytes_per_s=memory_bandwidth(dev), matmul_min_rows=rows,
            compute_op_overhead_s=op_overhead(dev), gpu_dequant_bytes_per_s=dequant_rate(dev),
            cpu_dequant_bytes_per_s=dequant_rate(cpu), stage_link_bytes_per_s=link, machine=machine(dev),
            calibration=calibrate(dev, torch.float16, offload_dir, list(models), notes, disk))
        notes.append(f"GPU: {torch.cuda.get_device_name(dev)}, fp16 rates")
    else:
        # no GPU: the "GPU" tier is a third of RAM and "GPU" compute is this CPU (float32)
        link, link_how = stage_link_rate(cpu)
        copy = memory_bandwidth(cpu) / 2  # a copy reads and writes
        prof = HardwareProfile(
            name=name, has_gpu=False, gpu_bytes=ram // 3, cpu_bytes=ram // 2, disk_bytes=int(disk_free * 0.8),
            gpu_from_cpu_bytes_per_s=copy, cpu_from_gpu_bytes_per_s=copy, cpu_from_disk_bytes_per_s=read,
            disk_from_cpu_bytes_per_s=write, gpu_matmul_flops_per_s=cpu_peak,
            gpu_attn_flops_per_s=attention_rate(cpu, torch.float32), cpu_matmul_flops_per_s=cpu_peak,
            cpu_mem_bytes_per_s=cpu_bw, gpu_mem_bytes_per_s=cpu_bw, matmul_min_rows=cpu_rows,
            compute_op_overhead_s=op_overhead(cpu), gpu_dequant_bytes_per_s=dequant_rate(cpu),
            cpu_dequant_bytes_per_s=dequant_rate(cpu), stage_link_bytes_per_s=link, machine=machine(cpu),
            calibration=calibrate(cpu, torch.float32, offload_dir, list(models), notes, disk))
        notes.append("no GPU: the gpu tier is a third of RAM, gpu rates are this CPU's (float32)")
    notes.append(f"stage link: {link_how}; a link between machines is not seen from here (compile "
                 "--stage-link-gbps gives it)")
    return prof, notes


def add_models(profile: HardwareProfile, models: list[ModelSpec], notes: list[str] | None = None) -> HardwareProfile:
    """The profile with layer curves for models it does not know yet (measured here: the caller checks the
    profile is this machine's)."""
    cal = profile.calibration
    assert cal is not None, "add_models needs a calibrated profile"
    device = torch.device("cuda" if profile.has_gpu and torch.cuda.is_available() else "cpu")
    new = [s for s in models if cal.layer("decoder", s.layer_bytes(1)) is None
           or cal.layer("head", s.layer_bytes(s.num_graph_layers - 1)) is None]
    if not new:
        return profile
    t = time.perf_counter()
    layers = list(cal.layers) + [c for spec in new for c in model_curves(spec, device)]
    if notes is not None:
        notes.append(f"timed the layers of {', '.join(s.name for s in new)} in {time.perf_counter() - t:.0f} s")
    return dataclasses.replace(profile, calibration=dataclasses.replace(cal, layers=tuple(layers)))
