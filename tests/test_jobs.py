"""Production runs: crash-safe output, resume after SIGKILL, input errors, sampling, measured peaks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexgen_graph.app.api import compile_plan
from flexgen_graph.app.jobs import OutputFile, errors_path, run_job
from flexgen_graph.app.models import store_dir
from flexgen_graph.catalog import DEFAULT_MODEL, catalog_spec
from flexgen_graph.hardware import load_profile
from flexgen_graph.ir import Workload
from flexgen_graph.policy import Placement
from flexgen_graph.spec import spec_from_config
from runtime.engine import Engine
from runtime.sampling import Sampling
from runtime.weight_store import make_dummy

ROOT = Path(__file__).resolve().parents[1]


def tiny_spec():
    cfg = SimpleNamespace(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=48, vocab_size=200, max_position_embeddings=64,
                          rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return spec_from_config(cfg, name="tiny")


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    return make_dummy(tiny_spec(), tmp_path_factory.mktemp("tiny-store"), seed=3)


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def run_tiny(store, inp, out_path, plans, defaults=Sampling()):
    out = OutputFile(out_path)
    try:
        return run_job(plans, lambda p: Engine(p, store), None, inp, out, defaults=defaults)
    finally:
        out.close()


def tiny_plans(store, lens=(8,), gbs=2):
    return [compile_plan(store.spec, load_profile("cpu-small"), Workload(n, 6), gpu_batch_size=gbs,
                         num_gpu_batches=1) for n in lens]


def test_resume_skips_done_ids_and_repairs_a_torn_line(tiny_store, tmp_path):
    inp = tmp_path / "in.jsonl"
    write_lines(inp, [{"id": i, "prompt_ids": [3 + i, 4, 5]} for i in range(5)])
    out = tmp_path / "out.jsonl"
    first = run_tiny(tiny_store, inp, out, tiny_plans(tiny_store))
    assert first.prompts == 5
    complete = out.read_text()
    out.write_text(complete.splitlines(keepends=True)[0] + '{"id": 1, "text": nu')  # crash mid-record
    again = run_tiny(tiny_store, inp, out, tiny_plans(tiny_store))
    assert again.skipped == 1 and again.prompts == 4
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == list(range(5))
    assert {r["id"]: r["token_ids"] for r in recs} == {json.loads(x)["id"]: json.loads(x)["token_ids"]
                                                       for x in complete.splitlines()}


def errors_of(out_path) -> list[dict]:
    path = errors_path(out_path)
    return [json.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def test_a_duplicate_id_is_an_error_on_every_run_and_never_counts_as_done(tiny_store, tmp_path):
    # error records go to the errors file (not the output), which every run rewrites: a duplicate line stays
    # reported after its id was answered, and an old error record in the output never makes an id done
    inp = tmp_path / "in.jsonl"
    write_lines(inp, [{"id": 0, "prompt_ids": [3, 4]}, {"id": 1, "prompt_ids": [5]}, {"id": 0, "prompt_ids": [6]}])
    out = tmp_path / "out.jsonl"
    first = run_tiny(tiny_store, inp, out, tiny_plans(tiny_store))
    assert first.errors == 1 and sorted(json.loads(x)["id"] for x in out.read_text().splitlines()) == [0, 1]
    [dup] = errors_of(out)
    assert dup["line"] == 3 and dup["id"] == 0 and "first on line 1" in dup["error"]
    out.write_text(json.dumps(dup) + "\n")  # an output holding only an error record (as an older version wrote)
    again = run_tiny(tiny_store, inp, out, tiny_plans(tiny_store))
    assert again.prompts == 2 and again.skipped == 0 and again.errors == 1
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert recs[0] == dup and sorted(r["id"] for r in recs[1:]) == [0, 1]  # left for the user, not counted
    assert errors_of(out) == [dup]
    third = run_tiny(tiny_store, inp, out, tiny_plans(tiny_store))
    assert (third.prompts, third.skipped, third.errors) == (0, 2, 1) and errors_of(out) == [dup]


def test_plan_set_routes_each_prompt_to_the_smallest_plan_that_fits(tiny_store, tmp_path):
    inp = tmp_path / "in.jsonl"
    write_lines(inp, [{"id": "short", "prompt_ids": [5, 6]}, {"id": "long", "prompt_ids": list(range(3, 15))},
                      {"id": "too-long", "prompt_ids": list(range(3, 30))},
                      {"id": "bad", "prompt_ids": "x"}, {"id": "t", "prompt_ids": [4], "temperature": -1}])
    plans = tiny_plans(tiny_store, lens=(4, 16))
    used = []

    def open_engine(p):
        used.append(p.workload.prompt_len)
        return Engine(p, tiny_store)

    out = OutputFile(tmp_path / "out.jsonl")
    summary = run_job(plans, open_engine, None, inp, out)
    out.close()
    answers = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    recs = {r["id"]: r for r in errors_of(tmp_path / "out.jsonl")}
    assert sorted(answers) == ["long", "short"] and sorted(recs) == ["bad", "t", "too-long"]
    assert used == [4, 16] and summary.prompts == 2 and summary.errors == 3
    assert "at most 16 prompt tokens" in recs["too-long"]["error"]
    assert "prompt_ids" in recs["bad"]["error"] and "temperature" in recs["t"]["error"]


def test_sampling_is_reproducible_per_id_and_differs_from_greedy(tiny_store, tmp_path):
    inp = tmp_path / "in.jsonl"
    write_lines(inp, [{"id": i, "prompt_ids": [3 + i, 9], "temperature": 1.5, "seed": 7} for i in range(3)])
    a = tmp_path / "a.jsonl"
    run_tiny(tiny_store, inp, a, tiny_plans(tiny_store, gbs=2))
    b = tmp_path / "b.jsonl"
    run_tiny(tiny_store, inp, b, tiny_plans(tiny_store, gbs=3))  # another block layout
    ids = lambda p: {r["id"]: r["token_ids"] for r in map(json.loads, p.read_text().splitlines())}  # noqa: E731
    assert ids(a) == ids(b)
    write_lines(inp, [{"id": i, "prompt_ids": [3 + i, 9]} for i in range(3)])
    g = tmp_path / "g.jsonl"
    run_tiny(tiny_store, inp, g, tiny_plans(tiny_store))
    assert ids(g) != ids(a)


FRACS = st.sampled_from([Placement(1, 0, 0), Placement(0, 1, 0), Placement(0, 0, 1), Placement(0.5, 0.5, 0),
                         Placement(0, 0.5, 0.5)])


@settings(max_examples=12, deadline=None)
@given(w=FRACS, c=FRACS, h=FRACS, gbs=st.integers(1, 3), nb=st.integers(1, 3), cpu_attention=st.booleans())
def test_measured_peak_never_exceeds_the_plans_prediction(tiny_store, tmp_path_factory, w, c, h, gbs, nb,
                                                         cpu_attention):
    plan = compile_plan(tiny_store.spec, load_profile("cpu-small"), Workload(6, 4), gpu_batch_size=gbs,
                        num_gpu_batches=nb, fixed={"weights": w, "cache": c, "hidden": h},
                        cpu_attention=cpu_attention)
    with Engine(plan, tiny_store, tmp_path_factory.mktemp("off")) as engine:
        engine.generate([[5, 6, 7]] * (gbs * nb))
        measured = engine.peak_bytes
    for tier, n in measured.items():
        assert n <= plan.predictions["peak_bytes"][tier], tier
    assert measured["gpu"] > 0


@pytest.mark.real_model
def test_sigkill_mid_run_then_resume_gives_each_id_once(smollm2_store, tmp_path):
    cache = tmp_path / "cache"
    spec = catalog_spec(DEFAULT_MODEL)
    dest = store_dir("default", spec, cache)
    dest.parent.mkdir(parents=True)
    dest.symlink_to(smollm2_store.path)  # reuse the session's import instead of a 13 s re-import
    plan = tmp_path / "p.fgplan"
    assert subprocess.run([sys.executable, "-m", "flexgen_graph", "compile", "--model", DEFAULT_MODEL,
                           "--prompt-len", "48", "--gen-len", "10", "--gpu-batch-size", "2",
                           "--num-gpu-batches", "1", "-o", str(plan)], cwd=ROOT).returncode == 0
    prompts = [json.loads(x) for x in (ROOT / "examples/sample_prompts.jsonl").read_text().splitlines()[:8]]
    inp = tmp_path / "in.jsonl"
    write_lines(inp, prompts)
    cmd = [sys.executable, "-m", "flexgen_graph", "run", "--plan", str(plan), "--input", str(inp),
           "--cache-dir", str(cache)]
    ref = tmp_path / "ref.jsonl"
    assert subprocess.run(cmd + ["--output", str(ref)], cwd=ROOT, capture_output=True).returncode == 0

    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(cmd + ["--output", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = out.read_text().count("\n")
    assert 2 <= partial < len(prompts), "the kill should land mid-job"
    assert subprocess.run(cmd + ["--output", str(out)], cwd=ROOT, capture_output=True).returncode == 0

    got = [json.loads(x) for x in out.read_text().splitlines()]
    want = {r["id"]: r["text"] for r in map(json.loads, ref.read_text().splitlines())}
    assert sorted(r["id"] for r in got) == sorted(want)  # each id exactly once
    assert {r["id"]: r["text"] for r in got} == want


# strings of any code points, lone surrogates (which st.text never draws) as often as the rest
ANY_TEXT = st.lists(st.one_of(st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"]),
                              st.characters(blacklist_categories=())), max_size=3).map("".join)


@settings(max_examples=12, deadline=None)
@given(ids=st.lists(ANY_TEXT, min_size=1, max_size=4), extra=ANY_TEXT)
def test_any_code_point_in_a_line_gets_one_answer_or_one_error_on_every_run(tiny_store, tmp_path_factory, ids, extra):
    """Ids and strings of any code points (a lone surrogate is valid JSON, not Unicode): each line gets exactly
    one answer or one error record, on the first run and on a re-run; nothing crashes writing a record."""
    d = tmp_path_factory.mktemp("unicode")
    inp, out = d / "in.jsonl", d / "out.jsonl"
    write_lines(inp, [{"id": rid, "prompt_ids": [3 + i, 4], "stop": [extra] if extra else []}
                      for i, rid in enumerate(ids)])
    for _ in range(2):
        s = run_tiny(tiny_store, inp, out, tiny_plans(tiny_store))
        answers = [json.loads(x) for x in out.read_bytes().splitlines()]
        errs = errors_of(out)
        assert len({json.dumps(a["id"]) for a in answers}) + len(errs) == len(ids)
        assert s.errors == len(errs)


def test_a_lone_surrogate_is_refused_naming_where_and_the_rest_answered(tiny_store, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "ok", "prompt_ids": [3, 4]}\n{"id": "s", "prompt_ids": [5], "stop": ["a\\ud800"]}\n'
                   '{"id": "bad \\udfff id", "prompt_ids": [6]}\n')
    for _ in range(2):  # the same on a re-run: never a crash that every re-run repeats
        s = run_tiny(tiny_store, inp, out, tiny_plans(tiny_store))
        assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["ok"]
        e = {x.get("id", x["line"]): x["error"] for x in errors_of(out)}
        assert e == {"s": "line 2: stop[0] holds a lone surrogate (a\\ud800), which is not Unicode",
                     3: "line 3: id holds a lone surrogate (bad \\udfff id), which is not Unicode"}, e
        assert s.errors == 2


@pytest.mark.parametrize("last,kept", [("last line no newline", True), ('{"id": 1, "text": nu', False)])
def test_only_a_torn_record_of_ours_is_cut_from_the_output(tiny_store, tmp_path, capsys, last, kept):
    """An unterminated last line is cut only when it is the start of a record this program writes and no whole
    JSON value; anything else is kept (a newline added after it) and named as not an answer."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, [{"id": i, "prompt_ids": [3 + i, 4]} for i in range(2)])
    out.write_text(last)
    run_tiny(tiny_store, inp, out, tiny_plans(tiny_store))
    lines = out.read_text().splitlines()
    assert (lines[0] == last) == kept and len(lines) == 2 + kept
    assert sorted(json.loads(x)["id"] for x in lines[kept:]) == [0, 1]
    assert ("added one" if kept else "cut off a torn last line") in capsys.readouterr().err


