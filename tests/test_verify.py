"""Verifier: hazards are found and named, memory is simulated over every step; and the planner's
promise, property-tested: every plan the search returns is hazard-free, fits every tier, and its
predicted peaks bound the simulated ones."""

from __future__ import annotations

import dataclasses
from functools import partial

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_planner import tiny_spec, toy_profile

from flexgen_graph.app.api import compile_plan
from flexgen_graph.catalog import catalog_spec
from flexgen_graph.hardware import load_profile
from flexgen_graph.ir import TIERS, Block, Phase, Tier, Workload
from flexgen_graph.lower import lower
from flexgen_graph.policy import Placement, Policy
from flexgen_graph.program import BufferRole, OpKind, Programs
from planner.compile import programs_for
from planner.errors import InfeasiblePlanError
from planner.lp import memory_figures
from planner.memory import buffer_bytes, peak_bytes
from planner.schedule import emit_programs
from planner.search import search
from planner.verify import (
    PlanHazardError,
    hazards,
    op_transients,
    simulate,
    simulate_plan,
    verify,
)

GPU, CPU, DISK = (Placement.all_on(t) for t in TIERS)
WL = Workload(8, 4)


def streamed_programs(nb: int = 2) -> Programs:
    g = lower(catalog_spec("facebook/opt-125m"), Workload(16, 4), Block(2, nb))
    return emit_programs(g, Policy(2, nb, CPU, CPU, GPU))


def with_op(programs: Programs, i: int, **change) -> Programs:
    decode = list(programs.decode)
    decode[i] = dataclasses.replace(decode[i], **change)
    return Programs(programs.buffers, programs.prefill, tuple(decode))


def decode_hazards(programs: Programs) -> list[str]:
    return list(hazards(programs.decode, programs, "decode"))


# ---------------------------------------------------------------- hazards


def test_clean_programs_have_no_hazards():
    p = streamed_programs()
    verify(p)
    assert decode_hazards(p) == [] and list(hazards(p.prefill, p, "prefill")) == []


def test_load_without_wait_overwrites_a_slot_still_read():
    p = streamed_programs()
    i = next(i for i, op in enumerate(p.decode) if op.kind is OpKind.LOAD_WEIGHT and op.waits)
    found = decode_hazards(with_op(p, i, waits=()))
    assert found and all("overwrite" in h for h in found)
    assert f"op {i} " in found[0] and "buffer" in found[0]
    with pytest.raises(PlanHazardError, match="overwrite"):
        verify(with_op(p, i, waits=()))


def test_compute_reading_a_slot_nothing_loaded():
    p = streamed_programs()
    first = next(i for i, op in enumerate(p.decode) if op.kind is OpKind.LOAD_WEIGHT)
    other = next(b.id for b in p.buffers if b.role is BufferRole.WEIGHT_SLOT and b.id != p.decode[first].dst)
    found = decode_hazards(with_op(p, first, dst=other))
    assert any("before anything loads it" in h for h in found)


def test_waits_on_a_later_op_or_a_missing_buffer():
    p = streamed_programs()
    found = decode_hazards(with_op(p, 3, waits=(7,)))
    assert found == [f"decode op 3 ({p.decode[3].node}) waits on op 7, which is not earlier in the program"]
    found = decode_hazards(with_op(p, 0, dst=10**6))
    assert any("buffer 1000000, which does not exist" in h for h in found)


def test_store_racing_the_compute_that_writes_its_slot():
    p = streamed_programs()
    i = next(i for i, op in enumerate(p.decode) if op.kind is OpKind.STORE_CACHE)
    found = decode_hazards(with_op(p, i, waits=()))
    assert any("may read buffer" in h for h in found)


# ---------------------------------------------------------------- memory simulation


def test_simulation_covers_prefill_and_every_decode_step():
    spec, wl = tiny_spec("llama", kv_heads=1), Workload(8, 5)
    g = lower(spec, wl, Block(2, 2))
    pol = Policy(2, 2, Placement(0.5, 0.5, 0.0), Placement(0.5, 0.25, 0.25), CPU)
    programs = emit_programs(g, pol)
    sim = simulate(programs, g, pol)
    assert sim.hazards == ()
    assert [(s.phase, s.ctx) for s in sim.steps] == [(Phase.PREFILL, 8)] + [(Phase.DECODE, 8 + k) for k in range(1, 5)]
    assert sim.static_bytes == buffer_bytes(programs.buffers)
    decode_gpu = [s.peak_bytes[Tier.GPU] for s in sim.steps[1:]]
    assert decode_gpu == sorted(decode_gpu) and decode_gpu[0] < decode_gpu[-1]  # attention scores grow
    assert sim.peaks == {t: max(s.peak_bytes[t] for s in sim.steps) for t in TIERS}
    predicted = peak_bytes(g, pol)
    assert all(sim.peaks[t] <= predicted[t] for t in TIERS)
    # the memory model's transients are those of the longest context: one more token than the last step
    assert predicted[Tier.GPU] - sim.peaks[Tier.GPU] <= g.nodes[next(iter(g.nodes))]["node"].bytes + 10**6


