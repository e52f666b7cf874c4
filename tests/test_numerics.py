"""End to end: the runtime's greedy tokens equal transformers' generate under every placement policy."""

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from flexgen_graph.app.api import compile_plan
from flexgen_graph.hardware import load_profile
from flexgen_graph.ir import Workload
from flexgen_graph.policy import Placement
from runtime.engine import Engine
from runtime.weight_store import import_hf_folder

PROMPT_LEN, GEN_LEN = 12, 8
P = Placement
POLICIES = {
    "all-gpu": (P(1, 0, 0), P(1, 0, 0), P(1, 0, 0)),
    "weights-cpu": (P(0, 1, 0), P(1, 0, 0), P(1, 0, 0)),
    "weights-disk": (P(0, 0, 1), P(1, 0, 0), P(1, 0, 0)),
    "cache-cpu": (P(1, 0, 0), P(0, 1, 0), P(1, 0, 0)),
    "cache-disk": (P(1, 0, 0), P(0, 0, 1), P(1, 0, 0)),
    "weights-50-gpu-50-cpu": (P(0.5, 0.5, 0), P(1, 0, 0), P(1, 0, 0)),
    "weights-50-cpu-50-disk+cache-50-gpu-50-cpu": (P(0, 0.5, 0.5), P(0.5, 0.5, 0), P(1, 0, 0)),
    "cache-50-gpu-50-disk+hidden-cpu": (P(1, 0, 0), P(0.5, 0, 0.5), P(0, 1, 0)),
    "everything-off-gpu": (P(0, 0, 1), P(0, 1, 0), P(0, 0, 1)),
}


def tiny_model(family: str):
    torch.manual_seed(0)
    if family == "opt":
        cfg = OPTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, ffn_dim=128, vocab_size=1000,
                        word_embed_proj_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=2,
                        eos_token_id=2)
        return OPTForCausalLM(cfg).eval()
    if family == "llama":
        cfg = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=96, vocab_size=1000, max_position_embeddings=64, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        return LlamaForCausalLM(cfg).eval()
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, vocab_size=1000, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, use_sliding_window=False)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["opt", "llama", "qwen2"])
def model_and_store(request, tmp_path_factory):
    model = tiny_model(request.param)
    folder = tmp_path_factory.mktemp(f"hf-{request.param}")
    model.save_pretrained(folder)
    store = import_hf_folder(folder, tmp_path_factory.mktemp(f"store-{request.param}"))
    return model, store


def prompts_for(vocab: int, n: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = [3, PROMPT_LEN, 7, 1, 10][:n]
    return [torch.randint(3, vocab, (n_tok,), generator=g).tolist() for n_tok in lengths]


def hf_generate(model, prompts, gen_len=GEN_LEN, prompt_len=PROMPT_LEN) -> list[list[int]]:
    pad = model.config.pad_token_id
    ids = torch.full((len(prompts), prompt_len), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, prompt_len - len(p):] = torch.tensor(p)
        mask[i, prompt_len - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=gen_len, min_new_tokens=gen_len
                             if model.config.eos_token_id is None else 0, do_sample=False, pad_token_id=pad)
    eos = model.config.eos_token_id
    result = []
    for row in out[:, prompt_len:].tolist():
        result.append(row[: row.index(eos) + 1] if eos in row else row)
    return result


def plan_for(spec, policy, gbs, nb, gen_len=GEN_LEN, cpu_attention=False):
    """The plan run_engine replays (tests/test_op_kinds.py reads the op kinds of these plans)."""
    w, c, h = policy
    return compile_plan(spec, load_profile("cpu-small"), Workload(PROMPT_LEN, gen_len), gpu_batch_size=gbs,
                        num_gpu_batches=nb, fixed={"weights": w, "cache": c, "hidden": h},
                        cpu_attention=cpu_attention)


def run_engine(store, prompts, policy, gbs, nb, tmp_path, gen_len=GEN_LEN, cpu_attention=False):
    plan = plan_for(store.spec, policy, gbs, nb, gen_len, cpu_attention)
    out = []
    with Engine(plan, store, tmp_path / "offload") as engine:
        for start in range(0, len(prompts), plan.block_size):
            out += [list(g.token_ids) for g in engine.generate(prompts[start:start + plan.block_size])]
        assert engine.peak_bytes["gpu"] <= plan.predictions["peak_bytes"]["gpu"]
    assert not any((tmp_path / "offload").glob("*.bin")), "scratch files left behind"
    return out


@pytest.mark.parametrize("cpu_attention", [False, True], ids=["gpu-attn", "cpu-attn"])
@pytest.mark.parametrize("nb", [1, 3])
@pytest.mark.parametrize("policy", list(POLICIES), ids=list(POLICIES))
def test_greedy_tokens_equal_transformers(model_and_store, policy, nb, cpu_attention, tmp_path):
    model, store = model_and_store
    prompts = prompts_for(model.config.vocab_size)
    expected = hf_generate(model, prompts)
    got = run_engine(store, prompts, POLICIES[policy], gbs=2, nb=nb, tmp_path=tmp_path, cpu_attention=cpu_attention)
    assert got == expected


def test_stops_at_eos_like_transformers(tmp_path):
    model = tiny_model("llama")
    prompts = prompts_for(model.config.vocab_size)
    free_run = hf_generate(model, prompts)
    model.config.eos_token_id = model.generation_config.eos_token_id = free_run[0][3]  # seq 0 stops at its 4th token
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    store = import_hf_folder(folder, tmp_path / "store")
    expected = hf_generate(model, prompts)
    assert len(expected[0]) == 4
    got = run_engine(store, prompts, POLICIES["cache-cpu"], gbs=3, nb=2, tmp_path=tmp_path)
    assert got == expected


def test_plan_with_another_models_weights_is_refused(model_and_store, tmp_path):
    from flexgen_graph.planfile import PlanMismatchError

    _, store = model_and_store
    other = tiny_model("llama" if store.spec.family == "opt" else "opt")
    other.save_pretrained(tmp_path / "other")
    other_store = import_hf_folder(tmp_path / "other", tmp_path / "other-store")
    plan = compile_plan(other_store.spec, load_profile("cpu-small"), Workload(PROMPT_LEN, GEN_LEN),
                        gpu_batch_size=2, num_gpu_batches=1)
    with pytest.raises(PlanMismatchError, match="compiled for"):
        Engine(plan, store, tmp_path / "off")
