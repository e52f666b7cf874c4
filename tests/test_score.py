"""Scoring plans: a prefill-only workload whose head gives log-probabilities, lowered, planned and replayed like
any other; equal to transformers' log-softmax within 1e-4 (float32) under offloaded placements."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexgen_graph import LLM
from flexgen_graph.app.api import compile_plan
from flexgen_graph.catalog import DEFAULT_MODEL, catalog_spec
from flexgen_graph.errors import UserError
from flexgen_graph.hardware import load_profile
from flexgen_graph.ir import Block, NodeKind, Phase, Workload
from flexgen_graph.lower import lower, nodes_of
from flexgen_graph.planfile import dumps, loads
from flexgen_graph.policy import Placement as P
from flexgen_graph.program import BufferRole, OpKind
from planner.verify import simulate_plan
from runtime.driver import PromptTooLongError
from runtime.engine import Engine
from tests.test_llm import Updates
from tests.test_numerics import model_and_store  # noqa: F401  (the tiny OPT, Llama-GQA and Qwen2 fixture)

PROMPT_LEN, SCORED = 12, 5
POLICIES = {  # a scoring plan keeps no cache: the weights and the hidden states move
    "all-gpu": (P(1, 0, 0), P(1, 0, 0), P(1, 0, 0)),
    "weights-disk": (P(0, 0, 1), P(1, 0, 0), P(1, 0, 0)),
    "weights-50-cpu-50-disk+hidden-cpu": (P(0, 0.5, 0.5), P(1, 0, 0), P(0, 1, 0)),
    "everything-off-gpu": (P(0, 0, 1), P(1, 0, 0), P(0, 0, 1)),
}


def hf_logprobs(model, context: list[int], continuation: list[int]) -> tuple[list[float], list[bool]]:
    """transformers' log-softmax at the continuation's positions (one sequence, no padding), as lm-eval reads it."""
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([context + continuation])).logits[0].float(), dim=-1)
    at = range(len(context) - 1, len(context) + len(continuation) - 1)
    return [lp[i, t].item() for i, t in zip(at, continuation)], [lp[i].argmax().item() == t for i, t in zip(at, continuation)]


def requests(model, n: int = 5) -> tuple[list[list[int]], list[list[int]]]:
    """Random contexts and continuations; two continuations are the model's greedy ones (is_greedy true)."""
    g = torch.Generator().manual_seed(3)
    ctx = [torch.randint(3, model.config.vocab_size, (k,), generator=g).tolist() for k in (3, 8, 1, 6, 11)[:n]]
    cont = [torch.randint(3, model.config.vocab_size, (k,), generator=g).tolist() for k in (2, 4, 5, 1, 2)[:n]]
    for i in (1, 3):
        cont[i] = greedy_continuation(model, ctx[i], len(cont[i]))
    return ctx, cont


