"""The calibrated cost model: profile files refused naming what is wrong, the cost terms read off the
curves they came from (checked by hand), the fit, and the fidelity benchmark's quick mode."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

from flexgen_graph.app import calibrate
from flexgen_graph.app.cli import _profile, main
from flexgen_graph.hardware import (
    BadProfileError,
    Calibration,
    Curve,
    LayerCurve,
    load_profile,
    machine_mismatch,
    save_profile,
)
from flexgen_graph.ir import Block, Phase, Tier, Workload
from flexgen_graph.lower import lower
from flexgen_graph.policy import Placement, Policy
from planner.cost import (
    THREADED,
    evaluate,
    phase_costs,
    policy_fracs,
    stream_sums,
)
from tests.test_planner import tiny_spec

GPU, CPU, DISK = (Placement.all_on(t) for t in (Tier.GPU, Tier.CPU, Tier.DISK))
ON_GPU = dict(weights=GPU, cache=GPU, hidden=GPU)


def toy_calibration(spec=None, **kw) -> Calibration:
    """Round numbers, so every cost term can be worked out by hand."""
    lines = Curve((1.0, 1e9), (1e-3, 1e-3))  # 1 ms per transfer of up to 1 GB
    base = dict(method="curves", matmul_s_per_flop=Curve((1.0, 4.0), (4e-9, 1e-9)), gpu_from_cpu_s=lines,
                cpu_from_gpu_s=lines, disk_read_cold_s=lines.scaled(10), disk_read_warm_s=lines.scaled(2),
                disk_write_s=lines.scaled(5), op_s=1e-4, handoff_s=2e-4, copy_share=0.5, disk_share=0.25,
                cold_disk_share=0.75, page_cache_bytes=1 << 40)
    if spec is not None:
        n = spec.num_graph_layers
        base["layers"] = (
            LayerCurve("embed", spec.layer_bytes(0), spec.name, Curve((1.0,), (1e-5,))),
            LayerCurve("decoder", spec.layer_bytes(1), spec.name, Curve((1.0, 4.0), (1e-3, 2e-3)), attn_s=1e-6,
                       attn_cpu_s=3e-6, prefill_attn_s=1e-7),
            LayerCurve("head", spec.layer_bytes(n - 1), spec.name, Curve((1.0, 2.0), (5e-3, 6e-3))),
        )
    base.update(kw)
    return Calibration(**base)


def calibrated(spec=None, has_gpu: bool = False, **kw):
    return dataclasses.replace(load_profile("cpu-small"), name="toy-cal", has_gpu=has_gpu,
                               calibration=toy_calibration(spec, **kw))


# ---------------------------------------------------------------- profile files: refused naming what is wrong


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_old_profile_file_is_refused_naming_what_is_missing(tmp_path, capsys):
    old = load_profile("cpu-small").to_dict()
    for f in ("version", "machine", "calibration"):  # what version 1 did not have
        del old[f]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    err = _one_line_error(capsys, ["compile", "--model", "facebook/opt-125m", "--profile", str(path), "--prompt-len",
                                   "16", "--gen-len", "4", "-o", str(tmp_path / "p.fgplan")])
    assert "version 1" in err and "missing calibration, machine, version" in err and str(path) in err


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.update(gpu_matmul_flops_per_s=float("nan")), "gpu_matmul_flops_per_s"),
    (lambda d: d.update(cpu_from_disk_bytes_per_s=float("inf")), "cpu_from_disk_bytes_per_s"),
    (lambda d: d.pop("disk_bytes"), "disk_bytes"),
    (lambda d: d["calibration"].pop("handoff_s"), "handoff_s"),
    (lambda d: d["calibration"].update(copy_share=float("nan")), "calibration.copy_share"),
    (lambda d: d["calibration"]["disk_read_cold_s"][1].__setitem__(1, float("inf")), "calibration.disk_read_cold_s[1]"),
    (lambda d: d["calibration"]["layers"][1].pop("attn_s"), "attn_s"),
])
def test_missing_or_non_finite_fields_are_refused_naming_the_field(tmp_path, edit, field):
    d = calibrated(tiny_spec("llama")).to_dict()
    edit(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))  # json writes NaN / Infinity, as a hand-edited file may hold them
    with pytest.raises(BadProfileError) as e:
        load_profile(str(path))
    assert field in str(e.value) and "\n" not in str(e.value)


def test_a_profile_round_trips_with_its_calibration(tmp_path):
    prof = calibrated(tiny_spec("llama"))
    save_profile(prof, tmp_path / "p.json")
    assert load_profile(str(tmp_path / "p.json")) == prof


def test_a_profile_of_another_machine_is_refused_by_run_and_taken_by_compile(tmp_path, capsys):
    other = dataclasses.replace(calibrated(), machine="cpu=Some Other CPU; cores=96; ram_gib=512; gpu=none")
    path = tmp_path / "other.json"
    save_profile(other, path)
    with pytest.raises(calibrate.ProfileMachineError) as e:
        _profile(str(path), here=True)
    msg = str(e.value)
    assert "another machine" in msg and "cores '96'" in msg and "Some Other CPU" in msg
    assert _profile(str(path)) == other  # compiling for that machine is what a profile file is for
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "prompt_ids": [5, 6, 7]}\n')
    err = _one_line_error(capsys, ["run", "--model", "facebook/opt-125m", "--weights", "dummy", "--profile", str(path),
                                   "--input", str(inp), "--output", str(tmp_path / "o.jsonl"),
                                   "--cache-dir", str(tmp_path / "cache")])
    assert "another machine" in err
    here = dataclasses.replace(other, machine="")  # a profile that names no machine applies anywhere
    assert machine_mismatch(here, "cpu=x; cores=1; ram_gib=1; gpu=none") is None


def _stub_measure(calls):
    def measure_profile(offload_dir, name, models=(), method="fit", cache_dir=None):
        calls.append([m.name for m in models])
        from runtime.profiler import machine

        return dataclasses.replace(calibrated(), name=name, machine=machine()), ["stub"]
    return measure_profile


@pytest.mark.parametrize("cached", ["old version", "other machine"])
def test_auto_remeasures_a_cached_profile_from_another_version_or_machine(tmp_path, monkeypatch, capsys, cached):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(calibrate, "measure_profile", _stub_measure(calls))
    monkeypatch.setattr(calibrate, "for_models", lambda prof, models, notes=None: prof)
    d = calibrated().to_dict()
    if cached == "old version":
        del d["version"], d["calibration"]
    else:
        d["machine"] = "cpu=Elsewhere; cores=64; ram_gib=256; gpu=none"
    path = tmp_path / "flexgen-graph" / "profile.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(d))
    prof = _profile("auto", tmp_path / "off")
    assert calls == [[]] and prof.name == "auto"
    assert "re-measuring this machine" in capsys.readouterr().err
    assert load_profile(str(path)) == prof  # the new measurement replaced the old file
    assert _profile("auto", tmp_path / "off") == prof and calls == [[]]  # and is reused


# ---------------------------------------------------------------- cost terms, by hand


def test_curve_interpolates_between_points_and_is_proportional_beyond():
    c = Curve((1.0, 4.0, 16.0), (2.0, 5.0, 8.0))
    assert [c.at(x) for x in (0.5, 1, 2, 4, 10, 16, 32)] == [2.0, 2.0, 3.0, 5.0, 6.5, 8.0, 16.0]


def test_a_measured_curve_never_falls_with_size():
    """A point slower than a later, larger one was slowed by something else: the profiler lowers it."""
    from runtime.profiler import monotone

    assert monotone(Curve((1.0, 2.0, 4.0, 8.0), (5.0, 1.0, 3.0, 2.5))).ys == (1.0, 1.0, 2.5, 2.5)


def test_calibrated_compute_terms_by_hand():
    """Prefill and a decode step of all-on-GPU, from the layer curves: per op the curve at its rows plus the
    fixed cost, attention per sequence and context token (prefill: per T^2), the head at its sequences."""
    spec = tiny_spec("llama", layers=2)
    hw = calibrated(spec)
    b, nb, P, G = 2, 2, 8, 4
    g = lower(spec, Workload(P, G), Block(b, nb))
    pred = evaluate(g, hw, Policy(b, nb, GPU, GPU, GPU))
    op = 1e-4
    embed_pre, embed_dec = nb * (1e-5 * b * P + op), nb * (1e-5 * b + op)  # one point: proportional beyond it
    dec_pre = nb * (2e-3 * (b * P) / 4 + op + 1e-7 * b * P * P)  # rows 16: beyond the last point, proportional
    head = nb * (5e-3 + (b - 1) * 1e-3 + op)  # the head's rows are the sequences: 2 -> 6 ms
    ctx = P + G / 2
    dec_step = nb * (1e-3 + (b - 1) / 3 * 1e-3 + op + 1e-6 * b * ctx)  # rows 2 between the points 1 and 4
    assert pred.prefill_s == pytest.approx(embed_pre + 2 * dec_pre + head, rel=1e-5)
    assert pred.decode_step_s == pytest.approx(embed_dec + 2 * dec_step + head, rel=1e-5)
    assert pred.binding == "compute"


def test_cpu_attention_uses_the_host_attention_curve():
    spec = tiny_spec("llama", layers=1)
    hw = calibrated(spec)
    b, P, G = 2, 8, 4
    g = lower(spec, Workload(P, G), Block(b, 1))
    on_gpu = evaluate(g, hw, Policy(b, 1, GPU, GPU, GPU)).decode_step_s
    delegated = evaluate(g, hw, Policy(b, 1, GPU, CPU, GPU, cpu_attention=True)).decode_step_s
    assert delegated - on_gpu == pytest.approx((3e-6 - 1e-6) * b * (P + G / 2), rel=1e-5)


def test_transfers_at_their_size_the_hand_off_and_the_shares_join_the_compute_stream():
    """Weights on the CPU tier, no GPU: each layer's load is one transfer at the copy curve (1 ms each), the
    compute stream gains copy_share of it and the hand-off per compute op; all on the GPU gains neither."""
    spec = tiny_spec("llama", layers=2)
    hw = calibrated(spec)
    b, P, G = 2, 8, 4
    g = lower(spec, Workload(P, G), Block(b, 1))
    pol = Policy(b, 1, CPU, GPU, GPU)
    assert policy_fracs(pol)[THREADED] == 1.0 and policy_fracs(Policy(b, 1, GPU, GPU, GPU))[THREADED] == 0.0
    sums = stream_sums(g, hw, pol)[Phase.DECODE]
    base = stream_sums(g, hw, Policy(b, 1, GPU, GPU, GPU))[Phase.DECODE]
    layers = spec.num_graph_layers
    assert sums["load"] == pytest.approx(layers * 1e-3, rel=1e-6)
    assert sums["compute"] - base["compute"] == pytest.approx(0.5 * layers * 1e-3 + layers * 2e-4, rel=1e-6)
    # on disk without a GPU: one read per layer (no second copy), cold at 10 ms, warm at 2 ms
    on_disk = Policy(b, 1, DISK, GPU, GPU)
    cold = stream_sums(g, hw, on_disk, disk="cold")[Phase.DECODE]["load"]
    warm = stream_sums(g, hw, on_disk, disk="warm")[Phase.DECODE]["load"]
    assert (cold, warm) == (pytest.approx(layers * 1e-2), pytest.approx(layers * 2e-3))
    for disk, share, load in (("cold", 0.75, cold), ("warm", 0.25, warm)):  # each read's own share joins compute
        compute = stream_sums(g, hw, on_disk, disk=disk)[Phase.DECODE]["compute"]
        assert compute - base["compute"] == pytest.approx(share * load + layers * 2e-4, rel=1e-6)
    assert stream_sums(g, hw, on_disk)[Phase.DECODE]["load"] == pytest.approx(warm)  # the model fits the page cache
    small = dataclasses.replace(hw, calibration=dataclasses.replace(hw.calibration, page_cache_bytes=1))
    assert stream_sums(g, small, on_disk)[Phase.DECODE]["load"] == pytest.approx(cold)


def test_the_lp_prices_the_hand_off_once_anything_moves():
    """With a GPU tier too small for everything something must stream, and the LP's own total (its THREADED binary
    at 1) carries the hand-off of every compute op, as the evaluation of its policy does; with room for
    everything nothing moves and no hand-off is paid."""
    from planner.lp import solve_block

    spec = tiny_spec("llama", layers=2)
    wl, b = Workload(8, 4), 2
    g = lower(spec, wl, Block(b, 1))
    ops = spec.num_graph_layers * (1 + (wl.gen_len - 1))  # compute ops of a prefill and every decode step
    roomy = solve_block(g, calibrated(spec, handoff_s=0.5))
    assert roomy.policy.weights == GPU and roomy.objective_s < 0.5
    need = roomy.peak_bytes[Tier.GPU]  # all on the GPU: one byte less and something must move
    tight = solve_block(g, dataclasses.replace(calibrated(spec, handoff_s=0.5), gpu_bytes=need - 1))
    assert policy_fracs(tight.policy)[THREADED] == 1.0
    assert tight.objective_s == pytest.approx(tight.predictions.total_s, rel=1e-3)
    assert tight.predictions.total_s > 0.5 * ops


def test_cost_terms_follow_the_measured_curve_they_came_from():
    """The profiler's layer curves for a tiny model, measured here, are what the cost model charges: a decode
    step's decoder ops cost the curve at their rows (no timing asserted, only that the terms read it)."""
    import torch

    from runtime.profiler import layer_curves

    spec = tiny_spec("llama", layers=1)
    curves = layer_curves(spec, torch.device("cpu"))
    assert [c.kind for c in curves] == ["embed", "decoder", "head"]
    dec = curves[1]
    assert all(math.isfinite(y) and y > 0 for y in dec.rows.ys) and list(dec.rows.xs) == sorted(dec.rows.xs)
    assert dec.dequant_s_per_byte > 0 and dec.dequant8_s_per_byte > 0 and curves[2].dequant8_s_per_byte > 0
    hw = calibrated(layers=tuple(curves), op_s=0.0)
    b, P, G = 4, 8, 2
    costs = phase_costs(lower(spec, Workload(P, G), Block(b, 1)), hw)
    [step] = [s for s in costs.decode if s.figures.weight_full_bytes == spec.layer_bytes(1)]
    want = dec.rows.at(b) + dec.attn_s * b * (P + G / 2)
    assert step.terms[0].const == pytest.approx(want, rel=1e-9)


