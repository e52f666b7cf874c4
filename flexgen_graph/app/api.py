"""Public API: compile a plan from a model spec, a hardware profile and a workload.

    >>> from flexgen_graph.app.api import compile_plan
    >>> from flexgen_graph.catalog import catalog_spec
    >>> from flexgen_graph.ir import Workload
    >>> from flexgen_graph.hardware import load_profile
    >>> plan = compile_plan(catalog_spec("facebook/opt-1.3b"), load_profile("t4-flexgen"), Workload(128, 32))
    >>> plan.policy.weights.gpu_frac
    1.0
"""

from __future__ import annotations

import dataclasses

from flexgen_graph.errors import UserError
from flexgen_graph.ir import Block, LayerKind, Stage, Tier, Workload
from flexgen_graph.lower import lower
from flexgen_graph.spec import ModelSpec
from planner import pipeline
from planner.cost import phase_costs, policy_fracs
from planner.errors import InfeasiblePlanError
from flexgen_graph.hardware import HardwareProfile
from planner.memory import GROUP_SIZE, policy_compression, sized_buffers
from flexgen_graph.planfile import Plan
from flexgen_graph.policy import Placement, Policy
from planner.schedule import emit_programs, graph_shape
from planner.search import DEFAULT_FLAGS, GPU_BATCH_SIZES, NUM_GPU_BATCHES, SearchResult, search

# --compress: which 4-bit compression flags the search may choose, or forces
COMPRESS_MODES: dict[str, dict[str, bool] | None] = {
    "off": {"compress_weights": False, "compress_cache": False},
    "auto": None,  # the search tries each flag on and off and keeps the faster plan
    "weights": {"compress_weights": True, "compress_cache": False},
    "cache": {"compress_weights": False, "compress_cache": True},
    "both": {"compress_weights": True, "compress_cache": True},
}


def compile_plan(spec: ModelSpec, profile: HardwareProfile, workload: Workload, *,
                 gpu_batch_size: int | None = None, num_gpu_batches: int | None = None,
                 fixed: dict[str, Placement] | None = None, weights_source: str = "",
                 max_block_size: int | None = None, cpu_attention: bool | None = None,
                 compress: str = "off", group_size: int = GROUP_SIZE, compress_bits: int = 4) -> Plan:
    """cpu_attention: force the flag on or off (None: the search decides). compress: a COMPRESS_MODES
    key; "off" (the default) keeps the output identical to transformers, the others trade accuracy for
    memory (compress_bits-bit groups of group_size elements; BENCHMARKS.md has the accuracy cost)."""
    check_workload(spec, workload)
    fixed, allowed = _search_flags(fixed, cpu_attention, compress)
    result = search(lambda block: lower(spec, workload, block), profile, workload,
                    gpu_batch_size=gpu_batch_size, num_gpu_batches=num_gpu_batches, fixed=fixed,
                    max_block_size=max_block_size, spec=spec, allowed_flags=allowed, group_size=group_size,
                    bits=compress_bits)
    pol = result.policy
    return Plan(spec=spec, profile=profile, workload=workload, weights_source=weights_source, policy=pol,
                predictions=result.predictions.to_dict(), programs=_programs(spec, workload, pol))


def _programs(spec: ModelSpec, workload: Workload, pol: Policy, stage: Stage | None = None):
    graph = lower(spec, workload, Block(pol.gpu_batch_size, pol.num_gpu_batches), stage)
    programs = emit_programs(graph, pol)
    if pol.compresses:  # same buffer ids, compressed tensors at their compressed sizes
        sized = sized_buffers(graph_shape(graph), pol, policy_compression(spec, pol))
        programs = dataclasses.replace(programs, buffers=sized.buffers)
    return programs


def check_workload(spec: ModelSpec, workload: Workload) -> None:
    if workload.max_seq_len > spec.max_positions:
        raise UserError(f"prompt_len + gen_len = {workload.max_seq_len} exceeds {spec.name}'s "
                         f"max_position_embeddings {spec.max_positions}")
    if spec.sliding_window is not None and workload.max_seq_len > spec.sliding_window:
        raise UserError(f"prompt_len + gen_len = {workload.max_seq_len} exceeds {spec.name}'s sliding window "
                         f"{spec.sliding_window}, which the runtime does not implement")


def _search_flags(fixed: dict | None, cpu_attention: bool | None, compress: str) -> tuple[dict, tuple[str, ...]]:
    """The search's fixed classes and flags, and the flags it may choose, from the user's options."""
    if compress not in COMPRESS_MODES:
        raise UserError(f"compress must be one of {', '.join(COMPRESS_MODES)}, got {compress!r}")
    fixed = dict(fixed or {})
    if cpu_attention is not None:
        fixed["cpu_attention"] = cpu_attention
    allowed = DEFAULT_FLAGS
    if COMPRESS_MODES[compress] is None:
        allowed = DEFAULT_FLAGS + ("compress_weights", "compress_cache")
    else:
        fixed.update(COMPRESS_MODES[compress])
    return fixed, allowed


