"""Compile plans from Python: keyword options in, `planner.compile` underneath.

    >>> from flexgen_graph.app.api import compile_plan
    >>> from flexgen_graph.catalog import catalog_spec
    >>> from flexgen_graph.ir import Workload
    >>> from flexgen_graph.hardware import load_profile
    >>> plan = compile_plan(catalog_spec("facebook/opt-1.3b"), load_profile("t4-flexgen"), Workload(128, 32))
    >>> plan.policy.weights.gpu_frac
    1.0
"""

from __future__ import annotations

from flexgen_graph.hardware import HardwareProfile
from flexgen_graph.ir import Workload
from flexgen_graph.planfile import Plan
from flexgen_graph.policy import Placement
from flexgen_graph.spec import ModelSpec
from planner.compile import (  # noqa: F401
    COMPRESS_MODES,
    CompileOptions,
    check_workload,
    compile,
    layer_times,
)


def options(*, fixed: dict[str, Placement] | None = None, **kw) -> CompileOptions:
    """CompileOptions from keywords, forced placements as a dict."""
    return CompileOptions(fixed=tuple(sorted((fixed or {}).items())), **kw)


def compile_plan(spec: ModelSpec, profile: HardwareProfile, workload: Workload, **kw) -> Plan:
    """One plan; keywords are CompileOptions' fields (fixed as a dict of class -> Placement)."""
    [plan] = compile(spec, profile, [workload], options(**kw))
    return plan


def compile_pipeline(spec: ModelSpec, profile: HardwareProfile, workload: Workload, stages: int, **kw) -> list[Plan]:
    """One plan per pipeline stage; keywords as for compile_plan."""
    return compile(spec, profile, [workload], options(stages=stages, **kw))