def greedy_continuation(model, context: list[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        with torch.no_grad():
            out.append(model(torch.tensor([context + out])).logits[0, -1].argmax().item())
    return out


@pytest.mark.parametrize("nb", [1, 2])
@pytest.mark.parametrize("policy", list(POLICIES), ids=list(POLICIES))
def test_logprobs_equal_transformers(model_and_store, policy, nb, tmp_path):  # noqa: F811
    model, store = model_and_store
    ctx, cont = requests(model)
    w, c, h = POLICIES[policy]
    plan = compile_plan(store.spec, load_profile("cpu-small"), Workload(PROMPT_LEN, SCORED, score=True),
                        gpu_batch_size=2, num_gpu_batches=nb, fixed={"weights": w, "cache": c, "hidden": h})
    got = []
    with Engine(plan, store, tmp_path / "offload") as engine:
        for s in range(0, len(ctx), plan.block_size):
            got += engine.score(ctx[s:s + plan.block_size], cont[s:s + plan.block_size])
        assert engine.peak_bytes["gpu"] <= plan.predictions["peak_bytes"]["gpu"]
    for i, (x, y, s) in enumerate(zip(ctx, cont, got)):
        want, greedy = hf_logprobs(model, x, y)
        assert max(abs(a - b) for a, b in zip(want, s.logprobs)) < 1e-4, i
        assert list(s.greedy) == greedy, i
    assert got[1].is_greedy and got[3].is_greedy and not got[0].is_greedy
    assert not any((tmp_path / "offload").glob("*.bin")), "scratch files left behind"


def test_a_scoring_plan_is_a_prefill_alone_with_its_own_cost_and_peak():
    spec, prof = catalog_spec("facebook/opt-125m"), load_profile("cpu-small")
    g = lower(spec, Workload(32, 4, score=True), Block(2, 3))
    assert {key.phase for key in g.nodes} == {Phase.PREFILL}
    assert not nodes_of(g, Phase.PREFILL, NodeKind.STORE_CACHE)
    [head] = [n for n in nodes_of(g, Phase.PREFILL, NodeKind.COMPUTE) if n.key.layer == spec.num_graph_layers - 1
              and n.key.batch == 0]
    assert head.flops == 2 * 2 * 4 * spec.hidden * spec.vocab  # 4 scored positions of 2 sequences
    assert head.work_bytes == 2 * 2 * 4 * spec.vocab * 4  # float32 logits and log-softmax's temporary
    opts = dict(gpu_batch_size=2, num_gpu_batches=3)
    plans = {c: compile_plan(spec, prof, Workload(32, c, score=True), **opts) for c in (1, 32)}
    for plan in plans.values():
        assert plan.programs.decode == () and plan.predictions["decode_step_s"] == 0
        assert not any(b.role in (BufferRole.CACHE_HOME, BufferRole.CACHE_SLOT) for b in plan.programs.buffers)
        assert {op.kind for op in plan.programs.prefill} >= {OpKind.DECODER_SCORE, OpKind.HEAD_SCORE}
        assert loads(dumps(plan)) == plan
        sim = simulate_plan(plan)
        assert sim.hazards == () and all(sim.peaks[t] <= plan.predictions["peak_bytes"][t.value] for t in sim.peaks)
    # scoring every position costs more compute and GPU memory than scoring one
    assert plans[32].predictions["prefill_s"] > plans[1].predictions["prefill_s"]
    assert plans[32].predictions["peak_bytes"]["gpu"] > plans[1].predictions["peak_bytes"]["gpu"]
    gen = compile_plan(spec, prof, Workload(32, 4), **opts)  # the same prompts generating: a cache, a decode
    assert gen.predictions["peak_bytes"]["gpu"] != plans[1].predictions["peak_bytes"]["gpu"]


def test_bad_scoring_input_is_named(model_and_store, tmp_path):  # noqa: F811
    _, store = model_and_store
    prof = load_profile("cpu-small")
    with pytest.raises(UserError, match="scores at most its prompt's positions"):
        Workload(8, 9, score=True)
    with pytest.raises(UserError, match="a scoring workload runs in one process"):
        compile_plan(store.spec, prof, Workload(8, 2, score=True), stages=2)
    plan = compile_plan(store.spec, prof, Workload(8, 3, score=True), gpu_batch_size=2, num_gpu_batches=1)
    gen = compile_plan(store.spec, prof, Workload(8, 3), gpu_batch_size=2, num_gpu_batches=1)
    with Engine(plan, store, tmp_path) as engine:
        with pytest.raises(UserError, match="request 1: the continuation is empty"):
            engine.score([[5], [6]], [[7], []])
        with pytest.raises(PromptTooLongError, match="request 0: context 7 \\+ continuation 3 tokens"):
            engine.score([[5] * 7], [[7] * 3])
        with pytest.raises(PromptTooLongError, match="this plan scores 3"):
            engine.score([[5]], [[7] * 4])
    with Engine(gen, store, tmp_path) as engine:
        with pytest.raises(UserError, match="scoring needs a scoring plan"):
            engine.score([[5]], [[7]])


def test_llm_score_sums_per_request_over_several_blocks(model_and_store, tmp_path):  # noqa: F811
    model, store = model_and_store
    ctx, cont = requests(model)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    with LLM(str(folder), profile="cpu-small", cache_dir=tmp_path / "cache", max_block_size=2) as llm:
        bar = Updates()
        got = llm.score(ctx, cont, progress=bar)
        opened = [p.workload for p in llm._engines.opened]
        with pytest.raises(UserError, match="request 2: the continuation is empty"):
            llm.score(ctx[:3], [[5], [6], []], progress=False)
        with pytest.raises(UserError, match="request 1: context \\+ continuation - 1 = 65 tokens: longer than"):
            llm.score([[5], [5] * 61], [[6], [6] * 5], progress=False)
        assert [p.workload for p in llm._engines.opened] == opened  # refused before anything ran
    for i, (x, y, (lp, greedy)) in enumerate(zip(ctx, cont, got)):
        want, flags = hf_logprobs(model, x, y)
        assert abs(sum(want) - lp) < 1e-4 and greedy == all(flags), i
    assert len(bar.calls) >= 3 and sum(bar.calls) == len(ctx)  # blocks of at most 2
    assert opened == [Workload(16, 5, score=True)]  # 11 + 2 - 1 tokens at most, the longest continuation 5


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_store):
    """The embedded SmolLM2 in transformers, on the weights of the store, and its tokenizer."""
    from transformers import AutoConfig, LlamaForCausalLM

    from flexgen_graph.app.jobs import load_tokenizer
    from runtime.weight_store import hf_state_dict

    model = LlamaForCausalLM(AutoConfig.from_pretrained(smollm2_store.path / "hf")).eval()
    model.load_state_dict(hf_state_dict(smollm2_store), strict=True)
    return model, load_tokenizer(smollm2_store.path)


@pytest.mark.real_model
@pytest.mark.parametrize("policy,gbs,nb", [
    ((P(1, 0, 0), P(1, 0, 0), P(1, 0, 0)), 4, 1),
    ((P(0, 0, 1), P(1, 0, 0), P(0, 1, 0)), 2, 2),
], ids=["all-gpu", "weights-disk+hidden-cpu"])
def test_smollm2_logprobs_equal_transformers(smollm2_store, smollm2_hf, policy, gbs, nb, tmp_path):
    store, (model, tok) = smollm2_store, smollm2_hf
    assert store.spec.fingerprint() == catalog_spec(DEFAULT_MODEL).fingerprint()
    pairs = [("The capital of France is", " Paris"), ("The capital of France is", " Berlin"),
             ("2 + 2 =", " 4"), ("Water boils at", " 100 degrees Celsius at sea level.")]
    ctx = [tok(c)["input_ids"] for c, _ in pairs]
    cont = [tok(x, add_special_tokens=False)["input_ids"] for _, x in pairs]
    w, c, h = policy
    plan = compile_plan(store.spec, load_profile("cpu-small"), Workload(24, 12, score=True), gpu_batch_size=gbs,
                        num_gpu_batches=nb, fixed={"weights": w, "cache": c, "hidden": h})
    got = []
    with Engine(plan, store, tmp_path) as engine:
        for s in range(0, len(pairs), plan.block_size):
            got += engine.score(ctx[s:s + plan.block_size], cont[s:s + plan.block_size])
    for x, y, s in zip(ctx, cont, got):
        want, greedy = hf_logprobs(model, x, y)
        assert max(abs(a - b) for a, b in zip(want, s.logprobs)) < 1e-4
        assert list(s.greedy) == greedy
    assert got[0].logprob > got[1].logprob  # Paris, not Berlin


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["all-gpu", "weights-50-cpu-50-disk+hidden-cpu"])
def test_cuda_logprobs_equal_transformers(policy, tmp_path):
    from runtime.weight_store import import_hf_folder
    from tests.test_numerics import tiny_model

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    store = import_hf_folder(tmp_path / "hf", tmp_path / "store")
    ctx, cont = requests(model)
    w, c, h = POLICIES[policy]
    plan = compile_plan(store.spec, load_profile("h100-pcie5"), Workload(PROMPT_LEN, SCORED, score=True),
                        gpu_batch_size=2, num_gpu_batches=3, fixed={"weights": w, "cache": c, "hidden": h})
    with Engine(plan, store, tmp_path / "off", device="cuda") as engine:
        got = engine.score(ctx, cont)
        assert engine.peak_bytes["gpu"] <= plan.profile.gpu_bytes
    for x, y, s in zip(ctx, cont, got):
        want, greedy = hf_logprobs(model, x, y)
        assert max(abs(a - b) for a, b in zip(want, s.logprobs)) < 1e-4 and list(s.greedy) == greedy
