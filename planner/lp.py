"""LP: for one block (the graph lowered for it), the placement that minimizes the predicted time.

A small MILP solved by CBC through pulp. Variables: the 9 placement fractions (weights / cache /
hidden over gpu, cpu, disk; each triple sums to 1), one binary per class that must be 1 when any
of the class is off the GPU (its two GPU slots exist only then), and one step time per (phase,
group of identical graph layers) bounded below by each stream's time (planner.cost). Capacities
follow planner.memory.peak_bytes: homes are fraction * total bytes, slots are added when the
class's binary is 1 (the weight slot sized for the largest layer), the workspace sits on the GPU.
Homes are whole items (assign_tiers), so the real bytes of a tier may exceed fraction * total by
under one item per class: the rounded policy is checked with the exact peak_bytes, a tier that
overflows has its capacity tightened by the overflow and the problem is solved again; the last of
max_rounds rounds reserves a whole item per class on the CPU and disk tiers, which always fits.

    >>> from flexgen_graph.catalog import catalog_spec
    >>> from flexgen_graph.ir import Block, Workload
    >>> from flexgen_graph.lower import lower
    >>> from planner.hardware import load_profile
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

from flexgen_graph.ir import TIERS, Tier
from planner.cost import CLASSES, FRAC_VARS, STREAMS, TERMS, Linear, PhaseCosts, Predictions, evaluate, \
    frac_var, phase_costs
from planner.errors import InfeasiblePlanError
from planner.hardware import HardwareProfile
from planner.memory import peak_bytes, workspace_bytes
from planner.policy import Placement, Policy
from planner.schedule import NUM_SLOTS, graph_shape

__all__ = ["Fault", "InfeasiblePlanError", "LpResult", "MemoryFigures", "diagnose", "memory_figures",
           "solve_block"]

GIB = float(1 << 30)  # for messages
OFF_GPU_PENALTY = 1e-6  # tie-break between equally fast placements: GPU, then CPU, then disk
BLAME_WEIGHT = {Tier.GPU: 4.0, Tier.CPU: 2.0, Tier.DISK: 1.0}  # diagnosis: blame the slower tiers first
TIGHTEN_MARGIN = 1e-6  # extra relative tightening per round, above the LP's feasibility tolerance
MAX_ROUNDS = 4  # the last round is the conservative one
SOLVER_TIME_LIMIT_S = 30

FixedSpec = Mapping[str, "Placement | float"]  # {"weights": Placement} or {"cache.gpu": 0.5}


@dataclass(frozen=True, slots=True)
class Fault:
    """A tier whose peak exceeds its capacity."""

    tier: Tier
    capacity_bytes: int
    peak_bytes: int

    def describe(self) -> str:
        return (f"the {self.tier.value} tier holds {self.capacity_bytes} bytes ({self.capacity_bytes / GIB:.2f} GiB) "
                f"but needs {self.peak_bytes} bytes ({self.peak_bytes / GIB:.2f} GiB)")

    def error(self, context: str = "") -> InfeasiblePlanError:
        msg = f"no plan fits: {self.describe()}" + (f" ({context})" if context else "")
        return InfeasiblePlanError(msg, tier=self.tier, capacity_bytes=self.capacity_bytes,
                                   peak_bytes=self.peak_bytes)


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
    """What the capacity rows need, read off the graph as planner.memory reads it."""

    total_bytes: dict[str, int]  # class -> bytes of all its homes
    item_bytes: dict[str, int]  # class -> bytes of its largest item (a layer's weights, one cache, one hidden)
    slot_bytes: dict[str, int]  # class -> bytes of its GPU slots when any item is off the GPU
    workspace_bytes: int

    def conservative_caps(self, caps: Mapping[Tier, int]) -> dict[Tier, float]:
        """Capacities under which any rounding of an LP solution fits: the CPU and disk tiers may each
        receive one straddling item per class beyond fraction * total; all tiers absorb the rounding of
        fractions to 6 digits and assign_tiers' 1e-6 tolerance."""
        fuzz = 4e-6 * sum(self.total_bytes.values())
        items = sum(self.item_bytes.values())
        return {t: caps[t] - fuzz - TIGHTEN_MARGIN * caps[t] - (0 if t is Tier.GPU else items) for t in TIERS}


def memory_figures(g: nx.DiGraph) -> MemoryFigures:
    shape = graph_shape(g)
    nb = shape.num_gpu_batches
    n_cache = len(shape.decoder_layers) * nb
    total = {"weights": sum(shape.weight_bytes), "cache": n_cache * shape.cache_bytes,
             "hidden": nb * shape.hidden_bytes}
    item = {"weights": max(shape.weight_bytes), "cache": shape.cache_bytes if n_cache else 0,
            "hidden": shape.hidden_bytes}
    # the weight slot is sized for the largest streamed layer; the largest of all bounds it
    return MemoryFigures(total, item, {c: NUM_SLOTS * b for c, b in item.items()}, workspace_bytes(g))


