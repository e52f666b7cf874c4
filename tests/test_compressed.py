"""4-bit compression at run time: byte layouts agree with the planner, codecs round-trip, and generation with
compressed weights and/or cache equals transformers run on the same compressed numbers, under every placement."""

import copy
import os

import pytest
import torch
import transformers.cache_utils as cache_utils
from test_numerics import (
    GEN_LEN,
    POLICIES,
    PROMPT_LEN,
    hf_generate,
    prompts_for,
    tiny_model,
)

from flexgen_graph.app.api import compile_plan
from flexgen_graph.catalog import catalog_spec
from flexgen_graph.hardware import load_profile
from flexgen_graph.ir import Workload
from flexgen_graph.program import QCACHE_TWIN, BufferRole
from planner.memory import compression_of
from runtime.compressed import (
    CacheCodec,
    compress_layer,
    compressed_layers,
    decompress_layer,
)
from runtime.engine import Engine
from runtime.kernels import layer_views
from runtime.quant import QuantConfig, fake_quantize
from runtime.weight_store import import_hf_folder, make_dummy

MODES = ("weights", "cache", "both")


def generate_within_peaks(plan, store, prompts, offload, what: str) -> list[list[int]]:
    """Greedy token ids of `prompts`, block after block of the plan, asserting each tier's measured peak is
    within the plan's."""
    got = []
    with Engine(plan, store, offload) as engine:
        for start in range(0, len(prompts), plan.block_size):
            got += [list(g.token_ids) for g in engine.generate(prompts[start:start + plan.block_size])]
        for t, peak in engine.peak_bytes.items():
            assert peak <= plan.predictions["peak_bytes"][t], f"{what}: {t} peak over the plan's"
    return got


@pytest.mark.parametrize("group", [32, 64, 128, 48])
@pytest.mark.parametrize("model", ["HuggingFaceTB/SmolLM2-135M-Instruct", "facebook/opt-1.3b",
                                   "meta-llama/Llama-2-7b-hf", "Qwen/Qwen2-0.5B"])
def test_planner_sizes_equal_runtime_layouts(model, group):
    spec = catalog_spec(model)
    comp, cfg = compression_of(spec, group), QuantConfig(4, group)
    assert comp.weight_bytes == tuple(spec.compressed_layer_bytes(j, cfg) for j in range(spec.num_graph_layers))
    for b in (1, 3, 8):
        codec = CacheCodec(spec, b, cfg)
        dense_row = b * spec.kv_bytes_per_token()
        assert comp.cache(dense_row * 100) == codec.row_bytes * 100
    assert comp.weight_bytes[1] < spec.layer_bytes(1) / 3  # 4 bits + stats of float32 (or half) weights


def test_compressed_plan_buffers_are_compressed_sizes():
    spec = catalog_spec("HuggingFaceTB/SmolLM2-135M-Instruct")
    p = compile_plan(spec, load_profile("cpu-small"), Workload(16, 4), gpu_batch_size=2, num_gpu_batches=1,
                     compress="both", group_size=32)
    cfg, codec = QuantConfig(4, 32), CacheCodec(spec, 2, QuantConfig(4, 32))
    assert (p.policy.compress_weights, p.policy.compress_cache, p.policy.group_size) == (True, True, 32)
    for b in p.programs.buffers:
        if b.role is BufferRole.WEIGHT_HOME:
            assert b.nbytes == spec.compressed_layer_bytes(b.layer, cfg)
        if b.role is BufferRole.CACHE_HOME:
            assert b.nbytes == codec.row_bytes * 20


def test_compress_layer_round_trip_is_fake_quantization(tmp_path):
    spec = tiny_store(tmp_path, "opt").spec
    store = make_dummy(spec, tmp_path / "dummy", seed=3)
    cfg = QuantConfig(4, 32)
    for j in range(spec.num_graph_layers):
        dense = torch.empty(spec.layer_bytes(j), dtype=torch.uint8)
        store.read_layer_into(j, dense)
        packed = torch.zeros(spec.compressed_layer_bytes(j, cfg), dtype=torch.uint8)
        compress_layer(spec, j, dense, cfg, packed)
        back = torch.zeros_like(dense)
        decompress_layer(spec, j, packed, cfg, back)
        got, want = layer_views(spec, j, back), layer_views(spec, j, dense)
        dims = {t.name: t.quant_dim for t in spec.layer_tensors(j)}
        for name, w in want.items():
            expect = fake_quantize(w, dims[name], cfg) if w.dim() >= 2 else w
            assert torch.equal(got[name], expect), f"layer {j} {name}"


