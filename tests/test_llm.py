"""The Python API: LLM.generate equals transformers on tiny models, block after block; bad input is refused
before any block runs; `import flexgen_graph` stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexgen_graph import LLM, SamplingParams
from flexgen_graph.app.api import compile_plan
from flexgen_graph.errors import UserError
from flexgen_graph.hardware import load_profile
from flexgen_graph.ir import Workload
from tests.test_numerics import hf_generate, tiny_model

ROOT = Path(__file__).resolve().parents[1]


class Updates:
    """A progress sink: records each update."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def update(self, n: int) -> None:
        self.calls.append(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tiny_model("llama")
    folder = tmp_path_factory.mktemp("hf-llama")
    model.save_pretrained(folder)
    return model, folder, tmp_path_factory.mktemp("cache")


def prompts(vocab: int, lengths=(3, 11, 7, 1, 20, 5, 9)) -> list[list[int]]:
    g = torch.Generator().manual_seed(4)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def test_generate_equals_transformers_over_several_blocks(tiny):
    model, folder, cache = tiny
    ps = prompts(model.config.vocab_size)
    want = [hf_generate(model, [p], gen_len=6, prompt_len=len(p))[0] for p in ps]
    bar = Updates()
    with LLM(str(folder), profile="cpu-small", cache_dir=cache, max_block_size=2) as llm:
        outs = llm.generate(ps, SamplingParams(max_tokens=6), progress=bar)
        opened = [p.workload.prompt_len for p in llm._engines.opened]
    assert [list(o.token_ids) for o in outs] == want
    assert all(o.text is None for o in outs)  # a checkpoint without a tokenizer
    assert [o.finish_reason for o in outs] == ["stop" if w[-1] == model.config.eos_token_id else "length" for w in want]
    assert sum(bar.calls) == len(ps) and len(bar.calls) >= 4  # blocks of at most 2
    assert opened == sorted(opened, reverse=True) and opened[0] == 32  # longest first, 20 tokens -> a 32-token plan


def test_a_seeded_sequence_does_not_depend_on_its_block(tiny):
    model, folder, cache = tiny
    ps = prompts(model.config.vocab_size)[:3]
    hot = [SamplingParams(max_tokens=5, temperature=1.0, seed=s) for s in (7, 8, 9)]
    with LLM(str(folder), profile="cpu-small", cache_dir=cache) as llm:
        together = llm.generate(ps, hot, progress=False)
        alone = llm.generate([ps[1]], hot[1], progress=False)
        greedy = llm.generate([ps[1]], SamplingParams(max_tokens=5), progress=False)
    assert together[1] == alone[0]
    assert together[1].token_ids != greedy[0].token_ids or together[0].token_ids != together[2].token_ids


def test_given_plans_are_routed_and_a_prompt_no_plan_takes_is_refused(tiny, tmp_path):
    model, folder, cache = tiny
    with LLM(str(folder), profile="cpu-small", cache_dir=cache) as probe:
        spec = probe.spec
    plans = [compile_plan(spec, load_profile("cpu-small"), Workload(n, 4), gpu_batch_size=2, num_gpu_batches=1,
                          weights_source=f"hf:{folder}") for n in (8, 16)]
    ps = prompts(model.config.vocab_size, (3, 12, 6))
    with LLM(plan=plans, cache_dir=cache) as llm:
        outs = llm.generate(ps, SamplingParams(max_tokens=4), progress=False)
        used = [p.workload.prompt_len for p in llm._engines.opened]
        assert [list(o.token_ids) for o in outs] == [hf_generate(model, [p], 4, len(p))[0] for p in ps]
        assert used == [16, 8]
        with pytest.raises(UserError, match="prompt 1 has 17 tokens and max_tokens 4: no given plan takes it"):
            llm.generate([[5], [5] * 17], SamplingParams(max_tokens=4), progress=False)
        with pytest.raises(UserError, match="prompt 0 has 3 tokens and max_tokens 5"):
            llm.generate([[5] * 3], SamplingParams(max_tokens=5), progress=False)
        assert [p.workload.prompt_len for p in llm._engines.opened] == used  # nothing ran
    with pytest.raises(UserError, match="give plan or model"):
        LLM(str(folder), plan=plans)


@pytest.mark.parametrize("prompt,msg", [
    ([], "prompt 1 is empty"),
    ([3, 1000], "prompt 1: token id 1000 is outside"),
    ("text", "prompt 1: these weights come without a tokenizer"),
    ([{"role": "user"}], "prompt 1: chat messages must be"),
    (3.5, "prompt 1: expected a string, a list of chat messages or a list of token ids"),
    ([4, 5.0], r"prompt 1: token ids must be integers, got 5.0 \(float\)"),
    ([4, True], r"prompt 1: token ids must be integers, got True \(bool\)"),
    ([5] * 60, "prompt 1 has 60 tokens and max_tokens 8: longer than"),
])
def test_bad_prompts_are_named_before_anything_runs(tiny, prompt, msg):
    _, folder, cache = tiny
    with LLM(str(folder), profile="cpu-small", cache_dir=cache) as llm:
        with pytest.raises(UserError, match=msg):
            llm.generate([[4, 5], prompt], SamplingParams(max_tokens=8), progress=False)
        assert llm._engines.opened == []


def test_calls_that_cannot_mean_anything_are_refused_in_one_line(tiny):
    _, folder, cache = tiny
    llm = LLM(str(folder), profile="cpu-small", cache_dir=cache)
    with pytest.raises(UserError, match="generate: prompts must be .* got int"):
        llm.generate(5, progress=False)
    with pytest.raises(UserError, match=r"sampling: give one SamplingParams or one per prompt \(1\), got dict"):
        llm.generate([[4, 5]], {"max_tokens": 2}, progress=False)
    assert len(llm.generate([[4, 5]], SamplingParams(max_tokens=2), progress=False)) == 1
    llm.close()
    for call in (lambda: llm.generate([[4, 5]], progress=False), lambda: llm.score([[4]], [[5]], progress=False)):
        with pytest.raises(UserError, match="this LLM was closed"):
            call()


def test_two_threads_on_one_llm_each_get_their_own_answers(tiny):
    """One engine computes one call at a time: concurrent calls wait their turn, and each thread gets exactly
    what it would alone (they once interleaved blocks on the engine: a crash in one, a wrong answer in the other)."""
    import threading
    model, folder, cache = tiny
    ps = prompts(model.config.vocab_size)
    with LLM(str(folder), profile="cpu-small", cache_dir=cache, max_block_size=2) as llm:
        alone = [llm.generate(ps[i::2], SamplingParams(max_tokens=5), progress=False) for i in (0, 1)]
        got, errors = [None, None], []

        def call(i: int) -> None:
            try:
                got[i] = llm.generate(ps[i::2], SamplingParams(max_tokens=5), progress=False)
            except BaseException as e:  # noqa: BLE001 (the test reports it)
                errors.append(e)
        threads = [threading.Thread(target=call, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert [[o.token_ids for o in g] for g in got] == [[o.token_ids for o in a] for a in alone]


def test_sampling_params_are_checked():
    for seed in (-1, 2 ** 64):
        with pytest.raises(UserError, match=r"seed must be in \[0, 2\*\*64\)"):
            SamplingParams(seed=seed)
    assert SamplingParams(seed=2 ** 64 - 1).seed == 2 ** 64 - 1
    with pytest.raises(UserError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(UserError, match="max_tokens"):
        SamplingParams(max_tokens=2.5)
    with pytest.raises(UserError, match="stop must be a non-empty string"):
        SamplingParams(stop=["ok", ""])


def test_import_flexgen_graph_stays_light_and_hands_out_the_api():
    code = ("import sys, flexgen_graph, flexgen_graph.ir; heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'runtime', 'planner') or m.startswith('flexgen_graph.app')); "
            "from flexgen_graph import LLM, SamplingParams, Output; import flexgen_graph.app.llm as m; "
            "print(heavy, LLM is m.LLM and SamplingParams is m.SamplingParams and Output is m.Output)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[] True", out.stdout


@pytest.mark.real_model
def test_doctests_of_the_api(smollm2_cache, monkeypatch):
    import doctest

    import flexgen_graph.app.llm as mod

    monkeypatch.setenv("XDG_CACHE_HOME", str(smollm2_cache.parent))  # the default cache: the session's import
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0