def test_paired_curves_time_each_layer_beside_a_twin_process_and_round_trip_in_the_profile(tmp_path):
    """runtime.profiler.paired_curves: the layers of a tiny model timed with another process running its decoder
    beside them (a pipeline's other stage), saved with the profile and read back; none on a single core."""
    import torch

    from runtime.profiler import paired_curves

    spec = tiny_spec("llama", layers=1)
    threads = torch.get_num_threads()
    curves = paired_curves(spec, cores=2)
    assert torch.get_num_threads() == threads  # restored, not left at cores // 2
    assert sorted(curves) == ["decoder", "embed", "head"]
    for c in curves.values():
        assert all(math.isfinite(y) and y > 0 for y in c.ys) and c.xs[0] == 1.0
    assert paired_curves(spec, cores=1) == {}
    hw = calibrated(spec)
    layers = tuple(dataclasses.replace(lc, paired_rows=curves.get(lc.kind)) for lc in hw.calibration.layers)
    hw = dataclasses.replace(hw, calibration=dataclasses.replace(hw.calibration, layers=layers))
    save_profile(hw, tmp_path / "p.json")
    assert load_profile(str(tmp_path / "p.json")) == hw
    plain = calibrated(spec).to_dict()  # a profile without them writes no such key (plans hash as before)
    assert all("paired_rows" not in lc for lc in plain["calibration"]["layers"])


