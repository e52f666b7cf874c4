"""Program verifier: hazards (flexgen_graph.hazards), and a simulation of memory over the prefill and every decode step.

Hazards: the check loading a plan makes, defined in flexgen_graph.hazards (re-exported here).

Memory. What a tier holds is the plan's buffer table (allocated once) plus the transients of the
compute op that runs (one at a time: the compute stream is serial): the graph's work bytes at the
step's context (planner.memory.compute_transient; the dequantization scratch is a buffer of the table).
A decode compute that reads a cache buffer on the CPU attends there, so its transients are the CPU's.

    >>> from flexgen_graph.app.api import compile_plan
    >>> from flexgen_graph.catalog import catalog_spec
    >>> from flexgen_graph.ir import Workload
    >>> from flexgen_graph.hardware import load_profile
    >>> plan = compile_plan(catalog_spec("facebook/opt-125m"), load_profile("cpu-small"), Workload(16, 4))
    >>> sim = simulate_plan(plan)
    >>> sim.hazards, all(sim.peaks[t] <= plan.predictions["peak_bytes"][t.value] for t in TIERS)
    ((), True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import networkx as nx

from flexgen_graph.hazards import (  # noqa: F401  (re-exported)
    SLOT_ROLES,
    PlanHazardError,
    accesses,
    hazards,
    verify,
    verify_program,
)
from flexgen_graph.ir import TIERS, Block, NodeKind, Phase, Tier
from flexgen_graph.policy import Policy
from flexgen_graph.program import COMPUTE_KINDS, Op, Programs
from planner.errors import Fault
from planner.memory import Transient, buffer_bytes, compute_transient, staging_bytes

NO_TRANSIENT = Transient(0, 0)


# ---------------------------------------------------------------- memory simulation


@dataclass(frozen=True, slots=True)
class StepMemory:
    """The peak of one program run: which op holds it, at what context."""

    phase: Phase
    ctx: int  # tokens attended (decode: the new one included; prefill: the prompt)
    peak_bytes: dict[Tier, int]
    op: int  # index of the compute op whose transients make the GPU peak (-1: none)


@dataclass(frozen=True, slots=True)
class Simulation:
    static_bytes: dict[Tier, int]  # the buffer table, allocated once
    steps: tuple[StepMemory, ...]  # prefill, then every decode step
    peaks: dict[Tier, int]
    hazards: tuple[str, ...]

    def faults(self, capacities: Mapping[Tier, int]) -> list[Fault]:
        return [Fault(t, capacities[t], self.peaks[t]) for t in TIERS if self.peaks[t] > capacities[t]]


@dataclass(frozen=True, slots=True)
class _OpCost:
    """A compute op's transients as linear functions of the context, and where it attends."""

    work_bytes: int
    work_bytes_per_ctx: int
    on_cpu: bool

    def at(self, ctx: int, policy: Policy) -> Transient:
        return compute_transient(self.work_bytes + self.work_bytes_per_ctx * ctx, policy, self.on_cpu)


def _op_costs(program: tuple[Op, ...], programs: Programs, g: nx.DiGraph, phase: Phase) -> list[_OpCost | None]:
    first = g.graph.get("first_layer", 0)  # ops name the model's layers; a stage graph counts from its first
    nodes = {key._replace(layer=first + key.layer).label(): data["node"] for key, data in g.nodes(data=True)
             if key.phase is phase}
    out: list[_OpCost | None] = []
    for op in program:
        if op.kind not in COMPUTE_KINDS:
            out.append(None)
            continue
        n = nodes.get(op.node)
        assert n is not None and n.key.kind is NodeKind.COMPUTE, f"op {op.node} realizes no compute node of the graph"
        decode = phase is Phase.DECODE
        on_cpu = decode and 0 <= op.cache < len(programs.buffers) and programs.buffers[op.cache].tier is Tier.CPU
        out.append(_OpCost(n.work_bytes, n.work_bytes_per_ctx if decode else 0, on_cpu))
    return out


def op_transients(programs: Programs, g: nx.DiGraph, policy: Policy, phase: Phase, ctx: int) -> list[Transient]:
    """Per op of the phase's program, the transients it holds while it runs at context ctx."""
    program = programs.prefill if phase is Phase.PREFILL else programs.decode
    return [NO_TRANSIENT if c is None else c.at(ctx, policy) for c in _op_costs(program, programs, g, phase)]


def _step(static: dict[Tier, int], cases: dict[_OpCost, int], phase: Phase, ctx: int, policy: Policy) -> StepMemory:
    gpu, cpu, at = 0, 0, -1
    for c, i in cases.items():
        t = c.at(ctx, policy)
        if t.gpu > gpu:
            gpu, at = t.gpu, i
        cpu = max(cpu, t.cpu)
    peak = dict(static)
    peak[Tier.GPU] += gpu
    peak[Tier.CPU] += cpu
    return StepMemory(phase, ctx, peak, at)


def simulate(programs: Programs, g: nx.DiGraph, policy: Policy, *, pinned_staging: bool = False) -> Simulation:
    """Hazards, and the memory of every tier over the prefill and every decode step (the context
    growing by one token a step) of the programs emitted for graph g's block under `policy`.
    pinned_staging: the backend keeps staging buffers (CUDA: a profile with a GPU; memory.staging_bytes)."""
    found = tuple(h for name, prog in (("prefill", programs.prefill), ("decode", programs.decode))
                  for h in hazards(prog, programs, name))
    static = buffer_bytes(programs.buffers)
    if pinned_staging:
        static[Tier.CPU] += staging_bytes(programs.buffers)
    prompt, gen = g.graph["prompt_len"], g.graph["gen_len"]
    steps = []
    decode_steps = 0 if g.graph.get("score", False) else gen - 1  # a scoring plan runs its prefill alone
    for phase, program, contexts in ((Phase.PREFILL, programs.prefill, [prompt]),
                                     (Phase.DECODE, programs.decode, [prompt + s + 1 for s in range(decode_steps)])):
        cases: dict[_OpCost, int] = {}  # ops alike are simulated once; the first one names them
        for i, c in enumerate(_op_costs(program, programs, g, phase)):
            if c is not None:
                cases.setdefault(c, i)
        steps += [_step(static, cases, phase, ctx, policy) for ctx in contexts]
    peaks = {t: max(s.peak_bytes[t] for s in steps) for t in TIERS}
    return Simulation(static, tuple(steps), peaks, found)


def simulate_plan(plan) -> Simulation:
    """simulate() for a flexgen_graph.planfile.Plan: lowers the plan's block again."""
    from flexgen_graph.lower import lower

    pol = plan.policy
    graph = lower(plan.spec, plan.workload, Block(pol.gpu_batch_size, pol.num_gpu_batches), plan.stage)
    return simulate(plan.programs, graph, pol, pinned_staging=plan.profile.has_gpu)
