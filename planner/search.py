"""Search: the block (gpu batch size x number of gpu batches), flags and placement with the best throughput.

One LP (planner.lp) per point (block, flags); the best predicted tokens/s wins, ties go to the
smaller GPU peak, then the smaller CPU and disk peaks, the smaller block, the fewer flags. Nothing
is lowered per point: the block figures come from planner.figures' two tiny lowerings. The search
is a branch and bound: a point's tokens/s is at most block size x gen_len / (its time with no byte
crossing a link), so points are tried in decreasing order of that bound and the search stops at the
first bound that does not beat the best found (such a point could at most tie). Points whose
transients or homes cannot fit whatever the placement, and points at least as large in both block
dimensions as one the LP proved infeasible (with the same flags), are never solved.

For a job of N prompts (job_prompts) no block is larger than N, the gpu batch sizes N // n (n gpu
batches) join the powers of two, and points rank by the job's predicted tokens/s: its full blocks
and a last one partly filled (planner.predict), which the bound still bounds (a block's throughput
never grows as it empties).

    >>> from functools import partial
    >>> from flexgen_graph.catalog import catalog_spec
    >>> from flexgen_graph.ir import Workload
    >>> from flexgen_graph.lower import lower
    >>> from flexgen_graph.hardware import load_profile
    >>> wl = Workload(64, 32)
    >>> r = search(partial(lower, catalog_spec("HuggingFaceTB/SmolLM2-135M-Instruct"), wl),
    ...            load_profile("cpu-small"), wl)
    >>> r.policy.weights.gpu_frac, r.predictions.binding
    (1.0, 'compute')
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Collection, Sequence

import networkx as nx

from flexgen_graph.hardware import HardwareProfile
from flexgen_graph.ir import TIERS, Block, Tier, Workload
from flexgen_graph.layout import DEFAULT_BITS, DEFAULT_GROUP_SIZE
from flexgen_graph.policy import Policy
from flexgen_graph.spec import ModelSpec
from planner.cost import (
    CLASSES,
    FLAG_NAMES,
    STREAMS,
    TERMS,
    Flags,
    PhaseCosts,
    Predictions,
    frac_var,
    phase_costs,
    sig,
)
from planner.errors import Fault, InfeasiblePlanError
from planner.figures import BlockFigures, FigureModel
from planner.lp import (
    FixedSpec,
    LpResult,
    MemoryFigures,
    diagnose,
    memory_figures,
    parse_fixed,
    solve_figures,
)
from planner.memory import Compression, compression_of, workspace_bytes
from planner.predict import Evaluator

__all__ = ["DEFAULT_FLAGS", "GPU_BATCH_SIZES", "NUM_GPU_BATCHES", "InfeasiblePlanError", "Predictions",
           "SearchResult", "search"]

GPU_BATCH_SIZES: tuple[int, ...] = tuple(2**i for i in range(10))  # 1..512
NUM_GPU_BATCHES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
# compression changes the numbers generated (no longer HF-identical): callers opt in (api.compile_plan)
DEFAULT_FLAGS: tuple[str, ...] = ("cpu_attention",)


@dataclass(frozen=True, slots=True)
class SearchResult:
    policy: Policy
    predictions: Predictions
    points_tried: int  # points whose LP was solved or whose fixed policy was evaluated

    def to_dict(self) -> dict:
        return {"policy": self.policy.to_dict(), "predictions": self.predictions.to_dict(),
                "points_tried": self.points_tried}

    @classmethod
    def from_dict(cls, d: dict) -> "SearchResult":
        return cls(Policy.from_dict(d["policy"]), Predictions.from_dict(d["predictions"]), int(d["points_tried"]))


@dataclass(frozen=True, slots=True)
class _Point:
    block: Block
    flags: Flags
    bound_tps: float  # no placement of this point beats it
    costs: PhaseCosts
    mem: MemoryFigures

    def order(self) -> tuple:
        return (-self.bound_tps, self.block.size, self.block.gpu_batch_size, len(self.flags.on()), self.flags.on())


def _least_cost(cost: dict[str, float], size: dict[str, int], room: float) -> float:
    """min sum(cost[c] * x[c]) subject to sum((1 - x[c]) * size[c]) <= room, 0 <= x <= 1: what must leave a
    tier of `room` bytes (a fractional knapsack: the densest classes stay)."""
    total = 0.0
    for c in sorted(cost, key=lambda c: -cost[c] / size[c] if size[c] else 0.0):
        keep = min(1.0, max(room, 0.0) / size[c]) if size[c] else 1.0
        room -= keep * size[c]
        total += cost[c] * (1.0 - keep)
    return total


def time_bound_s(costs: PhaseCosts, mem: MemoryFigures, profile: HardwareProfile, min_workspace: int) -> float:
    """A lower bound on the total time of any placement of a point: the compute streams alone, and in
    decode each link stream alone, with only the capacities of the tiers above it (slots ignored)."""
    pre = sum(s.count * s.compute_bound_s() for s in costs.prefill)
    dec = [sum(s.count * s.compute_bound_s() for s in costs.decode)]
    room = {Tier.GPU: profile.gpu_bytes - min_workspace, Tier.CPU: profile.gpu_bytes + profile.cpu_bytes - min_workspace}
    for stream in ("load", "store"):
        lb = 0.0
        for term in STREAMS[stream]:
            coefs: dict[str, float] = {}
            for s in costs.decode:
                for v, x in s.terms[TERMS.index(term)].coefs:
                    coefs[v] = coefs.get(v, 0.0) + s.count * x
            # bytes must cross gpu<->cpu when off the GPU, cpu<->disk when on disk
            above = Tier.GPU if term in ("gpu<-cpu link", "cpu<-gpu link") else Tier.CPU
            lower = (Tier.CPU, Tier.DISK) if above is Tier.GPU else (Tier.DISK,)
            cost = {c: min(coefs.get(frac_var(c, t), 0.0) for t in lower) for c in CLASSES}
            lb += _least_cost(cost, mem.total_bytes, room[above])
        dec.append(lb)
    dec.append(sum(s.count * s.terms[TERMS.index("stage link")].const for s in costs.decode))
    return pre + (costs.gen_len - 1) * max(dec)


def _rank(r: LpResult, tps: float) -> tuple:
    p, pol = r.predictions, r.policy
    return (-tps, *(p.peak_bytes[t.value] for t in TIERS), pol.gpu_batch_size * pol.num_gpu_batches,
            pol.gpu_batch_size, len(Flags.of(pol).on()), Flags.of(pol).on())


def job_tokens_per_s(r: LpResult, model: FigureModel, profile: HardwareProfile, comp, prompts: int | None) -> float:
    """Predicted tokens/s of a job of `prompts` full-length generations under a solved point's policy: its
    full blocks, then one with the rest (a plan's own figure when prompts is None)."""
    if prompts is None:
        return r.predictions.tokens_per_s
    pol, gen = r.policy, model.one.gen_len
    full, rest = divmod(prompts, pol.gpu_batch_size * pol.num_gpu_batches)
    total = full * r.predictions.total_s
    if rest:
        total += sum(Evaluator(model, profile, pol, comp if pol.compresses else None).block_s(rest, gen - 1))
    return prompts * gen / total if total > 0 else float("inf")


def _options(v: int | Sequence[int] | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if v is None:
        return default
    return (v,) if isinstance(v, int) else tuple(v)


def flag_sets(allowed: Collection[str], forced: dict[str, bool]) -> list[Flags]:
    """Every combination of the allowed flags (fewest first), with forced flags as given."""
    unknown = set(allowed) - set(FLAG_NAMES)
    if unknown:
        raise ValueError(f"unknown flags {sorted(unknown)}: expected some of {FLAG_NAMES}")
    free = [f for f in FLAG_NAMES if f in allowed and f not in forced]
    out = [Flags(**forced, **dict(zip(free, on))) for on in itertools.product((False, True), repeat=len(free))]
    out = [f for f in out if f.valid]
    return sorted(out, key=lambda f: (len(f.on()), f.on()))


_Fail = tuple[Block, BlockFigures, Flags, Fault | None]  # a point that did not fit, and why when known


def search(lower_fn: Callable[[Block], nx.DiGraph], profile: HardwareProfile, workload: Workload, *,
           gpu_batch_size: int | Sequence[int] | None = None, num_gpu_batches: int | Sequence[int] | None = None,
           fixed: FixedSpec | None = None, max_block_size: int | None = None,
           allowed_flags: Collection[str] = DEFAULT_FLAGS, spec: ModelSpec | None = None,
           group_size: int = DEFAULT_GROUP_SIZE, bits: int = DEFAULT_BITS, job_prompts: int | None = None
           ) -> SearchResult:
    """Best policy over gpu batch sizes 1..512 (powers of two), 1..32 gpu batches and the allowed
    flags, unless given (an int or a sequence of options).

    max_block_size caps gpu batch size x number of gpu batches; the smallest block is always tried.
    job_prompts: the job's number of prompts (see above): the best policy for that job.

    lower_fn(block) must lower the model for `workload`. fixed: see planner.lp.solve_block; a flag
    in `fixed` is forced whether allowed or not; with every class fixed, each point is only
    evaluated. spec: the model, needed when a compression flag may be on; group_size, bits: the
    compression of compressed tensors. Raises
    InfeasiblePlanError naming the tier, its capacity and the smallest peak found when no point fits.
    """
    sizes, counts = _options(gpu_batch_size, GPU_BATCH_SIZES), _options(num_gpu_batches, NUM_GPU_BATCHES)
    if job_prompts is not None:
        if gpu_batch_size is None:  # blocks that hold the job exactly (or its whole blocks)
            sizes = tuple(sorted(set(sizes) | {job_prompts // n for n in counts if n <= job_prompts}))
        max_block_size = min(max_block_size or job_prompts, job_prompts)
    fracs, placements, forced = parse_fixed(fixed)
    combos = flag_sets(allowed_flags, forced)
    comp = None
    if any(f.compress_weights or f.compress_cache for f in combos):
        if spec is None:
            raise ValueError("searching with compression needs the model spec (spec=)")
        comp = compression_of(spec, group_size, bits)
    model = FigureModel.sample(lower_fn)
    if (model.one.prompt_len, model.one.gen_len) != (workload.prompt_len, workload.gen_len):
        raise ValueError(f"lower_fn lowered for prompt/gen {model.one.prompt_len}/{model.one.gen_len}, "
                         f"not the workload's {workload.prompt_len}/{workload.gen_len}")
    blocks = [Block(b, n) for b, n in itertools.product(sizes, counts)
              if max_block_size is None or b * n <= max_block_size or (b, n) == (sizes[0], counts[0])]
    figures = {block: model.at(block) for block in blocks}
    points, fails = _points(blocks, figures, combos, profile, comp)
    job = lambda r: job_tokens_per_s(r, model, profile, comp, job_prompts)  # noqa: E731
    best, tried, unsolved = _branch_and_bound(points, figures, profile, fracs, placements, comp, job)
    if best is None:
        fails += unsolved
        if not fails:
            raise InfeasiblePlanError(f"no block to try on {profile.name} (sizes {sizes}, counts {counts})")
        raise _no_fit(fails, profile, {**placements, **fracs}, comp, tried)
    return SearchResult(best.policy, best.predictions, tried)


def _points(blocks: list[Block], figures: dict[Block, BlockFigures], combos: list[Flags], profile: HardwareProfile,
            comp: Compression | None) -> tuple[list[_Point], list[_Fail]]:
    """Every (block, flags) worth an LP, with its bound; and those whose transients or homes cannot fit
    whatever the placement."""
    capacity = profile.gpu_bytes + profile.cpu_bytes + profile.disk_bytes
    points: list[_Point] = []
    fails: list[_Fail] = []
    for block in blocks:
        figs = figures[block]
        ws = workspace_bytes(figs)  # every placement and flag holds at least this on the GPU
        for flags in combos:
            mem = memory_figures(figs, flags, comp, pinned_staging=profile.has_gpu)
            if ws > profile.gpu_bytes or ws + sum(mem.total_bytes.values()) > capacity:
                fault = Fault(Tier.GPU, profile.gpu_bytes, ws) if ws > profile.gpu_bytes else None
                fails.append((block, figs, flags, fault))
                continue
            costs = phase_costs(figs, profile, flags, comp)
            least_s = time_bound_s(costs, mem, profile, ws)
            bound = sig(costs.block_size * costs.gen_len / least_s) if least_s > 0 else float("inf")
            points.append(_Point(block, flags, bound, costs, mem))
    return points, fails


def _branch_and_bound(points: list[_Point], figures: dict[Block, BlockFigures], profile: HardwareProfile,
                      fracs: dict, placements: dict, comp: Compression | None,
                      job: Callable[[LpResult], float]) -> tuple[LpResult | None, int, list[_Fail]]:
    """The best LP result over the points (tried in decreasing order of their bound) by the job's
    tokens/s (`job`), the number of LPs solved, and the points the LP found no placement for."""
    ruled_out: list[tuple[Flags, int, int]] = []  # proven infeasible: larger blocks are too
    fails: list[_Fail] = []
    best: LpResult | None = None
    best_tps = 0.0
    tried = 0
    for p in sorted(points, key=_Point.order):
        if best is not None and p.bound_tps <= best_tps:
            break  # sorted by bound: no later point can beat the best
        b, n = p.block.gpu_batch_size, p.block.num_gpu_batches
        if any(f == p.flags and b >= b0 and n >= n0 for f, b0, n0 in ruled_out):
            continue
        figs = figures[p.block]
        tried += 1
        r = solve_figures(figs, profile, p.flags, fracs=fracs, placements=placements, comp=comp, costs=p.costs,
                          mem=p.mem, diagnose_infeasible=False)
        if not r.feasible:
            if r.status == "Infeasible" and r.rounds <= 1:  # proven, not a rounding casualty
                ruled_out.append((p.flags, b, n))
            fails.append((p.block, figs, p.flags, r.fault))
            continue
        tps = job(r)
        if best is None or _rank(r, tps) < _rank(best, best_tps):
            best, best_tps = r, tps
    return best, tried, fails


def _no_fit(fails: list[_Fail], profile: HardwareProfile, fixed: dict, comp: Compression | None,
            tried: int) -> InfeasiblePlanError:
    """The error for a search where nothing fits, named at its smallest point."""
    block, figs, flags, fault = min(fails, key=lambda f: (f[0].size, f[0].gpu_batch_size, len(f[2].on())))
    fault = fault or diagnose(figs, profile, {**fixed, **flags.as_dict()}, comp=comp)
    where = f"smallest block tried: gpu batch {block.gpu_batch_size} x {block.num_gpu_batches}" \
            f"{', flags ' + '+'.join(flags.on()) if flags.on() else ''}, {tried} points solved on {profile.name}"
    if fault is None:
        return InfeasiblePlanError(f"no plan fits on {profile.name}: the solver found no placement ({where})")
    return fault.error(where)
