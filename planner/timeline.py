"""One run of a plan's prefill or decode program replayed on the cost model: each op starts when its
stream is free and the ops it waits on are done, and lasts what the cost model gives it (its bytes
over its link, its share of the layer's compute). A step's end is a second estimate of the step
time, next to the cost model's max-of-streams figure. `inspect` prints and draws it.

    >>> from flexgen_graph.app.api import compile_plan
    >>> from flexgen_graph.catalog import catalog_spec
    >>> from flexgen_graph.hardware import load_profile
    >>> from flexgen_graph.ir import Workload
    >>> t = step_timeline(compile_plan(catalog_spec("facebook/opt-125m"), load_profile("cpu-small"), Workload(16, 4)))
    >>> t.end_s > 0
    True
"""

from __future__ import annotations

from dataclasses import dataclass

from flexgen_graph.ir import Block, Phase, Tier
from flexgen_graph.lower import TOKEN_BYTES, lower
from flexgen_graph.planfile import Plan
from flexgen_graph.program import OpKind
from planner.cost import Flags, compute_parts, layer_figures, weight_dequant_s
from planner.figures import block_figures
from planner.memory import buffer_bytes, policy_compression, staging_bytes
from planner.verify import op_transients


@dataclass(frozen=True, slots=True)
class Span:
    op: int
    kind: str
    stream: str
    start_s: float
    end_s: float
    label: str


@dataclass(frozen=True, slots=True)
class StepTimeline:
    phase: Phase
    ctx: int
    spans: tuple[Span, ...]
    memory: tuple[tuple[float, dict[Tier, int]], ...]  # (time, bytes per tier from then on)

    @property
    def end_s(self) -> float:
        return max((s.end_s for s in self.spans), default=0.0)


def plan_graph(plan: Plan):
    pol = plan.policy
    return lower(plan.spec, plan.workload, Block(pol.gpu_batch_size, pol.num_gpu_batches), plan.stage)


def step_timeline(plan: Plan, phase: Phase = Phase.DECODE, ctx: int | None = None, graph=None) -> StepTimeline:
    """One run of the phase's program at context ctx (decode: the last step by default)."""
    g = graph if graph is not None else plan_graph(plan)
    wl, pol, hw = plan.workload, plan.policy, plan.profile
    if ctx is None:
        ctx = wl.prompt_len if phase is Phase.PREFILL else wl.max_seq_len - 1
    flags = Flags.of(pol)
    comp = policy_compression(plan.spec, plan.policy) if plan.policy.compresses else None
    figs = block_figures(g)
    lf = layer_figures(figs, ctx, flags, comp)[phase]
    nb = pol.num_gpu_batches
    rows = pol.gpu_batch_size * (wl.prompt_len if phase is Phase.PREFILL else 1)
    programs = plan.programs
    program = programs.prefill if phase is Phase.PREFILL else programs.decode
    bufs = programs.buffers

    def link_s(nbytes: float, far: Tier, inbound: bool) -> float:
        if far is Tier.GPU:
            return 0.0
        s = nbytes / (hw.gpu_from_cpu_bytes_per_s if inbound else hw.cpu_from_gpu_bytes_per_s)
        if far is Tier.DISK:
            s += nbytes / (hw.cpu_from_disk_bytes_per_s if inbound else hw.disk_from_cpu_bytes_per_s)
        return s

    first = plan.layers.start  # ops name the model's layers, a stage's figures start at its first

    def duration(op) -> float:
        f = lf[op.layer - first]
        if op.kind is OpKind.RECV_HIDDEN:
            return f.hidden_load_bytes / nb / hw.stage_link_bytes_per_s
        if op.kind is OpKind.SEND_HIDDEN:
            return f.hidden_store_bytes / nb / hw.stage_link_bytes_per_s
        if op.kind in (OpKind.SEND_TOKENS, OpKind.RECV_TOKENS):
            return TOKEN_BYTES * (pol.gpu_batch_size + 1) / hw.stage_link_bytes_per_s  # the ids and a flag
        if op.kind is OpKind.LOAD_WEIGHT:
            return link_s(bufs[op.src].nbytes, bufs[op.src].tier, True)
        if op.kind is OpKind.LOAD_CACHE:
            return link_s(f.cache_load_bytes / nb, bufs[op.src].tier, True)
        if op.kind is OpKind.LOAD_HIDDEN:
            return link_s(f.hidden_load_bytes / nb, bufs[op.src].tier, True)
        if op.kind is OpKind.STORE_CACHE:
            return link_s(f.cache_store_bytes / nb, bufs[op.dst].tier, False)
        if op.kind is OpKind.STORE_HIDDEN:
            return link_s(f.hidden_store_bytes / nb, bufs[op.dst].tier, False)
        deq = weight_dequant_s(f, hw, flags) if not pol.packed_weights else 0.0  # the plan's DEQUANT_WEIGHT ops
        if op.kind is OpKind.DEQUANT_WEIGHT:
            return deq
        base, attn_gpu, attn_cpu = compute_parts(f, hw, rows, flags)
        on_cpu = phase is Phase.DECODE and op.cache >= 0 and bufs[op.cache].tier is Tier.CPU and pol.cpu_attention
        return (base - deq + (attn_cpu if on_cpu else attn_gpu)) / f.compute_ops if f.compute_ops else 0.0

    free: dict[str, float] = {}
    spans: list[Span] = []
    for i, op in enumerate(program):
        stream = op.stream.value
        start = max([free.get(stream, 0.0)] + [spans[w].end_s for w in op.waits])
        end = start + duration(op)
        free[stream] = end
        spans.append(Span(i, op.kind.value, stream, start, end, op.node))

    static = buffer_bytes(bufs)
    if hw.has_gpu:  # the CUDA backend's pinned staging buffers
        static[Tier.CPU] += staging_bytes(bufs)
    events = [(0.0, dict(static))]
    for span, t in zip(spans, op_transients(programs, g, pol, phase, ctx)):
        if t.gpu or t.cpu:
            on = dict(static)
            on[Tier.GPU] += t.gpu
            on[Tier.CPU] += t.cpu
            events += [(span.start_s, on), (span.end_s, dict(static))]
    return StepTimeline(phase, ctx, tuple(spans), tuple(events))