def test_paired_curves_fail_naming_the_other_process_when_it_dies(monkeypatch):
    """No silent half-measurement: a twin that exits is an error naming it, and this process's threads are restored."""
    import shutil
    import sys

    import torch

    from runtime.profiler import paired_curves

    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "executable", shutil.which("false"))
    with pytest.raises(RuntimeError, match="the process running tiny.*decoder beside this one stopped"):
        paired_curves(tiny_spec("llama", layers=1), cores=2)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("bits, measured8, want", [(4, 2e-10, 5e-10), (8, 2e-10, 2e-10), (8, 0.0, 5e-10)])
def test_dequantized_weights_are_priced_at_the_rate_measured_for_their_bits(bits, measured8, want):
    """8-bit weights restore about twice as fast per byte as 4-bit (no nibbles to split): an 8-bit plan's
    dequantization is priced at the 8-bit rate where the profile measured one, else at the 4-bit one."""
    from planner.cost import Flags, weight_dequant_s

    spec = tiny_spec("llama", layers=1)
    hw = calibrated(spec)
    layers = tuple(dataclasses.replace(lc, dequant_s_per_byte=5e-10, dequant8_s_per_byte=measured8)
                   for lc in hw.calibration.layers)
    hw = dataclasses.replace(hw, calibration=dataclasses.replace(hw.calibration, layers=layers))
    [step] = [s for s in phase_costs(lower(spec, Workload(8, 2), Block(4, 1)), hw).decode
              if s.figures.weight_full_bytes == spec.layer_bytes(1)]
    flags = dataclasses.replace(Flags(compress_weights=True), packed_bits=bits)
    assert weight_dequant_s(step.figures, hw, flags) == pytest.approx(want * spec.layer_bytes(1))


