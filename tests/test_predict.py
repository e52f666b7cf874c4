"""planner.predict: the cost model on the work actually run, and `run`'s summary that reports it per plan."""

import json

import pytest

from flexgen_graph.app.api import compile_pipeline, compile_plan
from flexgen_graph.app.cli import main
from flexgen_graph.catalog import catalog_spec
from flexgen_graph.hardware import load_profile
from flexgen_graph.ir import Workload
from flexgen_graph.policy import Placement
from planner.predict import BlockRun, full_block, predict_plan
from tests.test_cli import checkpoint  # noqa: F401  (the tiny Llama checkpoint fixture)

GPU, CPU, DISK = Placement(1, 0, 0), Placement(0, 1, 0), Placement(0, 0, 1)
OPT = catalog_spec("facebook/opt-125m")
WL = Workload(32, 16)


def _plan(weights=GPU, cache=GPU, hidden=GPU, **kw):
    return compile_plan(OPT, load_profile("cpu-small"), WL, gpu_batch_size=4, num_gpu_batches=4,
                        fixed={"weights": weights, "cache": cache, "hidden": hidden}, **kw)


def _same(a: float, b: float) -> bool:
    return a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("case", ["searched", "weights-disk", "cache-cpu-attention", "compressed", "t4-opt-30b"])
def test_a_full_block_of_full_length_generations_is_the_plans_own_prediction(case):
    if case == "searched":
        plan = compile_plan(OPT, load_profile("cpu-small"), WL)
    elif case == "weights-disk":
        plan = _plan(weights=DISK, hidden=CPU)
    elif case == "cache-cpu-attention":
        plan = _plan(cache=CPU, cpu_attention=True)
    elif case == "compressed":
        plan = _plan(weights=CPU, cache=DISK, compress="both")
    else:
        plan = compile_plan(catalog_spec("facebook/opt-30b").with_dtype("float16"), load_profile("t4-flexgen"),
                            Workload(512, 32))
    w = predict_plan(plan, [full_block(plan)])
    assert _same(w.tokens_per_s, plan.predictions["tokens_per_s"]) and _same(w.seconds, plan.predictions["total_s"])
    assert _same(w.prefill_s, plan.predictions["prefill_s"])
    two = predict_plan(plan, [full_block(plan)] * 2)  # blocks add up
    assert _same(two.seconds, 2 * w.seconds) and _same(two.tokens_per_s, w.tokens_per_s)


def test_pipeline_stage_full_block_is_the_pipelines_prediction():
    for plan in compile_pipeline(OPT, load_profile("cpu-small"), WL, 2):
        assert _same(predict_plan(plan, [full_block(plan)]).tokens_per_s, plan.predictions["tokens_per_s"])


def test_unfilled_and_partly_filled_gpu_batches_everything_on_the_gpu():
    """No byte moves: each gpu batch costs its compute alone, so half the sequences cost half, and a partly
    filled gpu batch costs what a block of that one batch costs."""
    plan = _plan()
    t = {n: predict_plan(plan, [BlockRun(n, WL.gen_len - 1)]).seconds for n in (1, 4, 5, 8, 16)}
    assert _same(t[8], t[16] / 2) and _same(t[4], t[16] / 4)
    assert _same(t[5], t[4] + t[1])
    assert t[1] > t[16] / 16  # a row costs more alone (the profile's matmul_min_rows)


def test_weights_on_disk_cost_a_decode_step_whatever_the_fill():
    """Weights read from disk every step bind the load stream: one sequence's decode steps cost what a
    full block's do, each step every layer's bytes over gpu<-cpu and cpu<-disk."""
    plan = _plan(weights=DISK)
    prof, steps = plan.profile, WL.gen_len - 1
    one, full = predict_plan(plan, [BlockRun(1, steps)]), predict_plan(plan, [full_block(plan)])
    wb = sum(OPT.layer_bytes(j) for j in range(OPT.num_graph_layers))
    hand = steps * wb * (1 / prof.gpu_from_cpu_bytes_per_s + 1 / prof.cpu_from_disk_bytes_per_s)
    assert _same(one.decode_s, hand) and _same(full.decode_s, hand)


