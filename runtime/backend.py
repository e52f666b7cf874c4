"""Backends: where buffers live and how streams run, behind one declared interface, `Backend`.

CpuBackend (this module): the GPU tier is host memory counted against the plan's GPU budget,
the CPU tier is host memory, the disk tier is real files in an offload folder; one worker
thread per stream, with threading.Event for the plan's events. CudaBackend (runtime.cuda_backend)
implements the same protocol with CUDA streams, events and pinned host memory. Neither inherits the
other: what they share is here as parts (MemoryTracker, ScratchFiles, StreamWorkers) and functions.
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from flexgen_graph.errors import DiskFullError, UserError
from flexgen_graph.ir import TIERS, Tier
from flexgen_graph.program import Stream


class OutOfBudgetError(UserError, MemoryError):
    """An allocation would exceed the plan's capacity for a tier."""


@dataclass
class HostBuf:
    tier: Tier
    tensor: torch.Tensor  # flat uint8

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()


@dataclass
class DiskBuf:
    path: Path
    fd: int
    nbytes: int
    tier: Tier = Tier.DISK


Buf = HostBuf | DiskBuf


@dataclass
class MemoryTracker:
    """Bytes allocated per tier now and at peak; refuses to pass a tier's budget."""

    budget: dict[Tier, int]
    current: dict[Tier, int] = field(default_factory=lambda: {t: 0 for t in TIERS})
    peak: dict[Tier, int] = field(default_factory=lambda: {t: 0 for t in TIERS})

    def take(self, tier: Tier, nbytes: int, what: str) -> None:
        if self.current[tier] + nbytes > self.budget[tier]:
            raise OutOfBudgetError(
                f"{what}: {nbytes} bytes on the {tier.value} tier would exceed its budget of "
                f"{self.budget[tier]} bytes ({self.current[tier]} in use)"
            )
        self.current[tier] += nbytes
        self.peak[tier] = max(self.peak[tier], self.current[tier])

    def give(self, tier: Tier, nbytes: int) -> None:
        self.current[tier] -= nbytes


def pread_full(fd: int, into: torch.Tensor, offset: int = 0) -> int:
    """Read from fd at offset straight into a flat uint8 host tensor until it is full or the file
    ends; the bytes read (fewer than into holds only at the end of the file)."""
    view, done, n = memoryview(into.numpy()), 0, into.numel()
    while done < n:  # preadv may return short counts (large reads, signals)
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            break
        done += got
    return done


def read_file_into(fd: int, into: torch.Tensor, what: str, error: type[Exception] = ValueError,
                   drop_page_cache: bool = False) -> None:
    """Fill `into` from the start of an open file, then close it; a file that ends first is an `error`
    naming `what`. drop_page_cache: evict the file's pages, so the next read comes from the disk."""
    try:
        done = pread_full(fd, into)  # reads land in into's memory in place, no staging copy
        if done < into.numel():
            raise error(f"{what}: file ended after {done} bytes")
        if drop_page_cache:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_disk(src: DiskBuf, into: torch.Tensor, offset: int) -> None:
    """Fill a flat uint8 host tensor with src's bytes from offset, straight into its memory."""
    got = pread_full(src.fd, into, offset)
    if got < into.numel():
        raise OSError(f"short read from {src.path} at byte {offset + got}")


def write_disk(dst: DiskBuf, data: torch.Tensor, offset: int) -> None:
    """Write a flat uint8 host tensor into dst at offset; a full disk names the file and the bytes unwritten."""
    view, done, n = memoryview(data.numpy()), 0, data.numel()
    while done < n:
        try:
            got = os.pwrite(dst.fd, view[done:], offset + done)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DiskFullError(dst.path, n - done, "offload scratch") from None
            raise
        if got <= 0:  # never loop on a write that makes no progress
            raise DiskFullError(dst.path, n - done, "offload scratch")
        done += got


