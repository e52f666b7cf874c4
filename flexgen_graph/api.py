"""Public API: compile a plan from a model spec, a hardware profile and a workload.

    >>> from flexgen_graph.api import compile_plan
    >>> from flexgen_graph.catalog import catalog_spec
    >>> from flexgen_graph.ir import Workload
    >>> from planner.hardware import load_profile
    >>> plan = compile_plan(catalog_spec("facebook/opt-1.3b"), load_profile("t4-flexgen"), Workload(128, 32))
    >>> plan.policy.weights.gpu_frac
    1.0
"""

from __future__ import annotations

import dataclasses

from flexgen_graph.ir import Block, Workload
from flexgen_graph.lower import lower
from flexgen_graph.spec import ModelSpec
from planner.hardware import HardwareProfile
from planner.memory import GROUP_SIZE, policy_compression, sized_buffers
from planner.plan import Plan
from planner.policy import Placement
from planner.schedule import emit_programs, graph_shape
from planner.search import DEFAULT_FLAGS, search

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
    if compress not in COMPRESS_MODES:
        raise ValueError(f"compress must be one of {', '.join(COMPRESS_MODES)}, got {compress!r}")
    if workload.max_seq_len > spec.max_positions:
        raise ValueError(f"prompt_len + gen_len = {workload.max_seq_len} exceeds {spec.name}'s "
                         f"max_position_embeddings {spec.max_positions}")
    if spec.sliding_window is not None and workload.max_seq_len > spec.sliding_window:
        raise ValueError(f"prompt_len + gen_len = {workload.max_seq_len} exceeds {spec.name}'s sliding window "
                         f"{spec.sliding_window}, which the runtime does not implement")
    fixed = dict(fixed or {})
    if cpu_attention is not None:
        fixed["cpu_attention"] = cpu_attention
    allowed = DEFAULT_FLAGS
    if COMPRESS_MODES[compress] is None:
        allowed = DEFAULT_FLAGS + ("compress_weights", "compress_cache")
    else:
        fixed.update(COMPRESS_MODES[compress])
    result = search(lambda block: lower(spec, workload, block), profile, workload,
                    gpu_batch_size=gpu_batch_size, num_gpu_batches=num_gpu_batches, fixed=fixed,
                    max_block_size=max_block_size, spec=spec, allowed_flags=allowed, group_size=group_size,
                    bits=compress_bits)
    pol = result.policy
    graph = lower(spec, workload, Block(pol.gpu_batch_size, pol.num_gpu_batches))
    programs = emit_programs(graph, pol)
    if pol.compresses:  # same buffer ids, compressed tensors at their compressed sizes
        sized = sized_buffers(graph_shape(graph), pol, policy_compression(spec, pol))
        programs = dataclasses.replace(programs, buffers=sized.buffers)
    return Plan(spec=spec, profile=profile, workload=workload, weights_source=weights_source, policy=pol,
                predictions=result.predictions.to_dict(), programs=programs)
