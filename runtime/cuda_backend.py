"""CUDA backend: the plan's three streams as CUDA streams, its events as CUDA events.

Each stream keeps a host worker thread (runtime.backend.StreamWorkers, as on the CPU backend) that
enqueues its ops in program order: before an op it makes its CUDA stream wait on the CUDA events of
the ops it depends on (the host only waits until those ops were *enqueued*), so layer j+1's weights
copy on the load stream while layer j computes. Host-tier buffers are pinned so copies are
asynchronous; disk reads land in a pinned staging buffer of the load worker and then cross PCIe.

The plan's GPU capacity is enforced on the card: torch.cuda.set_per_process_memory_fraction caps the
caching allocator of this process on this device at fraction x total memory (an allocation past it
raises torch.OutOfMemoryError), so a 16 GB plan on an 80 GB card fails where a 16 GB card would. The
cap is process-wide and outlives the backend unless undone: close() sets back the fraction found at
construction (1.0, no cap, unless someone set another), so later work in the process, another
engine or the caller's own, gets the card back. One CUDA backend per device at a time.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Sequence

import torch

from flexgen_graph.ir import Tier
from flexgen_graph.program import Stream
from runtime.backend import (
    Buf,
    DiskBuf,
    HostBuf,
    LayerSource,
    MemoryTracker,
    ScratchFiles,
    StreamWorkers,
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


def memory_fraction(device: torch.device) -> float:
    """The process's cap on the device's caching allocator (1.0 where torch cannot report it: before 2.7
    there is no getter, and a process that never set a cap has 1.0)."""
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return float(get(device)) if get is not None else 1.0


class CudaBackend:
    """runtime.backend.Backend on a CUDA device: device buffers for the GPU tier, pinned host buffers for
    the CPU tier, scratch files for the disk tier; ops enqueued on CUDA streams by host workers."""

    name = "cuda"

    def __init__(self, budget: dict[Tier, int], offload_dir: Path, overlap: bool = True,
                 device: torch.device | None = None) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("the CUDA backend needs a CUDA device; none is visible")
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        self.memory = MemoryTracker(budget)
        self._scratch = ScratchFiles(offload_dir)
        self._cuda_streams = {s: torch.cuda.Stream(self.device) for s in Stream}
        self._staging: dict[int, torch.Tensor] = {}  # per worker thread: pinned bytes for disk <-> GPU
        torch.cuda.reset_peak_memory_stats(self.device)
        self._streams = StreamWorkers(overlap)
        self._fraction_before: float | None = None
        total = torch.cuda.get_device_properties(self.device).total_memory
        if budget[Tier.GPU] < total:  # last: nothing after it can fail and leave the cap set
            # the plan's GPU capacity, enforced by the caching allocator: behave as the smaller card
            self._fraction_before = memory_fraction(self.device)
            torch.cuda.empty_cache()  # the cap counts reserved bytes: free blocks cached earlier would eat the budget
            torch.cuda.set_per_process_memory_fraction(budget[Tier.GPU] / total, self.device)

    def alloc(self, tier: Tier, nbytes: int, what: str) -> Buf:
        self.memory.take(tier, nbytes, what)
        if tier is Tier.DISK:
            return self._scratch.open(what, nbytes)
        if tier is Tier.GPU:
            return HostBuf(tier, torch.empty(nbytes, dtype=torch.uint8, device=self.device))
        return HostBuf(tier, torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))  # async copies need pinned pages

    def account(self, tier: Tier, nbytes: int, what: str) -> None:
        self.memory.take(tier, nbytes, what)

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

    def read_layer(self, store: LayerSource, layer: int, dst: Buf, drop_page_cache: bool = False) -> None:
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

    def submit(self, stream: Stream, fn: Callable[[], None], waits: Sequence[OpEvent], done: OpEvent) -> None:
        cuda_stream = self._cuda_streams[stream]

        def run() -> None:
            with torch.cuda.stream(cuda_stream):
                for ev in waits:
                    cuda_stream.wait_event(ev.done)  # device-side ordering; the host does not block
                fn()
                done.done.record(cuda_stream)

        # a worker waits (host side) until each dependency was enqueued, then runs `run`; inline, the
        # program order is that order already
        self._streams.submit(stream, run, [ev.enqueued for ev in waits], done.enqueued)

    def drain(self, events: Sequence[OpEvent]) -> None:
        for ev in events:
            ev.wait()
        torch.cuda.synchronize(self.device)  # the head's tokens are read on the host next
        self._streams.raise_first_error()

    def close(self) -> None:
        self._streams.close()
        self._scratch.close()
        self._staging.clear()
        if self._fraction_before is not None:  # the cap is the process's: give the card back
            torch.cuda.set_per_process_memory_fraction(self._fraction_before, self.device)
            self._fraction_before = None
