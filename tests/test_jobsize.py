"""Job-sized work: a block that is not full runs only its filled gpu batches, the last at its filled rows,
with the same tokens as transformers and memory within the plan; `run` compiles for its job's size."""

import pytest
from test_compressed import hf_compressed_reference
from test_numerics import GEN_LEN, POLICIES, PROMPT_LEN, hf_generate, prompts_for, tiny_model

from flexgen_graph.app.api import compile_plan
from flexgen_graph.catalog import catalog_spec
from flexgen_graph.hardware import load_profile
from flexgen_graph.ir import Workload
from planner.predict import BlockRun, predict_plan
from runtime import kernels
from runtime.engine import Engine
from runtime.quant import QuantConfig
from runtime.weight_store import import_hf_folder

B, NB = 4, 3  # 5 prompts fill gpu batch 0, one row of gpu batch 1, and leave gpu batch 2 empty
PLACEMENTS = {  # name: (policy key of test_numerics.POLICIES, cpu attention)
    "all-gpu": ("all-gpu", False),
    "cache-cpu-cpu-attention": ("cache-cpu", True),
    "cache-cpu-streamed": ("cache-cpu", False),
    "weights-disk": ("weights-disk", False),
    "cache-disk-hidden-cpu": ("cache-50-gpu-50-disk+hidden-cpu", False),
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = tiny_model("llama")
    folder = tmp_path_factory.mktemp("hf-llama")
    model.save_pretrained(folder)
    store = import_hf_folder(folder, tmp_path_factory.mktemp("store-llama"))
    store.model = model
    return store


def _plan(store, name: str, **kw):
    (w, c, h), cpu_attention = POLICIES[PLACEMENTS[name][0]], PLACEMENTS[name][1]
    return compile_plan(store.spec, load_profile("cpu-small"), Workload(PROMPT_LEN, GEN_LEN), gpu_batch_size=B,
                        num_gpu_batches=NB, fixed={"weights": w, "cache": c, "hidden": h},
                        cpu_attention=cpu_attention, **kw)


def _rows_computed(monkeypatch) -> list[int]:
    """The rows of every decoder layer the interpreter computes (attention inputs: both decoder paths)."""
    seen: list[int] = []
    inputs = kernels.attention_inputs

    def spy(spec, w, h, positions):
        seen.append(h.shape[0])
        return inputs(spec, w, h, positions)

    monkeypatch.setattr(kernels, "attention_inputs", spy)
    return seen


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_partly_filled_block_equals_transformers_and_computes_only_its_rows(llama, name, tmp_path, monkeypatch):
    prompts = prompts_for(llama.model.config.vocab_size)
    plan = _plan(llama, name)
    seen = _rows_computed(monkeypatch)
    with Engine(plan, llama, tmp_path / "offload") as engine:
        got = [list(g.token_ids) for g in engine.generate(prompts)]
        steps = sum(1 for n, _ in engine.step_times if n == "decode")
        for t, peak in engine.peak_bytes.items():
            assert peak <= plan.predictions["peak_bytes"][t], f"{name}: {t} peak over the plan's"
    assert got == hf_generate(llama.model, prompts)
    assert steps == max(map(len, got)) - 1  # a block runs until its longest generation stops (planner.predict)
    layers = llama.spec.num_layers
    # every run of a program computes gpu batch 0 at 4 rows and gpu batch 1 at its 1 row; batch 2 never
    assert sorted(set(seen)) == [1, B] and len(seen) == 2 * layers * (1 + steps)
    assert seen.count(1) == seen.count(B)


@pytest.mark.parametrize("cpu_attention", [False, True], ids=["gpu-attn", "cpu-attn"])
def test_partly_filled_block_compressed(llama, cpu_attention, tmp_path):
    """4-bit weights and cache, the cache on the CPU: the partly filled gpu batch's rows compress and
    restore alone (a cache record holds every row of the gpu batch)."""
    prompts = prompts_for(llama.model.config.vocab_size)
    cfg = QuantConfig(4, 32)
    plan = _plan(llama, "cache-cpu-cpu-attention" if cpu_attention else "cache-cpu-streamed", compress="both",
                 group_size=32)
    with Engine(plan, llama, tmp_path / "offload") as engine:
        got = [list(g.token_ids) for g in engine.generate(prompts)]
        for t, peak in engine.peak_bytes.items():
            assert peak <= plan.predictions["peak_bytes"][t]
    assert got == hf_compressed_reference(llama.model, prompts, "both", cfg)


def test_one_prompt_then_a_full_block_on_one_engine(llama, tmp_path):
    """Blocks of any fill follow each other on one engine (the interpreter keeps a dispatch per fill)."""
    prompts = prompts_for(llama.model.config.vocab_size) * 3  # 15: a block of 12, then 3
    plan = _plan(llama, "cache-cpu-cpu-attention")
    with Engine(plan, llama, tmp_path / "offload") as engine:
        got = [list(g.token_ids) for g in engine.generate(prompts[:1])]
        got += [list(g.token_ids) for g in engine.generate(prompts[:12])]
        got += [list(g.token_ids) for g in engine.generate(prompts[12:])]
    want = hf_generate(llama.model, prompts[:5])
    assert got == want[:1] + want * 3


def test_search_for_a_job_never_takes_a_larger_block_and_is_no_slower():
    """A job of N prompts: no block above N, and the job predicted no slower than the block the
    search took before (the next power of two at most), each evaluated on the job's blocks."""
    spec, profile, wl = catalog_spec("facebook/opt-1.3b").with_dtype("float16"), load_profile("t4-flexgen"), \
        Workload(256, 32)

    def job_s(plan, n: int) -> float:
        b = plan.block_size
        blocks = [BlockRun(b, wl.gen_len - 1)] * (n // b) + ([BlockRun(n % b, wl.gen_len - 1)] if n % b else [])
        return predict_plan(plan, blocks).seconds

    for n in (3, 36, 100):
        sized = compile_plan(spec, profile, wl, job_prompts=n)
        old = compile_plan(spec, profile, wl, max_block_size=1 << (n - 1).bit_length())
        assert sized.block_size <= n
        assert job_s(sized, n) <= job_s(old, n) * (1 + 1e-6)
    assert compile_plan(spec, profile, wl, job_prompts=36).block_size == 36  # fits the job exactly
