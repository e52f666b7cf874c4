"""LP: for one block and one set of flags, the placement that minimizes the predicted time.

A small MILP solved by CBC through pulp. Variables: the 9 placement fractions (weights / cache /
hidden over gpu, cpu, disk; each triple sums to 1), one binary per class that must be 1 when any
of the class needs GPU slots (off the GPU; for the cache under CPU attention, on disk), one binary
for the CPU attention's workspace (1 when any cache is on the CPU), one (planner.cost.THREADED, only
for a calibrated profile) at least each class's binary, and one step time per (phase,
group of identical graph layers) bounded below by each stream's time (planner.cost). Capacities
follow planner.memory: homes are fraction * total bytes, slots are added when the class's binary
is 1 (the weight slot sized for the largest layer), the transients sit on the GPU (and the CPU).
Homes are whole items (assign_tiers), so the real bytes of a tier may exceed fraction * total by
under one item per class: the rounded policy is checked with the exact peaks, a tier that
overflows has its capacity tightened by the overflow and the problem is solved again; the last of
max_rounds rounds reserves a whole item per class on the CPU and disk tiers, which always fits.

    >>> from flexgen_graph.catalog import catalog_spec
    >>> from flexgen_graph.ir import Block, Workload
    >>> from flexgen_graph.lower import lower
    >>> from flexgen_graph.hardware import load_profile
    >>> g = lower(catalog_spec("facebook/opt-125m"), Workload(32, 8), Block(4, 2))
    >>> r = solve_block(g, load_profile("t4-flexgen"))
    >>> r.status, r.policy.weights.gpu_frac
    ('Optimal', 1.0)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping

import networkx as nx
import pulp

from flexgen_graph.errors import UserError
from flexgen_graph.hardware import HardwareProfile
from flexgen_graph.ir import TIERS, Tier
from flexgen_graph.layout import DEFAULT_BITS, DEFAULT_GROUP_SIZE
from flexgen_graph.policy import Placement, Policy
from flexgen_graph.spec import ModelSpec
from planner.cost import (
    CLASSES,
    DELEGATED,
    FLAG_NAMES,
    FRAC_VARS,
    STREAMS,
    TERMS,
    THREADED,
    Flags,
    Linear,
    PhaseCosts,
    Predictions,
    evaluate,
    frac_var,
    phase_costs,
)
from planner.errors import Fault, InfeasiblePlanError
from planner.figures import BlockFigures, figures_of
from planner.memory import (
    Compression,
    cache_slots_for_cpu_attention,
    compression_of,
    layer_transients,
    needs_compression,
    peaks_of,
    scratch_bound,
)
from planner.schedule import NUM_SLOTS

__all__ = ["Fault", "InfeasiblePlanError", "LpResult", "MemoryFigures", "diagnose", "memory_figures",
           "parse_fixed", "solve_block", "solve_figures"]

OFF_GPU_PENALTY = 1e-6  # tie-break between equally fast placements: GPU, then CPU, then disk
BLAME_WEIGHT = {Tier.GPU: 4.0, Tier.CPU: 2.0, Tier.DISK: 1.0}  # diagnosis: blame the slower tiers first
TIGHTEN_MARGIN = 1e-6  # extra relative tightening per round, above the LP's feasibility tolerance
MAX_ROUNDS = 3  # the last round is the conservative one
SOLVER_TIME_LIMIT_S = 30

FixedSpec = Mapping[str, "Placement | float | bool"]  # {"weights": Placement}, {"cache.gpu": 0.5}, {"cpu_attention": True}


@dataclass(frozen=True, slots=True)
class LpResult:
    """status: the pulp status name ("Optimal", "Infeasible", ...), or "Fixed" when every fraction
    was given and the policy was only evaluated; "Infeasible" also when rounding could not be made
    to fit. policy / predictions / peak_bytes are None unless the plan fits."""

    status: str
    policy: Policy | None
    predictions: Predictions | None
    peak_bytes: dict[Tier, int] | None
    objective_s: float | None  # the LP's predicted total time (before rounding)
    rounds: int
    fault: Fault | None = None

    @property
    def feasible(self) -> bool:
        return self.policy is not None


@dataclass(frozen=True, slots=True)
class MemoryFigures:
    """What the capacity rows need, read off the block as planner.memory reads it."""

    total_bytes: dict[str, int]  # class -> bytes of all its homes (at their stored size)
    item_bytes: dict[str, int]  # class -> bytes of its largest item (a layer's weights, one cache, one hidden)
    slot_bytes: dict[str, int]  # class -> bytes of its GPU slots when any item needs one
    workspace_bytes: int  # GPU transients of the largest compute, and the device's dequantization scratch
    cpu_workspace_bytes: int = 0  # CPU attention's transients and host scratch (when any cache is attended there)
    staging_bytes: int = 0  # pinned staging buffers on the CPU (a bound: largest items)
    delegated_cache_needs_slots: bool = True  # what schedule.build_buffers does for CPU-attended cache

    def conservative_caps(self, caps: Mapping[Tier, int]) -> dict[Tier, float]:
        """Capacities under which any rounding of an LP solution fits: the CPU and disk tiers may each
        receive one straddling item per class beyond fraction * total; all tiers absorb the rounding of
        fractions to 6 digits and assign_tiers' 1e-6 tolerance."""
        fuzz = 4e-6 * sum(self.total_bytes.values())
        items = sum(self.item_bytes.values())
        return {t: caps[t] - fuzz - TIGHTEN_MARGIN * caps[t] - (0 if t is Tier.GPU else items) for t in TIERS}


