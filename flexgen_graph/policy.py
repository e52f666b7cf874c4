"""Policy: the planner's decision, and the rule that turns its fractions into concrete homes.

    >>> p = Placement(0.5, 0.5, 0.0)
    >>> [t.value for t in assign_tiers([10, 10, 10, 10], p)]
    ['gpu', 'gpu', 'cpu', 'cpu']
"""

from __future__ import annotations

from dataclasses import dataclass

from flexgen_graph.errors import UserError
from flexgen_graph.ir import Tier
from flexgen_graph.layout import (
    DEFAULT_BITS,
    DEFAULT_GROUP_SIZE,
    QuantConfig,
    QuantError,
    packed_group_fits,
    packed_groups_text,
)

FRAC_DIGITS = 6  # fractions are rounded so plans are byte-identical across solver runs
FRAC_TOL = 1e-6


@dataclass(frozen=True, slots=True)
class Placement:
    gpu_frac: float
    cpu_frac: float
    disk_frac: float

    def __post_init__(self) -> None:
        for name in ("gpu_frac", "cpu_frac", "disk_frac"):
            v = getattr(self, name)
            if type(v) not in (int, float) or not (-FRAC_TOL <= v <= 1 + FRAC_TOL):
                raise UserError(f"{name} must be in [0, 1], got {v}")
        total = self.gpu_frac + self.cpu_frac + self.disk_frac
        if abs(total - 1.0) > 1e-4:
            raise UserError(f"placement fractions must sum to 1, got {self.gpu_frac}+{self.cpu_frac}+{self.disk_frac}")

    @classmethod
    def rounded(cls, gpu: float, cpu: float) -> "Placement":
        g = round(min(max(gpu, 0.0), 1.0), FRAC_DIGITS)
        c = round(min(max(cpu, 0.0), 1.0 - g), FRAC_DIGITS)
        return cls(g, c, round(1.0 - g - c, FRAC_DIGITS))

    @classmethod
    def all_on(cls, tier: Tier) -> "Placement":
        return cls(float(tier is Tier.GPU), float(tier is Tier.CPU), float(tier is Tier.DISK))

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.gpu_frac, self.cpu_frac, self.disk_frac)


@dataclass(frozen=True, slots=True)
class Policy:
    gpu_batch_size: int
    num_gpu_batches: int
    weights: Placement
    cache: Placement
    hidden: Placement
    cpu_attention: bool = False
    compress_weights: bool = False
    compress_cache: bool = False
    group_size: int = DEFAULT_GROUP_SIZE  # elements per group when a compress flag is on (flexgen_graph.layout)
    compress_bits: int = DEFAULT_BITS  # 4 (FlexGen's) or 8
    # compressed weights computed on where they are (runtime.packed: the CPU int4 kernel), not dequantized
    # into a dense scratch per compute: 4- or 8-bit weights computed on the CPU only
    packed_weights: bool = False

    def __post_init__(self) -> None:
        try:
            self.quant_config
        except QuantError as e:
            raise UserError(f"policy compression: {e}") from None
        if self.packed_weights and not (self.compress_weights and packed_group_fits(self.quant_config)):
            raise UserError(f"policy packed_weights needs compressed weights at a group size the CPU int4 kernel "
                            f"takes ({packed_groups_text()}), got compress_weights {self.compress_weights}, "
                            f"compress_bits {self.compress_bits}, group_size {self.group_size}")

    @property
    def quant_config(self) -> QuantConfig:
        """The compression of compressed tensors (used only when a compress flag is on)."""
        return QuantConfig(self.compress_bits, self.group_size)

    @property
    def compresses(self) -> bool:
        return self.compress_weights or self.compress_cache

    def to_dict(self) -> dict:
        return {
            "gpu_batch_size": self.gpu_batch_size,
            "num_gpu_batches": self.num_gpu_batches,
            "weights": list(self.weights.as_tuple()),
            "cache": list(self.cache.as_tuple()),
            "hidden": list(self.hidden.as_tuple()),
            "cpu_attention": self.cpu_attention,
            "compress_weights": self.compress_weights,
            "compress_cache": self.compress_cache,
            "group_size": self.group_size,
            "compress_bits": self.compress_bits,
            # written only when on: plans without it read (and hash) as before
            **({"packed_weights": True} if self.packed_weights else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Policy":
        """Strict: plan files are untrusted."""
        for name in ("gpu_batch_size", "num_gpu_batches"):
            if type(d[name]) is not int or d[name] < 1:
                raise UserError(f"policy {name} must be a positive integer, got {d[name]!r}")
        for name in ("cpu_attention", "compress_weights", "compress_cache", "packed_weights"):
            if not isinstance(d.get(name, False), bool):
                raise UserError(f"policy {name} must be true or false, got {d.get(name)!r}")
        for name in ("weights", "cache", "hidden"):
            if not isinstance(d[name], list) or len(d[name]) != 3:
                raise UserError(f"policy {name} must be three fractions, got {d[name]!r}")
        return cls(
            gpu_batch_size=d["gpu_batch_size"], num_gpu_batches=d["num_gpu_batches"],
            weights=Placement(*d["weights"]), cache=Placement(*d["cache"]), hidden=Placement(*d["hidden"]),
            cpu_attention=d["cpu_attention"], compress_weights=d["compress_weights"],
            compress_cache=d["compress_cache"], group_size=d["group_size"], compress_bits=d["compress_bits"],
            packed_weights=d.get("packed_weights", False),
        )


def assign_tiers(sizes: list[int], placement: Placement) -> list[Tier]:
    """Give each item (in order) a home tier so each tier's share follows the fractions.

    An item goes to the GPU only if it ends within the GPU share, so GPU bytes never exceed
    gpu_frac * total; an item straddling a boundary goes to the slower tier.
    """
    total = sum(sizes)
    g_end = placement.gpu_frac * total * (1 + FRAC_TOL)
    c_end = (placement.gpu_frac + placement.cpu_frac) * total * (1 + FRAC_TOL)
    out, cum = [], 0
    for s in sizes:
        cum += s
        if cum <= g_end and placement.gpu_frac > 0:
            out.append(Tier.GPU)
        elif cum <= c_end and placement.cpu_frac > 0:
            out.append(Tier.CPU)
        elif placement.disk_frac > 0:
            out.append(Tier.DISK)
        else:
            out.append(Tier.CPU if placement.cpu_frac > 0 else Tier.GPU)
    return out
