"""Planner: cost model by hand on tiny graphs, LP placements, search, capacities (property test)."""

from __future__ import annotations

import dataclasses
from functools import partial
from types import SimpleNamespace

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexgen_graph.catalog import catalog_spec
from flexgen_graph.hardware import HardwareProfile, load_profile
from flexgen_graph.ir import TIERS, Block, NodeKind, Phase, Tier, Workload
from flexgen_graph.layout import QuantConfig, compressed_nbytes
from flexgen_graph.lower import lower
from flexgen_graph.policy import Placement, Policy, assign_tiers
from flexgen_graph.spec import spec_from_config
from planner.cost import TERMS, Flags, Predictions, decode_ctx, evaluate, phase_costs
from planner.errors import InfeasiblePlanError
from planner.figures import FigureModel, block_figures
from planner.lp import memory_figures, solve_block
from planner.memory import compression_of, peak_bytes
from planner.schedule import build_buffers, graph_shape
from planner.search import SearchResult, search

GPU, CPU, DISK = (Placement.all_on(t) for t in TIERS)


def tiny_spec(family: str = "opt", layers: int = 2, heads: int = 2, head_dim: int = 8, kv_heads: int | None = None,
              ffn: int = 32, vocab: int = 64, dtype: str = "float32"):
    h = heads * head_dim
    if family == "opt":
        cfg = SimpleNamespace(model_type="opt", hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                              ffn_dim=ffn, vocab_size=vocab, max_position_embeddings=256, word_embed_proj_dim=h,
                              do_layer_norm_before=True, activation_function="relu", enable_bias=True,
                              tie_word_embeddings=True, bos_token_id=2, eos_token_id=2, pad_token_id=1)
    else:
        cfg = SimpleNamespace(model_type="llama", hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                              num_key_value_heads=kv_heads or heads, intermediate_size=ffn, vocab_size=vocab,
                              rope_theta=10000.0, max_position_embeddings=256, rms_norm_eps=1e-5, hidden_act="silu",
                              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    return spec_from_config(cfg, name=f"tiny-{family}", dtype=dtype)


def toy_profile(gpu: int = 1 << 40, cpu: int = 1 << 40, disk: int = 1 << 40, has_gpu: bool = True,
                **rates) -> HardwareProfile:
    base = dict(gpu_from_cpu_bytes_per_s=1e9, cpu_from_gpu_bytes_per_s=5e8, cpu_from_disk_bytes_per_s=1e8,
                disk_from_cpu_bytes_per_s=5e7, gpu_matmul_flops_per_s=1e9, gpu_attn_flops_per_s=1e8,
                gpu_mem_bytes_per_s=1e15, matmul_min_rows=1, compute_op_overhead_s=0.0,
                cpu_matmul_flops_per_s=1e8, cpu_mem_bytes_per_s=1e9, gpu_dequant_bytes_per_s=1e10,
                cpu_dequant_bytes_per_s=1e9, stage_link_bytes_per_s=1e9)
    base.update(rates)
    return HardwareProfile(name="toy", has_gpu=has_gpu, gpu_bytes=gpu, cpu_bytes=cpu, disk_bytes=disk, **base)


def fits(g, policy: Policy, profile: HardwareProfile) -> bool:
    caps = {Tier.GPU: profile.gpu_bytes, Tier.CPU: profile.cpu_bytes, Tier.DISK: profile.disk_bytes}
    peaks = peak_bytes(g, policy, profile=profile)
    return all(peaks[t] <= caps[t] for t in TIERS)


WL = Workload(8, 4)
BLOCK = Block(2, 2)


# ---------------------------------------------------------------- cost model, by hand


def hand_step_times(g, phase: Phase, ctx: float, policy: Policy, hw: HardwareProfile) -> list[dict[str, float]]:
    """Per graph layer: the three streams' busy times, summed here from the nodes independently of planner.cost."""
    w, c, h = policy.weights, policy.cache, policy.hidden
    out = []
    for j in range(1 + max(k.layer for k in g.nodes)):
        nodes = [d["node"] for k, d in g.nodes(data=True) if k.phase is phase and k.layer == j]
        at = ctx if phase is Phase.DECODE else 0

        def total(kind):
            return sum(n.bytes + n.bytes_per_ctx * at for n in nodes if n.key.kind is kind)

        wb, cl, cs = total(NodeKind.LOAD_WEIGHT), total(NodeKind.LOAD_CACHE), total(NodeKind.STORE_CACHE)
        hl, hs = total(NodeKind.LOAD_HIDDEN), total(NodeKind.STORE_HIDDEN)
        comp = [n for n in nodes if n.key.kind is NodeKind.COMPUTE]
        gpu_from_cpu = (1 - w.gpu_frac) * wb + (1 - c.gpu_frac) * cl + (1 - h.gpu_frac) * hl
        cpu_from_disk = w.disk_frac * wb + c.disk_frac * cl + h.disk_frac * hl
        cpu_from_gpu = (1 - c.gpu_frac) * cs + (1 - h.gpu_frac) * hs
        disk_from_cpu = c.disk_frac * cs + h.disk_frac * hs
        out.append({
            "load": gpu_from_cpu / hw.gpu_from_cpu_bytes_per_s + cpu_from_disk / hw.cpu_from_disk_bytes_per_s,
            "store": cpu_from_gpu / hw.cpu_from_gpu_bytes_per_s + disk_from_cpu / hw.disk_from_cpu_bytes_per_s,
            "compute": sum(n.flops for n in comp) / hw.gpu_matmul_flops_per_s
            + sum(n.flops_per_ctx * at for n in comp) / hw.gpu_attn_flops_per_s,
        })
    return out


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_cost_model_by_hand(family):
    spec = tiny_spec(family, kv_heads=1 if family == "llama" else None)
    g = lower(spec, WL, BLOCK)
    hw = toy_profile()
    pol = Policy(2, 2, Placement(0.5, 0.3, 0.2), Placement(0.25, 0.5, 0.25), Placement(0.0, 1.0, 0.0))
    p = evaluate(g, hw, pol)
    ctx = WL.prompt_len + WL.gen_len / 2
    assert decode_ctx(g) == ctx == 10
    pre = hand_step_times(g, Phase.PREFILL, 0, pol, hw)
    dec = hand_step_times(g, Phase.DECODE, ctx, pol, hw)
    prefill_s = sum(max(s.values()) for s in pre)
    decode_s = sum(max(s.values()) for s in dec)
    total_s = prefill_s + (WL.gen_len - 1) * decode_s
    assert p.prefill_s == pytest.approx(prefill_s, rel=1e-5)
    assert p.decode_step_s == pytest.approx(decode_s, rel=1e-5)
    assert p.total_s == pytest.approx(total_s, rel=1e-5)
    assert p.tokens_per_s == pytest.approx(BLOCK.size * WL.gen_len / total_s, rel=1e-5)
    assert p.peak_bytes == {t.value: v for t, v in peak_bytes(g, pol, profile=hw).items()}


def test_step_is_max_of_streams_not_sum():
    # rates chosen so a decoder layer's decode step has both a link time and a compute time, neither negligible
    spec = tiny_spec("opt")
    g = lower(spec, WL, BLOCK)
    dec_layer = [d["node"] for k, d in g.nodes(data=True)
                 if k.phase is Phase.DECODE and k.layer == 1 and k.kind is NodeKind.COMPUTE]
    flops = sum(n.flops_at(10) for n in dec_layer)
    wbytes = g.nodes[next(k for k in g.nodes if k.phase is Phase.DECODE and k.kind is NodeKind.LOAD_WEIGHT
                          and k.layer == 1)]["node"].bytes
    hw = toy_profile(gpu_matmul_flops_per_s=flops / 1e-3, gpu_attn_flops_per_s=flops / 1e-3,
                     gpu_from_cpu_bytes_per_s=wbytes / 1.5e-3)
    pol = Policy(2, 2, CPU, GPU, GPU)  # only the weights cross a link
    p = evaluate(g, hw, pol)
    dec = hand_step_times(g, Phase.DECODE, 10, pol, hw)
    assert all(s["load"] > 0 and s["compute"] > 0 for s in dec[1:-1])
    by_max = sum(max(s.values()) for s in dec)
    by_sum = sum(sum(s.values()) for s in dec)
    assert p.decode_step_s == pytest.approx(by_max, rel=1e-5)
    assert by_sum > 1.2 * by_max  # the decoder layers overlap 1 ms of compute with 1.5 ms of loading
    assert p.binding == "gpu<-cpu link"


def test_binding_names_compute_when_all_on_gpu():
    g = lower(tiny_spec(), WL, BLOCK)
    p = evaluate(g, toy_profile(), Policy(2, 2, GPU, GPU, GPU))
    assert p.binding == "compute"
    # the CPU holds only the pinned buffer that stages the weights onto the GPU
    assert p.peak_bytes["cpu"] == max(graph_shape(g).weight_bytes) and p.peak_bytes["disk"] == 0
    assert evaluate(g, toy_profile(has_gpu=False), Policy(2, 2, GPU, GPU, GPU)).peak_bytes["cpu"] == 0


def test_predictions_round_trip_msgpack():
    g = lower(tiny_spec(), WL, BLOCK)
    p = evaluate(g, toy_profile(), Policy(2, 2, Placement(1 / 3, 2 / 3, 0.0), CPU, DISK))
    d = p.to_dict()
    back = msgpack.unpackb(msgpack.packb(d, use_bin_type=True), raw=False)
    assert back == d
    assert Predictions.from_dict(back) == p
    assert msgpack.packb(Predictions.from_dict(back).to_dict()) == msgpack.packb(d)


# ---------------------------------------------------------------- LP


def test_lp_objective_agrees_with_evaluation():
    spec = tiny_spec("llama", layers=3, kv_heads=1)
    g = lower(spec, WL, BLOCK)
    mem = memory_figures(g)
    # the GPU holds the workspace, every slot and a third of the weights: the rest must stream
    gpu = mem.workspace_bytes + sum(mem.slot_bytes.values()) + mem.total_bytes["weights"] // 3
    r = solve_block(g, toy_profile(gpu=gpu))
    assert r.status == "Optimal" and r.feasible
    assert r.policy.weights.gpu_frac < 1
    assert r.predictions.total_s == pytest.approx(r.objective_s, rel=1e-4)
    assert fits(g, r.policy, toy_profile(gpu=gpu))


def test_lp_partial_fixed_fraction():
    g = lower(tiny_spec(), WL, BLOCK)
    r = solve_block(g, toy_profile(), fixed={"cache.gpu": 0.0, "cache.disk": 0.0})
    assert r.feasible
    assert r.policy.cache == CPU
    assert r.policy.weights == GPU and r.policy.hidden == GPU


def test_lp_rejects_unknown_fixed_key():
    g = lower(tiny_spec(), WL, BLOCK)
    with pytest.raises(ValueError, match="unknown fixed key"):
        solve_block(g, toy_profile(), fixed={"activations": GPU})


# ---------------------------------------------------------------- search


def tiny_search(profile, spec=None, wl=WL, **kw) -> SearchResult:
    spec = spec or tiny_spec()
    return search(partial(lower, spec, wl), profile, wl, **kw)


def test_huge_gpu_puts_everything_on_gpu():
    # without CPU attention (with it, the toy CPU attends part of the cache in parallel: see below)
    r = tiny_search(toy_profile(), allowed_flags=())
    pol = r.policy
    assert (pol.weights, pol.cache, pol.hidden) == (GPU, GPU, GPU)
    assert r.predictions.peak_bytes["disk"] == 0
    assert r.predictions.binding == "compute"
    assert r.points_tried >= 1  # every block ties: the branch and bound stops after the first


def _tight_gpu(spec, wl, block) -> tuple[int, object]:
    g = lower(spec, wl, block)
    mem = memory_figures(g)
    # room for the workspace, all slots and half of the weights; cache and hidden are too small to matter
    assert mem.total_bytes["cache"] + mem.total_bytes["hidden"] < mem.total_bytes["weights"] // 4
    return mem.workspace_bytes + sum(mem.slot_bytes.values()) + mem.total_bytes["weights"] // 2, mem


def test_small_gpu_moves_weights_off_gpu():
    spec = tiny_spec("opt", layers=4, heads=4, head_dim=8, ffn=128)
    gpu, _ = _tight_gpu(spec, WL, BLOCK)
    hw = toy_profile(gpu=gpu)
    r = tiny_search(hw, spec, gpu_batch_size=2, num_gpu_batches=2)
    assert 0 < r.policy.weights.gpu_frac < 1
    assert r.policy.weights.disk_frac == 0  # the CPU is large and faster than the disk
    assert fits(lower(spec, WL, BLOCK), r.policy, hw)
    assert r.predictions.peak_bytes["gpu"] <= gpu


def test_small_gpu_and_cpu_push_weights_to_disk():
    spec = tiny_spec("llama", layers=4, heads=4, head_dim=8, kv_heads=2, ffn=128)
    gpu, mem = _tight_gpu(spec, WL, BLOCK)
    cpu = mem.total_bytes["weights"] // 8
    hw = toy_profile(gpu=gpu, cpu=cpu, has_gpu=False)  # no pinned staging: the CPU holds homes only
    r = tiny_search(hw, spec, gpu_batch_size=2, num_gpu_batches=2)
    assert r.policy.weights.disk_frac > 0
    assert fits(lower(spec, WL, BLOCK), r.policy, hw)
    assert r.predictions.peak_bytes["cpu"] <= cpu


def test_fixed_policy_is_respected_exactly():
    fixed = {"weights": Placement(0.5, 0.25, 0.25), "cache": Placement(0.0, 1.0, 0.0), "hidden": CPU}
    r = tiny_search(toy_profile(), fixed=fixed)
    assert (r.policy.weights, r.policy.cache, r.policy.hidden) == (fixed["weights"], fixed["cache"], fixed["hidden"])
    g = lower(tiny_spec(), WL, Block(r.policy.gpu_batch_size, r.policy.num_gpu_batches))
    assert r.predictions == evaluate(g, toy_profile(), r.policy)
    # one class fixed: the LP places the others
    r = tiny_search(toy_profile(), fixed={"weights": DISK}, gpu_batch_size=2, num_gpu_batches=2)
    assert r.policy.weights == DISK
    assert r.policy.cache == GPU


def test_search_is_deterministic():
    a = tiny_search(toy_profile(gpu=1 << 16))
    b = tiny_search(toy_profile(gpu=1 << 16))
    assert a == b
    assert msgpack.packb(a.to_dict()) == msgpack.packb(b.to_dict())
    assert SearchResult.from_dict(msgpack.unpackb(msgpack.packb(a.to_dict()), raw=False)) == a
    wl = Workload(64, 32)
    spec = catalog_spec("HuggingFaceTB/SmolLM2-135M-Instruct")
    c = search(partial(lower, spec, wl), load_profile("cpu-small"), wl)
    d = search(partial(lower, spec, wl), load_profile("cpu-small"), wl)
    assert c == d


def test_ties_go_to_smaller_gpu_peak_then_smaller_block():
    # everything on the GPU is compute bound: tokens/s is the same for every block, so the smallest wins
    r = tiny_search(toy_profile())
    assert (r.policy.gpu_batch_size, r.policy.num_gpu_batches) == (1, 1)


def test_infeasible_names_the_gpu_tier():
    with pytest.raises(InfeasiblePlanError, match="gpu tier") as e:
        tiny_search(toy_profile(gpu=1024))
    assert e.value.tier is Tier.GPU
    assert e.value.capacity_bytes == 1024 and e.value.peak_bytes > 1024
    assert "1024 bytes" in str(e.value)


def test_infeasible_names_the_disk_tier_when_the_model_fits_nowhere():
    spec = tiny_spec(layers=4, ffn=128)
    g = lower(spec, WL, Block(1, 1))
    mem = memory_figures(g)
    small = mem.total_bytes["weights"] // 4
    gpu = mem.workspace_bytes + sum(mem.slot_bytes.values()) + small
    with pytest.raises(InfeasiblePlanError, match="disk tier") as e:
        tiny_search(toy_profile(gpu=gpu, cpu=small, disk=small, has_gpu=False), spec)
    assert e.value.tier is Tier.DISK and e.value.peak_bytes > small


def test_fixed_policy_that_does_not_fit_names_the_tier():
    with pytest.raises(InfeasiblePlanError, match="gpu tier"):
        tiny_search(toy_profile(gpu=1 << 12), fixed={"weights": GPU, "cache": GPU, "hidden": GPU})


def test_catalog_model_on_builtin_profile():
    wl = Workload(64, 32)
    r = search(partial(lower, catalog_spec("HuggingFaceTB/SmolLM2-135M-Instruct"), wl), load_profile("cpu-small"), wl)
    assert r.policy.weights == GPU  # 0.6 GB of fp32 weights fit the 8 GiB budget
    assert r.predictions.tokens_per_s > 0
    small = dataclasses.replace(load_profile("cpu-small"), gpu_bytes=300 << 20)
    r = search(partial(lower, catalog_spec("HuggingFaceTB/SmolLM2-135M-Instruct"), wl), small, wl)
    assert r.policy.weights.gpu_frac < 1
    assert r.predictions.peak_bytes["gpu"] <= 300 << 20


# ---------------------------------------------------------------- capacity property


@st.composite
def cases(draw):
    family = draw(st.sampled_from(["opt", "llama"]))
    heads = draw(st.sampled_from([1, 2, 4]))
    kv = draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0])) if family == "llama" else None
    spec = tiny_spec(family, layers=draw(st.integers(1, 3)), heads=heads, head_dim=draw(st.sampled_from([4, 8])),
                     kv_heads=kv, ffn=draw(st.sampled_from([8, 24, 64])), vocab=draw(st.sampled_from([32, 100])),
                     dtype=draw(st.sampled_from(["float32", "float16"])))
    wl = Workload(draw(st.integers(1, 32)), draw(st.integers(1, 8)))
    block = Block(draw(st.sampled_from([1, 2, 4, 8])), draw(st.sampled_from([1, 2, 4])))
    # capacities across orders of magnitude around what the block needs, so that every tier gets used
    mem = memory_figures(lower(spec, wl, block))
    need = sum(mem.total_bytes.values())
    gpu_floor = mem.workspace_bytes + draw(st.sampled_from([0, sum(mem.slot_bytes.values())]))
    scale = {t: 2.0 ** draw(st.floats(-8, 2)) for t in ("gpu", "cpu", "disk")}
    caps = {t: max(1, int(need * scale[t])) for t in scale}
    caps["gpu"] += gpu_floor
    return spec, wl, block, caps


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_plans_fit_their_capacities(case):
    spec, wl, block, caps = case
    hw = toy_profile(**caps)
    try:
        r = search(partial(lower, spec, wl), hw, wl, gpu_batch_size=block.gpu_batch_size,
                   num_gpu_batches=block.num_gpu_batches)
    except InfeasiblePlanError as e:
        assert e.tier is not None and e.tier.value in str(e)
        assert e.peak_bytes > e.capacity_bytes == caps[e.tier.value]
        return
    g = lower(spec, wl, block)
    peaks = peak_bytes(g, r.policy, profile=hw)
    assert {t.value: v for t, v in peaks.items()} == r.predictions.peak_bytes
    for t in TIERS:
        assert peaks[t] <= caps[t.value], f"{t.value}: {peaks[t]} > {caps[t.value]}"