def copy_range(dst: Buf, src: Buf, offset: int, nbytes: int) -> None:
    """Copy bytes [offset, offset + nbytes) of src into the same range of dst."""
    if nbytes <= 0:
        return
    end = offset + nbytes
    if isinstance(src, HostBuf) and isinstance(dst, HostBuf):
        dst.tensor[offset:end].copy_(src.tensor[offset:end])
    elif isinstance(src, DiskBuf) and isinstance(dst, HostBuf):
        read_disk(src, dst.tensor[offset:end], offset)
    elif isinstance(src, HostBuf) and isinstance(dst, DiskBuf):
        write_disk(dst, src.tensor[offset:end], offset)
    else:
        raise AssertionError(f"no disk-to-disk copies in a plan ({src} -> {dst})")


class ScratchInUseError(UserError):
    """Another process holds a scratch file of the offload folder: two runs would overwrite each other's cache."""


def open_scratch(path: Path, nbytes: int) -> DiskBuf:
    """A scratch file with its blocks reserved now, so a full disk fails at start, not hours in. It is
    locked for this process (flock): a second run given the same offload folder is refused, never
    allowed to overwrite the first's cache under it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not O_TRUNC: the file may be another run's
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ScratchInUseError(f"scratch file {path} is in use by another run: give each run its own "
                                "--offload-dir") from None
    try:
        os.ftruncate(fd, 0)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DiskFullError(path, nbytes, "offload scratch, reserved at start") from None
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # filesystems without fallocate: sparse file
                raise
            os.ftruncate(fd, nbytes)
    except BaseException:
        path.unlink(missing_ok=True)
        os.close(fd)
        raise
    return DiskBuf(path, fd, nbytes)


class ScratchFiles:
    """The disk tier: one preallocated scratch file per buffer in the offload folder, removed on close."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: list[DiskBuf] = []

    def open(self, what: str, nbytes: int) -> DiskBuf:
        self.folder.mkdir(parents=True, exist_ok=True)
        buf = open_scratch(self.folder / f"{what}.bin", nbytes)
        self._files.append(buf)
        return buf

    def close(self) -> None:
        for f in self._files:
            f.path.unlink(missing_ok=True)  # before the lock goes with the fd: no other run holds this file
            os.close(f.fd)
        self._files.clear()


