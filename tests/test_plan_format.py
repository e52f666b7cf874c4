"""Plan files: round trip, determinism, and refusal of corrupt or foreign plans with clear messages."""

import msgpack
import pytest

from flexgen_graph import planfile
from flexgen_graph.app.api import compile_plan
from flexgen_graph.catalog import catalog_spec
from flexgen_graph.hardware import load_profile
from flexgen_graph.ir import Workload
from flexgen_graph.planfile import BadPlanFileError, PlanMismatchError, check_model
from planner.verify import verify


@pytest.fixture(scope="module")
def plan():
    return compile_plan(catalog_spec("facebook/opt-1.3b"), load_profile("t4-flexgen"), Workload(128, 16),
                        weights_source="dummy:0")


def test_round_trip_is_exact(plan, tmp_path):
    planfile.save(plan, tmp_path / "p.fgplan")
    back = planfile.load(tmp_path / "p.fgplan")
    assert back == plan
    assert planfile.dumps(back) == planfile.dumps(plan)
    verify(back.programs)


def test_compiling_twice_gives_identical_bytes(plan):
    again = compile_plan(catalog_spec("facebook/opt-1.3b"), load_profile("t4-flexgen"), Workload(128, 16),
                         weights_source="dummy:0")
    assert planfile.dumps(again) == planfile.dumps(plan)


def test_corruption_is_refused(plan):
    data = planfile.dumps(plan)
    with pytest.raises(BadPlanFileError):
        planfile.loads(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    with pytest.raises(BadPlanFileError, match="checksum"):
        planfile.loads(bytes(flipped))
    fmt, version, checksum, body = msgpack.unpackb(data)
    with pytest.raises(BadPlanFileError, match="format"):
        planfile.loads(msgpack.packb(["not-a-plan", version, checksum, body]))
    with pytest.raises(BadPlanFileError, match="version 99"):
        planfile.loads(msgpack.packb([fmt, 99, checksum, body]))


def test_plan_for_another_model_is_refused_naming_the_difference(plan):
    with pytest.raises(PlanMismatchError, match="hidden: plan 2048 vs weights 768"):
        check_model(plan, catalog_spec("facebook/opt-125m"))
    check_model(plan, catalog_spec("facebook/opt-1.3b"))  # same architecture passes