@pytest.mark.parametrize("b, slope", [(4, 1e-6), (8, 1e-6), (36, 2e-6), (64, 3e-6), (128, 3e-6)])
def test_decode_attention_is_priced_at_the_batch_it_runs(b, slope):
    """Per sequence, decode attention costs more at 64 sequences than at 8 (measured: the cache outgrows the
    CPU's caches): priced linearly between the two measured batches, held beyond them."""
    spec = tiny_spec("llama", layers=1)
    hw = calibrated(spec, op_s=0.0)
    layers = list(hw.calibration.layers)
    layers[1] = dataclasses.replace(layers[1], attn_s=1e-6, attn_wide_s=3e-6)
    hw = dataclasses.replace(hw, calibration=dataclasses.replace(hw.calibration, layers=tuple(layers)))
    P, G = 8, 2
    [step] = [s for s in phase_costs(lower(spec, Workload(P, G), Block(b, 1)), hw).decode
              if s.figures.weight_full_bytes == spec.layer_bytes(1)]
    assert step.terms[0].const == pytest.approx(layers[1].rows.at(b) + slope * b * (P + G / 2), rel=1e-9)


def test_a_profile_measured_before_the_wide_attention_slope_reads_and_prices_one_slope(tmp_path):
    d = calibrated(tiny_spec("llama")).to_dict()
    for layer in d["calibration"]["layers"]:
        del layer["attn_wide_s"]
    path = tmp_path / "older.json"
    path.write_text(json.dumps(d))
    dec = load_profile(str(path)).calibration.layers[1]
    assert dec.attn_wide_s == 0.0 and dec.attn_at(64) == dec.attn_at(8) == dec.attn_s > 0


