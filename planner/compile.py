"""The planner's one entry: a model, a hardware profile, workloads and frozen options in, plans out.

    >>> from flexgen_graph.catalog import catalog_spec
    >>> from flexgen_graph.hardware import load_profile
    >>> from flexgen_graph.ir import Workload
    >>> from planner.compile import CompileOptions, compile
    >>> [plan] = compile(catalog_spec("facebook/opt-1.3b"), load_profile("t4-flexgen"), [Workload(128, 32)])
    >>> plan.policy.weights.gpu_frac
    1.0

CompileOptions is built once at the edge (the CLI, the Python API) and passed down as is; its
`key()` names a compiled result in a cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Sequence

from flexgen_graph.errors import UserError
from flexgen_graph.hardware import HardwareProfile, packed_suffix
from flexgen_graph.ir import Block, LayerKind, Stage, Tier, Workload
from flexgen_graph.layout import DEFAULT_BITS, DEFAULT_GROUP_SIZE, QuantConfig, packed_group_fits, packed_groups_text
from flexgen_graph.lower import lower
from flexgen_graph.planfile import Plan
from flexgen_graph.policy import Placement, Policy
from flexgen_graph.program import Programs
from flexgen_graph.spec import ModelSpec
from planner import pipeline
from planner.cost import phase_costs, policy_fracs
from planner.errors import InfeasiblePlanError
from planner.lp import parse_fixed
from planner.memory import policy_compression, sized_buffers
from planner.schedule import emit_programs, graph_shape
from planner.search import (
    DEFAULT_FLAGS,
    GPU_BATCH_SIZES,
    NUM_GPU_BATCHES,
    SearchResult,
    search,
)

# compress: which compression flags the search may choose, or forces
COMPRESS_MODES: dict[str, dict[str, bool] | None] = {
    "off": {"compress_weights": False, "compress_cache": False},
    "auto": None,  # the search tries each flag on and off and keeps the faster plan
    "weights": {"compress_weights": True, "compress_cache": False},
    "cache": {"compress_weights": False, "compress_cache": True},
    "both": {"compress_weights": True, "compress_cache": True},
}


@dataclass(frozen=True, slots=True)
class CompileOptions:
    """Everything a user may say about a compile besides the model, the profile and the workloads.

    None means "the search decides". fixed: what the search may not choose, as (name, value) pairs:
    a class's Placement, one fraction ("weights.gpu") or a flag (planner.lp.parse_fixed).
    compress: a COMPRESS_MODES key; "off" keeps the output identical to transformers, the others
    trade accuracy for memory (compress_bits-bit groups of group_size elements). stages > 1 compiles
    a pipeline: one plan per stage, stages_per_machine of them sharing a machine's RAM and disk,
    stage_link_bytes_per_s (None: the profile's) between them. job_prompts: compile for a job of that
    many prompts (no block larger; the policy with the job's best predicted time, planner.search)."""

    gpu_batch_size: int | None = None
    num_gpu_batches: int | None = None
    max_block_size: int | None = None
    fixed: tuple[tuple[str, Placement | float | bool], ...] = ()
    cpu_attention: bool | None = None
    compress: str = "off"
    group_size: int = DEFAULT_GROUP_SIZE
    compress_bits: int = DEFAULT_BITS
    packed: bool = False  # compressed weights computed on packed (4 or 8 bits, CPU: runtime.packed), not dequantized
    stages: int = 1
    stages_per_machine: int | None = None
    stage_link_bytes_per_s: float | None = None
    weights_source: str = ""
    job_prompts: int | None = None

    def __post_init__(self) -> None:
        for name in ("gpu_batch_size", "num_gpu_batches", "max_block_size", "stages_per_machine", "job_prompts"):
            v = getattr(self, name)
            if v is not None and (type(v) is not int or v < 1):
                raise UserError(f"{name.replace('_', '-')} must be a whole number >= 1, got {v!r}")
        if type(self.stages) is not int or self.stages < 1:
            raise UserError(f"stages must be >= 1, got {self.stages!r}")
        if self.stages == 1 and (self.stages_per_machine is not None or self.stage_link_bytes_per_s is not None):
            raise UserError("stages per machine and the stage link describe a pipeline: give stages N (N >= 2)")
        if self.stage_link_bytes_per_s is not None and not self.stage_link_bytes_per_s > 0:
            raise UserError(f"the stage link must be positive, got {self.stage_link_bytes_per_s} bytes/s")
        if self.compress not in COMPRESS_MODES:
            raise UserError(f"compress must be one of {', '.join(COMPRESS_MODES)}, got {self.compress!r}")
        parse_fixed(self.fixed_map)  # names and ranges checked here, at the edge
        if self.packed and (self.compress in ("off", "cache") or self.stages > 1):
            raise UserError(f"packed weights need compressed weights in one process (--compress weights, both or "
                            f"auto), got --compress {self.compress}, stages {self.stages}")
        if self.packed and not packed_group_fits(QuantConfig(self.compress_bits, self.group_size)):
            raise UserError(f"packed weights need a group size the CPU int4 kernel takes ({packed_groups_text()}), "
                            f"got --compress-bits {self.compress_bits} --group-size {self.group_size}")

    @property
    def fixed_map(self) -> dict[str, Placement | float | bool]:
        return dict(self.fixed)

    def key(self) -> list:
        """A JSON-able value that names the options (for caches of compiled plans)."""
        d = dataclasses.asdict(self)
        d["fixed"] = [[c, list(v.as_tuple()) if isinstance(v, Placement) else v] for c, v in self.fixed]
        return sorted(d.items())


def compile(spec: ModelSpec, profile: HardwareProfile, workloads: Workload | Iterable[Workload],
            options: CompileOptions = CompileOptions()) -> list[Plan]:
    """One plan per workload (a plan set, sorted by prompt length), or one per workload and pipeline stage."""
    wls = [workloads] if isinstance(workloads, Workload) else list(workloads)
    if not wls:
        raise UserError("compile needs at least one workload")
    if options.stage_link_bytes_per_s is not None:
        profile = dataclasses.replace(profile, stage_link_bytes_per_s=options.stage_link_bytes_per_s)
    if options.stages > 1 and any(wl.score for wl in wls):
        raise UserError("a scoring workload runs in one process: compile it without stages")
    out: list[Plan] = []
    for wl in wls:
        out += _pipeline(spec, profile, wl, options) if options.stages > 1 else [_single(spec, profile, wl, options)]
    return out


def check_workload(spec: ModelSpec, workload: Workload) -> None:
    if workload.max_seq_len > spec.max_positions:
        raise UserError(f"prompt_len + gen_len = {workload.max_seq_len} exceeds {spec.name}'s "
                        f"max_position_embeddings {spec.max_positions}")
    if spec.sliding_window is not None and workload.max_seq_len > spec.sliding_window:
        raise UserError(f"prompt_len + gen_len = {workload.max_seq_len} exceeds {spec.name}'s sliding window "
                        f"{spec.sliding_window}, which the runtime does not implement")


def programs_for(spec: ModelSpec, workload: Workload, pol: Policy, stage: Stage | None = None) -> Programs:
    """The programs of a policy: the scheduled graph, compressed buffers at their compressed sizes."""
    graph = lower(spec, workload, Block(pol.gpu_batch_size, pol.num_gpu_batches), stage)
    programs = emit_programs(graph, pol)
    if pol.compresses:  # same buffer ids, compressed tensors at their compressed sizes
        sized = sized_buffers(graph_shape(graph), pol, policy_compression(spec, pol))
        programs = dataclasses.replace(programs, buffers=sized.buffers)
    return programs


def _search_flags(o: CompileOptions) -> tuple[dict, tuple[str, ...]]:
    """The search's fixed classes and flags, and the flags it may choose, from the options."""
    fixed: dict = o.fixed_map
    if o.cpu_attention is not None:
        fixed["cpu_attention"] = o.cpu_attention
    allowed = DEFAULT_FLAGS
    if COMPRESS_MODES[o.compress] is None:
        allowed = DEFAULT_FLAGS + ("compress_weights", "compress_cache")
    else:
        fixed.update(COMPRESS_MODES[o.compress])
    return fixed, allowed


def _packed_flags(spec: ModelSpec, profile: HardwareProfile, o: CompileOptions, fixed: dict,
                  allowed: tuple[str, ...]) -> tuple[dict, tuple[str, ...]]:
    """--packed forces packed weights; --compress auto may choose them where the profile measured this model's
    layers on packed weights (runtime.profiler.packed_layer_curves), so the choice follows measured times."""
    if o.packed:
        return {**fixed, "packed_weights": True}, allowed
    cal = profile.calibration
    fits = packed_group_fits(QuantConfig(o.compress_bits, o.group_size))
    measured = cal is not None and not profile.has_gpu and fits and all(
        cal.layer(spec.layer_kind(j).value + packed_suffix(o.compress_bits), spec.layer_bytes(j)) is not None
        for j in range(spec.num_graph_layers))
    if o.compress == "auto" and measured:
        return fixed, allowed + ("packed_weights",)
    return {**fixed, "packed_weights": False}, allowed


def _search(spec: ModelSpec, profile: HardwareProfile, workload: Workload, o: CompileOptions, fixed: dict,
            allowed: tuple[str, ...], stage: Stage | None = None, gpu_batch_size: int | None = None,
            num_gpu_batches: int | None = None) -> SearchResult:
    return search(lambda block: lower(spec, workload, block, stage), profile, workload,
                  gpu_batch_size=gpu_batch_size or o.gpu_batch_size,
                  num_gpu_batches=num_gpu_batches or o.num_gpu_batches, fixed=fixed,
                  max_block_size=o.max_block_size, spec=spec, allowed_flags=allowed, group_size=o.group_size,
                  bits=o.compress_bits, job_prompts=o.job_prompts)


def _single(spec: ModelSpec, profile: HardwareProfile, workload: Workload, o: CompileOptions) -> Plan:
    """One plan; a scoring workload's (Workload.score) is its prefill alone, priced and sized like any other."""
    check_workload(spec, workload)
    fixed, allowed = _search_flags(o)
    if o.packed and profile.has_gpu:
        raise UserError(f"packed weights are computed by the CPU int4 kernel; profile {profile.name} has a GPU, "
                        "which computes there: drop --packed")
    fixed, allowed = _packed_flags(spec, profile, o, fixed, allowed)
    r = _search(spec, profile, workload, o, fixed, allowed)
    policy = r.policy
    return Plan(spec=spec, profile=profile, workload=workload, weights_source=o.weights_source, policy=policy,
                predictions=r.predictions.to_dict(), programs=programs_for(spec, workload, policy))


def _pipeline(spec: ModelSpec, profile: HardwareProfile, workload: Workload, o: CompileOptions) -> list[Plan]:
    """One plan per pipeline stage (planner.pipeline), all with one block.

    The layers are split to balance the stages' compute; each stage's placement is its own LP, with its
    weights on its GPU (batch-major stage programs cannot stream them, planner.schedule) and the link to
    its neighbours priced at profile.stage_link_bytes_per_s. The block is the best, for the whole pipeline,
    of the blocks the stages pick alone for each number of gpu batches."""
    check_workload(spec, workload)
    if o.compress not in ("off", "cache"):
        raise UserError(f"--compress {o.compress} with pipeline stages: a stage's weights stay on its GPU and would "
                        "be dequantized again for every gpu batch; use --compress off or cache")
    fixed, allowed = _search_flags(o)
    if "weights" in fixed and fixed["weights"] != Placement.all_on(Tier.GPU):
        raise UserError("pipeline stages keep their weights on their GPUs: drop --weights-frac")
    fixed["weights"] = Placement.all_on(Tier.GPU)
    share = pipeline.stage_share(profile, o.stages if o.stages_per_machine is None else o.stages_per_machine)
    decoder = [spec.layer_kind(j) is LayerKind.DECODER for j in range(spec.num_graph_layers)]
    wbytes = [spec.layer_bytes(j) for j in range(spec.num_graph_layers)]

    def split(block: Block) -> list[Stage]:
        bounds = pipeline.split_layers(layer_times(spec, share, workload, block), o.stages, decoder, wbytes,
                                       share.gpu_bytes)
        return [Stage(i, o.stages, a, b) for i, (a, b) in enumerate(bounds)]

    def solve(stage: Stage, b: int | None, n: int | None) -> SearchResult:
        try:
            return _search(spec, share, workload, o, fixed, allowed, stage, b, n)
        except InfeasiblePlanError as e:
            raise InfeasiblePlanError(f"pipeline stage {stage.index} (graph layers {stage.first_layer}.."
                                      f"{stage.end_layer - 1}, weights on its GPU): {e}") from None

    def at(sts: list[Stage], b: int, n: int) -> tuple[dict, list[SearchResult]]:
        """Every stage solved with block b x n, and the pipeline's predictions."""
        res = [solve(st, b, n) for st in sts]
        return pipeline.pipeline_predictions([r.predictions for r in res], n, b * n, workload.gen_len), res

    plan_stages = split(Block(1, 1))
    blocks = _candidate_blocks(plan_stages, solve, o)
    best = None
    for b, n in blocks:
        try:
            pred, results = at(plan_stages, b, n)
        except InfeasiblePlanError:
            continue
        if best is None or pred["tokens_per_s"] > best[0]["tokens_per_s"]:
            best = (pred, results)
    if best is None:
        raise InfeasiblePlanError(f"no block fits every pipeline stage (tried {blocks})")
    pred, results = best
    # the split was balanced at a probe block; balanced again at the chosen gpu batch size, it may differ
    b, n = results[0].policy.gpu_batch_size, results[0].policy.num_gpu_batches
    again = split(Block(b, 1))
    if again != plan_stages:
        try:
            p2, r2 = at(again, b, n)
            if p2["tokens_per_s"] > pred["tokens_per_s"]:
                pred, results, plan_stages = p2, r2, again
        except InfeasiblePlanError:
            pass  # the first split fits: keep it
    return [Plan(spec=spec, profile=share, workload=workload, weights_source=o.weights_source, policy=r.policy,
                 predictions=pipeline.stage_predictions(r.predictions, pred),
                 programs=programs_for(spec, workload, r.policy, st), stage=st)
            for st, r in zip(plan_stages, results)]


def _candidate_blocks(stages: Sequence[Stage], solve, o: CompileOptions) -> list[tuple[int, int]]:
    """For each number of gpu batches (more of them fill the pipeline better, fewer keep each batch large),
    the gpu batch size each stage picks alone."""
    counts = NUM_GPU_BATCHES if o.num_gpu_batches is None else (o.num_gpu_batches,)
    caps = [c for c in (o.max_block_size, o.job_prompts) if c is not None]
    if caps:
        counts = tuple(n for n in counts if n <= min(caps)) or counts[:1]
    blocks: list[tuple[int, int]] = []
    for n in counts:
        for st in stages:
            try:
                b = solve(st, o.gpu_batch_size, n).policy.gpu_batch_size
            except InfeasiblePlanError:
                continue
            if (b, n) not in blocks:
                blocks.append((b, n))
    if not blocks:  # the error of the smallest block names the stage and the tier that does not fit
        solve(stages[0], o.gpu_batch_size or GPU_BATCH_SIZES[0], counts[0])
    return blocks


def layer_times(spec: ModelSpec, profile: HardwareProfile, workload: Workload, block: Block = Block(1, 1)) -> list[float]:
    """Each graph layer's predicted compute time over a run (prefill and every decode step), all on the GPU:
    what the stage split balances."""
    on_gpu = Placement.all_on(Tier.GPU)
    fracs = policy_fracs(Policy(block.gpu_batch_size, block.num_gpu_batches, on_gpu, on_gpu, on_gpu))
    costs = phase_costs(lower(spec, workload, block), profile)
    out = [0.0] * spec.num_graph_layers
    for steps, weight in ((costs.prefill, 1), (costs.decode, workload.gen_len - 1)):
        for s in steps:
            for j in s.layers:
                out[j] += weight * s.time_s(fracs)
    return out