class _Worker:
    """One stream: runs submitted thunks in order, each after its wait events are set."""

    def __init__(self, name: str, errors: list[BaseException]) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._errors = errors
        self._thread = threading.Thread(target=self._loop, name=f"stream-{name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None], waits: Sequence[threading.Event], done: threading.Event) -> None:
        self._q.put((fn, waits, done))

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, waits, done = item
            try:
                for ev in waits:
                    ev.wait()
                if not self._errors:  # after a failure, skip work but keep releasing waiters
                    fn()
            except BaseException as e:  # surfaced to the caller by StreamWorkers.raise_first_error
                self._errors.append(e)
            finally:
                done.set()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()


class StreamWorkers:
    """The plan's streams as host threads, one per stream running its thunks in submission order, each
    after its wait events are set; or, with overlap off, every thunk inline on the caller, in program
    order. After a failure the rest is skipped (waiters still released); the first error is kept."""

    def __init__(self, overlap: bool) -> None:
        self.errors: list[BaseException] = []
        self._workers = {s: _Worker(s.value, self.errors) for s in Stream} if overlap else {}

    def submit(self, stream: Stream, fn: Callable[[], None], waits: Sequence[Any], done: Any) -> None:
        if self._workers:
            self._workers[stream].submit(fn, waits, done)
            return
        try:
            if not self.errors:
                fn()
        except BaseException as e:  # raised by raise_first_error, as with workers
            self.errors.append(e)
        done.set()

    def raise_first_error(self) -> None:
        if self.errors:
            err = self.errors[0]
            self.errors.clear()
            raise err

    def close(self) -> None:
        for w in self._workers.values():
            w.close()
        self._workers = {}


class LayerSource(Protocol):
    """A weight store, or its compressed copy: whole layers read into a host buffer."""

    def layer_nbytes(self, layer: int) -> int: ...

    def read_layer_into(self, layer: int, buf: torch.Tensor, drop_page_cache: bool = False) -> None: ...


class Backend(Protocol):
    """What the interpreter (runtime.engine) asks of a backend. Events are the backend's own: `new_events`
    makes them, ops `submit`ted to a stream wait on some and set one, `drain` waits for the given ones
    and raises the first error any op raised."""

    name: str
    device: torch.device
    memory: MemoryTracker

    def alloc(self, tier: Tier, nbytes: int, what: str) -> Buf:
        """A buffer of nbytes on tier, counted against the tier's budget (OutOfBudgetError past it)."""
        ...

    def account(self, tier: Tier, nbytes: int, what: str) -> None:
        """Count bytes that live outside the backend's allocations (weights left in the weight store)."""
        ...

    def copy(self, dst: Buf, src: Buf, offset: int, nbytes: int) -> None:
        """Bytes [offset, offset + nbytes) of src into the same range of dst (inside a stream's thunk)."""
        ...

    def read_layer(self, store: LayerSource, layer: int, dst: Buf, drop_page_cache: bool = False) -> None:
        ...

    def new_events(self, n: int) -> list[Any]:
        ...

    def submit(self, stream: Stream, fn: Callable[[], None], waits: Sequence[Any], done: Any) -> None:
        ...

    def drain(self, events: Sequence[Any]) -> None:
        ...

    def device_peak_bytes(self) -> int | None:
        """The device's own peak, where it measures one (None: the tracker's accounting is the measurement)."""
        ...

    def close(self) -> None:
        """Stop the streams, remove scratch files, undo any process-wide setting; safe to call twice."""
        ...


def open_backend(device: str, budget: dict[Tier, int], offload_dir: Path, overlap: bool = True) -> Backend:
    """The backend for device "cpu" or "cuda" (runtime.cuda_backend, imported only then)."""
    if device == "cuda":
        from runtime.cuda_backend import CudaBackend

        return CudaBackend(budget, offload_dir, overlap=overlap)
    if device == "cpu":
        return CpuBackend(budget, offload_dir, overlap=overlap)
    raise UserError(f"device must be auto, cpu or cuda, got {device!r}")


class CpuBackend:
    """overlap=False runs every op inline on the calling thread, in program order: the same
    results without any overlap of transfers and compute (for measuring what overlap buys)."""

    name = "cpu"
    device = torch.device("cpu")

    def __init__(self, budget: dict[Tier, int], offload_dir: Path, overlap: bool = True) -> None:
        self.memory = MemoryTracker(budget)
        self._scratch = ScratchFiles(offload_dir)
        self._streams = StreamWorkers(overlap)

    def alloc(self, tier: Tier, nbytes: int, what: str) -> Buf:
        self.memory.take(tier, nbytes, what)
        if tier is Tier.DISK:
            return self._scratch.open(what, nbytes)
        return HostBuf(tier, torch.empty(nbytes, dtype=torch.uint8))

    def account(self, tier: Tier, nbytes: int, what: str) -> None:
        self.memory.take(tier, nbytes, what)

    def copy(self, dst: Buf, src: Buf, offset: int, nbytes: int) -> None:
        copy_range(dst, src, offset, nbytes)

    def read_layer(self, store: LayerSource, layer: int, dst: Buf, drop_page_cache: bool = False) -> None:
        store.read_layer_into(layer, dst.tensor, drop_page_cache=drop_page_cache)

    def new_events(self, n: int) -> list[threading.Event]:
        return [threading.Event() for _ in range(n)]

    def device_peak_bytes(self) -> int | None:
        return None  # the tracker's accounting is the measurement on a CPU-only machine

    def submit(self, stream: Stream, fn: Callable[[], None], waits: Sequence[threading.Event],
               done: threading.Event) -> None:
        self._streams.submit(stream, fn, waits, done)

    def drain(self, events: Sequence[threading.Event]) -> None:
        for ev in events:
            ev.wait()
        self._streams.raise_first_error()

    def close(self) -> None:
        self._streams.close()
        self._scratch.close()