def test_cache_codec_rows_round_trip_in_pieces():
    spec = catalog_spec("HuggingFaceTB/SmolLM2-135M-Instruct")
    cfg = QuantConfig(4, 64)
    codec = CacheCodec(spec, 3, cfg)
    S = 10
    x = torch.randn(S, 2, 3, spec.num_kv_heads, spec.head_dim)
    buf = torch.zeros(S * codec.row_bytes, dtype=torch.uint8)
    codec.store(buf, x[:4], 0)  # prefill rows, then decode rows one by one: each write touches its rows only
    for s in range(4, 7):
        codec.store(buf, x[s:s + 1], s)
    out = torch.zeros_like(x)
    codec.load(buf, out, 7)
    assert torch.equal(out[:7], fake_quantize(x[:7], -1, cfg))
    assert not out[7:].any()
    assert not buf[7 * codec.row_bytes:].any()
    k, v = x[7:9, 0].transpose(0, 1), x[7:9, 1].transpose(0, 1)  # two new tokens as [B, T, KV, D]
    k_back, v_back = codec.store_new(buf, k, v, 7)
    codec.load(buf, out, 9)
    assert torch.equal(out[:9], fake_quantize(x[:9], -1, cfg))
    assert torch.equal(k_back, out[7:9, 0].transpose(0, 1)) and torch.equal(v_back, out[7:9, 1].transpose(0, 1))


def test_compressed_copy_is_built_once_and_checked(tmp_path):
    store = make_dummy(catalog_spec("HuggingFaceTB/SmolLM2-135M-Instruct").with_dtype("float32"), tmp_path / "s")
    cfg = QuantConfig(4, 64)
    first = compressed_layers(store, cfg)
    stamp = first.file(1).stat().st_mtime_ns
    again = compressed_layers(store, cfg)
    assert again.file(1).stat().st_mtime_ns == stamp
    with open(again.file(2), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="2.bin: 100 bytes"):
        compressed_layers(store, cfg)


def tiny_store(tmp_path, family):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / f"hf-{family}")
    store = import_hf_folder(tmp_path / f"hf-{family}", tmp_path / f"store-{family}")
    store.model = model
    return store


def hf_compressed_reference(model, prompts, mode: str, cfg: QuantConfig) -> list[list[int]]:
    """transformers' greedy generate on the numbers our compressed run computes with: every matrix
    fake-quantized along its input (hidden) dim, and/or every k and v as it reads back from the cache."""
    if mode in ("weights", "both"):
        model = copy.deepcopy(model)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:  # HF holds [out, in]: the input dim is the last
                    p.copy_(fake_quantize(p, -1, cfg))
    if mode == "weights":
        return hf_generate(model, prompts)
    update = cache_utils.DynamicLayer.update

    def compressed_update(self, k, v, *args, **kwargs):
        return update(self, fake_quantize(k, -1, cfg), fake_quantize(v, -1, cfg), *args, **kwargs)

    cache_utils.DynamicLayer.update = compressed_update
    try:
        return hf_generate(model, prompts)
    finally:
        cache_utils.DynamicLayer.update = update


@pytest.fixture(scope="module", params=["opt", "llama", "qwen2"])
def family_store(request, tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp(request.param), request.param)


def compressed_plan(spec, policy: str, mode: str, cpu_attention: bool):
    """The plans the compressed replay test runs (test_op_kinds counts their op kinds)."""
    w, c, h = POLICIES[policy]
    return compile_plan(spec, load_profile("cpu-small"), Workload(PROMPT_LEN, GEN_LEN), gpu_batch_size=2,
                        num_gpu_batches=2, fixed={"weights": w, "cache": c, "hidden": h},
                        cpu_attention=cpu_attention, compress=mode, group_size=32)


@pytest.mark.parametrize("mode", MODES)
def test_compressed_generation_equals_transformers_on_compressed_numbers(family_store, mode, tmp_path):
    store = family_store
    cfg = QuantConfig(4, 32)
    prompts = prompts_for(store.model.config.vocab_size)
    expected = hf_compressed_reference(store.model, prompts, mode, cfg)
    if store.model.config.model_type == "llama" and mode != "cache":  # (the tiny qwen2 repeats one token)
        assert expected != hf_generate(store.model, prompts), "compression changed nothing: the test would be void"
    for name in POLICIES:
        for cpu_attention in (False, True):
            plan = compressed_plan(store.spec, name, mode, cpu_attention)
            got = generate_within_peaks(plan, store, prompts, tmp_path / "offload", name)
            assert got == expected, f"{mode} under {name}, cpu attention {cpu_attention}"


