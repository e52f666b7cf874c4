"""The real embedded model: SmolLM2-135M-Instruct from its GGUF, against transformers on the same weights."""

import pytest
import torch

from flexgen_graph.app.api import compile_plan
from flexgen_graph.app.jobs import load_tokenizer
from flexgen_graph.catalog import DEFAULT_MODEL, catalog_spec
from flexgen_graph.hardware import load_profile
from flexgen_graph.ir import Workload
from flexgen_graph.policy import Placement as P
from runtime.engine import Engine

pytestmark = pytest.mark.real_model

QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "What is 2 + 2?",
             "Name a famous physicist."]
GEN = 12


@pytest.fixture(scope="module")
def setup(smollm2_store):
    from transformers import AutoConfig, LlamaForCausalLM

    from runtime.weight_store import hf_state_dict

    store = smollm2_store
    tok = load_tokenizer(store.path)
    prompts = []
    for q in QUESTIONS:
        out = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        prompts.append(list(out["input_ids"] if hasattr(out, "keys") else out))
    cfg = AutoConfig.from_pretrained(store.path / "hf")
    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(hf_state_dict(store), strict=True)
    p_len = max(len(p) for p in prompts)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids = torch.full((len(prompts), p_len), pad)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, p_len - len(p):] = torch.tensor(p)
        mask[i, p_len - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=GEN, do_sample=False, pad_token_id=pad)
    eos = set(store.spec.eos_token_ids)
    expected = []
    for row in out[:, p_len:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        expected.append(row[:cut])
    return store, prompts, p_len, expected, tok


def test_spec_matches_the_catalog(smollm2_store):
    assert smollm2_store.spec.fingerprint() == catalog_spec(DEFAULT_MODEL).fingerprint()


@pytest.mark.parametrize("policy,gbs,nb", [
    ((P(1, 0, 0), P(1, 0, 0), P(1, 0, 0)), 4, 1),
    ((P(0, 0, 1), P(0, 1, 0), P(1, 0, 0)), 2, 2),
    ((P(0.5, 0.5, 0), P(0.5, 0, 0.5), P(0, 1, 0)), 1, 3),
], ids=["all-gpu", "weights-disk+cache-cpu", "splits-3-batches"])
def test_greedy_tokens_equal_transformers(setup, policy, gbs, nb, tmp_path):
    store, prompts, p_len, expected, tok = setup
    w, c, h = policy
    plan = compile_plan(store.spec, load_profile("cpu-small"), Workload(p_len, GEN), gpu_batch_size=gbs,
                        num_gpu_batches=nb, fixed={"weights": w, "cache": c, "hidden": h})
    got = []
    with Engine(plan, store, tmp_path) as engine:
        for s in range(0, len(prompts), plan.block_size):
            got += [list(g.token_ids) for g in engine.generate(prompts[s:s + plan.block_size])]
    assert got == expected
    assert "Paris" in tok.decode(got[0])
