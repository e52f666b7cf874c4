"""Golden plans: recompiling plans/ gives the committed bytes (rerun `python plans/build.py` to accept a change)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from flexgen_graph import planfile
from planner.verify import simulate_plan

PLANS = Path(__file__).resolve().parents[1] / "plans"


def _build_module():
    spec = importlib.util.spec_from_file_location("plans_build", PLANS / "build.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


BUILD = _build_module()


@pytest.mark.parametrize("entry", BUILD.ENTRIES, ids=lambda e: e.file_name.removesuffix(".fgplan"))
def test_recompiled_plan_is_byte_identical(entry):
    path = PLANS / entry.file_name
    assert path.is_file(), f"{path} is missing: run python plans/build.py"
    plans = BUILD.compile_entry(entry)
    if planfile.dumps_set(plans) != path.read_bytes():
        old = planfile.load_set(path)
        what = [f for f in ("policy", "predictions", "programs", "stage")
                if [getattr(p, f) for p in old] != [getattr(p, f) for p in plans]]
        pytest.fail(f"{entry.file_name} differs from a fresh compile ({', '.join(what) or 'header/format'}): "
                    "rerun python plans/build.py if the change is intended")


def test_committed_plans_load_and_verify():
    for entry, plan in ((e, p) for e in BUILD.ENTRIES for p in planfile.load_set(PLANS / e.file_name)):
        sim = simulate_plan(plan)
        assert sim.hazards == (), entry.file_name
        assert all(sim.peaks[t] <= plan.predictions["peak_bytes"][t.value] for t in sim.peaks), entry.file_name
        assert not sim.faults({t: c for t, c in zip(sim.peaks, (plan.profile.gpu_bytes, plan.profile.cpu_bytes,
                                                                 plan.profile.disk_bytes))}), entry.file_name


def test_readme_table_lists_every_plan():
    text = (PLANS / "README.md").read_text()
    for entry in BUILD.ENTRIES:
        assert f"`{entry.file_name}`" in text