def _parse_fixed(fixed: FixedSpec | None) -> tuple[dict[str, float], dict[str, Placement]]:
    """Fixed fraction values by variable name, and the classes whose whole placement is given."""
    fracs: dict[str, float] = {}
    placements: dict[str, Placement] = {}
    for key, v in (fixed or {}).items():
        if key in CLASSES:
            if not isinstance(v, Placement):
                raise TypeError(f"fixed[{key!r}] must be a Placement, got {type(v).__name__}")
            placements[key] = v
            fracs.update({frac_var(key, t): x for t, x in zip(TIERS, v.as_tuple())})
        elif key in FRAC_VARS:
            x = float(v)
            if not 0.0 <= x <= 1.0:
                raise ValueError(f"fixed[{key!r}] must be in [0, 1], got {x}")
            fracs[key] = x
        else:
            raise ValueError(f"unknown fixed key {key!r}: expected one of {CLASSES} or {FRAC_VARS}")
    for c in CLASSES:
        if c not in placements and all(frac_var(c, t) in fracs for t in TIERS):
            placements[c] = Placement(*(fracs[frac_var(c, t)] for t in TIERS))
        if c not in placements and sum(fracs.get(frac_var(c, t), 0.0) for t in TIERS) > 1.0 + 1e-9:
            raise ValueError(f"fixed {c} fractions sum to more than 1")
    return fracs, placements


@dataclass(frozen=True, slots=True)
class _Model:
    prob: pulp.LpProblem
    frac: dict[str, pulp.LpVariable]
    off_gpu: dict[str, pulp.LpVariable]
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
    off_gpu = {c: _var(prob, f"off_gpu_{c}", 0, 1, "Binary") for c in CLASSES}
    for c in CLASSES:
        if c not in fixed_classes:  # a given Placement sums to 1 within its own tolerance
            prob += pulp.lpSum(frac[frac_var(c, t)] for t in TIERS) == 1, f"sum_{c}"
        prob += 1 - frac[frac_var(c, Tier.GPU)] <= off_gpu[c], f"slots_{c}"

    # each step time is measured in its own scale (its largest possible stream time) so every row is of
    # order 1 and the solver's tolerances are relative; the objective is the total over the compute-only total
    ref_s = costs.compute_only_s() or 1.0
    time_expr = pulp.LpAffineExpression()  # seconds
    for steps, weight, tag in ((costs.prefill, 1, "pre"), (costs.decode, costs.gen_len - 1, "dec")):
        for i, s in enumerate(steps):
            terms = dict(zip(TERMS, s.terms))
            unit_s = max(sum(terms[n].const + sum(c for _, c in terms[n].coefs) for n in names)
                         for names in STREAMS.values()) or 1.0
            t_step = _var(prob, f"T_{tag}_{i}", 0)
            for stream, names in STREAMS.items():
                expr = pulp.lpSum(_lin(terms[n], frac) for n in names)
                prob += t_step >= (1.0 / unit_s) * expr, f"T_{tag}_{i}_{stream}"
            time_expr += (weight * s.count * unit_s) * t_step

    # each capacity row is divided by the tier's true capacity: the solver's tolerances are then relative
    slack = {t: _var(prob, f"over_{t.value}", 0) for t in TIERS} if elastic else {}
    for t in TIERS:
        unit = float(units[t])
        used = pulp.lpSum(frac[frac_var(c, t)] * (mem.total_bytes[c] / unit) for c in CLASSES)
        if t is Tier.GPU:
            used += pulp.lpSum(off_gpu[c] * (mem.slot_bytes[c] / unit) for c in CLASSES) + mem.workspace_bytes / unit
        cap = caps[t] / unit + (slack[t] if elastic else 0)
        prob += used <= cap, f"cap_{t.value}"

    if elastic:
        prob += pulp.lpSum(BLAME_WEIGHT[t] * slack[t] for t in TIERS)  # overflows relative to capacity
    else:
        prefer = pulp.lpSum(frac[frac_var(c, Tier.CPU)] + 2 * frac[frac_var(c, Tier.DISK)] for c in CLASSES)
        prob += (1.0 / ref_s) * time_expr + OFF_GPU_PENALTY * prefer
    return _Model(prob, frac, off_gpu, slack, time_expr)


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


