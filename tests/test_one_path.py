"""`flexgen-graph run` and `LLM.generate` are one path (app.session): the same prompts, with a stop string
that fires, a max_tokens that cuts and more prompts than a block, give the same texts, token ids and
finish reasons through both, native lines and OpenAI batch lines alike."""

from __future__ import annotations

import json

import pytest

from flexgen_graph import LLM, SamplingParams
from flexgen_graph.app.cli import main
from tests.test_llm import Updates
from tests.test_numerics import tiny_model
from tests.test_stops import word_tokenizer

PROMPTS = ["w5 w9 w33", "w100 w7", "w400 w401 w402 w403 w404 w405", "w12", "w77 w78 w79 w80", "w250 w3 w8"]
LIMITS = [8, 8, 3, 8, 8, 5]  # prompt 2 is cut by its max_tokens


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The tiny llama with a word tokenizer; each prompt's stop strings, one of which fires (taken from a
    run without them); and what LLM.generate gives with them, in blocks of at most 2."""
    model = tiny_model("llama")
    folder = tmp_path_factory.mktemp("hf-llama-one-path")
    model.save_pretrained(folder)
    word_tokenizer(model.config.vocab_size).save_pretrained(folder)
    cache = tmp_path_factory.mktemp("cache-one-path")
    with LLM(str(folder), profile="cpu-small", cache_dir=cache, max_block_size=2) as llm:
        free = llm.generate(PROMPTS, [SamplingParams(max_tokens=n) for n in LIMITS], progress=False)
        stops = [[], [], [], [], [], []]
        stops[0] = [" ".join(free[0].text.split()[2:4]), "w999 w998"]  # the 3rd and 4th generated words
        stops[4] = [free[4].text.split()[1]]
        bar = Updates()
        want = llm.generate(PROMPTS, [SamplingParams(max_tokens=n, stop=s) for n, s in zip(LIMITS, stops)],
                            progress=bar)
        name = llm.spec.name
    assert len(bar.calls) >= 3  # more prompts than a block
    assert want[0].finish_reason == want[4].finish_reason == "stop" and want[0].text != free[0].text
    assert want[2].finish_reason == "length" and len(want[2].token_ids) == 3
    return folder, cache, stops, want, name


def run(tmp_path, folder, cache, lines, capsys) -> list[dict]:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["run", "--model", str(folder), "--profile", "cpu-small", "--cache-dir", str(cache),
                 "--input", str(inp), "--output", str(out), "--max-block-size", "2"]) == 0
    assert "3 blocks" in capsys.readouterr().out  # six prompts in blocks of two
    return [json.loads(x) for x in out.read_text().splitlines()]


def test_run_and_generate_give_the_same_answers(job, tmp_path, capsys):
    folder, cache, stops, want, _ = job
    lines = [{"id": i, "prompt": p, "max_tokens": n, "stop": s}
             for i, (p, n, s) in enumerate(zip(PROMPTS, LIMITS, stops))]
    got = {r["id"]: r for r in run(tmp_path, folder, cache, lines, capsys)}
    assert [(got[i]["text"], tuple(got[i]["token_ids"]), got[i]["finish_reason"]) for i in range(len(PROMPTS))] == \
        [(o.text, o.token_ids, o.finish_reason) for o in want]


def test_openai_lines_give_the_same_answers(job, tmp_path, capsys):
    folder, cache, stops, want, name = job
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": name, "prompt": p, "max_tokens": n, **({"stop": s} if s else {})}}
             for i, (p, n, s) in enumerate(zip(PROMPTS, LIMITS, stops))]
    by_id = {r["custom_id"]: r["response"]["body"] for r in run(tmp_path, folder, cache, lines, capsys)}
    bodies = [by_id[f"r{i}"] for i in range(len(PROMPTS))]
    got = [(b["choices"][0]["text"], b["usage"]["completion_tokens"], b["choices"][0]["finish_reason"]) for b in bodies]
    assert got == [(o.text, len(o.token_ids), o.finish_reason) for o in want]