def _quant(comp: Compression | None) -> dict[str, int]:
    """The policy fields of a compression (the defaults when nothing is compressed)."""
    return {"group_size": comp.group_size, "compress_bits": comp.bits} if comp is not None else \
        {"group_size": DEFAULT_GROUP_SIZE, "compress_bits": DEFAULT_BITS}


def _flag_policy(figs: BlockFigures, flags: Flags, comp: Compression | None = None) -> Policy:
    on_gpu = Placement.all_on(Tier.GPU)
    return Policy(figs.gpu_batch_size, figs.num_gpu_batches, on_gpu, on_gpu, on_gpu, **flags.as_dict(),
                  **_quant(comp))


def memory_figures(g: "nx.DiGraph | BlockFigures", flags: Flags = Flags(), comp: Compression | None = None, *,
                   pinned_staging: bool = False) -> MemoryFigures:
    figs = figures_of(g)
    shape = figs.shape
    nb = shape.num_gpu_batches
    cw, cc = flags.compress_weights and comp is not None, flags.compress_cache and comp is not None
    weights = comp.weight_bytes if cw else shape.weight_bytes
    cache = comp.cache(shape.cache_bytes) if cc else shape.cache_bytes
    n_cache = len(shape.decoder_layers) * nb
    total = {"weights": sum(weights), "cache": n_cache * cache, "hidden": nb * shape.hidden_bytes}
    item = {"weights": max(weights), "cache": cache if n_cache else 0, "hidden": shape.hidden_bytes}
    pol = _flag_policy(figs, flags, comp)
    decoders = frozenset(shape.decoder_layers)
    on_gpu = layer_transients(figs, pol, figs.max_seq_len, frozenset(), frozenset(range(len(figs.decode))))
    cpu_ws = layer_transients(figs, pol, figs.max_seq_len, decoders, frozenset()).cpu if flags.cpu_attention else 0
    dev_scratch, host_scratch = scratch_bound(shape, pol)  # the scratch buffers, placed with the cache
    cpu_ws += host_scratch
    # memory.staging_bytes: GPU-homed weights, disk reads and disk writes, each bounded by its largest item
    staging = item["weights"] + max(item.values()) + max(item["cache"], item["hidden"]) if pinned_staging else 0
    # the weight slot is sized for the largest streamed layer; the largest of all bounds it
    return MemoryFigures(total, item, {c: NUM_SLOTS * b for c, b in item.items()}, on_gpu.gpu + dev_scratch, cpu_ws,
                         staging, cache_slots_for_cpu_attention(shape) if flags.cpu_attention else True)


def parse_fixed(fixed: FixedSpec | None) -> tuple[dict[str, float], dict[str, Placement], dict[str, bool]]:
    """Fixed fraction values by variable name, the classes whose whole placement is given, and the
    flags forced on or off."""
    fracs: dict[str, float] = {}
    placements: dict[str, Placement] = {}
    flags: dict[str, bool] = {}
    for key, v in (fixed or {}).items():
        if key in CLASSES:
            if not isinstance(v, Placement):
                raise TypeError(f"fixed[{key!r}] must be a Placement, got {type(v).__name__}")
            placements[key] = v
            fracs.update({frac_var(key, t): x for t, x in zip(TIERS, v.as_tuple())})
        elif key in FRAC_VARS:
            x = float(v)
            if not 0.0 <= x <= 1.0:
                raise UserError(f"fixed[{key!r}] must be in [0, 1], got {x}")
            fracs[key] = x
        elif key in FLAG_NAMES:
            if not isinstance(v, bool):
                raise TypeError(f"fixed[{key!r}] must be a bool, got {type(v).__name__}")
            flags[key] = v
        else:
            raise UserError(f"unknown fixed key {key!r}: expected one of {CLASSES}, {FRAC_VARS} or {FLAG_NAMES}")
    for c in CLASSES:
        if c not in placements and all(frac_var(c, t) in fracs for t in TIERS):
            placements[c] = Placement(*(fracs[frac_var(c, t)] for t in TIERS))
        if c not in placements and sum(fracs.get(frac_var(c, t), 0.0) for t in TIERS) > 1.0 + 1e-9:
            raise UserError(f"fixed {c} fractions sum to more than 1")
    return fracs, placements, flags