# ---------------------------------------------------------------- the fit


def test_nnls_recovers_known_constants_and_keeps_them_non_negative():
    import random

    rng = random.Random(1)
    truth = [1.2, 3e-4, 5e-5, 0.8, 0.0]
    rows = [[rng.uniform(0.01, 1), rng.randrange(30, 300), rng.choice((0, 1)) * rng.randrange(30, 300),
             rng.uniform(0, 0.2), rng.uniform(0, 0.3)] for _ in range(16)]
    ys = [sum(a * x for a, x in zip(r, truth)) for r in rows]
    got = calibrate.nnls(rows, ys, [1 / y for y in ys])
    assert got == pytest.approx(truth, rel=1e-6, abs=1e-9)
    noisy = [y * (1.3 if i % 2 else 0.8) for i, y in enumerate(ys)]
    assert min(calibrate.nnls(rows, noisy, [1.0] * len(ys))) >= 0


# known constants (FEATURES' multipliers, then threaded_share) and the feature rows of twelve runs: six still, six moving
FIT_TRUTH = [1.1, 1.3, 2e-4, 3e-4, 0.7, 0.4, 0.9, 0.15]
FIT_ROWS = [[0.10, 0, 62, 0, 0, 0, 0], [0, 0.30, 62, 0, 0, 0, 0], [1.20, 0, 62, 0, 0, 0, 0],
            [0, 0.20, 124, 0, 0, 0, 0], [0.05, 0, 124, 0, 0, 0, 0], [0, 0.9, 62, 0, 0, 0, 0],
            [0.25, 0, 62, 62, 0.01, 0, 0], [0, 0.25, 62, 62, 0.05, 0, 0], [0.25, 0, 62, 62, 0.0, 0.08, 0],
            [0.4, 0, 62, 62, 0.02, 0.02, 0], [0, 0.3, 62, 62, 0, 0, 0.3], [0, 2.0, 62, 62, 0.01, 0, 0]]


