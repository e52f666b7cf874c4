"""Backends: both implement the declared Backend protocol without inheriting each other; the CUDA
backend's process-wide memory cap is set from the plan and restored on close (torch.cuda mocked: this
runs without a GPU; tests/test_cuda.py runs the real thing where there is one)."""

from __future__ import annotations

import inspect
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flexgen_graph.ir import Tier
from flexgen_graph.program import Stream
from runtime.backend import Backend, CpuBackend, open_backend
from runtime.cuda_backend import CudaBackend

GIB = 1 << 30


def protocol_members() -> dict[str, object]:
    names = set(Backend.__annotations__) | {n for n, v in vars(Backend).items()
                                             if callable(v) and not n.startswith("_")}
    return {n: getattr(Backend, n, None) for n in sorted(names)}


@pytest.mark.parametrize("cls", [CpuBackend, CudaBackend])
def test_each_backend_implements_the_protocol_with_its_signatures(cls):
    for name, member in protocol_members().items():
        assert hasattr(cls, name) or name in ("memory", "device"), f"{cls.__name__} lacks {name}"
        if callable(member):
            want = list(inspect.signature(member).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == want, f"{cls.__name__}.{name}"


def test_the_cuda_backend_does_not_inherit_the_cpu_one():
    assert not issubclass(CudaBackend, CpuBackend) and not issubclass(CpuBackend, CudaBackend)


def test_cpu_backend_instance_has_the_protocols_attributes(tmp_path):
    b = open_backend("cpu", {t: GIB for t in Tier}, tmp_path)
    try:
        missing = [n for n in protocol_members() if not hasattr(b, n)]
        assert not missing
        done = b.new_events(2)
        b.submit(Stream.LOAD, lambda: None, [], done[0])
        b.submit(Stream.COMPUTE, lambda: 1 / 0, [done[0]], done[1])
        with pytest.raises(ZeroDivisionError):
            b.drain(done)  # an op's error surfaces at the drain, on the caller's thread
    finally:
        b.close()
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda, got 'tpu'"):
        open_backend("tpu", {t: GIB for t in Tier}, tmp_path)


class FakeCuda:
    """The torch.cuda calls CudaBackend makes at construction and close, recorded."""

    def __init__(self, monkeypatch, total: int, fraction: float | None) -> None:
        self.fraction, self.calls = fraction, []
        m = monkeypatch
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "current_device", lambda: 0)
        m.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=total))
        m.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: None)
        m.setattr(torch.cuda, "empty_cache", lambda: self.calls.append("empty_cache"))
        m.setattr(torch.cuda, "Stream", lambda d: object())
        m.setattr(torch.cuda, "set_per_process_memory_fraction", self.set)
        if fraction is None:  # torch before 2.7: no getter
            m.delattr(torch.cuda, "get_per_process_memory_fraction", raising=False)
        else:
            m.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: self.fraction)

    def set(self, fraction: float, device) -> None:
        assert isinstance(fraction, float) and 0 <= fraction <= 1  # torch's own checks
        self.calls.append(fraction)
        self.fraction = fraction


@pytest.mark.parametrize("before", [1.0, 0.75, None], ids=["default", "set-by-caller", "no-getter"])
def test_cuda_memory_fraction_is_the_plans_until_close(monkeypatch, tmp_path, before):
    cuda = FakeCuda(monkeypatch, total=80 * GIB, fraction=before)
    b = CudaBackend({Tier.GPU: 16 * GIB, Tier.CPU: GIB, Tier.DISK: GIB}, tmp_path)
    # a 16 GB plan on an 80 GB card behaves as the 16 GB card (cached free blocks released first: they count)
    assert cuda.calls == ["empty_cache", 0.2]
    threads = [t for t in threading.enumerate() if t.name.startswith("stream-")]
    b.close()
    assert cuda.calls == ["empty_cache", 0.2, 1.0 if before is None else before]  # the process gets the card back
    assert not any(t.is_alive() for t in threads)
    b.close()  # twice: nothing more to undo
    assert len(cuda.calls) == 3


def test_a_plan_as_large_as_the_card_sets_no_cap(monkeypatch, tmp_path):
    cuda = FakeCuda(monkeypatch, total=16 * GIB, fraction=0.5)
    b = CudaBackend({Tier.GPU: 16 * GIB, Tier.CPU: GIB, Tier.DISK: GIB}, tmp_path, overlap=False)
    b.close()
    assert cuda.calls == []  # the caller's own cap stays as it was


def test_a_failed_construction_leaves_no_cap(monkeypatch, tmp_path):
    cuda = FakeCuda(monkeypatch, total=80 * GIB, fraction=1.0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        CudaBackend({Tier.GPU: 16 * GIB, Tier.CPU: GIB, Tier.DISK: GIB}, Path(tmp_path))
    assert cuda.calls == []