@settings(max_examples=8, deadline=None)
@given(cases())
def test_full_search_fits(case):
    spec, wl, _, caps = case
    hw = toy_profile(**caps)
    try:
        r = search(partial(lower, spec, wl), hw, wl)
    except InfeasiblePlanError as e:
        assert e.tier is not None
        return
    g = lower(spec, wl, Block(r.policy.gpu_batch_size, r.policy.num_gpu_batches))
    assert fits(g, r.policy, hw)
    assert phase_costs(g, hw).block_size == r.policy.gpu_batch_size * r.policy.num_gpu_batches


# ---------------------------------------------------------------- block figures without lowering per block


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_figures_of_any_block_follow_from_two_tiny_lowerings(family):
    spec = tiny_spec(family, layers=3, kv_heads=1 if family == "llama" else None)
    lower_fn = partial(lower, spec, WL)
    model = FigureModel.sample(lower_fn)
    for block in (Block(1, 1), Block(4, 1), Block(5, 3), Block(8, 4)):
        assert model.at(block) == block_figures(lower_fn(block))


# ---------------------------------------------------------------- CPU attention and compression, by hand


def hand_cpu_attention_decode(g, ctx: float, pol: Policy, hw: HardwareProfile) -> list[dict[str, float]]:
    """Decode streams per graph layer with CPU attention, from the nodes (toy profile: no roofline, no overhead)."""
    w, c, h = pol.weights, pol.cache, pol.hidden
    out = []
    for j in range(1 + max(k.layer for k in g.nodes)):
        nodes = [d["node"] for k, d in g.nodes(data=True) if k.phase is Phase.DECODE and k.layer == j]

        def total(kind):
            return sum(n.bytes + n.bytes_per_ctx * ctx for n in nodes if n.key.kind is kind)

        wb, cl, cs = total(NodeKind.LOAD_WEIGHT), total(NodeKind.LOAD_CACHE), total(NodeKind.STORE_CACHE)
        hl, hs = total(NodeKind.LOAD_HIDDEN), total(NodeKind.STORE_HIDDEN)
        comp = [n for n in nodes if n.key.kind is NodeKind.COMPUTE]
        dense = sum(n.flops for n in comp) / hw.gpu_matmul_flops_per_s
        attn_flops = sum(n.flops_per_ctx * ctx for n in comp)
        delegated = c.cpu_frac if cl else 0.0  # decoder layers only
        # q (hidden-sized) and the new k, v go to the host; the attention output comes back
        to_cpu, to_gpu = (hs + cs, hs) if cl else (0.0, 0.0)
        out.append({
            "load": ((1 - w.gpu_frac) * wb + c.disk_frac * cl + delegated * to_gpu + (1 - h.gpu_frac) * hl)
            / hw.gpu_from_cpu_bytes_per_s
            + (w.disk_frac * wb + c.disk_frac * cl + h.disk_frac * hl) / hw.cpu_from_disk_bytes_per_s,
            "store": (c.disk_frac * cs + delegated * to_cpu + (1 - h.gpu_frac) * hs) / hw.cpu_from_gpu_bytes_per_s
            + (c.disk_frac * cs + h.disk_frac * hs) / hw.disk_from_cpu_bytes_per_s,
            # delegated attention runs on the compute stream: its CPU time adds to the GPU compute
            "compute": dense + (1 - delegated) * attn_flops / hw.gpu_attn_flops_per_s
            + delegated * max(attn_flops / hw.cpu_matmul_flops_per_s, (cl + cs) / hw.cpu_mem_bytes_per_s),
        })
    return out


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_cpu_attention_cost_by_hand(family):
    spec = tiny_spec(family, kv_heads=1 if family == "llama" else None)
    g = lower(spec, WL, BLOCK)
    hw = toy_profile()
    pol = Policy(2, 2, Placement(0.5, 0.5, 0.0), Placement(0.25, 0.5, 0.25), Placement(0.0, 1.0, 0.0),
                 cpu_attention=True)
    p = evaluate(g, hw, pol)
    dec = hand_cpu_attention_decode(g, decode_ctx(g), pol, hw)
    assert p.decode_step_s == pytest.approx(sum(max(s.values()) for s in dec), rel=1e-5)
    # prefill does not change with the flag
    assert p.prefill_s == evaluate(g, hw, dataclasses.replace(pol, cpu_attention=False)).prefill_s


