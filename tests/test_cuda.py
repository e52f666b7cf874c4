"""The CUDA backend: same tokens as transformers on the GPU, the GPU cap enforced. Skipped without CUDA."""

import pytest
import torch

from flexgen_graph.app.api import compile_plan
from flexgen_graph.hardware import load_profile
from flexgen_graph.ir import Workload
from flexgen_graph.policy import Placement as P
from runtime.engine import Engine
from runtime.weight_store import import_hf_folder
from tests.test_numerics import (
    GEN_LEN,
    PROMPT_LEN,
    hf_generate,
    prompts_for,
    tiny_model,
)

pytestmark = pytest.mark.gpu

POLICIES = {
    "all-gpu": (P(1, 0, 0), P(1, 0, 0), P(1, 0, 0)),
    "weights-cpu+cache-cpu": (P(0, 1, 0), P(0, 1, 0), P(1, 0, 0)),
    "weights-disk+cache-disk": (P(0, 0, 1), P(0, 0, 1), P(0, 1, 0)),
    "splits": (P(0.5, 0.5, 0), P(0.5, 0, 0.5), P(1, 0, 0)),
}


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("cpu_attention", [False, True])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_cuda_tokens_equal_transformers(family, policy, cpu_attention, tmp_path):
    model = tiny_model(family)
    prompts = prompts_for(model.config.vocab_size)
    expected = hf_generate(model, prompts)
    model.save_pretrained(tmp_path / "hf")
    store = import_hf_folder(tmp_path / "hf", tmp_path / "store")
    w, c, h = POLICIES[policy]
    plan = compile_plan(store.spec, load_profile("h100-pcie5"), Workload(PROMPT_LEN, GEN_LEN), gpu_batch_size=2,
                        num_gpu_batches=3, fixed={"weights": w, "cache": c, "hidden": h},
                        cpu_attention=cpu_attention)
    with Engine(plan, store, tmp_path / "off", device="cuda") as engine:
        got = [list(g.token_ids) for g in engine.generate(prompts)]
        assert engine.peak_bytes["gpu"] <= plan.profile.gpu_bytes
    assert got == expected


def test_gpu_cap_is_enforced_on_the_card():
    total = torch.cuda.get_device_properties(0).total_memory
    from flexgen_graph.ir import Tier
    from runtime.cuda_backend import CudaBackend

    budget = {Tier.GPU: 1 << 30, Tier.CPU: 1 << 34, Tier.DISK: 1 << 34}
    backend = CudaBackend(budget, __import__("pathlib").Path("/tmp"))
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    backend.close()  # the cap is the process's: closing gives the card back
    assert total > 2 << 30
    assert torch.empty(2 << 30, dtype=torch.uint8, device="cuda").numel() == 2 << 30
