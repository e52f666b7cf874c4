"""Measure this machine into a HardwareProfile (`flexgen-graph profile`), in well under a minute.

    from runtime.profiler import measure
    profile, notes = measure(Path("/tmp/offload"))

Capacities: GPU memory (or, without a GPU, a third of RAM as the "GPU" tier), RAM, free disk
of the offload folder. Rates: host<->GPU copies (pinned), disk read/write of the offload folder
(O_DIRECT where the filesystem allows, else page-cache evicted reads, said in the notes), matmul
and attention rates of the compute device and of the CPU, the matmul row count below which
small batches stop paying off, host memory bandwidth, the per-op dispatch overhead, and the rate
of 4-bit dequantization on each device, and the link between pipeline stages as this machine sees it
(gloo between two local processes; without a second GPU, a GPU's hidden states leave through the host).
"""

from __future__ import annotations

import mmap
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flexgen_graph.hardware import HardwareProfile

DISK_TEST_BYTES = 256 << 20


def _best_time(fn, repeats: int = 3, sync=lambda: None) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_rate(device: torch.device, dtype: torch.dtype, rows: int, k: int = 2048, n: int = 2048) -> float:
    x = torch.randn(rows, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return 2 * rows * k * n / _best_time(lambda: F.linear(x, w), sync=sync)


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
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return 4 * b * h * s * d / _best_time(lambda: F.scaled_dot_product_attention(q, k, v), sync=sync)


def memory_bandwidth(device: torch.device) -> float:
    x = torch.ones(256 << 20 >> 2, device=device)  # 256 MiB of float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return x.numel() * 4 / _best_time(lambda: x.sum(), sync=sync)


def dequant_rate(device: torch.device) -> float:
    """Dense float32 bytes per second that 4-bit dequantization (runtime.quant, as the runtime calls
    it on a weight grouped along its input dim) writes on the device."""
    from runtime.quant import QuantConfig, dequantize, quantize

    w = torch.randn(2048, 2048, device=device)
    q, out = quantize(w, 0, QuantConfig(4, 64)), torch.empty_like(w)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return w.numel() * 4 / _best_time(lambda: dequantize(q, out=out), sync=sync)


def op_overhead(device: torch.device) -> float:
    """Fixed cost of one small layer op (dispatch), per op."""
    x = torch.randn(1, 64, device=device)
    w = torch.randn(64, 64, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def ops():
        for _ in range(100):
            F.linear(x, w)
    return _best_time(ops, sync=sync) / 100 * 10  # ~10 torch calls per layer op


def copy_rates(device: torch.device) -> tuple[float, float]:
    n = 256 << 20
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device=device)
    sync = torch.cuda.synchronize
    h2d = n / _best_time(lambda: dev.copy_(host, non_blocking=True), sync=sync)
    d2h = n / _best_time(lambda: host.copy_(dev, non_blocking=True), sync=sync)
    return h2d, d2h


def _link_peer(rank: int, store: str, n: int, result: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        t = torch.zeros(n, dtype=torch.uint8)

        def hop() -> None:
            dist.send(t, 1) if rank == 0 else dist.recv(t, 0)
        rate = n / _best_time(hop, repeats=5)
        if rank == 1:
            Path(result).write_text(repr(rate))
    finally:
        dist.destroy_process_group()


def stage_link_rate(device: torch.device) -> tuple[float, str]:
    """Bytes/s of handing a hidden state to the next pipeline stage, and how it was measured."""
    n = 8 << 20  # the hidden states of a large gpu batch in prefill are megabytes
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        a = torch.empty(n, dtype=torch.uint8, device="cuda:0")
        b = torch.empty(n, dtype=torch.uint8, device="cuda:1")
        return n / _best_time(lambda: b.copy_(a), sync=torch.cuda.synchronize), "a copy cuda:0 -> cuda:1"
    if device.type == "cuda":
        return copy_rates(device)[1], "one GPU: hidden states would leave through the host (device -> host rate)"
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "rate")
        mp.spawn(_link_peer, args=(os.path.join(tmp, "store"), n, result), nprocs=2)
        return float(Path(result).read_text()), "gloo send/recv between two processes of this machine"


def disk_rates(folder: Path) -> tuple[float, float, str]:
    """(read, write) bytes/s of the folder's filesystem, bypassing the page cache where possible."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".flexgen-graph-disk-test"
    buf = mmap.mmap(-1, DISK_TEST_BYTES)  # page-aligned, as O_DIRECT wants
    buf.write(os.urandom(1 << 20) * (DISK_TEST_BYTES >> 20))
    direct = getattr(os, "O_DIRECT", 0)
    note = "O_DIRECT"
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | direct, 0o600)
        except OSError:
            direct, note = 0, "page cache evicted with posix_fadvise (no O_DIRECT on this filesystem)"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            t = time.perf_counter()
            os.pwrite(fd, buf, 0)
            os.fsync(fd)
            write = DISK_TEST_BYTES / (time.perf_counter() - t)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t = time.perf_counter()
            os.preadv(fd, [buf], 0)
            read = DISK_TEST_BYTES / (time.perf_counter() - t)
        finally:
            os.close(fd)
    finally:
        path.unlink(missing_ok=True)
        buf.close()
    return read, write, note


def measure(offload_dir: Path, name: str = "measured") -> tuple[HardwareProfile, list[str]]:
    notes: list[str] = []
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    disk_free = shutil.disk_usage(offload_dir if offload_dir.exists() else offload_dir.parent).free
    cpu = torch.device("cpu")
    cpu_rows, cpu_peak = min_rows(cpu, torch.float32)
    cpu_bw = memory_bandwidth(cpu)
    read, write, how = disk_rates(offload_dir)
    notes.append(f"disk rates measured with {how}")
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
            cpu_dequant_bytes_per_s=dequant_rate(cpu), stage_link_bytes_per_s=link)
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
            cpu_dequant_bytes_per_s=dequant_rate(cpu), stage_link_bytes_per_s=link)
        notes.append("no GPU: the gpu tier is a third of RAM, gpu rates are this CPU's (float32)")
    notes.append(f"stage link: {link_how}; a link between machines is not seen from here (compile "
                 "--stage-link-gbps gives it)")
    return prof, notes