def test_cpu_attention_keeps_cpu_cache_off_the_link():
    spec = tiny_spec("opt", layers=3)
    g = lower(spec, WL, BLOCK)
    hw = toy_profile(gpu_from_cpu_bytes_per_s=1e5, cpu_from_gpu_bytes_per_s=1e5)  # a slow link
    on_cpu = Policy(2, 2, GPU, CPU, GPU)
    slow, fast = evaluate(g, hw, on_cpu), evaluate(g, hw, dataclasses.replace(on_cpu, cpu_attention=True))
    assert slow.binding == "gpu<-cpu link"
    assert fast.decode_step_s < slow.decode_step_s / 5
    # and the cache needs no GPU slots, only the CPU attention's transients on the CPU
    shape_peaks, ca_peaks = peak_bytes(g, on_cpu), peak_bytes(g, dataclasses.replace(on_cpu, cpu_attention=True))
    assert ca_peaks[Tier.GPU] < shape_peaks[Tier.GPU]
    assert ca_peaks[Tier.CPU] > shape_peaks[Tier.CPU]


def test_slow_gpu_attention_is_delegated_by_the_search():
    # a GPU that attends 100x slower than the CPU: delegating the attention (on the compute
    # stream, so CPU time adds to GPU time) wins
    hw = toy_profile(gpu_attn_flops_per_s=1e6)
    r = tiny_search(hw, gpu_batch_size=2, num_gpu_batches=2)
    assert r.policy.cpu_attention and r.policy.cache.cpu_frac > 0
    no_flag = tiny_search(hw, gpu_batch_size=2, num_gpu_batches=2, allowed_flags=())
    assert r.predictions.tokens_per_s > no_flag.predictions.tokens_per_s
    assert not no_flag.policy.cpu_attention


