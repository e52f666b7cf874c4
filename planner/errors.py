"""Typed planner errors: each names the tier and the byte counts at fault."""

from __future__ import annotations

from dataclasses import dataclass

from flexgen_graph.errors import UserError
from flexgen_graph.ir import Tier

GIB = float(1 << 30)  # for messages


class InfeasiblePlanError(UserError):
    """No policy fits the hardware profile's capacities."""

    def __init__(self, message: str, *, tier: Tier | None = None, capacity_bytes: int | None = None,
                 peak_bytes: int | None = None) -> None:
        super().__init__(message)
        self.tier = tier
        self.capacity_bytes = capacity_bytes
        self.peak_bytes = peak_bytes

    @property
    def over_bytes(self) -> int | None:
        if self.capacity_bytes is None or self.peak_bytes is None:
            return None
        return self.peak_bytes - self.capacity_bytes


@dataclass(frozen=True, slots=True)
class Fault:
    """A tier whose peak exceeds its capacity."""

    tier: Tier
    capacity_bytes: int
    peak_bytes: int

    @property
    def over_bytes(self) -> int:
        return self.peak_bytes - self.capacity_bytes

    def describe(self) -> str:
        return (f"the {self.tier.value} tier holds {self.capacity_bytes} bytes ({self.capacity_bytes / GIB:.2f} GiB) "
                f"but needs {self.peak_bytes} bytes ({self.peak_bytes / GIB:.2f} GiB), "
                f"{self.over_bytes} bytes over")

    def error(self, context: str = "") -> InfeasiblePlanError:
        msg = f"no plan fits: {self.describe()}" + (f" ({context})" if context else "")
        return InfeasiblePlanError(msg, tier=self.tier, capacity_bytes=self.capacity_bytes,
                                   peak_bytes=self.peak_bytes)
