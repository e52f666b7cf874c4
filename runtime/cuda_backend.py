"""CUDA backend: the plan's three streams as CUDA streams, its events as CUDA events.

Each stream keeps a host worker thread (as on the CPU backend) that enqueues its ops in program
order: before an op it makes its CUDA stream wait on the CUDA events of the ops it depends on
(the host only waits until those ops were *enqueued*), so layer j+1's weights copy on the load
stream while layer j computes. Host-tier buffers are pinned so copies are asynchronous; disk
reads land in a pinned staging buffer of the load worker and then cross PCIe. The plan's GPU
capacity is enforced on the card (set_per_process_memory_fraction), so a 16 GB plan on an 80 GB
card fails where a 16 GB card would.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import torch

from flexgen_graph.ir import Tier
from flexgen_graph.program import Stream
from runtime.backend import (
    Buf,
    CpuBackend,
    DiskBuf,
    HostBuf,
    copy_range,
    read_disk,
    write_disk,
)


class OpEvent:
    """A plan event on CUDA: `enqueued` for the host threads, `done` (a CUDA event) for the streams."""

    def __init__(self) -> None:
        self.enqueued = threading.Event()
        self.done = torch.cuda.Event()

    def clear(self) -> None:
        self.enqueued.clear()

    def set(self) -> None:
        self.enqueued.set()

    def wait(self) -> None:
        self.enqueued.wait()


class CudaBackend(CpuBackend):
    """The CPU backend's structure (memory tracker, disk scratch files, one host worker per stream,
    error propagation) with device buffers, pinned host buffers and CUDA streams and events."""

    name = "cuda"

    def __init__(self, budget: dict[Tier, int], offload_dir: Path, overlap: bool = True,
                 device: torch.device | None = None) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("the CUDA backend needs a CUDA device; none is visible")
        super().__init__(budget, offload_dir, overlap=overlap)
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        total = torch.cuda.get_device_properties(self.device).total_memory
        if budget[Tier.GPU] < total:
            # the plan's GPU capacity, enforced by the caching allocator: behave as the smaller card
            torch.cuda.set_per_process_memory_fraction(budget[Tier.GPU] / total, self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._streams = {s: torch.cuda.Stream(self.device) for s in Stream}
        self._staging: dict[int, torch.Tensor] = {}  # per worker thread: pinned bytes for disk <-> GPU

    def _host_tensor(self, tier: Tier, nbytes: int) -> torch.Tensor:
        if tier is Tier.GPU:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # async copies need pinned pages

    def _stage(self, nbytes: int) -> torch.Tensor:
        key = threading.get_ident()
        buf = self._staging.get(key)
        if buf is None or buf.numel() < nbytes:
            if buf is not None:
                self.memory.give(Tier.CPU, buf.numel())
            self.memory.take(Tier.CPU, nbytes, "pinned staging")
            buf = self._staging[key] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return buf[:nbytes]

    def device_peak_bytes(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    # -- transfers (run on a worker thread, inside its stream) --------------------------------------
    def copy(self, dst: Buf, src: Buf, offset: int, nbytes: int) -> None:
        if nbytes <= 0:
            return
        end = offset + nbytes
        on_gpu = lambda b: isinstance(b, HostBuf) and b.tensor.is_cuda  # noqa: E731
        if isinstance(src, HostBuf) and isinstance(dst, HostBuf):
            dst.tensor[offset:end].copy_(src.tensor[offset:end], non_blocking=True)
        elif isinstance(src, DiskBuf) and on_gpu(dst):
            stage = self._stage(nbytes)
            read_disk(src, stage, offset)
            dst.tensor[offset:end].copy_(stage, non_blocking=True)
            torch.cuda.current_stream().synchronize()  # the staging buffer is reused by the next read
        elif on_gpu(src) and isinstance(dst, DiskBuf):
            stage = self._stage(nbytes)
            stage.copy_(src.tensor[offset:end], non_blocking=True)
            torch.cuda.current_stream().synchronize()
            write_disk(dst, stage, offset)
        else:
            copy_range(dst, src, offset, nbytes)  # disk <-> pinned host: plain reads and writes

    def read_layer(self, store, layer: int, dst: Buf, drop_page_cache: bool = False) -> None:
        if isinstance(dst, HostBuf) and dst.tensor.is_cuda:
            stage = self._stage(store.layer_nbytes(layer))
            store.read_layer_into(layer, stage, drop_page_cache=drop_page_cache)
            dst.tensor[: stage.numel()].copy_(stage, non_blocking=True)
            torch.cuda.current_stream().synchronize()
        else:
            store.read_layer_into(layer, dst.tensor, drop_page_cache=drop_page_cache)

    # -- streams -------------------------------------------------------------------------------------
    def new_events(self, n: int) -> list[OpEvent]:
        return [OpEvent() for _ in range(n)]

    def submit(self, stream: Stream, fn: Callable[[], None], waits: list[OpEvent], done: OpEvent) -> None:
        cuda_stream = self._streams[stream]

        def run() -> None:
            with torch.cuda.stream(cuda_stream):
                for ev in waits:
                    cuda_stream.wait_event(ev.done)  # device-side ordering; the host does not block
                fn()
                done.done.record(cuda_stream)

        if not self.overlap:
            super().submit(stream, run, waits, done)
            return
        # the worker waits (host side) until each dependency was enqueued, then runs `run`
        self._workers[stream].submit(run, [ev.enqueued for ev in waits], done.enqueued)

    def _synchronize(self) -> None:
        torch.cuda.synchronize(self.device)  # the head's tokens are read on the host next

    def close(self) -> None:
        super().close()
        self._staging.clear()