def test_early_stops_price_the_steps_run_at_their_contexts():
    """A block that stops after s decode steps costs prefill plus s steps at their average context
    (prompt + (s + 1) / 2): with nothing moving, a step's cost is linear in its context."""
    plan = _plan()
    n = plan.block_size
    pre = predict_plan(plan, [BlockRun(n, 0)])
    assert pre.decode_s == 0 and _same(pre.seconds, plan.predictions["prefill_s"])
    per_step = {s: predict_plan(plan, [BlockRun(n, s)]).decode_s / s for s in (1, 5, 9, 15)}
    assert per_step[1] < per_step[5] < per_step[15]
    assert _same(per_step[9] - per_step[5], per_step[5] - per_step[1])  # ctx grows by 2 each time
    assert _same(per_step[15], plan.predictions["decode_step_s"])
    stopped = predict_plan(plan, [BlockRun(n, 5, tokens=40)])
    assert stopped.tokens == 40 and _same(stopped.tokens_per_s, 40 / stopped.seconds)


def test_a_block_of_more_sequences_or_steps_than_the_plan_is_refused():
    plan = _plan()
    with pytest.raises(ValueError, match="holds 1..16"):
        predict_plan(plan, [BlockRun(17, 1)])
    with pytest.raises(ValueError, match="at most 15 decode steps"):
        predict_plan(plan, [BlockRun(4, 16)])


def test_run_summary_reports_the_prediction_for_the_blocks_run_per_plan(checkpoint, tmp_path, capsys):  # noqa: F811
    from flexgen_graph import planfile

    plan_path = tmp_path / "set.fgplan"
    assert main(["compile", "--model", str(checkpoint), "--profile", "cpu-small", "--prompt-len", "4,8",
                 "--gen-len", "6", "--gpu-batch-size", "2", "--num-gpu-batches", "2", "-o", str(plan_path)]) == 0
    plans = planfile.load_set(plan_path)
    # 5 short prompts (blocks of 4 and 1), 2 long ones (a block of 2); max_tokens sets each block's steps
    lines = [{"id": i, "prompt_ids": [3 + i] * (1 + i % 3), "max_tokens": 1 + i % 4} for i in range(5)]
    lines += [{"id": 10 + i, "prompt_ids": [7] * 6, "max_tokens": 3} for i in range(2)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    capsys.readouterr()
    assert main(["run", "--plan", str(plan_path), "--input", str(inp), "--output", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    text = capsys.readouterr().out
    got = {r["id"]: len(r["token_ids"]) for r in map(json.loads, out.read_text().splitlines())}
    blocks = {4: [BlockRun(4, max(got[i] for i in range(4)) - 1, sum(got[i] for i in range(4))),
                  BlockRun(1, got[4] - 1, got[4])],
              8: [BlockRun(2, max(got[10], got[11]) - 1, got[10] + got[11])]}
    for plan in plans:
        want = predict_plan(plan, blocks[plan.workload.prompt_len])
        runs = [x for x in text.splitlines() if x.startswith(f"  plan prompt {plan.workload.prompt_len}, gen 6:")]
        assert len(runs) == 1, text
        seqs = sum(b.sequences for b in blocks[plan.workload.prompt_len])
        steps = sum(b.decode_steps for b in blocks[plan.workload.prompt_len])
        assert f"{seqs} sequences, {steps} decode steps" in runs[0]
        assert f"predicted {want.tokens_per_s:.1f}; full blocks" in runs[0]
        assert f"full-length generations: {plan.predictions['tokens_per_s']:.1f}" in runs[0]
    assert "(predicted: cost model on the blocks run" in text


def test_data_parallel_summaries_combine_per_plan():
    """Ranks run their blocks at once: a plan's tokens add up, its measured and predicted seconds are the
    slowest rank's; a plan only one rank ran is kept."""
    from flexgen_graph.app.distributed import combine
    from flexgen_graph.app.jobs import JobSummary, PlanRun

    a = JobSummary(tokens=30, plans=[PlanRun(8, 6, 100.0, [BlockRun(2, 5, 10)], 10, 2.0, 1.0),
                                     PlanRun(16, 6, 50.0, [BlockRun(2, 5, 20)], 20, 3.0, 2.0)])
    b = JobSummary(tokens=12, plans=[PlanRun(8, 6, 100.0, [BlockRun(2, 5, 12)], 12, 1.5, 1.5)])
    total = combine([a, b])
    short, long = total.plans
    assert (short.tokens, short.block_s, short.predicted_s, len(short.blocks)) == (22, 2.0, 1.5, 2)
    assert (long.tokens, long.block_s, long.predicted_s) == (20, 3.0, 2.0)
    assert len(a.plans[0].blocks) == 1  # the ranks' own summaries are left as they were
    assert any("plan prompt 16, gen 6: 1 block, 2 sequences, 5 decode steps" in x for x in total.lines())