def compile_pipeline(spec: ModelSpec, profile: HardwareProfile, workload: Workload, stages: int, *,
                     stages_per_machine: int | None = None, gpu_batch_size: int | None = None,
                     num_gpu_batches: int | None = None, fixed: dict[str, Placement] | None = None,
                     weights_source: str = "", max_block_size: int | None = None, cpu_attention: bool | None = None,
                     compress: str = "off", group_size: int = GROUP_SIZE, compress_bits: int = 4) -> list[Plan]:
    """One plan per pipeline stage (planner.pipeline), all with one block. stages_per_machine: how many
    stage processes share a machine's host memory and disk (default: all of them, the safe guess).

    The layers are split to balance the stages' compute; each stage's placement is its own LP, with its
    weights on its GPU (batch-major stage programs cannot stream them, planner.schedule) and the link to
    its neighbours priced at profile.stage_link_bytes_per_s. The block is the best, for the whole pipeline,
    of the blocks the stages pick alone for each number of gpu batches."""
    check_workload(spec, workload)
    if compress not in ("off", "cache"):
        raise UserError(f"--compress {compress} with pipeline stages: a stage's weights stay on its GPU and would "
                         "be dequantized again for every gpu batch; use --compress off or cache")
    fixed, allowed = _search_flags(fixed, cpu_attention, compress)
    if "weights" in fixed and fixed["weights"] != Placement.all_on(Tier.GPU):
        raise UserError("pipeline stages keep their weights on their GPUs: drop --weights-frac")
    fixed["weights"] = Placement.all_on(Tier.GPU)
    share = pipeline.stage_share(profile, stages if stages_per_machine is None else stages_per_machine)
    decoder = [spec.layer_kind(j) is LayerKind.DECODER for j in range(spec.num_graph_layers)]
    wbytes = [spec.layer_bytes(j) for j in range(spec.num_graph_layers)]

    def split(block: Block) -> tuple[tuple[int, int], ...]:
        return pipeline.split_layers(layer_times(spec, share, workload, block), stages, decoder, wbytes, share.gpu_bytes)

    plan_stages = [Stage(i, stages, a, b) for i, (a, b) in enumerate(split(Block(1, 1)))]

    def solve(stage: Stage, b: int | None, n: int | None) -> SearchResult:
        try:
            return search(lambda block: lower(spec, workload, block, stage), share, workload, gpu_batch_size=b,
                          num_gpu_batches=n, fixed=fixed, max_block_size=max_block_size, spec=spec,
                          allowed_flags=allowed, group_size=group_size, bits=compress_bits)
        except InfeasiblePlanError as e:
            raise InfeasiblePlanError(f"pipeline stage {stage.index} (graph layers {stage.first_layer}.."
                                      f"{stage.end_layer - 1}, weights on its GPU): {e}") from None

    def at(sts: list[Stage], b: int, n: int) -> tuple[dict, list[SearchResult]]:
        """Every stage solved with block b x n, and the pipeline's predictions."""
        res = [solve(st, b, n) for st in sts]
        return pipeline.pipeline_predictions([r.predictions for r in res], n, b * n, workload.gen_len), res

    # candidate blocks: for each number of gpu batches (more of them fill the pipeline better, fewer keep
    # each batch large), the gpu batch size each stage picks alone; the best pipeline of them wins
    counts = NUM_GPU_BATCHES if num_gpu_batches is None else (num_gpu_batches,)
    if max_block_size is not None:
        counts = tuple(n for n in counts if n <= max_block_size) or counts[:1]
    blocks = []
    for n in counts:
        for st in plan_stages:
            try:
                b = solve(st, gpu_batch_size, n).policy.gpu_batch_size
            except InfeasiblePlanError:
                continue
            if (b, n) not in blocks:
                blocks.append((b, n))
    if not blocks:  # the error of the smallest block names the stage and the tier that does not fit
        solve(plan_stages[0], gpu_batch_size or GPU_BATCH_SIZES[0], counts[0])
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
    again = [Stage(i, stages, a, e) for i, (a, e) in enumerate(split(Block(b, 1)))]
    if again != plan_stages:
        try:
            p2, r2 = at(again, b, n)
            if p2["tokens_per_s"] > pred["tokens_per_s"]:
                pred, results, plan_stages = p2, r2, again
        except InfeasiblePlanError:
            pass  # the first split fits: keep it
    return [Plan(spec=spec, profile=share, workload=workload, weights_source=weights_source, policy=r.policy,
                 predictions=pipeline.stage_predictions(r.predictions, pred),
                 programs=_programs(spec, workload, r.policy, st), stage=st)
            for st, r in zip(plan_stages, results)]


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
