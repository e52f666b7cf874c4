"""inspect: a plan described as data and text, a decode step drawn; the planner stays torch-free."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flexgen_graph.app.api import compile_plan
from flexgen_graph.app.inspect import describe, describe_text, plot, step_timeline
from flexgen_graph.catalog import catalog_spec
from flexgen_graph.hardware import load_profile
from flexgen_graph.ir import Phase, Workload
from flexgen_graph.policy import Placement


@pytest.fixture(scope="module")
def plan():
    # weights streamed from the CPU and cache attended there: every stream has work
    return compile_plan(catalog_spec("facebook/opt-125m"), load_profile("cpu-small"), Workload(16, 4),
                        gpu_batch_size=2, num_gpu_batches=2,
                        fixed={"weights": Placement(0, 1, 0), "cache": Placement(0, 1, 0), "hidden": Placement(0, 1, 0),
                               "cpu_attention": True})


def test_describe_is_json_and_names_what_binds(plan):
    d = json.loads(json.dumps(describe(plan)))
    assert d["policy"]["cpu_attention"] and d["block_size"] == 4
    assert d["binding"] == plan.predictions["binding"] and d["binding_constraint"]
    assert d["hazards"] == []
    for t in ("gpu", "cpu", "disk"):
        v = d["tiers"][t]
        assert v["static_bytes"] <= v["simulated_peak_bytes"] <= v["predicted_peak_bytes"] <= v["capacity_bytes"]
    assert d["ops"]["decode"]["decoder_decode_cpu_attn"] == 12 * 2
    text = describe_text(plan)
    for word in ("binding", "predicted peak", "simulated peak", "cpu_attention", "hazards   0"):
        assert word in text


def test_step_timeline_respects_streams_and_waits(plan):
    tl = step_timeline(plan, Phase.DECODE)
    assert tl.ctx == 19 and len(tl.spans) == len(plan.programs.decode)
    for op, span in zip(plan.programs.decode, tl.spans):
        assert span.end_s >= span.start_s >= max([tl.spans[w].end_s for w in op.waits], default=0.0)
    by_stream: dict[str, float] = {}
    for span in tl.spans:  # a stream runs its ops in order, one at a time
        assert span.start_s >= by_stream.get(span.stream, 0.0)
        by_stream[span.stream] = span.end_s
    assert tl.end_s > 0 and [t for t, _ in tl.memory] == sorted(t for t, _ in tl.memory)


def test_plot_writes_a_png(plan, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "step.png"
    plot(plan, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_so(plan, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot(plan, tmp_path / "x.png")


def test_planner_and_inspect_never_import_torch():
    code = ("import sys, planner.search, planner.verify, flexgen_graph.planfile, flexgen_graph.app.api, flexgen_graph.app.inspect; "
            "print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.split() == ["False", "False"]
