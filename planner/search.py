"""Search: the block (gpu batch size x number of gpu batches) and placement with the best throughput.

One LP (planner.lp) per block; the best predicted tokens/s wins, ties go to the smaller GPU peak,
then the smaller block. Two prunings skip blocks without lowering them: capacity needs only grow
with either block dimension, so a block the LP proves infeasible rules out every block at least
as large in both; and gpu batches are alike, so tokens/s at gpu batch size b is at most
b * gen_len / (compute time of one gpu batch) whatever their number: once the best found reaches
that bound, more gpu batches of size b cannot beat it (they could at most tie).

    >>> from functools import partial
    >>> from flexgen_graph.catalog import catalog_spec
    >>> from flexgen_graph.ir import Workload
    >>> from flexgen_graph.lower import lower
    >>> from planner.hardware import load_profile
    >>> wl = Workload(64, 32)
    >>> r = search(partial(lower, catalog_spec("HuggingFaceTB/SmolLM2-135M-Instruct"), wl),
    ...            load_profile("cpu-small"), wl)
    >>> r.policy.weights.gpu_frac, r.predictions.binding
    (1.0, 'compute')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import networkx as nx

from flexgen_graph.ir import Block, Tier, Workload
from planner.cost import Predictions, phase_costs, sig
from planner.errors import InfeasiblePlanError
from planner.hardware import HardwareProfile
from planner.lp import Fault, FixedSpec, LpResult, diagnose, solve_block
from planner.memory import workspace_bytes
from planner.policy import Policy

__all__ = ["GPU_BATCH_SIZES", "NUM_GPU_BATCHES", "InfeasiblePlanError", "Predictions", "SearchResult", "search"]

GPU_BATCH_SIZES: tuple[int, ...] = tuple(2**i for i in range(10))  # 1..512
NUM_GPU_BATCHES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True, slots=True)
class SearchResult:
    policy: Policy
    predictions: Predictions
    points_tried: int  # blocks lowered and checked (LP solved or policy evaluated)

    def to_dict(self) -> dict:
        return {"policy": self.policy.to_dict(), "predictions": self.predictions.to_dict(),
                "points_tried": self.points_tried}

    @classmethod
    def from_dict(cls, d: dict) -> "SearchResult":
        return cls(Policy.from_dict(d["policy"]), Predictions.from_dict(d["predictions"]), int(d["points_tried"]))


def _rank(r: LpResult) -> tuple[float, int, int, int]:
    p = r.predictions
    return (-p.tokens_per_s, p.peak_bytes[Tier.GPU.value], r.policy.gpu_batch_size * r.policy.num_gpu_batches,
            r.policy.gpu_batch_size)


def search(lower_fn: Callable[[Block], nx.DiGraph], profile: HardwareProfile, workload: Workload, *,
           gpu_batch_size: int | None = None, num_gpu_batches: int | None = None,
           fixed: FixedSpec | None = None, max_block_size: int | None = None) -> SearchResult:
    """Best policy over gpu batch sizes 1..512 (powers of two) and 1..32 gpu batches, unless given.

    max_block_size caps gpu batch size x number of gpu batches (a job of 40 prompts gains nothing
    from blocks of 512: the rest would be padding).

    lower_fn(block) must lower the model for `workload`. fixed: see planner.lp.solve_block; with
    every class fixed, each block is only evaluated. Raises InfeasiblePlanError naming the tier,
    its capacity and the smallest peak found when no block fits.
    """
    sizes = GPU_BATCH_SIZES if gpu_batch_size is None else (gpu_batch_size,)
    counts = NUM_GPU_BATCHES if num_gpu_batches is None else (num_gpu_batches,)
    ruled_out: list[tuple[int, int]] = []  # blocks proven infeasible: larger ones are too
    first_fail: tuple[Block, nx.DiGraph, Fault | None] | None = None
    best: LpResult | None = None
    tried = 0
    for b in sizes:
        bound = float("inf")  # tokens/s no block of gpu batch size b can exceed
        for n in counts:
            if any(b >= b0 and n >= n0 for b0, n0 in ruled_out):
                continue
            if max_block_size is not None and b * n > max_block_size and (b, n) != (sizes[0], counts[0]):
                continue
            if best is not None and sig(bound) <= best.predictions.tokens_per_s:
                break
            block = Block(b, n)
            g = lower_fn(block)
            if (g.graph["prompt_len"], g.graph["gen_len"]) != (workload.prompt_len, workload.gen_len):
                raise ValueError(f"lower_fn lowered for prompt/gen {g.graph['prompt_len']}/{g.graph['gen_len']}, "
                                 f"not the workload's {workload.prompt_len}/{workload.gen_len}")
            tried += 1
            costs = phase_costs(g, profile)
            compute_s = costs.compute_only_s()
            if compute_s > 0:
                bound = costs.block_size * costs.gen_len / compute_s
            ws = workspace_bytes(g)
            if ws > profile.gpu_bytes:  # one compute's transients alone do not fit: no LP needed
                r = LpResult("Infeasible", None, None, None, None, 0, Fault(Tier.GPU, profile.gpu_bytes, ws))
            else:
                r = solve_block(g, profile, fixed=fixed, diagnose_infeasible=False, costs=costs)
            if not r.feasible:
                if r.status == "Infeasible" and r.rounds <= 1:  # proven, not a rounding casualty
                    ruled_out.append((b, n))
                if first_fail is None:
                    first_fail = (block, g, r.fault)
                continue
            if best is None or _rank(r) < _rank(best):
                best = r
    if best is None:
        if first_fail is None:
            raise InfeasiblePlanError(f"no block to try on {profile.name} (sizes {sizes}, counts {counts})")
        block, g, fault = first_fail
        fault = fault or diagnose(g, profile, fixed)
        where = f"smallest block tried: gpu batch {block.gpu_batch_size} x {block.num_gpu_batches}, " \
                f"{tried} blocks tried on {profile.name}"
        if fault is None:
            raise InfeasiblePlanError(f"no plan fits on {profile.name}: the solver found no placement ({where})")
        raise fault.error(where)
    return SearchResult(best.policy, best.predictions, tried)