@dataclass(frozen=True, slots=True)
class _Model:
    prob: pulp.LpProblem
    frac: dict[str, pulp.LpVariable]
    slots: dict[str, pulp.LpVariable]
    cpu_ws: pulp.LpVariable | None
    slack: dict[Tier, pulp.LpVariable]
    time_expr: pulp.LpAffineExpression


def _lin(expr: Linear, frac: dict[str, pulp.LpVariable]) -> pulp.LpAffineExpression:
    return expr.const + pulp.lpSum(c * frac[v] for v, c in expr.coefs)


def _build(costs: PhaseCosts, mem: MemoryFigures, caps: Mapping[Tier, float], units: Mapping[Tier, int],
           fixed: Mapping[str, float], fixed_classes: set[str], elastic: bool) -> _Model:
    """caps: the capacities to respect (tightened after an overflow); units: the true capacities."""
    prob = pulp.LpProblem("placement", pulp.LpMinimize)
    frac = {}
    for v in FRAC_VARS:
        lo, hi = (min(max(fixed[v], 0.0), 1.0),) * 2 if v in fixed else (0.0, 1.0)
        frac[v] = _var(prob, v.replace(".", "_"), lo, hi)
    slots = {c: _var(prob, f"slots_{c}", 0, 1, "Binary") for c in CLASSES}
    delegated = costs.flags.cpu_attention
    for c in CLASSES:
        if c not in fixed_classes:  # a given Placement sums to 1 within its own tolerance
            prob += pulp.lpSum(frac[frac_var(c, t)] for t in TIERS) == 1, f"sum_{c}"
        if c == "cache" and delegated and not mem.delegated_cache_needs_slots:
            prob += frac[frac_var(c, Tier.DISK)] <= slots[c], f"slots_{c}"  # CPU-attended cache stays home
        else:
            prob += 1 - frac[frac_var(c, Tier.GPU)] <= slots[c], f"slots_{c}"
    # a calibrated profile prices the worker-thread hand-off once any class moves: THREADED >= each binary
    if any(v == THREADED for s in costs.prefill + costs.decode for lin in s.terms for v, _ in lin.coefs):
        frac[THREADED] = _var(prob, THREADED, 0, 1, "Binary")
        for c in CLASSES:
            prob += slots[c] <= frac[THREADED], f"threaded_{c}"
    cpu_ws = None
    if delegated and mem.cpu_workspace_bytes:
        cpu_ws = _var(prob, "cpu_attention_ws", 0, 1, "Binary")
        prob += frac[DELEGATED] <= cpu_ws, "cpu_attention_ws"

    # each step time is measured in its own scale (its largest possible stream time) so every row is of
    # order 1 and the solver's tolerances are relative; the objective is the total over the compute-only total
    ref_s = costs.compute_only_s() or 1.0
    time_expr = pulp.LpAffineExpression()  # seconds
    for steps, weight, tag in ((costs.prefill, 1, "pre"), (costs.decode, costs.gen_len - 1, "dec")):
        for i, s in enumerate(steps):
            terms = dict(zip(TERMS, s.terms))
            unit_s = max(sum(terms[n].const + sum(max(c, 0.0) for _, c in terms[n].coefs) for n in names)
                         for names in STREAMS.values()) or 1.0
            t_step = _var(prob, f"T_{tag}_{i}", 0)
            for stream, names in STREAMS.items():
                if not any(terms[n].const or terms[n].coefs for n in names):
                    continue  # a stream this step does not use (the stage link of a single process)
                expr = pulp.lpSum(_lin(terms[n], frac) for n in names)
                prob += t_step >= (1.0 / unit_s) * expr, f"T_{tag}_{i}_{stream}"
            time_expr += (weight * s.count * unit_s) * t_step

    # each capacity row is divided by the tier's true capacity: the solver's tolerances are then relative
    slack = {t: _var(prob, f"over_{t.value}", 0) for t in TIERS} if elastic else {}
    for t in TIERS:
        unit = float(units[t])
        used = pulp.lpSum(frac[frac_var(c, t)] * (mem.total_bytes[c] / unit) for c in CLASSES)
        if t is Tier.GPU:
            used += pulp.lpSum(slots[c] * (mem.slot_bytes[c] / unit) for c in CLASSES) + mem.workspace_bytes / unit
        if t is Tier.CPU:
            used += mem.staging_bytes / unit + (cpu_ws * (mem.cpu_workspace_bytes / unit) if cpu_ws is not None else 0)
        cap = caps[t] / unit + (slack[t] if elastic else 0)
        prob += used <= cap, f"cap_{t.value}"

    if elastic:
        prob += pulp.lpSum(BLAME_WEIGHT[t] * slack[t] for t in TIERS)  # overflows relative to capacity
    else:
        prefer = pulp.lpSum(frac[frac_var(c, Tier.CPU)] + 2 * frac[frac_var(c, Tier.DISK)] for c in CLASSES)
        prob += (1.0 / ref_s) * time_expr + OFF_GPU_PENALTY * prefer
    return _Model(prob, frac, slots, cpu_ws, slack, time_expr)