def test_weight_homes_hold_compressed_bytes(tmp_path):
    """The disk tier and the link carry 4-bit bytes: a disk-homed weight is read from the compressed copy."""
    store = tiny_store(tmp_path, "llama")
    w, c, h = POLICIES["weights-disk"]
    plan = compile_plan(store.spec, load_profile("cpu-small"), Workload(PROMPT_LEN, GEN_LEN), gpu_batch_size=2,
                        num_gpu_batches=1, fixed={"weights": w, "cache": c, "hidden": h}, compress="weights")
    plain = compile_plan(store.spec, load_profile("cpu-small"), Workload(PROMPT_LEN, GEN_LEN), gpu_batch_size=2,
                         num_gpu_batches=1, fixed={"weights": w, "cache": c, "hidden": h})
    with Engine(plan, store, tmp_path / "off") as engine:
        assert engine.weights is not store
        files = sorted(os.listdir(engine.weights.path))
        assert "compressed.json" in files
        disk = engine.peak_bytes["disk"]
    assert disk * 3 < plain.predictions["peak_bytes"]["disk"]


def test_plan_and_store_disagreeing_on_sizes_is_refused(tmp_path):
    import dataclasses

    store = tiny_store(tmp_path, "llama")
    plan = compile_plan(store.spec, load_profile("cpu-small"), Workload(PROMPT_LEN, GEN_LEN), gpu_batch_size=2,
                        num_gpu_batches=1, compress="cache")
    # the ops say how the cache is kept: dense decoder kinds over the plan's compressed cache buffers
    undo = {name: tuple(dataclasses.replace(op, kind=QCACHE_TWIN.get(op.kind, op.kind), scratch=-1)
                        for op in getattr(plan.programs, name)) for name in ("prefill", "decode")}
    assert undo["decode"] != plan.programs.decode
    tampered = dataclasses.replace(plan, programs=dataclasses.replace(plan.programs, **undo))
    with pytest.raises(ValueError, match="recompile the plan"):
        Engine(tampered, store, tmp_path / "off")


def test_auto_compresses_where_it_pays_and_not_where_it_does_not():
    """--compress auto: the flags are search dimensions priced by their bytes and dequantization time."""
    wl = Workload(512, 32)
    opt13 = catalog_spec("facebook/opt-13b")
    off = compile_plan(opt13, load_profile("t4-flexgen"), wl)
    auto = compile_plan(opt13, load_profile("t4-flexgen"), wl, compress="auto")
    assert not off.policy.compresses and auto.policy.compresses  # a 16 GB GPU and a slow link: compress
    assert auto.predictions["tokens_per_s"] > 1.2 * off.predictions["tokens_per_s"]
    smol = catalog_spec("HuggingFaceTB/SmolLM2-135M-Instruct").with_dtype("float32")
    cpu = compile_plan(smol, load_profile("cpu-small"), Workload(64, 32), compress="auto")
    assert not cpu.policy.compresses  # all in RAM already: dequantizing would only cost time