def test_cpu_attended_ops_hold_their_transients_on_the_cpu():
    spec = tiny_spec("opt", layers=2)
    g = lower(spec, WL, Block(2, 2))
    pol = Policy(2, 2, GPU, CPU, GPU, cpu_attention=True)
    programs = emit_programs(g, pol)
    assert not any(b.role is BufferRole.CACHE_SLOT for b in programs.buffers)
    sim = simulate(programs, g, pol)
    assert sim.hazards == () and sim.peaks[Tier.CPU] > sim.static_bytes[Tier.CPU]
    t = op_transients(programs, g, pol, Phase.DECODE, 11)
    cpu_ops = [i for i, op in enumerate(programs.decode) if op.kind is OpKind.DECODER_DECODE_CPU_ATTN]
    assert cpu_ops and all(t[i].cpu > 0 for i in cpu_ops)
    assert all(x.cpu == 0 for i, x in enumerate(t) if i not in cpu_ops)
    assert all(sim.peaks[t] <= v for t, v in peak_bytes(g, pol).items())


def compressed_programs(g, pol: Policy, spec) -> Programs:
    """The programs of a compressed policy, with the buffer table at compressed sizes (same ids)."""
    programs = programs_for(spec, Workload(g.graph["prompt_len"], g.graph["gen_len"]), pol)  # g's workload
    dense = emit_programs(g, pol)
    assert [(b.id, b.role, b.tier) for b in programs.buffers] == [(b.id, b.role, b.tier) for b in dense.buffers]
    return programs


def test_compressed_plans_hold_dequantized_copies_in_their_scratch_for_the_whole_run():
    """The scratch is allocated once at its largest use: counted with the buffer table (a compute op's
    transients are its work bytes alone), so the peak is the table plus the largest work."""
    spec = tiny_spec("llama", heads=2, head_dim=64, kv_heads=1, ffn=256, dtype="float16")
    g = lower(spec, WL, Block(2, 2))
    plain = Policy(2, 2, Placement(0.5, 0.5, 0.0), CPU, GPU)
    both = dataclasses.replace(plain, compress_weights=True, compress_cache=True)
    a = simulate(emit_programs(g, plain), g, plain)
    programs = compressed_programs(g, both, spec)
    b = simulate(programs, g, both)
    scratch = [x for x in programs.buffers if x.role is BufferRole.DEQUANT_SCRATCH]
    assert len(scratch) == 1 and scratch[0].nbytes > max(spec.layer_bytes(j) for j in range(spec.num_graph_layers))
    assert b.static_bytes[Tier.CPU] < a.static_bytes[Tier.CPU] / 3
    assert b.static_bytes[Tier.GPU] == sum(x.nbytes for x in programs.buffers if x.tier is Tier.GPU)
    assert b.peaks[Tier.GPU] - b.static_bytes[Tier.GPU] == a.peaks[Tier.GPU] - a.static_bytes[Tier.GPU]
    predicted = peak_bytes(g, both, spec)
    assert all(b.peaks[t] <= predicted[t] for t in TIERS)


def test_simulate_plan_of_a_compiled_catalog_plan():
    plan = compile_plan(catalog_spec("facebook/opt-125m"), load_profile("cpu-small"), Workload(16, 4))
    sim = simulate_plan(plan)
    assert sim.hazards == () and sim.faults({Tier.GPU: 1, Tier.CPU: 1 << 40, Tier.DISK: 1 << 40})
    assert all(sim.peaks[t] <= plan.predictions["peak_bytes"][t.value] for t in TIERS)


# ---------------------------------------------------------------- the planner's promise, property-tested

RATES = ("gpu_from_cpu_bytes_per_s", "cpu_from_gpu_bytes_per_s", "cpu_from_disk_bytes_per_s",
         "disk_from_cpu_bytes_per_s", "gpu_matmul_flops_per_s", "gpu_attn_flops_per_s", "cpu_matmul_flops_per_s",
         "cpu_mem_bytes_per_s", "gpu_mem_bytes_per_s", "gpu_dequant_bytes_per_s", "cpu_dequant_bytes_per_s",
         "stage_link_bytes_per_s")