def test_fit_takes_scales_and_per_op_cost_from_still_runs_then_the_rest_from_the_others():
    """Runs that move nothing fix the compute scales (decode's, prefill's) and the cost per op; the hand-off,
    the shares and the threaded stretch come from what the moving runs leave; a scale beyond SCALE_RANGE
    (disturbed runs) is held at its end."""
    truth, rows = FIT_TRUTH, FIT_ROWS
    ys = [calibrate.fitted(r, truth) for r in rows]
    assert ys[-1] > 1.1 * sum(a * x for a, x in zip(rows[-1], truth))  # the stretch is part of the truth
    assert calibrate.fit_constants(rows, ys) == pytest.approx(truth, rel=1e-6)
    slow = [y * 3 if not any(r[calibrate.STILL:]) and r[1] else y for r, y in zip(rows, ys)]
    got = calibrate.fit_constants(rows, slow)
    assert got[1] == calibrate.SCALE_RANGE[1] and got[0] < calibrate.SCALE_RANGE[1]


def test_a_measured_cost_per_op_is_kept_and_the_scales_fitted_around_it():
    """Given the cost per op (measured, not fitted), the still runs fix only the two compute scales: runs whose
    ops cost what was measured give the scales back, and noise in one batch-1 run moves a scale, not the cost
    per op (fitted, that run's noise went into the cost per op)."""
    truth, rows = FIT_TRUTH, FIT_ROWS
    ys = [calibrate.fitted(r, truth) for r in rows]
    assert calibrate.fit_constants(rows, ys, per_op=2e-4) == pytest.approx(truth, rel=1e-6)
    noisy = list(ys)
    noisy[4] *= 1.15  # the op-heaviest still run, 15% slow
    fitted_op = calibrate.fit_constants(rows, noisy)[2]
    kept = calibrate.fit_constants(rows, noisy, per_op=2e-4)
    assert kept[2] == 2e-4 and abs(fitted_op / 2e-4 - 1) > 0.2  # fitted, the noise lands on the cost per op
    assert kept[0] == pytest.approx(truth[0], rel=0.1) and kept[1] == pytest.approx(truth[1], rel=1e-6)


def test_the_fit_times_the_interpreter_outside_the_op_handlers(tmp_path, monkeypatch):
    """calibrate._time's second figure is a program run's time outside its op handlers: time added inside
    a handler is not in it, time added around the handlers is."""
    import time

    from flexgen_graph.app.api import compile_plan
    from flexgen_graph.program import OpKind
    from runtime.engine import Engine
    from runtime.weight_store import make_dummy

    spec = tiny_spec("llama", layers=2)
    store = make_dummy(spec, tmp_path / "store", seed=1)
    plan = compile_plan(spec, load_profile("cpu-small"), Workload(8, 3), gpu_batch_size=1, num_gpu_batches=1,
                        fixed=ON_GPU)
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10]]
    head = Engine.HANDLERS[OpKind.HEAD]

    def slow_head(eng, op):
        time.sleep(0.02)
        head(eng, op)
    monkeypatch.setitem(Engine.HANDLERS, OpKind.HEAD, slow_head)
    (steps, outside) = calibrate._time(plan, store, prompts, repeats=1)
    for ph in (Phase.PREFILL, Phase.DECODE):
        assert steps[ph] > 0.02 and 0 <= outside[ph] < 0.01  # the handler's sleep is inside the ops
    drain = Engine.run_program

    def slow_program(eng, name, start, t):
        time.sleep(0.02)
        drain(eng, name, start, t)
    monkeypatch.setattr(Engine, "run_program", slow_program)
    (_, outside) = calibrate._time(plan, store, prompts, repeats=1)
    assert all(outside[ph] >= 0.02 for ph in (Phase.PREFILL, Phase.DECODE))


def test_features_split_the_compute_stream_linearly():
    """features(plan) times the calibration's constants gives the cost model's compute stream back."""
    from flexgen_graph.app.api import compile_plan

    spec = tiny_spec("llama", layers=2)
    hw = calibrated(spec, compute_scale=1.5, prefill_scale=1.2, threaded_share=0.3)
    plan = compile_plan(spec, hw, Workload(8, 4), gpu_batch_size=2, num_gpu_batches=2,
                        fixed={"weights": CPU, "cache": GPU, "hidden": GPU})
    consts = calibrate.multipliers(hw.calibration)
    got = calibrate.features(plan)
    want = stream_sums(lower(spec, Workload(8, 4), Block(2, 2)), hw, plan.policy)
    for ph in (Phase.PREFILL, Phase.DECODE):
        assert sum(consts[k] * v for k, v in got[ph].items()) == pytest.approx(want[ph]["compute"], rel=1e-9)
        assert got[ph]["copies"] > 0 and got[ph]["handoff"] > 0 and got[ph]["disk"] == got[ph]["cold disk"] == 0
        assert got[ph]["threaded"] > 0  # weights on the CPU tier: the streams run on worker threads


