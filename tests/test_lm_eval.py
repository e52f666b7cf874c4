"""The lm-eval backend: registered with lm-eval, per-request log-likelihoods and generations equal to lm-eval's
own `hf` backend on the same SmolLM2 weights (the local tasks in tests/lm_eval_tasks), bad input named.
Skipped when lm-eval is not installed (pip install 'flexgen-graph[eval]')."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from flexgen_graph.app.lmeval import FlexGenLM  # noqa: E402  (registers the backend)
from flexgen_graph.errors import UserError  # noqa: E402
from tests.test_numerics import tiny_model  # noqa: E402
from tests.test_stops import word_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "lm_eval_tasks"
LOCAL = ["flexgen_local_mc", "flexgen_local_gen", "flexgen_local_ppl"]


@pytest.fixture(scope="module")
def worded_lm(tmp_path_factory):
    """The backend over the tiny llama with a word-level tokenizer (64 positions)."""
    model = tiny_model("llama")
    folder = tmp_path_factory.mktemp("hf-words")
    model.save_pretrained(folder)
    word_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return FlexGenLM.create_from_arg_string(f"model={folder},profile=cpu-small,cache_dir={folder / 'cache'}",
                                            {"batch_size": 1, "max_batch_size": None, "device": None})


def ll(context: str, continuation: str, i: int = 0) -> Instance:
    return Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=i)


def test_registered_with_lm_eval_beside_its_own_models():
    from lm_eval.api.registry import model_registry

    assert get_model("flexgen-graph") is FlexGenLM
    assert "hf" in model_registry.keys()  # registering first must not hide lm-eval's own models


def test_an_unknown_model_args_key_is_named():
    with pytest.raises(UserError, match="unknown model_args key 'modle'"):
        FlexGenLM.create_from_arg_string("modle=facebook/opt-125m,profile=cpu-small", {"batch_size": 8})
    with pytest.raises(UserError, match="device 'mps' is not one of auto, cpu, cuda"):
        FlexGenLM.create_from_arg_string("profile=cpu-small", {"device": "mps"})


def test_the_command_line_knows_the_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flexgen_graph.app.lmeval", "--model", "flexgen-graph", "--model_args",
                          "profile=cpu-small,bogus=1", "--tasks", "flexgen_local_mc", "--include_path", str(TASKS)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode != 0 and "unknown model_args key 'bogus'" in out.stderr, out.stderr[-2000:]


def test_bad_requests_are_named_before_anything_runs(worded_lm):
    lm = worded_lm
    with pytest.raises(UserError, match=r"loglikelihood request 1 \(context \.\.\.'w5', continuation ''\): the "
                                        "continuation is empty"):
        lm.loglikelihood([ll("w5", " w6"), ll("w5", "", 1)])
    with pytest.raises(UserError, match="loglikelihood request 0 .*: context 70 \\+ continuation 1 tokens is longer "
                                        "than max_length 64"):
        lm.loglikelihood([ll(" ".join(["w7"] * 70), " w6")])
    gen = Instance(request_type="generate_until", doc={}, arguments=("w5 w6", {"until": ["w9"], "top_k": 5}), idx=0)
    with pytest.raises(UserError, match="generate_until request 0: generation kwarg 'top_k' is not supported"):
        lm.generate_until([gen])
    assert lm.llm._engines.opened == []


def test_results_follow_the_requests_order(worded_lm):
    lm = worded_lm
    reqs = [ll("w5 w6 w7 w8 w9", " w10"), ll("w5", " w6 w7"), ll("w11 w12", " w13")]
    each = [lm.loglikelihood([r])[0] for r in reqs]
    together = lm.loglikelihood(reqs)
    assert [s for s, _ in together] == pytest.approx([s for s, _ in each], abs=1e-5)
    assert [g for _, g in together] == [g for _, g in each]
    rolled = Instance(request_type="loglikelihood_rolling", doc={}, arguments=("w5 w6 w7 w8",), idx=0)
    [total] = lm.loglikelihood_rolling([rolled])
    # one window (the text fits): every token scored after the prefix token (BOS, w1) and the tokens before it
    pieces = lm.loglikelihood([ll("w1", " w5"), ll("w1 w5", " w6"), ll("w1 w5 w6", " w7"), ll("w1 w5 w6 w7", " w8")])
    assert total == pytest.approx(sum(s for s, _ in pieces), abs=1e-4)


@pytest.fixture(scope="module")
def smollm2_hf_folder(smollm2_store, tmp_path_factory):
    """The imported SmolLM2 written back as a Hugging Face folder: what lm-eval's hf backend loads."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from runtime.weight_store import hf_state_dict

    folder = tmp_path_factory.mktemp("smollm2-hf")
    model = LlamaForCausalLM(AutoConfig.from_pretrained(smollm2_store.path / "hf")).eval()
    model.load_state_dict(hf_state_dict(smollm2_store), strict=True)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_store.path / "hf").save_pretrained(folder)
    return folder


@pytest.mark.real_model
def test_local_tasks_equal_the_hf_backend(smollm2_cache, smollm2_hf_folder, monkeypatch, tmp_path):
    pytest.importorskip("accelerate", reason="lm-eval's hf backend needs accelerate (the bench extra)")
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)  # the tasks name their JSONL files from the repository root
    monkeypatch.setenv("XDG_CACHE_HOME", str(smollm2_cache.parent))  # model_args without a model: the embedded one
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tm = TaskManager(include_path=str(TASKS), include_defaults=False)
    ours = lm_eval.simple_evaluate(model="flexgen-graph", model_args="profile=cpu-small", tasks=LOCAL,
                                   task_manager=tm, log_samples=True)
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={smollm2_hf_folder},dtype=float32",
                                 tasks=LOCAL, task_manager=tm, device="cpu", batch_size=8, log_samples=True)
    for task in LOCAL:
        a, b = ours["samples"][task], hf["samples"][task]
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b]
        for x, y in zip(a, b):
            if task == "flexgen_local_gen":
                assert x["resps"] == y["resps"], x["doc"]  # the same text, cut at the same stop string
            else:  # per request: (log-likelihood, is_greedy), or a passage's rolling log-likelihood
                for (u,), (v,) in zip(x["resps"], y["resps"]):
                    u, v = (u, None) if task == "flexgen_local_ppl" else u, (v, None) if task == "flexgen_local_ppl" else v
                    assert u[0] == pytest.approx(v[0], abs=1e-4) and u[1] == v[1], x["doc"]
    for task, metric in (("flexgen_local_mc", "acc,none"), ("flexgen_local_mc", "acc_norm,none"),
                         ("flexgen_local_gen", "exact_match,last_word")):
        assert ours["results"][task][metric] == hf["results"][task][metric]
    assert ours["results"]["flexgen_local_ppl"]["word_perplexity,none"] == pytest.approx(
        hf["results"]["flexgen_local_ppl"]["word_perplexity,none"], rel=1e-4)
    assert ours["results"]["flexgen_local_mc"]["acc,none"] >= 0.5  # the model knows some answers: a real signal