PLACEMENTS = [GPU, CPU, DISK, Placement(0.5, 0.5, 0.0), Placement(0.0, 0.5, 0.5), Placement(0.3, 0.3, 0.4)]
SIZES, COUNTS = (1, 2, 4), (1, 2)


@st.composite
def planning_cases(draw):
    family = draw(st.sampled_from(["opt", "llama"]))
    heads = draw(st.sampled_from([1, 2, 4]))
    kv = draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0])) if family == "llama" else None
    spec = tiny_spec(family, layers=draw(st.integers(1, 3)), heads=heads, head_dim=draw(st.sampled_from([4, 8, 64])),
                     kv_heads=kv, ffn=draw(st.sampled_from([8, 24, 64])), vocab=draw(st.sampled_from([32, 100])),
                     dtype=draw(st.sampled_from(["float32", "float16"])))
    wl = Workload(draw(st.integers(1, 24)), draw(st.integers(1, 6)))
    mem = memory_figures(lower(spec, wl, Block(2, 2)))
    need = sum(mem.total_bytes.values())
    scale = {t: 2.0 ** draw(st.floats(-7, 2)) for t in ("gpu", "cpu", "disk")}
    caps = {t: max(1, int(need * scale[t])) for t in scale}
    caps["gpu"] += mem.workspace_bytes + draw(st.sampled_from([0, sum(mem.slot_bytes.values())]))
    rates = {r: 1e9 * 10.0 ** draw(st.floats(-3, 3)) for r in RATES}
    hw = toy_profile(**caps, **rates, matmul_min_rows=draw(st.sampled_from([1, 64])),
                     compute_op_overhead_s=draw(st.sampled_from([0.0, 1e-4])))
    hw = dataclasses.replace(hw, has_gpu=draw(st.booleans()))
    fixed: dict = {}
    forced = draw(st.sampled_from(["none", "flags", "one class", "all"]))
    if forced in ("flags", "all"):
        fixed.update({f: draw(st.booleans()) for f in ("cpu_attention", "compress_weights", "compress_cache")})
    if forced == "one class":
        fixed[draw(st.sampled_from(["weights", "cache", "hidden"]))] = draw(st.sampled_from(PLACEMENTS))
    if forced == "all":
        fixed.update({c: draw(st.sampled_from(PLACEMENTS)) for c in ("weights", "cache", "hidden")})
    return spec, wl, hw, fixed


def check_plan_promise(spec, wl, hw, fixed) -> None:
    caps = {Tier.GPU: hw.gpu_bytes, Tier.CPU: hw.cpu_bytes, Tier.DISK: hw.disk_bytes}
    run = partial(search, partial(lower, spec, wl), hw, wl, gpu_batch_size=SIZES, num_gpu_batches=COUNTS,
                  fixed=fixed, spec=spec)
    try:
        r = run()
    except InfeasiblePlanError as e:
        assert e.tier is not None and e.tier.value in str(e) and f"{e.over_bytes} bytes over" in str(e)
        assert e.peak_bytes > e.capacity_bytes == caps[e.tier]
        return
    pol = r.policy
    for key, v in fixed.items():  # forced is forced
        assert getattr(pol, key) == v, key
    g = lower(spec, wl, Block(pol.gpu_batch_size, pol.num_gpu_batches))
    compressed = pol.compress_weights or pol.compress_cache
    programs = compressed_programs(g, pol, spec) if compressed else emit_programs(g, pol)
    sim = simulate(programs, g, pol, pinned_staging=hw.has_gpu)
    assert sim.hazards == ()
    assert {t.value: v for t, v in peak_bytes(g, pol, spec, profile=hw).items()} == r.predictions.peak_bytes
    for t in TIERS:
        assert sim.peaks[t] <= caps[t], f"{t.value}: simulated {sim.peaks[t]} > capacity {caps[t]}"
        assert sim.peaks[t] <= r.predictions.peak_bytes[t.value], f"{t.value}: simulated above predicted"
    again = run()  # compiling is deterministic
    assert again == r and msgpack.packb(again.to_dict()) == msgpack.packb(r.to_dict())
    assert emit_programs(g, again.policy) == emit_programs(g, pol)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(planning_cases())
def test_every_plan_is_hazard_free_fits_and_is_bounded_by_its_prediction(case):
    check_plan_promise(*case)
