"""Stop strings: generation ends as soon as a sequence generates one of its stop strings (checked on the
host once per step), the text ends before it; per prompt in the Python API, per line in JSONL jobs."""

from __future__ import annotations

import json

import pytest

from flexgen_graph import LLM, SamplingParams
from flexgen_graph.app.jobs import OutputFile, load_tokenizer, run_job
from flexgen_graph.errors import UserError
from runtime.engine import Engine
from tests.test_numerics import tiny_model


def word_tokenizer(vocab: int):
    """A word-level tokenizer over "w0".."w{vocab-1}" (w0 pad, w1 bos, w2 eos): text without a download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", bos_token="w1", eos_token="w2")


@pytest.fixture(scope="module")
def worded(tmp_path_factory):
    """The tiny llama with a tokenizer: text prompts and stop strings."""
    model = tiny_model("llama")
    folder = tmp_path_factory.mktemp("hf-llama-words")
    model.save_pretrained(folder)
    word_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return model, folder, tmp_path_factory.mktemp("cache-words")


def test_stop_strings_end_generation_at_the_first_one(worded):
    model, folder, cache = worded
    ps = ["w5 w9 w33", "w100 w7", "w400 w401 w402 w403"]
    with LLM(str(folder), profile="cpu-small", cache_dir=cache) as llm:
        free = llm.generate(ps, SamplingParams(max_tokens=8), progress=False)
        assert all(o.finish_reason == "length" and len(o.token_ids) == 8 for o in free)
        words = free[0].text.split()
        stop = f"{words[3]} {words[4][:2]}"  # spans the 4th and 5th generated words
        other = free[1].text.split()[1]  # the 2nd word of prompt 1
        params = [SamplingParams(max_tokens=8, stop=[stop, "never"]), SamplingParams(max_tokens=8, stop=other),
                  SamplingParams(max_tokens=8)]
        got = llm.generate(ps, params, progress=False)
    assert got[0].text == free[0].text[:free[0].text.index(stop)] and got[0].finish_reason == "stop"
    assert got[0].token_ids == free[0].token_ids[:5]  # up to the token that completed the stop string
    assert got[1].text == free[1].text[:free[1].text.index(other)] and got[1].token_ids == free[1].token_ids[:2]
    assert got[2] == free[2]  # a neighbour without stop strings runs on


def test_stop_on_the_last_allowed_token_is_a_stop(worded):
    _, folder, cache = worded
    with LLM(str(folder), profile="cpu-small", cache_dir=cache) as llm:
        [free] = llm.generate(["w5 w9"], SamplingParams(max_tokens=3), progress=False)
        [got] = llm.generate(["w5 w9"], SamplingParams(max_tokens=3, stop=free.text.split()[-1]), progress=False)
    assert got.token_ids == free.token_ids and got.finish_reason == "stop"
    assert got.text == free.text[:free.text.rindex(free.text.split()[-1])]


def test_jsonl_lines_carry_their_stop_strings(worded, tmp_path):
    _, folder, cache = worded
    with LLM(str(folder), profile="cpu-small", cache_dir=cache) as llm:
        [free] = llm.generate(["w5 w9 w33"], SamplingParams(max_tokens=6), progress=False)
        plan = llm._engines.opened[0]
        store, tokenizer = llm.store, load_tokenizer(llm.store.path)
    stop = free.text.split()[2]
    lines = [{"id": "a", "prompt": "w5 w9 w33", "max_tokens": 6, "stop": stop},
             {"id": "b", "prompt": "w5 w9 w33", "max_tokens": 6, "stop": [stop, "w999 w998"]},
             {"id": "c", "prompt": "w5 w9 w33", "max_tokens": 6},
             {"id": "d", "prompt": "w5", "stop": ["ok", 3]}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = OutputFile(tmp_path / "out.jsonl")
    try:
        run_job([plan], lambda p: Engine(p, store), tokenizer, inp, out)
    finally:
        out.close()
    recs = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    cut = free.text[:free.text.index(stop)]
    assert recs["a"]["text"] == recs["b"]["text"] == cut and recs["a"]["finish_reason"] == "stop"
    assert recs["a"]["token_ids"] == list(free.token_ids[:3])
    assert recs["c"]["text"] == free.text and recs["c"]["finish_reason"] == "length"
    errors = {r["id"]: r for r in map(json.loads, (tmp_path / "out.errors.jsonl").read_text().splitlines())}
    assert "d" not in recs and errors["d"]["error"].startswith("stop must be a non-empty string or a list of them")


def test_stop_strings_without_a_tokenizer_are_refused(tmp_path):
    model = tiny_model("opt")
    model.save_pretrained(tmp_path / "hf")
    with LLM(str(tmp_path / "hf"), profile="cpu-small", cache_dir=tmp_path / "cache") as llm:
        with pytest.raises(UserError, match="prompt 1: stop strings need a tokenizer"):
            llm.generate([[5], [6]], [SamplingParams(), SamplingParams(stop="x")], progress=False)
