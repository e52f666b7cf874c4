"""HardwareProfile: capacities and rates of one machine, as data. Builtin profiles and profile files.

    >>> p = load_profile("t4-flexgen")
    >>> round(p.gpu_from_cpu_bytes_per_s / GB, 2), p.has_gpu
    (12.89, True)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from flexgen_graph.errors import UserError

GB = 1 << 30
TFLOP = 10**12


class BadProfileError(UserError):
    """A profile name or file the planner cannot use."""


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    """Capacities (bytes) and rates. On a machine without a GPU (has_gpu=False) the GPU tier is a
    budget of host memory and "GPU" compute is the CPU; the gpu<->cpu links are host memcpy."""

    name: str
    has_gpu: bool
    gpu_bytes: int
    cpu_bytes: int
    disk_bytes: int
    gpu_from_cpu_bytes_per_s: float
    cpu_from_gpu_bytes_per_s: float
    cpu_from_disk_bytes_per_s: float
    disk_from_cpu_bytes_per_s: float
    gpu_matmul_flops_per_s: float
    gpu_attn_flops_per_s: float
    cpu_matmul_flops_per_s: float
    cpu_mem_bytes_per_s: float
    gpu_mem_bytes_per_s: float  # what bounds a compute that must read its weights (decode at small batch)
    matmul_min_rows: int  # a matmul of fewer rows costs as much as one of this many (small-batch inefficiency)
    compute_op_overhead_s: float  # fixed cost per compute op (launches, Python dispatch)
    # dense bytes per second that 4-bit dequantization produces (runtime.quant: a few elementwise passes,
    # far below memory bandwidth on a CPU): on the compute device, and on the host (CPU-attended cache)
    gpu_dequant_bytes_per_s: float
    cpu_dequant_bytes_per_s: float
    # hidden states between pipeline stages (one process per GPU or machine): bytes per second of one
    # torch.distributed send/recv. The profiler measures the local one; a link between machines is only
    # known to the user (`compile --stage-link-gbps`)
    stage_link_bytes_per_s: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not isinstance(self.has_gpu, bool):
            raise BadProfileError(f"profile name must be a string and has_gpu true/false, got {self.name!r}, "
                                  f"{self.has_gpu!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("name", "has_gpu"):
                continue
            low_ok = f.name == "compute_op_overhead_s" and v == 0
            if not isinstance(v, (int, float)) or isinstance(v, bool) or (v <= 0 and not low_ok):
                raise BadProfileError(f"profile {self.name!r}: {f.name} must be a positive number, got {v!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HardwareProfile":
        names = {f.name for f in fields(cls)}
        missing, unknown = names - set(d), set(d) - names
        if missing or unknown:
            raise BadProfileError(f"profile fields: missing {sorted(missing)}, unknown {sorted(unknown)} "
                                  "(a profile from another version: measure it again with `flexgen-graph profile`)")
        return cls(**d)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def with_capacities(self, **caps: int) -> "HardwareProfile":
        return replace(self, **caps)


BUILTIN_PROFILES: dict[str, HardwareProfile] = {
    # FlexGen paper's GCP machine (T4 16 GB, 208 GB DRAM, 1.5 TB NVMe); rates fitted by FlexGen
    # (CostModelConfig in its experimental/cost_model.py): ctog 12.89, gtoc 0.97 (cache),
    # dtoc 0.473, ctod 0.746 GB/s; fp16 matmul 4.3 TFLOP/s decode, bmm 0.079; cpu 0.0123 TFLOP/s.
    "t4-flexgen": HardwareProfile(
        name="t4-flexgen", has_gpu=True,
        gpu_bytes=16 * GB, cpu_bytes=208 * GB, disk_bytes=1500 * GB,
        gpu_from_cpu_bytes_per_s=12.89 * GB, cpu_from_gpu_bytes_per_s=0.97 * GB,
        cpu_from_disk_bytes_per_s=0.473 * GB, disk_from_cpu_bytes_per_s=0.746 * GB,
        gpu_matmul_flops_per_s=21.24 * TFLOP, gpu_attn_flops_per_s=0.079 * TFLOP,
        cpu_matmul_flops_per_s=0.0123 * TFLOP, cpu_mem_bytes_per_s=20 * GB,
        # FlexGen fits 21.24 TFLOP/s for prefill matmuls but 4.3 for decode; a 128-row floor on
        # decode-sized matmuls reproduces that ratio at its gpu batch sizes (~32)
        gpu_mem_bytes_per_s=300e9, matmul_min_rows=128, compute_op_overhead_s=5e-5,
        # assumed: ~6 bytes of traffic per float16 byte produced on the GPU; a many-core host 4x ours
        gpu_dequant_bytes_per_s=50e9, cpu_dequant_bytes_per_s=4e9,
        # assumed: GPUs of one host without a peer link exchange through host memory (PCIe gen3 x16)
        stage_link_bytes_per_s=10e9,
    ),
    # H100 80GB PCIe gen5 machine, figures measured 2026-11-26 (bench/SCENARIOS.md); the disk and
    # CPU matmul rates were not measured there and are conservative assumptions.
    "h100-pcie5": HardwareProfile(
        name="h100-pcie5", has_gpu=True,
        gpu_bytes=80 * GB, cpu_bytes=120 * GB, disk_bytes=60 * GB,
        gpu_from_cpu_bytes_per_s=54.4e9, cpu_from_gpu_bytes_per_s=55.0e9,
        cpu_from_disk_bytes_per_s=2.0e9, disk_from_cpu_bytes_per_s=1.5e9,
        gpu_matmul_flops_per_s=762e12, gpu_attn_flops_per_s=200e12,
        cpu_matmul_flops_per_s=1.0e12, cpu_mem_bytes_per_s=97e9,
        gpu_mem_bytes_per_s=2.0e12, matmul_min_rows=128, compute_op_overhead_s=3e-5,
        gpu_dequant_bytes_per_s=330e9, cpu_dequant_bytes_per_s=8e9,  # assumed, as for t4-flexgen
        stage_link_bytes_per_s=50e9,  # assumed: PCIe gen5 peer copies, not measured
    ),
    # The CI/developer box: 2 cores, 24 GiB, no GPU. The "GPU" tier is an 8 GiB budget of host
    # memory. fp32 matmul 150 GFLOP/s at >= 64 rows (16 rows cost as much as 64), host memory read
    # 22 GB/s, cold disk 1.1 GB/s: measured here and in bench/SCENARIOS.md.
    "cpu-small": HardwareProfile(
        name="cpu-small", has_gpu=False,
        gpu_bytes=8 * GB, cpu_bytes=12 * GB, disk_bytes=50 * GB,
        gpu_from_cpu_bytes_per_s=10e9, cpu_from_gpu_bytes_per_s=10e9,
        cpu_from_disk_bytes_per_s=1.1e9, disk_from_cpu_bytes_per_s=1.0e9,
        gpu_matmul_flops_per_s=150e9, gpu_attn_flops_per_s=30e9,
        cpu_matmul_flops_per_s=150e9, cpu_mem_bytes_per_s=22e9,
        gpu_mem_bytes_per_s=22e9, matmul_min_rows=64, compute_op_overhead_s=1e-4,
        # float32 out (runtime.profiler.dequant_rate: 0.4 GB/s measured with the other core busy)
        gpu_dequant_bytes_per_s=1.2e9, cpu_dequant_bytes_per_s=1.2e9,
        # gloo between two processes of this machine: `flexgen-graph profile` measured 2.9 and 4.2 GB/s
        # (8 MiB messages, two runs, 2026-11-27); a decode step's messages are kilobytes and per-message
        # latency weighs more there, so a lower figure is assumed
        stage_link_bytes_per_s=2e9,
    ),
}


def load_profile(name_or_path: str) -> HardwareProfile:
    """A builtin profile by name, or a JSON profile file (the fields of HardwareProfile)."""
    if name_or_path in BUILTIN_PROFILES:
        return BUILTIN_PROFILES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise BadProfileError(
            f"unknown profile {name_or_path!r}: not a builtin ({', '.join(BUILTIN_PROFILES)}) nor a file"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadProfileError(f"profile file {path}: {e}") from None
    if not isinstance(data, dict):
        raise BadProfileError(f"profile file {path}: expected a JSON object")
    return HardwareProfile.from_dict(data)


def save_profile(profile: HardwareProfile, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile.to_dict(), indent=2, sort_keys=True) + "\n")
