"""HardwareProfile: capacities and rates of one machine, as data. Builtin profiles and profile files.

    >>> p = load_profile("t4-flexgen")
    >>> round(p.gpu_from_cpu_bytes_per_s / GB, 2), p.has_gpu
    (12.89, True)

A profile measured by `flexgen-graph profile` also carries a Calibration: what the cost model
needs at the shapes that matter (planner.cost reads it; a profile without one is priced with the
scalar rates alone, as FlexGen's fitted constants are), the profile format's version and the
machine it was measured on. A profile file from another version, with a missing or non-finite
field, or (where the caller checks) from another machine is refused naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from flexgen_graph.errors import UserError

GB = 1 << 30
TFLOP = 10**12
# 2: a Calibration (curves measured at the model's shapes), the machine it was measured on
PROFILE_VERSION = 3


class BadProfileError(UserError):
    """A profile name or file the planner cannot use."""


def _finite(v: Any, what: str, *, positive: bool = False, zero_ok: bool = True) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise BadProfileError(f"{what} must be a finite number, got {v!r}")
    if v < 0 or (v == 0 and not zero_ok) or (positive and v <= 0):
        raise BadProfileError(f"{what} must be {'positive' if positive or not zero_ok else 'non-negative'}, got {v!r}")
    return v


@dataclass(frozen=True, slots=True)
class Curve:
    """y measured at increasing x: linear between the points, y[0] below the first, proportional to x
    beyond the last (a cost that has reached its linear regime).

        >>> Curve((1, 4), (2.0, 5.0)).at(2), Curve((1, 4), (2.0, 5.0)).at(8)
        (3.0, 10.0)
    """

    xs: tuple[float, ...]
    ys: tuple[float, ...]

    def at(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if x <= xs[0]:
            return ys[0]
        if x >= xs[-1]:
            return ys[-1] * x / xs[-1]
        lo, hi = 0, len(xs) - 1
        while hi - lo > 1:  # bisect: xs[lo] <= x < xs[hi]
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if xs[mid] <= x else (lo, mid)
        f = (x - xs[lo]) / (xs[hi] - xs[lo])
        return ys[lo] + f * (ys[hi] - ys[lo])

    def scaled(self, k: float) -> "Curve":
        return Curve(self.xs, tuple(y * k for y in self.ys))

    def to_list(self) -> list[list[float]]:
        return [[x, y] for x, y in zip(self.xs, self.ys)]

    @classmethod
    def from_list(cls, d: Any, what: str) -> "Curve":
        if not isinstance(d, list) or not d:
            raise BadProfileError(f"{what} must be a non-empty list of [x, y] points, got {d!r}")
        pts = []
        for i, p in enumerate(d):
            if not (isinstance(p, (list, tuple)) and len(p) == 2):
                raise BadProfileError(f"{what}[{i}] must be an [x, y] point, got {p!r}")
            pts.append((_finite(p[0], f"{what}[{i}] x", zero_ok=False), _finite(p[1], f"{what}[{i}] y")))
        if any(b[0] <= a[0] for a, b in zip(pts, pts[1:])):
            raise BadProfileError(f"{what}: x must increase from point to point")
        return cls(tuple(float(x) for x, _ in pts), tuple(float(y) for _, y in pts))


LAYER_KINDS = ("embed", "decoder", "head")
# "<kind>-packed4" / "-packed8": the layer computed on packed 4- / 8-bit weights (a policy's packed_weights); a
# kind, not a field, so profiles measured before it still read (they have no such curve, and no plan computes
# packed by them)
PACKED_BITS = (4, 8)


def packed_suffix(bits: int) -> str:
    return f"-packed{bits}"


PACKED_KINDS = tuple(k + packed_suffix(b) for b in PACKED_BITS for k in LAYER_KINDS)


@dataclass(frozen=True, slots=True)
class LayerCurve:
    """One layer kind of one model, timed by running its kernel at the model's own shapes: applies to
    the graph layers of that kind with exactly that many weight bytes (the same model and dtype)."""

    kind: str  # "embed", "decoder", "head", or one of them + packed_suffix(bits)
    weight_bytes: int
    model: str  # for people: what was measured
    rows: Curve  # seconds of one compute op against its rows (gpu batch x new tokens; the head: sequences)
    attn_s: float = 0.0  # decode attention on the compute device: seconds per sequence per context token
    attn_cpu_s: float = 0.0  # the same on the host (CPU attention)
    prefill_attn_s: float = 0.0  # prefill attention: seconds per sequence per prompt_len squared
    dequant_s_per_byte: float = 0.0  # 4-bit weights of this layer: seconds per dense byte restored
    # 4-bit cache, decode attention beyond the dense cache's (runtime.qattention): per dense byte attended, and
    # per op (its new rows stored, fixed costs)
    cache_dequant_s_per_byte: float = 0.0
    cache_store_s: float = 0.0
    cache_quant_s_per_byte: float = 0.0  # 4-bit cache: prefill's rows compressed and read back, per dense byte
    # decode attention on the compute device at ATTN_WIDE_SEQS sequences (attn_s is at ATTN_SEQS): per sequence
    # it grows with the batch once the cache outgrows the CPU's caches; 0: not measured (attn_s at any batch)
    attn_wide_s: float = 0.0
    dequant8_s_per_byte: float = 0.0  # the same for 8-bit weights (no nibbles to split: ~2x faster); 0: not measured
    # without a GPU: `rows` with the cores split between PAIRED processes, the others computing beside it (each
    # stage of a pipeline sharing this machine); None: not measured
    paired_rows: Curve | None = None

    NUMBERS = ("attn_s", "attn_cpu_s", "prefill_attn_s", "dequant_s_per_byte", "cache_dequant_s_per_byte",
               "cache_store_s", "cache_quant_s_per_byte", "attn_wide_s", "dequant8_s_per_byte")
    OPTIONAL = {"attn_wide_s": 0.0, "dequant8_s_per_byte": 0.0, "paired_rows": None}  # fields profiles measured before them lack
    ATTN_SEQS, ATTN_WIDE_SEQS = 8, 64
    UNWRITTEN_IF_UNSET = ("dequant8_s_per_byte", "paired_rows")
    PAIRED = 2  # paired_rows: the processes sharing the machine

    def attn_at(self, seqs: int) -> float:
        """Decode attention seconds per sequence per context token for an op of `seqs` sequences: linear
        between the two measured batches, held beyond them."""
        if not self.attn_wide_s:
            return self.attn_s
        x = min(1.0, max(0.0, (seqs - self.ATTN_SEQS) / (self.ATTN_WIDE_SEQS - self.ATTN_SEQS)))
        return self.attn_s + x * (self.attn_wide_s - self.attn_s)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["rows"] = self.rows.to_list()
        for k in self.UNWRITTEN_IF_UNSET:  # a profile without them reads (and hashes) as before
            if d[k] is None or d[k] == 0.0:
                del d[k]
        if self.paired_rows is not None:
            d["paired_rows"] = self.paired_rows.to_list()
        return d

    @classmethod
    def from_dict(cls, d: Any, what: str) -> "LayerCurve":
        if isinstance(d, dict):
            d = {**cls.OPTIONAL, **d}
        _exact_keys(d, {f.name for f in fields(cls)}, what)
        if d["kind"] not in LAYER_KINDS + PACKED_KINDS or not isinstance(d["model"], str):
            raise BadProfileError(f"{what}: kind must be embed, decoder or head (or one + -packed4 or -packed8) and "
                                  f"model a string, got {d['kind']!r}, {d['model']!r}")
        if not isinstance(d["weight_bytes"], int) or isinstance(d["weight_bytes"], bool) or d["weight_bytes"] < 0:
            raise BadProfileError(f"{what}.weight_bytes must be a whole number >= 0, got {d['weight_bytes']!r}")
        paired = None if d["paired_rows"] is None else Curve.from_list(d["paired_rows"], f"{what}.paired_rows")
        return cls(d["kind"], d["weight_bytes"], d["model"], Curve.from_list(d["rows"], f"{what}.rows"),
                   **{k: float(_finite(d[k], f"{what}.{k}")) for k in cls.NUMBERS}, paired_rows=paired)


@dataclass(frozen=True, slots=True)
class Calibration:
    """What `flexgen-graph profile` measured for the cost model beyond the scalar rates (planner.cost).

    Transfers are curves of seconds against the bytes of one transfer (small ones pay a latency);
    compute of a layer the calibration knows (`layers`) is its own measured curve, of any other layer
    its FLOPs at the generic matmul curve. op_s is the engine's fixed cost per op; handoff_s what each op
    costs more when the streams run on worker threads (the CPU backend, whenever a plan moves bytes).
    copy_share / disk_share / cold_disk_share: the fraction of a host copy's, a warm (page cache) disk
    read's or write's, or a cold disk read's time that the compute stream loses to it (0 where transfers run beside compute, as DMA does; near 1 on a CPU-only machine whose
    copies run on the cores that compute). Disk reads are warm (page cache) while the model's weights
    and cache fit in page_cache_bytes, cold otherwise. compute_scale multiplies every compute time (a
    pipeline stage sharing the host's cores); prefill_scale multiplies prefill's kernels on top (the layer
    curves are timed one token per sequence; prefill runs prompt_len of them); threaded_share is the
    fraction by which compute stretches once the streams run on worker threads (THREADED: they contend
    for the cores and their memory bandwidth beside every kernel, not only beside a copy). method: "curves" (isolated measurements) or "fit" (their
    constants fitted to timed runs of the engine)."""

    method: str
    matmul_s_per_flop: Curve  # generic: seconds per FLOP against rows, at a square weight (layers not measured)
    gpu_from_cpu_s: Curve
    cpu_from_gpu_s: Curve
    disk_read_cold_s: Curve
    disk_read_warm_s: Curve
    disk_write_s: Curve
    op_s: float
    handoff_s: float
    copy_share: float
    disk_share: float
    cold_disk_share: float
    page_cache_bytes: int
    compute_scale: float = 1.0
    prefill_scale: float = 1.0
    threaded_share: float = 0.0
    layers: tuple[LayerCurve, ...] = ()
    # why the profile cannot vouch for its predictions ("" when it can): its fit missed its own engine runs by more
    # than ESTIMATE_BAND twice over; its predictions are then labelled estimates, never promises
    estimate: str = ""

    CURVES = ("matmul_s_per_flop", "gpu_from_cpu_s", "cpu_from_gpu_s", "disk_read_cold_s", "disk_read_warm_s",
              "disk_write_s")
    NUMBERS = ("op_s", "handoff_s", "copy_share", "disk_share", "cold_disk_share", "compute_scale", "prefill_scale",
               "threaded_share")

    def layer(self, kind: str, weight_bytes: int) -> LayerCurve | None:
        for lc in self.layers:
            if lc.kind == kind and lc.weight_bytes == weight_bytes:
                return lc
        return None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"method": self.method, "page_cache_bytes": self.page_cache_bytes}
        d.update({k: getattr(self, k).to_list() for k in self.CURVES})
        d.update({k: getattr(self, k) for k in self.NUMBERS})
        d["layers"] = [lc.to_dict() for lc in self.layers]
        if self.estimate:  # absent when it vouches: a vouching profile's file (and fingerprint) as before
            d["estimate"] = self.estimate
        return d

    @classmethod
    def from_dict(cls, d: Any, what: str = "calibration") -> "Calibration":
        _exact_keys(d, {f.name for f in fields(cls)} - ({"estimate"} if "estimate" not in d else set()), what)
        if not isinstance(d.get("estimate", ""), str):
            raise BadProfileError(f"{what}.estimate must be a string, got {d['estimate']!r}")
        if d["method"] not in ("curves", "fit"):
            raise BadProfileError(f"{what}.method must be 'curves' or 'fit', got {d['method']!r}")
        if not isinstance(d["page_cache_bytes"], int) or isinstance(d["page_cache_bytes"], bool) \
                or d["page_cache_bytes"] < 0:
            raise BadProfileError(f"{what}.page_cache_bytes must be a whole number >= 0, got {d['page_cache_bytes']!r}")
        if not isinstance(d["layers"], list):
            raise BadProfileError(f"{what}.layers must be a list, got {d['layers']!r}")
        nums = {k: float(_finite(d[k], f"{what}.{k}", zero_ok=k not in ("compute_scale", "prefill_scale"))) for k in cls.NUMBERS}
        return cls(method=d["method"], page_cache_bytes=d["page_cache_bytes"],
                   **{k: Curve.from_list(d[k], f"{what}.{k}") for k in cls.CURVES}, **nums,
                   layers=tuple(LayerCurve.from_dict(x, f"{what}.layers[{i}]") for i, x in enumerate(d["layers"])),
                   estimate=d.get("estimate", ""))


def _exact_keys(d: Any, names: set[str], what: str) -> None:
    if not isinstance(d, dict):
        raise BadProfileError(f"{what} must be a JSON object, got {type(d).__name__}")
    missing, unknown = sorted(names - set(d)), sorted(set(d) - names)
    if missing or unknown:
        raise BadProfileError(f"{what}: " + "; ".join(
            ([f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}"] if missing else [])
            + ([f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"] if unknown else [])))


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
    version: int = PROFILE_VERSION
    machine: str = ""  # machine_id() of where it was measured; "" for builtin and hand-written profiles
    calibration: Calibration | None = None  # None: priced with the scalar rates alone

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not isinstance(self.has_gpu, bool) or not isinstance(self.machine, str):
            raise BadProfileError(f"profile name and machine must be strings and has_gpu true/false, got "
                                  f"{self.name!r}, {self.machine!r}, {self.has_gpu!r}")
        if self.version != PROFILE_VERSION:
            raise BadProfileError(f"profile {self.name!r} is version {self.version!r}, this flexgen-graph reads "
                                  f"version {PROFILE_VERSION}: measure it again with `flexgen-graph profile`")
        for f in fields(self):
            if f.name in ("name", "has_gpu", "version", "machine", "calibration"):
                continue
            v = getattr(self, f.name)
            _finite(v, f"profile {self.name!r}: {f.name}", zero_ok=f.name == "compute_op_overhead_s")
        if self.calibration is not None and not isinstance(self.calibration, Calibration):
            raise BadProfileError(f"profile {self.name!r}: calibration must be a Calibration")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["calibration"] = None if self.calibration is None else self.calibration.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HardwareProfile":
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict):
            raise BadProfileError(f"a profile must be a JSON object, got {type(d).__name__}")
        if d.get("version") != PROFILE_VERSION:
            missing = sorted(names - set(d))
            raise BadProfileError(f"profile {d.get('name', '?')!r} is version {d.get('version', 1)!r}, this "
                                  f"flexgen-graph reads version {PROFILE_VERSION}"
                                  + (f" (missing {', '.join(missing)})" if missing else "")
                                  + ": measure it again with `flexgen-graph profile`")
        _exact_keys(d, names, f"profile {d.get('name', '?')!r}")
        d = dict(d)
        if d["calibration"] is not None:
            d["calibration"] = Calibration.from_dict(d["calibration"])
        return cls(**d)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def with_capacities(self, **caps: int) -> "HardwareProfile":
        return replace(self, **caps)


def usable_cores() -> int:
    """The cores this process may run on (a cgroup or taskset can allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_id(gpu_name: str = "", kernels: str = "") -> str:
    """What identifies the machine a profile was measured on: CPU model, cores, RAM, GPU, and the CPU capability
    torch dispatches its kernels for (ATEN_CPU_CAPABILITY can lower it: other kernels, other speeds). The caller
    names the last two: finding them needs torch, which the core does not import."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return (f"cpu={cpu or platform.processor() or platform.machine()}; cores={os.cpu_count()}; "
            f"ram_gib={round(ram / GB)}; gpu={gpu_name or 'none'}; kernels={kernels or 'unknown'}")


def machine_mismatch(profile: HardwareProfile, here: str) -> str | None:
    """None when the profile applies to this machine (or names none), else which parts differ."""
    if not profile.machine or profile.machine == here:
        return None
    mine = dict(p.split("=", 1) for p in profile.machine.split("; ") if "=" in p)
    theirs = dict(p.split("=", 1) for p in here.split("; ") if "=" in p)
    diff = [f"{k} {mine.get(k)!r} (here {theirs.get(k)!r})" for k in dict.fromkeys([*mine, *theirs])
            if mine.get(k) != theirs.get(k)]
    return ", ".join(diff) or f"{profile.machine!r} (here {here!r})"


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


# Fields of the builtin profiles that nobody measured on their machine: assumptions (`inspect` says so)
ASSUMED_FIELDS: dict[str, tuple[str, ...]] = {
    # measured on the H100 machine: the pinned copy rates, the fp16 matmul rate, host memory read
    "h100-pcie5": ("cpu_from_disk_bytes_per_s", "disk_from_cpu_bytes_per_s", "gpu_attn_flops_per_s",
                   "cpu_matmul_flops_per_s", "gpu_mem_bytes_per_s", "matmul_min_rows", "compute_op_overhead_s",
                   "gpu_dequant_bytes_per_s", "cpu_dequant_bytes_per_s", "stage_link_bytes_per_s"),
    "t4-flexgen": ("gpu_dequant_bytes_per_s", "cpu_dequant_bytes_per_s", "stage_link_bytes_per_s"),
    "cpu-small": ("stage_link_bytes_per_s",),
}


def assumed_fields(profile: HardwareProfile) -> tuple[str, ...]:
    """The fields of a builtin profile (unchanged) that are assumptions, not measurements."""
    builtin = BUILTIN_PROFILES.get(profile.name)
    if builtin is None:
        return ()
    return tuple(f for f in ASSUMED_FIELDS.get(profile.name, ()) if getattr(profile, f) == getattr(builtin, f))


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
    try:
        return HardwareProfile.from_dict(data)
    except BadProfileError as e:
        raise BadProfileError(f"profile file {path}: {e}") from None


def save_profile(profile: HardwareProfile, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n")