def _var(prob: pulp.LpProblem, name: str, lo: float | None = None, hi: float | None = None,
         cat: str = "Continuous") -> pulp.LpVariable:
    if hasattr(prob, "add_variable"):  # pulp >= 3.3 attaches variables to their problem
        return prob.add_variable(name, lo, hi, cat=cat)
    return pulp.LpVariable(name, lo, hi, cat=cat)


def _solver() -> pulp.LpSolver:
    coin = pulp.COIN_CMD(msg=False, timeLimit=SOLVER_TIME_LIMIT_S)
    if coin.available():
        return coin
    with warnings.catch_warnings():  # pulp 3 ships its bundled CBC only under this deprecated name
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=SOLVER_TIME_LIMIT_S)


def _solve(m: _Model) -> str:
    solver = _solver()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        m.prob.solve(solver)
    return pulp.LpStatus[m.prob.status]


def _on(v: pulp.LpVariable | None) -> bool:
    return v is not None and (v.varValue or 0.0) >= 0.5


def _rounded_policy(figs: BlockFigures, m: _Model, mem: MemoryFigures, placements: Mapping[str, Placement],
                    flags: Flags, comp: Compression | None) -> Policy:
    out = {}
    for c in CLASSES:
        if c in placements:
            out[c] = placements[c]  # respected exactly
            continue
        g, cpu = (m.frac[frac_var(c, t)].varValue or 0.0 for t in (Tier.GPU, Tier.CPU))
        # where the LP counted no slots (no CPU workspace), nothing of the class may go that needs them
        disk_ok = cpu_ok = _on(m.slots[c])
        if c == "cache" and flags.cpu_attention and not mem.delegated_cache_needs_slots:
            cpu_ok = m.cpu_ws is None or _on(m.cpu_ws)
        if not (cpu_ok or disk_ok):
            r = Placement.all_on(Tier.GPU)
        elif not disk_ok:
            r = Placement.rounded(g, 1.0 - g)
        elif not cpu_ok:
            r = Placement.rounded(g, 0.0)
        else:
            r = Placement.rounded(g, cpu)
        out[c] = Placement(*(x + 0.0 for x in r.as_tuple()))  # + 0.0 turns a -0.0 into 0.0
    return Policy(figs.gpu_batch_size, figs.num_gpu_batches, out["weights"], out["cache"], out["hidden"],
                  **flags.as_dict(), **_quant(comp))


def _capacities(profile: HardwareProfile) -> dict[Tier, int]:
    return {Tier.GPU: profile.gpu_bytes, Tier.CPU: profile.cpu_bytes, Tier.DISK: profile.disk_bytes}


def _worst_overflow(peaks: Mapping[Tier, int], caps: Mapping[Tier, int]) -> Fault | None:
    over = [t for t in TIERS if peaks[t] > caps[t]]
    if not over:
        return None
    t = max(over, key=lambda t: ((peaks[t] - caps[t]) / caps[t], -TIERS.index(t)))
    return Fault(t, caps[t], peaks[t])