def _rounded_policy(g: nx.DiGraph, m: _Model, placements: Mapping[str, Placement]) -> Policy:
    out = {}
    for c in CLASSES:
        if c in placements:
            out[c] = placements[c]  # respected exactly
        elif (m.off_gpu[c].varValue or 0.0) < 0.5:
            out[c] = Placement.all_on(Tier.GPU)  # the LP counted no slots: nothing of it may leave the GPU
        else:
            r = Placement.rounded(m.frac[frac_var(c, Tier.GPU)].varValue or 0.0,
                                  m.frac[frac_var(c, Tier.CPU)].varValue or 0.0)
            out[c] = Placement(*(x + 0.0 for x in r.as_tuple()))  # + 0.0 turns a -0.0 into 0.0
    return Policy(g.graph["gpu_batch_size"], g.graph["num_gpu_batches"], out["weights"], out["cache"], out["hidden"])


def _capacities(profile: HardwareProfile) -> dict[Tier, int]:
    return {Tier.GPU: profile.gpu_bytes, Tier.CPU: profile.cpu_bytes, Tier.DISK: profile.disk_bytes}


def _worst_overflow(peaks: Mapping[Tier, int], caps: Mapping[Tier, int]) -> Fault | None:
    over = [t for t in TIERS if peaks[t] > caps[t]]
    if not over:
        return None
    t = max(over, key=lambda t: ((peaks[t] - caps[t]) / caps[t], -TIERS.index(t)))
    return Fault(t, caps[t], peaks[t])


def diagnose(g: nx.DiGraph, profile: HardwareProfile, fixed: FixedSpec | None = None) -> Fault | None:
    """Why no placement fits this block: the least overflow (blaming disk before CPU before GPU)
    over all placements; the first tier (gpu, cpu, disk) that must overflow is named."""
    fracs, placements = _parse_fixed(fixed)
    caps = _capacities(profile)
    m = _build(phase_costs(g, profile), memory_figures(g), caps, caps, fracs, set(placements), elastic=True)
    if _solve(m) != "Optimal":
        return None
    for t in TIERS:
        over = (m.slack[t].varValue or 0.0) * caps[t]
        if over > 1e-6 * caps[t]:
            return Fault(t, caps[t], caps[t] + max(1, math.ceil(over)))
    return None


def solve_block(g: nx.DiGraph, profile: HardwareProfile, *, fixed: FixedSpec | None = None,
                max_rounds: int = MAX_ROUNDS, diagnose_infeasible: bool = True,
                costs: PhaseCosts | None = None) -> LpResult:
    """The best placement for the block `g` was lowered for, checked against the exact peaks.

    fixed: {"weights" | "cache" | "hidden": Placement} fixes a class exactly; {"cache.gpu": 0.5}
    fixes one fraction (rounded to 6 digits with the rest). With all three classes fixed nothing
    is solved: the policy is evaluated and checked (status "Fixed"). costs: phase_costs(g, profile)
    when the caller has it already.
    """
    fracs, placements = _parse_fixed(fixed)
    caps = _capacities(profile)
    nb, gbs = g.graph["num_gpu_batches"], g.graph["gpu_batch_size"]
    if len(placements) == len(CLASSES):
        policy = Policy(gbs, nb, placements["weights"], placements["cache"], placements["hidden"])
        peaks = peak_bytes(g, policy)
        fault = _worst_overflow(peaks, caps)
        if fault is not None:
            return LpResult("Infeasible", None, None, None, None, 0, fault)
        pred = evaluate(g, profile, policy, peaks=peaks, costs=costs)
        return LpResult("Fixed", policy, pred, peaks, pred.total_s, 0)

    costs = costs if costs is not None else phase_costs(g, profile)
    mem = memory_figures(g)
    eff_caps = {t: float(c) for t, c in caps.items()}
    fault: Fault | None = None
    for rnd in range(1, max_rounds + 1):
        if rnd > 1 and rnd == max_rounds:
            eff_caps = mem.conservative_caps(caps)
        m = _build(costs, mem, eff_caps, caps, fracs, set(placements), elastic=False)
        status = _solve(m)
        if status != "Optimal":
            if fault is None and status == "Infeasible" and diagnose_infeasible:
                fault = diagnose(g, profile, fixed)
            return LpResult(status, None, None, None, None, rnd, fault)
        policy = _rounded_policy(g, m, placements)
        peaks = peak_bytes(g, policy)
        fault = _worst_overflow(peaks, caps)
        if fault is None:
            return LpResult("Optimal", policy, evaluate(g, profile, policy, peaks=peaks, costs=costs), peaks,
                            pulp.value(m.time_expr), rnd)
        for t in TIERS:
            if peaks[t] > caps[t]:
                eff_caps[t] -= peaks[t] - caps[t] + TIGHTEN_MARGIN * caps[t]
    return LpResult("Infeasible", None, None, None, None, max_rounds, fault)
