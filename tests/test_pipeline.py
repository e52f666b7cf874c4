"""Pipeline stages: the layer split, the stage plans and their programs, and runs of 2 and 3 gloo processes
(torchrun) whose tokens equal transformers' and a single process's, token for token."""

import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import checkpoint  # noqa: F401  (a tiny Llama checkpoint folder)
from test_distributed import by_key, records
from test_jobs import write_lines
from test_numerics import GEN_LEN, PROMPT_LEN, hf_generate, prompts_for, tiny_model

from flexgen_graph import planfile
from flexgen_graph.app.api import compile_pipeline, layer_times
from flexgen_graph.app.cli import main
from flexgen_graph.catalog import catalog_spec
from flexgen_graph.hardware import load_profile
from flexgen_graph.ir import TIERS, Block, Stage, Tier, Workload
from flexgen_graph.policy import Placement
from flexgen_graph.program import OpKind
from planner import pipeline
from planner.verify import simulate_plan
from runtime.weight_store import import_hf_folder

ROOT = Path(__file__).resolve().parents[1]
P = Placement
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def torchrun(n: int, entry: list[str], args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
                          + entry + args, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, **(env or {})})


# ---------------------------------------------------------------- the split

def _ranges(cuts: tuple[int, ...], n: int) -> list[tuple[int, int]]:
    edges = (0, *cuts, n)
    return list(zip(edges, edges[1:]))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_split_is_the_best_contiguous_split_that_fits(data):
    n = data.draw(st.integers(3, 9), label="graph layers")
    times = data.draw(st.lists(st.integers(0, 20), min_size=n, max_size=n), label="times")
    weights = data.draw(st.lists(st.integers(1, 10), min_size=n, max_size=n), label="weights")
    stages = data.draw(st.integers(1, n - 2), label="stages")
    cap = data.draw(st.none() | st.integers(5, 40), label="capacity")
    decoder = [False] + [True] * (n - 2) + [False]

    def valid(rs) -> bool:
        return all(any(decoder[a:b]) and (cap is None or sum(weights[a:b]) <= cap) for a, b in rs)

    splits = [r for cuts in itertools.combinations(range(1, n), stages - 1) if valid(r := _ranges(cuts, n))]
    if not splits:
        with pytest.raises(ValueError, match="do not split into"):
            pipeline.split_layers(times, stages, decoder, weights, cap)
        return
    got = pipeline.split_layers(times, stages, decoder, weights, cap)
    assert valid(got) and [a for a, _ in got][0] == 0 and got[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
    assert max(sum(times[a:b]) for a, b in got) == min(max(sum(times[a:b]) for a, b in r) for r in splits)


def test_a_stage_without_a_decoder_layer_is_refused():
    with pytest.raises(ValueError, match="each stage needs one"):
        pipeline.split_layers([1, 1, 1, 1], 3, [False, True, True, False])


def test_pipeline_step_is_the_first_batch_through_every_stage_then_the_slowest_per_batch():
    # stages taking 2 s and 4 s for a block of 2 gpu batches: 1 + 2 for batch 0, then 2 for batch 1
    assert pipeline.step_s([2.0, 4.0], 2) == 5.0
    assert pipeline.step_s([3.0], 1) == 3.0  # one stage: its own time


def test_decode_steps_overlap_so_the_busiest_stage_paces_them_unless_the_ring_is_short_of_batches():
    assert pipeline.ring_step_s([2.0, 4.0], 4) == 4.0  # the busiest stage, every step
    assert pipeline.ring_step_s([2.0, 2.0, 2.0, 2.0], 2) == 4.0  # a batch's way round: 4 x 1 s > 2 s


def test_stages_sharing_a_machine_share_its_host_and_without_a_gpu_its_gpu_tier_and_cores():
    cpu, gpu = load_profile("cpu-small"), load_profile("t4-flexgen")
    half = pipeline.stage_share(cpu, 2)
    assert (half.gpu_bytes, half.cpu_bytes, half.gpu_matmul_flops_per_s) == \
        (cpu.gpu_bytes // 2, cpu.cpu_bytes // 2, cpu.gpu_matmul_flops_per_s / 2)
    quarter = pipeline.stage_share(gpu, 4)
    assert (quarter.gpu_bytes, quarter.cpu_bytes, quarter.gpu_matmul_flops_per_s) == \
        (gpu.gpu_bytes, gpu.cpu_bytes // 4, gpu.gpu_matmul_flops_per_s)
    assert pipeline.stage_share(gpu, 1) is gpu


def test_a_stage_sharing_a_machine_is_priced_at_its_kernels_measured_beside_the_other_stage():
    """Without a GPU, 2 stages on one machine: a layer's kernels at the curve measured with the cores split
    between two processes (paired_rows), not at twice the whole machine's (two 1-thread stages on 2 cores run
    a 4-row decoder op at 0.9-1.5x a 2-thread one's time, not 2x); a layer without one, or 3 stages, at n times."""
    from test_calibration import calibrated
    from test_planner import tiny_spec

    from flexgen_graph.hardware import Curve
    from planner.cost import phase_costs
    from flexgen_graph.lower import lower

    spec = tiny_spec("llama", layers=1)
    hw = calibrated(spec, op_s=1e-5)
    cal = hw.calibration
    paired = Curve((1.0, 64.0), (7e-3, 9e-3))
    dec_i = next(i for i, lc in enumerate(cal.layers) if lc.kind == "decoder")
    layers = list(cal.layers)
    layers[dec_i] = dataclasses.replace(layers[dec_i], paired_rows=paired)
    hw = dataclasses.replace(hw, calibration=dataclasses.replace(cal, layers=tuple(layers)))
    two, three = (pipeline.stage_share(hw, n).calibration for n in (2, 3))
    assert two.layers[dec_i].rows == paired and two.compute_scale == cal.compute_scale
    for i, lc in enumerate(layers):
        assert three.layers[i].rows == lc.rows.scaled(3)  # no curve measured for 3 processes
        assert three.layers[i].attn_s == pytest.approx(3 * lc.attn_s)
        if i != dec_i:
            assert two.layers[i].rows == lc.rows.scaled(2)
    assert (two.op_s, two.matmul_s_per_flop) == (2 * cal.op_s, cal.matmul_s_per_flop.scaled(2))
    b, P_, G = 4, 8, 2
    [step] = [s for s in phase_costs(lower(spec, Workload(P_, G), Block(b, 1)), pipeline.stage_share(hw, 2)).decode
              if s.figures.weight_full_bytes == spec.layer_bytes(1)]
    want = paired.at(b) + 2 * layers[dec_i].attn_s * b * (P_ + G / 2) + 2 * cal.op_s
    assert step.terms[0].const == pytest.approx(want, rel=1e-9)


# ---------------------------------------------------------------- stage plans

CASES = {  # model, dtype, profile, stages, stages per machine
    "smollm2-cpu-small-2": (SMOL, "float32", "cpu-small", 2, None),
    "opt-13b-t4-4": ("facebook/opt-13b", "float16", "t4-flexgen", 4, 1),
}


@pytest.fixture(scope="module", params=list(CASES))
def stage_plans(request):
    name, dtype, profile, stages, per_machine = CASES[request.param]
    spec = catalog_spec(name, dtype)
    return spec, compile_pipeline(spec, load_profile(profile), Workload(128, 16), stages,
                                  stages_per_machine=per_machine)


def test_stages_cover_the_model_in_order_with_one_block_and_weights_on_their_gpus(stage_plans):
    spec, plans = stage_plans
    assert [p.stage.index for p in plans] == list(range(len(plans)))
    assert plans[0].stage.first_layer == 0 and plans[-1].stage.end_layer == spec.num_graph_layers
    assert all(a.stage.end_layer == b.stage.first_layer for a, b in zip(plans, plans[1:]))
    assert len({(p.policy.gpu_batch_size, p.policy.num_gpu_batches) for p in plans}) == 1
    assert all(p.policy.weights == P(1, 0, 0) for p in plans)
    assert plans[0].policy.num_gpu_batches >= 2  # a pipeline of one gpu batch would never overlap
    assert len({p.predictions["tokens_per_s"] for p in plans}) == 1
    nb = plans[0].policy.num_gpu_batches
    for key, step in (("prefill_s", pipeline.step_s), ("decode_step_s", pipeline.ring_step_s)):
        assert plans[0].predictions[key] == pytest.approx(  # the run's step from the stages' own times
            step([p.predictions[f"stage_{key}"] for p in plans], nb), rel=1e-5)


def test_stage_programs_are_batch_major_hand_over_each_gpu_batch_and_fit(stage_plans):
    _, plans = stage_plans
    nb = plans[0].policy.num_gpu_batches
    for p in plans:
        sim = simulate_plan(p)
        assert sim.hazards == ()
        caps = {Tier.GPU: p.profile.gpu_bytes, Tier.CPU: p.profile.cpu_bytes, Tier.DISK: p.profile.disk_bytes}
        assert all(sim.peaks[t] <= p.predictions["peak_bytes"][t.value] <= caps[t] for t in TIERS)
        for ops in (p.programs.prefill, p.programs.decode):
            assert {op.layer for op in ops} == set(p.layers)
            computes = [(op.batch, op.layer) for op in ops if op.kind not in
                        (OpKind.RECV_HIDDEN, OpKind.SEND_HIDDEN) and op.stream.value == "compute"]
            assert computes == sorted(computes)  # gpu batch k through every layer, then k + 1
            recv = [op.batch for op in ops if op.kind is OpKind.RECV_HIDDEN]
            send = [op.batch for op in ops if op.kind is OpKind.SEND_HIDDEN]
            assert recv == ([] if p.stage.is_first else list(range(nb)))
            assert send == ([] if p.stage.is_last else list(range(nb)))
            assert all(op.layer == p.stage.first_layer for op in ops if op.kind is OpKind.RECV_HIDDEN)
            assert all(op.layer == p.stage.end_layer - 1 for op in ops if op.kind is OpKind.SEND_HIDDEN)
            # each gpu batch's tokens go round: from the last stage's head to the first stage's next embedding
            got = [op.batch for op in ops if op.kind is OpKind.RECV_TOKENS]
            assert got == (list(range(nb)) if p.stage.is_first and ops is p.programs.decode else [])
            sent = [op.batch for op in ops if op.kind is OpKind.SEND_TOKENS]
            assert sent == (list(range(nb)) if p.stage.is_last else [])


def test_the_split_balances_predicted_time_not_layer_counts():
    """SmolLM2's head (a 49152-word vocabulary) costs several decoder layers: the last stage gets fewer."""
    spec = catalog_spec(SMOL)
    plans = compile_pipeline(spec, load_profile("cpu-small"), Workload(64, 32), 2, gpu_batch_size=16,
                             num_gpu_batches=4)
    first, last = (p.stage for p in plans)
    assert last.num_layers < first.num_layers
    times = layer_times(spec, pipeline.stage_share(load_profile("cpu-small"), 2), Workload(64, 32), Block(16, 1))
    sums = [sum(times[s.first_layer:s.end_layer]) for s in (first, last)]
    even = spec.num_graph_layers // 2
    assert max(sums) < max(sum(times[:even]), sum(times[even:]))


def test_a_slow_stage_link_is_priced_and_can_bind():
    spec, wl = catalog_spec(SMOL), Workload(64, 32)
    fast, slow = (dataclasses.replace(load_profile("cpu-small"), stage_link_bytes_per_s=r) for r in (1e12, 1e5))
    kw = dict(gpu_batch_size=16, num_gpu_batches=4)
    a = compile_pipeline(spec, fast, wl, 2, **kw)
    b = compile_pipeline(spec, slow, wl, 2, **kw)
    assert b[0].predictions["tokens_per_s"] < a[0].predictions["tokens_per_s"] / 2
    assert b[0].predictions["binding"] == "stage link" and a[0].predictions["binding"] != "stage link"


@pytest.mark.parametrize("kwargs, message", [
    ({"compress": "weights"}, "dequantized again for every gpu batch"),
    ({"fixed": {"weights": P(0, 1, 0)}}, "keep their weights on their GPUs"),
])
def test_pipeline_options_it_cannot_honour_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compile_pipeline(catalog_spec(SMOL), load_profile("cpu-small"), Workload(64, 8), 2, **kwargs)


def test_more_stages_than_decoder_layers_are_refused():
    spec = catalog_spec(SMOL)
    with pytest.raises(ValueError, match="each stage needs one"):
        compile_pipeline(spec, load_profile("cpu-small"), Workload(16, 4), spec.num_layers + 1)


def test_compiling_a_pipeline_twice_gives_the_same_bytes():
    args = (catalog_spec(SMOL), load_profile("cpu-small"), Workload(32, 8), 3)
    assert planfile.dumps_set(compile_pipeline(*args)) == planfile.dumps_set(compile_pipeline(*args))


def test_pipeline_plan_files_round_trip_and_partial_or_edited_ones_are_refused(stage_plans, tmp_path):
    _, plans = stage_plans
    path = tmp_path / "pipe.fgplan"
    planfile.save_set(plans, path)
    assert planfile.load_set(path) == plans
    with pytest.raises(planfile.BadPlanFileError, match="not stages 0"):
        planfile.loads_set(planfile.dumps_set(plans[1:]))
    ops = list(plans[0].programs.decode)
    ops[-1] = dataclasses.replace(ops[-1], layer=plans[0].stage.end_layer)  # a layer of the next stage
    edited = dataclasses.replace(plans[0], programs=dataclasses.replace(plans[0].programs, decode=tuple(ops)))
    with pytest.raises(planfile.BadPlanFileError, match="outside this plan's layers"):
        planfile.loads(planfile.dumps(edited))
    with pytest.raises(ValueError, match="is not a stage"):
        Stage(2, 2, 0, 3)


# ---------------------------------------------------------------- runs over gloo

ENGINE_CASES = {  # family, stages, cache placement, CPU attention
    "opt-3-stages-cache-cpu-attended": ("opt", 3, P(0, 1, 0), True),
    "llama-3-stages-cache-disk": ("llama", 3, P(0, 0, 1), False),
    "qwen2-2-stages-cache-split": ("qwen2", 2, P(0.5, 0.25, 0.25), False),
}


def case_plans(spec, case: str) -> list:
    """The stage plans a case of ENGINE_CASES replays (tests/test_op_kinds.py reads their op kinds)."""
    _, stages, cache, cpu_attention = ENGINE_CASES[case]
    return compile_pipeline(spec, load_profile("cpu-small"), Workload(PROMPT_LEN, GEN_LEN), stages,
                            gpu_batch_size=2, num_gpu_batches=3, fixed={"cache": cache}, cpu_attention=cpu_attention)


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_stages_over_gloo_give_transformers_tokens(case, tmp_path):
    family, stages, cache, cpu_attention = ENGINE_CASES[case]
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "hf")
    store = import_hf_folder(tmp_path / "hf", tmp_path / "store")
    prompts = prompts_for(model.config.vocab_size)
    plans = case_plans(store.spec, case)
    assert all(p.policy.cache == cache and p.policy.cpu_attention == cpu_attention for p in plans)
    planfile.save_set(plans, tmp_path / "pipe.fgplan")
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path / "out.json"
    run = torchrun(stages, [str(ROOT / "tests" / "pipeline_worker.py")],
                   [str(tmp_path / "pipe.fgplan"), str(store.path), str(tmp_path / "prompts.json"), str(out)])
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(out.read_text()) == hf_generate(model, prompts)
    for p in plans:  # every stage saw the same tokens, and stayed within its plan's memory
        rank = json.loads(Path(f"{out}.rank{p.stage.index}").read_text())
        assert rank["tokens"] == json.loads(out.read_text())
        assert all(rank["peak"][t.value] <= p.predictions["peak_bytes"][t.value] for t in TIERS)


def test_when_every_sequence_is_done_early_every_stage_stops_after_the_same_step(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    store = import_hf_folder(tmp_path / "hf", tmp_path / "store")
    prompts = prompts_for(model.config.vocab_size)
    limits = [2, 3, 1, 3, 2]  # all done after the third token of 8
    plans = compile_pipeline(store.spec, load_profile("cpu-small"), Workload(PROMPT_LEN, GEN_LEN), 3,
                             gpu_batch_size=2, num_gpu_batches=3)
    planfile.save_set(plans, tmp_path / "pipe.fgplan")
    (tmp_path / "job.json").write_text(json.dumps({"prompts": prompts, "max_new_tokens": limits}))
    out = tmp_path / "out.json"
    run = torchrun(3, [str(ROOT / "tests" / "pipeline_worker.py")],
                   [str(tmp_path / "pipe.fgplan"), str(store.path), str(tmp_path / "job.json"), str(out)])
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(out.read_text()) == [t[:m] for t, m in zip(hf_generate(model, prompts), limits)]
    runs = {json.loads(Path(f"{out}.rank{r}").read_text())["runs"] for r in range(3)}
    # prefill and 3 decode steps: the stop is known after the third token, and every stage learns it
    # while it runs the next step
    assert runs == {4}


@pytest.fixture(scope="module")
def pipe_job(checkpoint, tmp_path_factory):  # noqa: F811
    """A 2-stage plan and its single-process twin (same block), an input with errors, a duplicate id,
    sampled lines and token limits, and the single-process output."""
    d = tmp_path_factory.mktemp("pp")
    common = ["--model", str(checkpoint), "--profile", "cpu-small", "--prompt-len", "8", "--gen-len", "6",
              "--gpu-batch-size", "2", "--num-gpu-batches", "2"]
    assert main(["compile", *common, "--stages", "2", "-o", str(d / "pipe.fgplan")]) == 0
    assert main(["compile", *common, "--weights-frac", "1,0,0", "-o", str(d / "single.fgplan")]) == 0
    recs = [{"id": f"p{i}", "prompt_ids": list(range(3, 4 + i % 6)), "max_tokens": 2 + i % 5} for i in range(14)]
    recs += [{"id": "hot", "prompt_ids": [7, 8, 9], "temperature": 1.3}, {"id": "p3", "prompt_ids": [5]},
             {"id": "too-long", "prompt_ids": list(range(3, 20))}, {"id": "warm", "prompt_ids": [4], "temperature": 0.7,
                                                                    "seed": 9}]
    inp = d / "in.jsonl"
    write_lines(inp, recs)
    with open(inp, "a") as f:
        f.write("{not json\n")
    ref = d / "ref.jsonl"
    assert main(["run", "--plan", str(d / "single.fgplan"), "--input", str(inp), "--output", str(ref),
                 "--cache-dir", str(d / "cache")]) == 3  # the errors file holds the bad lines
    return d / "pipe.fgplan", inp, ref


def pipe_run(job, out: Path, cache: Path, entry=("-m", "flexgen_graph"), env=None) -> subprocess.CompletedProcess:
    plan, inp, _ = job
    return torchrun(2, list(entry), ["run", "--plan", str(plan), "--input", str(inp), "--output", str(out),
                                     "--cache-dir", str(cache)], env=env)


def test_a_pipeline_run_writes_the_single_process_output(pipe_job, tmp_path):
    out = tmp_path / "out.jsonl"
    run = pipe_run(pipe_job, out, tmp_path / "cache")
    assert run.returncode == 0, run.stderr[-3000:]
    want = by_key(records(pipe_job[2]))
    assert by_key(records(out)) == want
    assert sum("token_ids" in r for r in want.values()) >= 15 and any("error" in r for r in want.values())
    assert run.stdout.count("prompts (") == 1  # stage 0 reports the run, once
    assert "stage 0 of 2" in run.stderr


def test_run_without_a_plan_compiles_and_caches_a_pipeline_for_the_job(pipe_job, checkpoint, tmp_path):  # noqa: F811
    _, inp, ref = pipe_job
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache"
    args = ["run", "--model", str(checkpoint), "--stages", "2", "--prompt-len", "8", "--gen-len", "6", "--input",
            str(inp), "--output", str(out), "--cache-dir", str(cache)]
    run = torchrun(2, ["-m", "flexgen_graph"], args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert by_key(records(out)) == by_key(records(ref))
    [cached] = (cache / "plans").glob("*.fgplan")  # stage 0 compiles for both
    assert [p.stage.index for p in planfile.load_set(cached)] == [0, 1]


def test_a_stage_killed_mid_block_then_a_relaunch_leaves_every_id_once(pipe_job, tmp_path):
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache"
    died = pipe_run(pipe_job, out, cache, entry=(str(ROOT / "tests" / "pipeline_fault.py"),),
                    env={"DIE_RANK": "1", "DIE_AT": "20"})  # stage 1, a few blocks in, inside a block
    assert died.returncode != 0
    kept = by_key(records(out))
    assert 0 < len(kept) < len(by_key(records(pipe_job[2])))
    again = pipe_run(pipe_job, out, cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert by_key(records(out)) == by_key(records(pipe_job[2]))  # each id once, the same records
    assert f"{sum('token_ids' in r for r in kept.values())} already done" in again.stdout


def test_a_stop_signal_to_one_stage_stops_every_stage_at_the_same_block_boundary(pipe_job, tmp_path):
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache"
    stopped = pipe_run(pipe_job, out, cache, entry=(str(ROOT / "tests" / "pipeline_fault.py"),),
                       env={"DIE_RANK": "1", "DIE_AT": "8", "DIE_SIGNAL": "SIGTERM"})  # in block 2 of 4
    assert stopped.returncode != 0
    assert "stopped by SIGTERM" in stopped.stderr  # stage 0 stopped too: it was not signalled
    kept = by_key(records(out))
    assert 0 < len(kept) < len(by_key(records(pipe_job[2])))
    again = pipe_run(pipe_job, out, cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert by_key(records(out)) == by_key(records(pipe_job[2]))


def test_a_pipeline_plan_needs_one_process_per_stage(pipe_job, tmp_path, capsys):
    plan, inp, _ = pipe_job
    assert main(["run", "--plan", str(plan), "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "launch it with torchrun, one process per stage" in capsys.readouterr().err
    run = torchrun(3, ["-m", "flexgen_graph"], ["run", "--plan", str(plan), "--input", str(inp), "--output",
                                                str(tmp_path / "o.jsonl"), "--cache-dir", str(tmp_path / "c")])
    assert run.returncode != 0 and "pipeline of 2 stages but 3 processes" in run.stderr


def test_compile_and_inspect_show_the_stages(pipe_job, capsys):
    assert main(["inspect", str(pipe_job[0])]) == 0
    text = capsys.readouterr().out
    assert re.search(r"stage +0 of 2: graph layers 0\.\.1;", text) and re.search(r"stage +1 of 2: graph layers 2\.\.3;", text)