def diagnose(g: "nx.DiGraph | BlockFigures", profile: HardwareProfile, fixed: FixedSpec | None = None, *,
             spec: ModelSpec | None = None, comp: Compression | None = None) -> Fault | None:
    """Why no placement fits this block: the least overflow (blaming disk before CPU before GPU)
    over all placements; the first tier (gpu, cpu, disk) that must overflow is named."""
    figs = figures_of(g)
    fracs, placements, flag_values = parse_fixed(fixed)
    flags = Flags(**flag_values)
    comp = comp if comp is not None else (compression_of(spec) if spec is not None else None)
    caps = _capacities(profile)
    m = _build(phase_costs(figs, profile, flags, comp), memory_figures(figs, flags, comp, pinned_staging=profile.has_gpu),
               caps, caps, fracs, set(placements), elastic=True)
    if _solve(m) != "Optimal":
        return None
    for t in TIERS:
        over = (m.slack[t].varValue or 0.0) * caps[t]
        if over > 1e-6 * caps[t]:
            return Fault(t, caps[t], caps[t] + max(1, math.ceil(over)))
    return None


def solve_block(g: "nx.DiGraph | BlockFigures", profile: HardwareProfile, *, fixed: FixedSpec | None = None,
                max_rounds: int = MAX_ROUNDS, diagnose_infeasible: bool = True, costs: PhaseCosts | None = None,
                spec: ModelSpec | None = None) -> LpResult:
    """The best placement for the block `g` was lowered for, checked against the exact peaks.

    fixed: {"weights" | "cache" | "hidden": Placement} fixes a class exactly; {"cache.gpu": 0.5}
    fixes one fraction (rounded to 6 digits with the rest); {"cpu_attention": True} sets a flag
    (unset flags are off here; planner.search tries them). With all three classes fixed nothing
    is solved: the policy is evaluated and checked (status "Fixed"). spec: needed for compression.
    """
    fracs, placements, flag_values = parse_fixed(fixed)
    return solve_figures(figures_of(g), profile, Flags(**flag_values), fracs=fracs, placements=placements,
                         comp=compression_of(spec) if spec is not None else None, costs=costs,
                         max_rounds=max_rounds, diagnose_infeasible=diagnose_infeasible)


def solve_figures(figs: BlockFigures, profile: HardwareProfile, flags: Flags, *, fracs: Mapping[str, float],
                  placements: Mapping[str, Placement], comp: Compression | None = None,
                  costs: PhaseCosts | None = None, mem: MemoryFigures | None = None, max_rounds: int = MAX_ROUNDS,
                  diagnose_infeasible: bool = True) -> LpResult:
    """solve_block on block figures with parsed fixed values (what planner.search calls per point)."""
    needs_compression(_flag_policy(figs, flags, comp), comp)
    caps = _capacities(profile)
    costs = costs if costs is not None else phase_costs(figs, profile, flags, comp)
    if len(placements) == len(CLASSES):
        policy = Policy(figs.gpu_batch_size, figs.num_gpu_batches, placements["weights"], placements["cache"],
                        placements["hidden"], **flags.as_dict(), **_quant(comp))
        peaks = peaks_of(figs, policy, comp, pinned_staging=profile.has_gpu)
        fault = _worst_overflow(peaks, caps)
        if fault is not None:
            return LpResult("Infeasible", None, None, None, None, 0, fault)
        pred = evaluate(figs, profile, policy, peaks=peaks, costs=costs, comp=comp)
        return LpResult("Fixed", policy, pred, peaks, pred.total_s, 0)

    mem = mem if mem is not None else memory_figures(figs, flags, comp, pinned_staging=profile.has_gpu)
    eff_caps = {t: float(c) for t, c in caps.items()}
    fault: Fault | None = None
    for rnd in range(1, max_rounds + 1):
        if rnd > 1 and rnd == max_rounds:
            eff_caps = mem.conservative_caps(caps)
        m = _build(costs, mem, eff_caps, caps, fracs, set(placements), elastic=False)
        status = _solve(m)
        if status != "Optimal":
            if fault is None and status == "Infeasible" and diagnose_infeasible:
                fault = diagnose(figs, profile, {**placements, **fracs, **flags.as_dict()}, comp=comp)
            return LpResult(status, None, None, None, None, rnd, fault)
        policy = _rounded_policy(figs, m, mem, placements, flags, comp)
        peaks = peaks_of(figs, policy, comp, pinned_staging=profile.has_gpu)
        fault = _worst_overflow(peaks, caps)
        if fault is None:
            pred = evaluate(figs, profile, policy, peaks=peaks, costs=costs, comp=comp)
            return LpResult("Optimal", policy, pred, peaks, pulp.value(m.time_expr), rnd)
        for t in TIERS:
            if peaks[t] > caps[t]:
                eff_caps[t] -= peaks[t] - caps[t] + TIGHTEN_MARGIN * caps[t]
    return LpResult("Infeasible", None, None, None, None, max_rounds, fault)