def test_a_whole_answer_without_a_final_newline_counts_as_done(tiny_store, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, [{"id": i, "prompt_ids": [3 + i, 4]} for i in range(3)])
    run_tiny(tiny_store, inp, out, tiny_plans(tiny_store))
    whole = out.read_text()
    out.write_text(whole.rstrip("\n"))
    again = run_tiny(tiny_store, inp, out, tiny_plans(tiny_store))
    assert again.skipped == 3 and again.prompts == 0 and out.read_text() == whole


@pytest.mark.parametrize("msgs,why", [
    ([{"role": "wizard", "content": "hi"}], "messages[0].role 'wizard' not supported (known: system, developer"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": "x", "name": "n"}],
     "messages[1]: field(s) ['name'] not supported"),
    ([{"role": "user", "content": 5}], "messages[0].content must be a string, got int"),
    ([], "messages must be a non-empty list"),
])
def test_a_chat_a_template_cannot_take_is_refused_naming_the_message(msgs, why):
    from flexgen_graph.app.jobs import parse_line
    got = parse_line(json.dumps({"id": "c", "messages": msgs}), 1, tokenizer=object())
    assert why in got.message, got.message


def test_stale_temporary_files_of_a_killed_import_are_removed_and_a_live_ones_kept(tmp_path):
    from runtime.integrity import remove_stale_tmp
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = tmp_path / f"a.bin.tmp-{dead.pid}", tmp_path / f"b.bin.tmp-{os.getpid()}"
    for f in (stale, live, tmp_path / "c.bin"):
        f.write_bytes(b"x")
    assert remove_stale_tmp(tmp_path) == [stale]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["b.bin.tmp-" + str(os.getpid()), "c.bin"]


