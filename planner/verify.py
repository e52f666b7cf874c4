"""Program verifier: hazards, and a simulation of memory over the prefill and every decode step.

Hazards. Ops on one stream run in program order; ops on different streams are ordered only through
waits. From that, a happens-before relation; then for every buffer access:
- a wait names an earlier op (an event something records before);
- a read is ordered after the buffer's last writer (a slot must have one in the program);
- a write is ordered after the previous writer and every read since (no load overwrites a
  slot that a pending op still reads).
A program run ends with a drain, so steps do not overlap and each program is checked once.

Memory. What a tier holds is the plan's buffer table (allocated once) plus the transients of the
compute op that runs (one at a time: the compute stream is serial): the graph's work bytes at the
step's context, and the dequantized copies of compressed tensors (planner.memory.compute_transient).
A decode compute that reads a cache buffer on the CPU attends there, so its transients are the CPU's.

    >>> from flexgen_graph.api import compile_plan
    >>> from flexgen_graph.catalog import catalog_spec
    >>> from flexgen_graph.ir import Workload
    >>> from planner.hardware import load_profile
    >>> plan = compile_plan(catalog_spec("facebook/opt-125m"), load_profile("cpu-small"), Workload(16, 4))
    >>> sim = simulate_plan(plan)
    >>> sim.hazards, all(sim.peaks[t] <= plan.predictions["peak_bytes"][t.value] for t in TIERS)
    ((), True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping

import networkx as nx

from flexgen_graph.ir import TIERS, Block, NodeKind, Phase, Tier
from planner.errors import Fault
from planner.memory import Transient, buffer_bytes, compute_transient, staging_bytes
from planner.policy import Policy
from planner.program import COMPUTE_KINDS, BufferRole, Op, OpKind, Programs

SLOT_ROLES = frozenset({BufferRole.WEIGHT_SLOT, BufferRole.CACHE_SLOT, BufferRole.HIDDEN_SLOT})
NO_TRANSIENT = Transient(0, 0)


class PlanHazardError(AssertionError):
    """A program could read a buffer before it is written, or overwrite it while it is read."""


def accesses(op: Op) -> tuple[list[int], list[int]]:
    """(buffers read, buffers written) by an op."""
    if op.kind in COMPUTE_KINDS:
        # prefill writes the cache rows it then reads: for it the cache is output only
        reads = [op.weight] + ([op.cache] if op.cache >= 0 and op.kind is not OpKind.DECODER_PREFILL else [])
        if op.kind is not OpKind.EMBED:
            reads.append(op.hidden)
        writes = ([op.cache] if op.cache >= 0 else []) + ([op.hidden] if op.kind is not OpKind.HEAD else [])
        return reads, writes
    if op.kind in (OpKind.LOAD_WEIGHT, OpKind.RECV_HIDDEN):
        return [], [op.dst]  # the weight store, or another process, is the source
    if op.kind is OpKind.SEND_HIDDEN:
        return [op.src], []
    if op.kind in (OpKind.SEND_TOKENS, OpKind.RECV_TOKENS):
        return [], []  # the engine's token ids, not a plan buffer
    return [op.src], [op.dst]


def happens_before(program: tuple[Op, ...]) -> list[int]:
    """hb[i]: bitset of the ops that finish before op i starts."""
    hb: list[int] = []
    last_on_stream: dict = {}
    for i, op in enumerate(program):
        bits = 0
        preds = list(op.waits)
        if op.stream in last_on_stream:
            preds.append(last_on_stream[op.stream])
        for p in preds:
            if not 0 <= p < i:
                raise PlanHazardError(f"op {i} ({op.node}) waits on op {p}, which is not earlier in the program")
            bits |= hb[p] | (1 << p)
        hb.append(bits)
        last_on_stream[op.stream] = i
    return hb


def hazards(program: tuple[Op, ...], programs: Programs, name: str) -> Iterator[str]:
    """Every hazard of one program, in program order."""
    n_bufs = len(programs.buffers)
    slots = {b.id for b in programs.buffers if b.role in SLOT_ROLES}
    try:
        hb = happens_before(program)
    except PlanHazardError as e:
        yield f"{name} {e}"
        return
    last_write: dict[int, int] = {}
    reads_since: dict[int, list[int]] = {}

    def before(a: int, b: int) -> bool:
        return bool(hb[b] >> a & 1)

    for i, op in enumerate(program):
        reads, writes = accesses(op)
        bad = [buf for buf in reads + writes if not 0 <= buf < n_bufs]
        if bad:
            yield f"{name} op {i} ({op.node}) names buffer {bad[0]}, which does not exist"
            continue
        for buf in reads:
            w = last_write.get(buf)
            if w is None and buf in slots:
                yield f"{name} op {i} ({op.node}) reads slot buffer {buf} before anything loads it"
            if w is not None and w != i and not before(w, i):
                yield (f"{name} op {i} ({op.node}) may read buffer {buf} before op {w} "
                       f"({program[w].node}) finishes writing it")
        for buf in writes:
            prior = reads_since.get(buf, []) + ([last_write[buf]] if buf in last_write else [])
            for p in prior:
                if p != i and not before(p, i):
                    yield (f"{name} op {i} ({op.node}) may overwrite buffer {buf} while op {p} "
                           f"({program[p].node}) still uses it")
            last_write[buf] = i
            reads_since[buf] = []
        for buf in reads:
            if buf not in writes:
                reads_since.setdefault(buf, []).append(i)


def verify_program(program: tuple[Op, ...], programs: Programs, name: str) -> None:
    for h in hazards(program, programs, name):
        raise PlanHazardError(h)


def verify(programs: Programs) -> None:
    verify_program(programs.prefill, programs, "prefill")
    verify_program(programs.decode, programs, "decode")


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
    full_weight_bytes: int
    cache_bytes_per_ctx: int
    on_cpu: bool

    def at(self, ctx: int, policy: Policy) -> Transient:
        return compute_transient(self.work_bytes + self.work_bytes_per_ctx * ctx, self.full_weight_bytes,
                                 self.cache_bytes_per_ctx * ctx, policy, self.on_cpu)


def _op_costs(program: tuple[Op, ...], programs: Programs, g: nx.DiGraph, phase: Phase) -> list[_OpCost | None]:
    first = g.graph.get("first_layer", 0)  # ops name the model's layers; a stage graph counts from its first
    nodes = {key._replace(layer=first + key.layer).label(): data["node"] for key, data in g.nodes(data=True)
             if key.phase is phase}
    weights = {first + key.layer: data["node"].bytes for key, data in g.nodes(data=True)
               if key.phase is Phase.PREFILL and key.kind is NodeKind.LOAD_WEIGHT}
    cache_per_ctx = {(first + key.layer, key.batch): data["node"].bytes_per_ctx for key, data in g.nodes(data=True)
                     if key.phase is Phase.DECODE and key.kind is NodeKind.LOAD_CACHE}
    out: list[_OpCost | None] = []
    for op in program:
        if op.kind not in COMPUTE_KINDS:
            out.append(None)
            continue
        n = nodes.get(op.node)
        assert n is not None and n.key.kind is NodeKind.COMPUTE, f"op {op.node} realizes no compute node of the graph"
        decode = phase is Phase.DECODE
        on_cpu = decode and 0 <= op.cache < len(programs.buffers) and programs.buffers[op.cache].tier is Tier.CPU
        out.append(_OpCost(n.work_bytes, n.work_bytes_per_ctx if decode else 0, weights[op.layer],
                           cache_per_ctx.get((op.layer, op.batch), 0) if decode else 0, on_cpu))
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
    for phase, program, contexts in ((Phase.PREFILL, programs.prefill, [prompt]),
                                     (Phase.DECODE, programs.decode, [prompt + s + 1 for s in range(gen - 1)])):
        cases: dict[_OpCost, int] = {}  # ops alike are simulated once; the first one names them
        for i, c in enumerate(_op_costs(program, programs, g, phase)):
            if c is not None:
                cases.setdefault(c, i)
        steps += [_step(static, cases, phase, ctx, policy) for ctx in contexts]
    peaks = {t: max(s.peak_bytes[t] for s in steps) for t in TIERS}
    return Simulation(static, tuple(steps), peaks, found)


def simulate_plan(plan) -> Simulation:
    """simulate() for a planner.plan.Plan: lowers the plan's block again."""
    from flexgen_graph.lower import lower

    pol = plan.policy
    graph = lower(plan.spec, plan.workload, Block(pol.gpu_batch_size, pol.num_gpu_batches), plan.stage)
    return simulate(plan.programs, graph, pol, pinned_staging=plan.profile.has_gpu)