def test_compressed_sizes_by_hand():
    # one definition (flexgen_graph.layout) sizes the planner's buffers and the runtime's codecs
    assert compressed_nbytes((4096,), 0, QuantConfig()) == 4096 // 2 + 4 * 4096 // 64
    for shape in [(64, 64), (10, 100), (3, 7, 65), (128,), (5, 1)]:
        rows = 1
        for d in shape[:-1]:
            rows *= d
        for g in (64, 32):
            groups = (shape[-1] + g - 1) // g  # a partial group is padded to a whole one
            assert compressed_nbytes(shape, -1, QuantConfig(4, g)) == rows * groups * (g // 2 + 4), (shape, g)


def test_compressed_layer_keeps_vectors_and_aligns_tensors():
    spec = tiny_spec("opt", heads=8, head_dim=8, ffn=128, dtype="float16")  # hidden 64
    by_hand = 0
    for ts in spec.layer_tensors(1):
        n = len(ts.shape) == 2 and ts.shape[0] * (ts.shape[1] // 2 + 4 * ts.shape[1] // 64) or ts.numel * 2
        by_hand += -(-n // 64) * 64
    assert spec.compressed_layer_bytes(1, QuantConfig()) == by_hand < spec.layer_bytes(1) / 3


def test_compressed_policies_count_compressed_homes_and_links():
    spec = tiny_spec("llama", heads=2, head_dim=64, kv_heads=1, ffn=256, dtype="float16")
    g = lower(spec, WL, BLOCK)
    comp = compression_of(spec)
    hw = toy_profile()
    plain = Policy(2, 2, CPU, CPU, GPU)
    both = dataclasses.replace(plain, compress_weights=True, compress_cache=True)
    with pytest.raises(ValueError, match="spec"):
        evaluate(g, hw, both)  # compressed sizes need the model
    shape = graph_shape(g)
    n_cache = spec.num_layers * 2
    assert peak_bytes(g, plain)[Tier.CPU] == sum(shape.weight_bytes) + n_cache * shape.cache_bytes
    assert peak_bytes(g, both, spec)[Tier.CPU] == sum(comp.weight_bytes) + n_cache * comp.cache(shape.cache_bytes)
    assert comp.cache(shape.cache_bytes) == shape.cache_bytes // 128 * 36  # 64 fp16 values -> 32 + 4 bytes
    # the decoder layers' weights cross the link at their compressed size
    a, b = phase_costs(g, hw), phase_costs(g, hw, Flags(compress_weights=True), comp)
    link = TERMS.index("gpu<-cpu link")
    pa = next(s for s in a.decode if 1 in s.layers).terms[link]
    pb = next(s for s in b.decode if 1 in s.layers).terms[link]
    wa, wb = dict(pa.coefs)["weights.cpu"], dict(pb.coefs)["weights.cpu"]
    assert wb / wa == pytest.approx(comp.weight_bytes[1] / shape.weight_bytes[1])
    # dequantization costs compute time: reading the compressed bytes and writing the full ones
    ca = next(s for s in a.decode if 1 in s.layers).terms[0].const
    cb = next(s for s in b.decode if 1 in s.layers).terms[0].const
    assert cb > ca


def test_search_turns_compression_on_only_when_allowed():
    spec = tiny_spec("opt", layers=4, heads=4, head_dim=16, ffn=256, dtype="float16")
    g = lower(spec, WL, BLOCK)
    mem = memory_figures(g)
    # the GPU holds about half the weights uncompressed: all of them compressed
    gpu = mem.workspace_bytes + sum(mem.slot_bytes.values()) + mem.total_bytes["weights"] // 2
    hw = toy_profile(gpu=gpu, gpu_from_cpu_bytes_per_s=1e6)
    default = tiny_search(hw, spec, gpu_batch_size=2, num_gpu_batches=2)
    assert not (default.policy.compress_weights or default.policy.compress_cache)
    with pytest.raises(ValueError, match="spec"):
        tiny_search(hw, spec, gpu_batch_size=2, num_gpu_batches=2, allowed_flags=("compress_weights",))
    r = search(partial(lower, spec, WL), hw, WL, gpu_batch_size=2, num_gpu_batches=2,
               allowed_flags=("compress_weights",), spec=spec)
    assert r.policy.compress_weights and r.policy.weights == GPU
    assert r.predictions.tokens_per_s > default.predictions.tokens_per_s
    assert r.predictions.peak_bytes["gpu"] <= gpu


def test_forced_flag_is_respected():
    r = tiny_search(toy_profile(), fixed={"cpu_attention": True}, allowed_flags=(), gpu_batch_size=2,
                    num_gpu_batches=2)
    assert r.policy.cpu_attention
    r = tiny_search(toy_profile(), fixed={"cpu_attention": False}, gpu_batch_size=2, num_gpu_batches=2)
    assert not r.policy.cpu_attention
    with pytest.raises(TypeError, match="bool"):
        tiny_search(toy_profile(), fixed={"cpu_attention": 1})


# ---------------------------------------------------------------- explaining the result


def test_binding_constraint_tells_capacity_from_link_and_compute():
    spec = tiny_spec("opt", layers=4, heads=4, head_dim=8, ffn=128)
    gpu, _ = _tight_gpu(spec, WL, BLOCK)
    slow_link = dict(gpu_from_cpu_bytes_per_s=1e6)
    tight = tiny_search(toy_profile(gpu=gpu, **slow_link), spec, gpu_batch_size=2, num_gpu_batches=2, allowed_flags=())
    assert tight.predictions.binding == "gpu<-cpu link" and "gpu" in tight.predictions.tight
    assert tight.predictions.binding_constraint == "gpu capacity"
    roomy = tiny_search(toy_profile(**slow_link), spec, gpu_batch_size=2, num_gpu_batches=2, allowed_flags=())
    assert roomy.predictions.binding_constraint == "compute" and roomy.predictions.tight == ()
    # weights forced off the GPU with room to spare: the link binds, not the capacity
    forced = tiny_search(toy_profile(**slow_link), spec, gpu_batch_size=2, num_gpu_batches=2, allowed_flags=(),
                         fixed={"weights": CPU})
    assert forced.predictions.binding_constraint == "gpu<-cpu link"
    assert Predictions.from_dict(tight.predictions.to_dict()) == tight.predictions


def test_infeasible_forced_policy_names_tier_and_bytes_over():
    with pytest.raises(InfeasiblePlanError) as e:
        tiny_search(toy_profile(gpu=1 << 12), fixed={"weights": GPU, "cache": GPU, "hidden": GPU})
    msg = str(e.value)
    assert e.value.tier is Tier.GPU and f"{e.value.over_bytes} bytes over" in msg and "4096 bytes" in msg


def test_gpu_profiles_count_the_cuda_backends_pinned_staging():
    g = lower(tiny_spec("opt", layers=3), WL, BLOCK)
    pol = Policy(2, 2, Placement(0.5, 0.0, 0.5), DISK, CPU)
    gpu_box, cpu_box = toy_profile(), dataclasses.replace(toy_profile(), has_gpu=False)
    with_staging, without = peak_bytes(g, pol, profile=gpu_box), peak_bytes(g, pol, profile=cpu_box)
    shape = graph_shape(g)
    tiers = assign_tiers(list(shape.weight_bytes), pol.weights)
    gpu_w = max(b for b, t in zip(shape.weight_bytes, tiers) if t is Tier.GPU)
    disk_w = max(b for b, t in zip(shape.weight_bytes, tiers) if t is Tier.DISK)
    # loading GPU homes at allocation, reading disk homes (a weight layer), writing them (a cache)
    assert with_staging[Tier.CPU] - without[Tier.CPU] == gpu_w + max(disk_w, shape.cache_bytes) + shape.cache_bytes
    assert with_staging[Tier.GPU] == without[Tier.GPU] and with_staging[Tier.DISK] == without[Tier.DISK]
    assert evaluate(g, gpu_box, pol).peak_bytes["cpu"] == with_staging[Tier.CPU]


def test_compressing_a_narrow_cache_costs_bytes_and_is_not_chosen():
    # head_dim 8 < the 64-value group: each row pads to a whole group (36 bytes for 8 fp32 values = 32)
    spec = tiny_spec("llama", head_dim=8, kv_heads=1)
    g = lower(spec, WL, BLOCK)
    comp = compression_of(spec)
    assert comp.cache(graph_shape(g).cache_bytes) > graph_shape(g).cache_bytes
    r = search(partial(lower, spec, WL), toy_profile(), WL, gpu_batch_size=2, num_gpu_batches=2,
               allowed_flags=("compress_cache",), spec=spec)
    assert not r.policy.compress_cache


def test_delegated_cache_with_a_forced_disk_share_still_gets_slots():
    spec = tiny_spec("opt", layers=2)
    r = tiny_search(toy_profile(), spec, gpu_batch_size=2, num_gpu_batches=2,
                    fixed={"cache": Placement(0.0, 0.5, 0.5), "cpu_attention": True})
    g = lower(spec, WL, BLOCK)
    bp = build_buffers(graph_shape(g), r.policy)
    assert bp.cache_slots  # the disk half streams through the GPU
    assert {Tier.CPU, Tier.DISK} <= set(bp.cache_tier.values())
    assert fits(g, r.policy, toy_profile())