@pytest.mark.parametrize("lines,want", [
    ([{"id": i, "prompt_ids": [3, 4], "max_tokens": 1} for i in range(5)], (5, 2, 1)),  # every line says its own
    # one line does not: the default 64 new tokens, within the model's 64 positions after the prompt's 8
    ([{"id": 0, "prompt_ids": [3] * 5, "max_tokens": 3}, {"id": 1, "prompt_ids": [3]}], (2, 8, 56)),
    ([{"id": 0, "prompt_ids": [3] * 17, "max_tokens": 2}], (1, 32, 2)),
])
def test_run_sizes_its_plan_from_the_jobs_own_lengths_and_max_tokens(tmp_path, lines, want):
    """A 3,000-line job of 1-token answers ran a plan of 16 prompt and 64 new tokens (8x the time): the plan's
    prompt length rounds the longest prompt up (a power of two below 16), its new tokens are the largest
    max_tokens when every line gives one, else the default."""
    from flexgen_graph.app.jobs import job_workload
    inp = tmp_path / "in.jsonl"
    write_lines(inp, lines)
    assert job_workload(inp, None, Sampling(), tiny_spec()) == want


def test_a_repeated_id_that_is_not_unicode_gets_its_error_record_too(tiny_store, tmp_path):
    """Found by the property test above: the second line of a repeated id holding a lone surrogate crashed the
    job writing its duplicate-id record (the id cannot be written); it is refused as not Unicode instead."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "\\ud800", "prompt_ids": [3]}\n{"id": "\\ud800", "prompt_ids": [4]}\n')
    for _ in range(2):
        s = run_tiny(tiny_store, inp, out, tiny_plans(tiny_store))
        assert s.errors == 2 and out.read_text() == ""
        assert [e["line"] for e in errors_of(out)] == [1, 2] and all("surrogate" in e["error"] for e in errors_of(out))
