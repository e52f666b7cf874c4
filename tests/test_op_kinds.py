"""Every op kind is replayed on the CPU against transformers somewhere in the suite: the plans of the
replay tests' cases (test_numerics' placement policies, test_compressed's compressed ones, test_pipeline's
stages over gloo, test_score's scoring plans), compiled by
the same helpers those tests replay, together hold every OpKind. A new op kind fails here until some
replay test runs it."""

from __future__ import annotations

import pytest

from flexgen_graph.app.api import compile_plan
from flexgen_graph.hardware import load_profile
from flexgen_graph.ir import Workload
from flexgen_graph.program import OpKind
from flexgen_graph.spec import spec_from_config
from runtime.engine import Engine
from tests.test_compressed import MODES as COMPRESS_MODES
from tests.test_compressed import compressed_plan
from tests.test_numerics import POLICIES, plan_for, tiny_model
from tests.test_pipeline import ENGINE_CASES, case_plans
from tests.test_score import POLICIES as SCORE_POLICIES
from tests.test_score import PROMPT_LEN, SCORED


@pytest.fixture(scope="module")
def spec():
    return spec_from_config(tiny_model("llama").config)


def kinds(plan) -> set[OpKind]:
    return {op.kind for op in plan.programs.prefill + plan.programs.decode}


def test_every_op_kind_has_a_handler():
    assert set(Engine.HANDLERS) == set(OpKind)


def test_the_replay_tests_plans_hold_every_op_kind(spec):
    seen: dict[OpKind, str] = {}
    for name, policy in POLICIES.items():  # replayed for each family, nb in (1, 3), both attentions
        for cpu_attention in (False, True):
            for k in kinds(plan_for(spec, policy, 2, 1, cpu_attention=cpu_attention)):
                seen.setdefault(k, f"test_numerics {name} cpu_attention={cpu_attention}")
    for name in POLICIES:  # test_compressed_generation_equals_transformers_on_compressed_numbers' plans
        for mode in COMPRESS_MODES:
            for cpu_attention in (False, True):
                for k in kinds(compressed_plan(spec, name, mode, cpu_attention)):
                    seen.setdefault(k, f"test_compressed {name} {mode} cpu_attention={cpu_attention}")
    for case in ENGINE_CASES:
        for plan in case_plans(spec, case):
            for k in kinds(plan):
                seen.setdefault(k, f"test_pipeline {case}")
    for name, (w, c, h) in SCORE_POLICIES.items():  # test_logprobs_equal_transformers' plans
        plan = compile_plan(spec, load_profile("cpu-small"), Workload(PROMPT_LEN, SCORED, score=True), gpu_batch_size=2,
                            num_gpu_batches=1, fixed={"weights": w, "cache": c, "hidden": h})
        for k in kinds(plan):
            seen.setdefault(k, f"test_score {name}")
    missing = sorted(k.value for k in set(OpKind) - set(seen))
    assert not missing, f"op kinds no replay test runs: {missing}"