def test_cli_compile_inspect_run_compressed(tmp_path, capsys):
    import json

    from flexgen_graph.app.cli import main

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "ckpt")
    plan = tmp_path / "c.fgplan"
    assert main(["compile", "--model", str(tmp_path / "ckpt"), "--prompt-len", str(PROMPT_LEN), "--gen-len",
                 str(GEN_LEN), "--gpu-batch-size", "2", "--num-gpu-batches", "2", "--weights-frac", "0,0,1",
                 "--compress", "both", "--group-size", "32", "-o", str(plan)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(plan)]) == 0
    assert "compress_weights, compress_cache (4-bit, groups of 32)" in capsys.readouterr().out
    prompts = prompts_for(model.config.vocab_size, 4)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "prompt_ids": p}) + "\n"
                                               for i, p in enumerate(prompts)))
    assert main(["run", "--plan", str(plan), "--input", str(tmp_path / "in.jsonl"), "--output",
                 str(tmp_path / "out.jsonl"), "--cache-dir", str(tmp_path / "cache")]) == 0
    got = {r["id"]: r["token_ids"] for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert [got[i] for i in range(4)] == hf_compressed_reference(model, prompts, "both", QuantConfig(4, 32))
    with pytest.raises(SystemExit):
        main(["compile", "--model", str(tmp_path / "ckpt"), "--prompt-len", "8", "--gen-len", "4",
              "--compress", "yes", "-o", str(plan)])


def test_eight_bit_compression_through_the_same_code(tmp_path):
    """8 bits: planner sizes equal the runtime's, and generation equals transformers on the 8-bit numbers."""
    spec = catalog_spec("HuggingFaceTB/SmolLM2-135M-Instruct")
    cfg8 = QuantConfig(8, 64)
    comp = compression_of(spec, 64, 8)
    assert comp.weight_bytes == tuple(spec.compressed_layer_bytes(j, cfg8) for j in range(spec.num_graph_layers))
    assert comp.weight_bytes[1] > compression_of(spec, 64, 4).weight_bytes[1] * 1.5
    store = tiny_store(tmp_path, "llama")
    prompts = prompts_for(store.model.config.vocab_size)
    w, c, h = POLICIES["everything-off-gpu"]
    plan = compile_plan(store.spec, load_profile("cpu-small"), Workload(PROMPT_LEN, GEN_LEN), gpu_batch_size=2,
                        num_gpu_batches=2, fixed={"weights": w, "cache": c, "hidden": h}, compress="both",
                        compress_bits=8, group_size=16)
    assert plan.policy.compress_bits == 8
    with Engine(plan, store, tmp_path / "off") as engine:
        got = []
        for start in range(0, len(prompts), plan.block_size):
            got += [list(g.token_ids) for g in engine.generate(prompts[start:start + plan.block_size])]
    assert got == hf_compressed_reference(store.model, prompts, "both", QuantConfig(8, 16))


@pytest.mark.parametrize("cpu_attention", [False, True])
def test_engine_allocates_only_the_plans_buffers(tmp_path, cpu_attention):
    """The dequantization scratch is a plan buffer: what the backend accounts, per tier, is exactly the
    plan's buffer table, before and after a run (an allocation the plan does not name would show)."""
    from flexgen_graph.ir import TIERS
    from flexgen_graph.program import SCRATCH_ROLES

    store = tiny_store(tmp_path, "llama")
    w, c, h = POLICIES["weights-50-cpu-50-disk+cache-50-gpu-50-cpu"]
    plan = compile_plan(store.spec, load_profile("cpu-small"), Workload(PROMPT_LEN, GEN_LEN), gpu_batch_size=2,
                        num_gpu_batches=2, fixed={"weights": w, "cache": c, "hidden": h},
                        cpu_attention=cpu_attention, compress="both", group_size=32)
    roles = {b.role for b in plan.programs.buffers if b.role in SCRATCH_ROLES}
    assert roles == ({BufferRole.DEQUANT_SCRATCH, BufferRole.DEQUANT_HOST} if cpu_attention
                     else {BufferRole.DEQUANT_SCRATCH})
    want = {t: sum(b.nbytes for b in plan.programs.buffers if b.tier is t) for t in TIERS}
    with Engine(plan, store, tmp_path / "off") as engine:
        assert engine.backend.memory.current == want
        engine.generate(prompts_for(store.model.config.vocab_size)[:plan.block_size])
        assert engine.backend.memory.current == want
        assert engine.backend.memory.peak == want


def test_plan_without_its_scratch_buffer_is_refused(tmp_path):
    import dataclasses

    from flexgen_graph.program import SCRATCH_ROLES, Programs

    store = tiny_store(tmp_path, "llama")
    plan = compile_plan(store.spec, load_profile("cpu-small"), Workload(PROMPT_LEN, GEN_LEN), gpu_batch_size=2,
                        num_gpu_batches=1, compress="weights")
    p = plan.programs
    kept = tuple(b for b in p.buffers if b.role not in SCRATCH_ROLES)
    assert len(kept) == len(p.buffers) - 1 and p.buffers[:len(kept)] == kept  # the scratch comes last
    tampered = dataclasses.replace(plan, programs=Programs(kept, p.prefill, p.decode))
    with pytest.raises(ValueError, match="names buffer .* the plan does not have.*recompile the plan"):
        Engine(tampered, store, tmp_path / "off")