# ---------------------------------------------------------------- inspect, the benchmark


def test_inspect_marks_the_h100_figures_nobody_measured(capsys):
    from pathlib import Path

    plan = Path(__file__).resolve().parents[1] / "plans/opt-13b--h100-pcie5--float16--p512g32.fgplan"
    assert main(["inspect", str(plan)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("profile"))
    assert "assumed, never measured" in line and "cpu_from_disk_bytes_per_s" in line
    assert "gpu_from_cpu_bytes_per_s" not in line and "gpu_matmul_flops_per_s" not in line  # measured there


@pytest.mark.real_model
def test_bench_fidelity_quick_prints_a_ratio_per_scenario(smollm2_store, tmp_path, capsys):
    from flexgen_graph.app.bench_cmd import load_scenario

    fidelity = load_scenario("fidelity")
    assert main(["bench", "fidelity", "--quick", "--profile", "cpu-small", "--store", str(smollm2_store.path),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    rows = {r.split("|")[1].strip(): r.split("|")[2:-1] for r in out.splitlines() if r.startswith("| ")
            and not r.startswith("| scenario")}
    for sc in fidelity.SCENARIOS:
        ratio = rows[sc.name][3].strip()
        assert float(ratio) > 0, (sc.name, rows[sc.name])
    import torch

    for sc in fidelity.GPU_SCENARIOS:
        assert torch.cuda.is_available() or "not run" in rows[sc.name][0]
    assert re.search(r"median \|measured/predicted - 1\| of tokens/s: [\d.]+ over \d+ scenarios", out)


@pytest.mark.parametrize("noise", [None, 1.4])
def test_a_fit_that_misses_its_own_runs_is_timed_again_then_saved_as_an_estimate(tmp_path, monkeypatch, noise):
    """A fit within ESTIMATE_BAND of every run it was fitted to vouches for itself after one round; one whose run
    stays off by more (40% on one batch-1 run, both rounds) is timed again, then marked an estimate naming
    the run; the mark survives the profile file, and a vouching profile's file carries none."""
    import flexgen_graph.app.models as models
    ys = [calibrate.fitted(r, FIT_TRUTH) for r in FIT_ROWS]
    if noise is not None:
        ys[0] *= noise
    rounds = []

    def runs(spec, prof, store, which, again=False):  # the fake runs: FIT_ROWS two at a time, as the engine's
        rounds.append(which)
        return {i: ([(FIT_ROWS[j], ys[j], f"run {j}") for j in (2 * i, 2 * i + 1)], []) for i in which}
    monkeypatch.setattr(calibrate, "FIT_RUNS", [None] * (len(FIT_ROWS) // 2))
    monkeypatch.setattr(calibrate, "for_models", lambda prof, specs, notes=None: prof)
    monkeypatch.setattr(models, "open_store", lambda *a, **k: None)
    monkeypatch.setattr(calibrate, "_fit_runs", runs)
    notes: list[str] = []
    prof = calibrate.fit(calibrated(), notes)
    est = prof.calibration.estimate
    if noise is None:
        assert len(rounds) == 1 and est == "" and "estimate" not in prof.calibration.to_dict()
    else:
        assert len(rounds) == 2 and "run 0" in est and any("estimate, not a promise" in n for n in notes)
        assert 0 in rounds[1] and len(rounds[1]) < len(rounds[0]), "the second round times the runs that missed"
    save_profile(prof, tmp_path / "p.json")
    assert load_profile(str(tmp_path / "p.json")).calibration.estimate == est


def test_a_run_on_a_profile_that_cannot_vouch_labels_its_predictions_estimates(capsys):
    from types import SimpleNamespace

    from flexgen_graph.app.cli import _report
    prof = calibrated()
    summary = SimpleNamespace(lines=lambda errs: ["summary"], plans=[1], peak_bytes=None, errors=0)
    args = SimpleNamespace(output=None)
    _report(summary, args, [SimpleNamespace(profile=prof)], False)
    assert "estimates" not in capsys.readouterr().out
    est = dataclasses.replace(prof, calibration=dataclasses.replace(prof.calibration, estimate="its fit missed X"))
    _report(summary, args, [SimpleNamespace(profile=est)], False)
    out = capsys.readouterr().out
    assert "its fit missed X" in out and "estimates, not promises" in out
