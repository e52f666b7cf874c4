"""Typed planner errors: each names the tier and the byte counts at fault."""

from __future__ import annotations

from flexgen_graph.ir import Tier


class InfeasiblePlanError(ValueError):
    """No policy fits the hardware profile's capacities."""

    def __init__(self, message: str, *, tier: Tier | None = None, capacity_bytes: int | None = None,
                 peak_bytes: int | None = None) -> None:
        super().__init__(message)
        self.tier = tier
        self.capacity_bytes = capacity_bytes
        self.peak_bytes = peak_bytes
