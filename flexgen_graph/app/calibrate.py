"""Profiles for `flexgen-graph profile` and `--profile auto`: measured (runtime.profiler), optionally with
the calibration's interaction constants fitted to timed runs of the real engine, and checked against
this machine.

    prof, notes = measure_profile(Path("."), "here", [spec], method="fit")
    prof = for_models(prof, [spec])          # layer curves for a model the profile does not know yet

Two methods, compared by bench/fidelity.py (BENCHMARKS.md, "Plan fidelity"):
- "curves": every figure measured in isolation (the kernels at the model's shapes, copies and reads by
  size, a thread hand-off, the compute lost beside a copy or a read);
- "fit": the same curves, then the constants that say how the pieces combine in the engine (a compute
  scale, the fixed cost per op, the hand-off per op, the compute lost per second of copy, of warm and
  of cold disk read) fitted by non-negative least squares (fit_constants) to short runs of the engine over a few small policies
  (FIT_RUNS, SmolLM2-135M with seeded weights: the constants are the machine's, not the model's), each
  run's prefill and median decode step against the cost model's compute stream (planner.cost.stream_sums)
  split into the parts the constants multiply. Beside the fitted cost per op, the fit notes the part of it
  measured directly: the time the engine spends outside its op handlers when every op runs inline.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from flexgen_graph.catalog import DEFAULT_MODEL, catalog_spec
from flexgen_graph.errors import UserError
from flexgen_graph.hardware import Calibration, HardwareProfile, load_profile, machine_mismatch, save_profile
from flexgen_graph.ir import TIERS, Phase, Workload
from flexgen_graph.policy import Placement
from flexgen_graph.spec import ModelSpec

METHODS = ("curves", "fit")
GPU, CPU, DISK = (Placement.all_on(t) for t in TIERS)
FIT_WORKLOAD = Workload(32, 8)
# (what it exercises, gpu batch size, gpu batches, forced placement): small policies, each quick to run
FIT_RUNS = (
    ("in RAM, batch 1", 1, 1, {"weights": GPU, "cache": GPU, "hidden": GPU}),
    ("in RAM, batch 8", 8, 1, {"weights": GPU, "cache": GPU, "hidden": GPU}),
    ("in RAM, batch 32", 32, 1, {"weights": GPU, "cache": GPU, "hidden": GPU}),
    ("in RAM, batch 64", 64, 1, {"weights": GPU, "cache": GPU, "hidden": GPU}),
    ("in RAM, 8 x 2", 8, 2, {"weights": GPU, "cache": GPU, "hidden": GPU}),
    ("hidden states on the CPU tier (threads)", 8, 1, {"weights": GPU, "cache": GPU, "hidden": CPU}),
    # threads at a batch of 1 and of 32: ops and compute no longer in one proportion, so the hand-off per op
    # and the stretch of compute separate (at batch 8 alone they were nearly collinear)
    ("threads, batch 1", 1, 1, {"weights": GPU, "cache": GPU, "hidden": CPU}),
    ("threads, batch 32", 32, 1, {"weights": GPU, "cache": GPU, "hidden": CPU}),
    ("weights on the CPU tier", 8, 1, {"weights": CPU, "cache": GPU, "hidden": GPU}),
    ("cache on the CPU tier", 8, 1, {"weights": GPU, "cache": CPU, "hidden": GPU}),
    ("weights on disk", 8, 1, {"weights": DISK, "cache": GPU, "hidden": GPU}),
    ("weights on disk, cold", 8, 1, {"weights": DISK, "cache": GPU, "hidden": GPU, "cold": True}),
)
# the fitted unknowns: compute_scale, compute_scale times prefill_scale, compute_scale times op_s and
# handoff_s, then the three shares; threaded_share last, on what the first three give a threaded run
FEATURES = ("kernels", "prefill kernels", "ops", "handoff", "copies", "disk", "cold disk")
STILL = 3  # FEATURES[:STILL] are fitted to the runs that move nothing
HANDOFF = FEATURES.index("handoff")  # > 0 exactly where the plan runs its streams on worker threads


class ProfileMachineError(UserError):
    """A profile measured on another machine, used where it must describe this one."""


def _zeroed(cal: Calibration, **one: float) -> Calibration:
    base = dict(op_s=0.0, handoff_s=0.0, copy_share=0.0, disk_share=0.0, cold_disk_share=0.0, compute_scale=1.0,
                prefill_scale=1.0, threaded_share=0.0)
    base.update(one)
    return dataclasses.replace(cal, **base)


def features(plan, disk: str | None = None) -> dict[Phase, dict[str, float]]:
    """The compute stream of a plan's prefill and decode step split into what each fitted constant
    multiplies (FEATURES): the kernels' measured times (decode's, prefill's), compute ops, ops paying the
    hand-off, seconds of host copies and of disk reads (the stream is linear in them); and "threaded",
    the scaled kernels and ops that threaded_share stretches."""
    from planner.cost import stream_sums
    from planner.memory import policy_compression
    from planner.timeline import plan_graph

    cal = plan.profile.calibration
    g = plan_graph(plan)
    comp = policy_compression(plan.spec, plan.policy) if plan.policy.compresses else None

    def compute(**one: float) -> dict[Phase, float]:
        prof = dataclasses.replace(plan.profile, calibration=_zeroed(cal, **one))
        return {ph: v["compute"] for ph, v in stream_sums(g, prof, plan.policy, comp=comp, disk=disk).items()}
    base = compute()
    own = dict(compute_scale=cal.compute_scale, prefill_scale=cal.prefill_scale, op_s=cal.op_s)
    threaded, still = compute(**own, threaded_share=1.0), compute(**own)
    parts = {"ops": compute(op_s=1.0), "handoff": compute(handoff_s=1.0), "copies": compute(copy_share=1.0),
             "disk": compute(disk_share=1.0), "cold disk": compute(cold_disk_share=1.0)}
    kernels = {ph: {"kernels": 0.0 if ph is Phase.PREFILL else base[ph],
                    "prefill kernels": base[ph] if ph is Phase.PREFILL else 0.0} for ph in base}
    return {ph: {**kernels[ph], **{k: v[ph] - base[ph] for k, v in parts.items()}, "threaded": threaded[ph] - still[ph]}
            for ph in base}


def multipliers(cal: Calibration) -> dict[str, float]:
    """What the calibration multiplies each of FEATURES by: features(plan) times these is the compute stream."""
    k = cal.compute_scale
    return {"kernels": k, "prefill kernels": k * cal.prefill_scale, "ops": k * cal.op_s, "handoff": k * cal.handoff_s,
            "copies": cal.copy_share, "disk": cal.disk_share, "cold disk": cal.cold_disk_share,
            "threaded": cal.threaded_share}


def nnls(rows: list[list[float]], ys: list[float], weights: list[float]) -> list[float]:
    """Non-negative least squares, weighted, by trying every set of free unknowns (a handful of them)."""
    import numpy as np

    a = np.asarray(rows, float) * np.asarray(weights, float)[:, None]
    y = np.asarray(ys, float) * np.asarray(weights, float)
    n = a.shape[1]
    best, best_err = [0.0] * n, float(np.sum(y ** 2))
    for k in range(1, n + 1):
        for free in itertools.combinations(range(n), k):
            sub = a[:, free]
            if np.linalg.matrix_rank(sub) < k:
                continue
            x, *_ = np.linalg.lstsq(sub, y, rcond=None)
            if (x < 0).any():
                continue
            err = float(np.sum((sub @ x - y) ** 2))
            if err < best_err:
                best_err, best = err, [0.0] * n
                for i, v in zip(free, x):
                    best[i] = float(v)
    return best


SCALE_RANGE = (0.5, 2.0)  # how far the fit may rescale the measured kernels: beyond, the runs were disturbed


def fit_constants(rows: list[list[float]], ys: list[float], per_op: float | None = None) -> list[float]:
    """FEATURES' constants, then threaded_share, in two stages, so that collinear parts do not trade off
    against each other: the compute scales (decode's, prefill's) and the cost per op from the runs that
    move nothing (their hand-off, copy and disk parts are 0), then the hand-off, the shares and the
    threaded stretch (of what the first stage predicts for the run's compute) from the others' residuals.
    per_op: the cost per op as measured (seconds), not fitted. Relative errors: a batch-1 decode step weighs
    as much as a prefill. The scales are held within SCALE_RANGE."""
    still = [i for i, r in enumerate(rows) if not any(r[STILL:])]
    moving = [i for i in range(len(rows)) if i not in still]
    w = [1 / ys[i] for i in still]
    scales, measured = [1.0, 1.0], per_op is not None
    if measured and still:
        scales = nnls([rows[i][:STILL - 1] for i in still], [ys[i] - per_op * rows[i][STILL - 1] for i in still], w)
    elif still:
        *scales, per_op = nnls([rows[i][:STILL] for i in still], [ys[i] for i in still], w)
    per_op = per_op or 0.0
    clamped = [min(max(k, SCALE_RANGE[0]), SCALE_RANGE[1]) for k in scales]
    if clamped != scales:
        scales = clamped
        if not measured:
            [per_op] = nnls([[rows[i][STILL - 1]] for i in still],
                            [ys[i] - sum(k * x for k, x in zip(scales, rows[i])) for i in still], w) if still else [0.0]
    head = [*scales, per_op]
    rest = [0.0] * (len(rows[0]) - STILL + 1)
    if moving:
        first = [_still_time(rows[i], head) for i in moving]
        rest = nnls([rows[i][STILL:] + [f if rows[i][HANDOFF] else 0.0] for i, f in zip(moving, first)],
                    [ys[i] - f for i, f in zip(moving, first)], [1 / ys[i] for i in moving])
    return [*head, *rest]


def _still_time(row: list[float], x: list[float]) -> float:
    """The part of a run's time the first stage's constants (x[:STILL]) give: its kernels and ops."""
    return sum(c * v for c, v in zip(x[:STILL], row))


def fitted(row: list[float], x: list[float]) -> float:
    """The time fit_constants' constants x give a run of FEATURES `row`."""
    stretch = x[-1] if row[HANDOFF] else 0.0
    return _still_time(row, x) * (1 + stretch) + sum(c * v for c, v in zip(x[STILL:-1], row[STILL:]))


def _time(plan, store, prompts: list[list[int]], repeats: int = 2,
          cold: bool = False) -> tuple[dict[Phase, float], dict[Phase, float]]:
    """Prefill seconds and decode-step seconds, each the median over `repeats` runs of the engine (after a
    warm-up run; decode over every step of them): typical figures, as the profile's curves are. Beside them,
    by phase, the median seconds of a program run spent outside the ops' handlers (the interpreter's own
    cost: dispatch, events; meaningful where every op runs inline on the compute stream)."""
    from runtime.engine import Engine

    prefill, decode = [], []
    outside: dict[str, list[float]] = {"prefill": [], "decode": []}
    in_ops = [0.0]

    def timed(handler):
        def run(eng, op):
            t = time.perf_counter()
            try:
                handler(eng, op)
            finally:
                in_ops[0] += time.perf_counter() - t
        return run

    with tempfile.TemporaryDirectory(prefix="flexgen-fit-") as off, Engine(plan, store, off, cold_weights=cold) as eng:
        eng.HANDLERS = {k: timed(h) for k, h in Engine.HANDLERS.items()}  # this engine's ops, timed
        program = eng.run_program

        def run_program(name: str, start: int, t: int) -> None:
            before, t0 = in_ops[0], time.perf_counter()
            program(name, start, t)
            outside[name].append(time.perf_counter() - t0 - (in_ops[0] - before))
        eng.run_program = run_program
        eng.generate(prompts, ignore_eos=True)
        outside = {"prefill": [], "decode": []}
        for _ in range(repeats):
            eng.step_times.clear()
            eng.generate(prompts, ignore_eos=True)
            prefill += [s for n, s in eng.step_times if n == "prefill"]
            decode += [s for n, s in eng.step_times if n == "decode"]
    return ({Phase.PREFILL: statistics.median(prefill), Phase.DECODE: statistics.median(decode)},
            {Phase.PREFILL: statistics.median(outside["prefill"]), Phase.DECODE: statistics.median(outside["decode"])})


ESTIMATE_BAND = 0.15  # a fit whose worst run is further than this from its fitted time cannot vouch for itself


def _fit_runs(spec: ModelSpec, profile: HardwareProfile, store, which: list[int], again: bool = False) -> dict:
    """FIT_RUNS[i] for i in which, timed on the engine: per run, its two phases' (feature row, measured seconds,
    label) and the interpreter's seconds per op outside the handlers where it moves nothing."""
    from flexgen_graph.app.api import compile_plan
    from runtime.profiler import progress

    out = {}
    for n, i in enumerate(which):
        label, b, nb, fixed = FIT_RUNS[i]
        progress(f"engine run {n + 1} of {len(which)} for the fit{', again' if again else ''} ({label})")
        fixed = dict(fixed)
        cold = fixed.pop("cold", False)  # weight reads evicted from the page cache: cold ones
        plan = compile_plan(spec, profile, FIT_WORKLOAD, gpu_batch_size=b, num_gpu_batches=nb, fixed=fixed,
                            weights_source="dummy:0")
        rng = random.Random(i)
        prompts = [[rng.randrange(3, spec.vocab) for _ in range(FIT_WORKLOAD.prompt_len)] for _ in range(b * nb)]
        measured, outside = _time(plan, store, prompts, cold=cold)
        feats = features(plan, "cold" if cold else None)
        points, per_op = [], []
        for ph in (Phase.PREFILL, Phase.DECODE):
            row = [feats[ph][f] for f in FEATURES]
            points.append((row, measured[ph], f"{label}, {ph.value}"))
            if not any(row[STILL:]) and feats[ph]["ops"]:  # every op inline: the rest is the interpreter's
                per_op.append(outside[ph] / feats[ph]["ops"])
        out[i] = (points, per_op)
    return out


def fit(profile: HardwareProfile, notes: list[str], cache_dir: Path | None = None) -> HardwareProfile:
    """The profile with its calibration's interaction constants fitted to FIT_RUNS (method "fit"). A fit that
    misses one of its own runs by more than ESTIMATE_BAND (or holds a scale at its bound) times those runs again
    (all of them for a scale) and fits once more; still missing, the profile is saved marked as an estimate
    (Calibration.estimate), never as a promise."""
    from flexgen_graph.app.models import default_cache_dir, open_store

    spec = catalog_spec(DEFAULT_MODEL)
    profile = for_models(profile, [spec], notes)
    store = open_store("dummy:0", spec, cache_dir or default_cache_dir())
    runs = _fit_runs(spec, profile, store, list(range(len(FIT_RUNS))))
    for attempt in (1, 2):
        points = [(i, *p) for i in sorted(runs) for p in runs[i][0]]
        which, rows, ys, labels = (list(t) for t in zip(*points))
        # the cost per op stays fitted: measured instead (the interpreter's time outside its handlers), the
        # constants were steadier but predicted other runs no better (bench/fit_stability.py); the note shows both
        x = fit_constants(rows, ys)
        ratios = [fitted(r, x) / y for r, y in zip(rows, ys)]
        w = max(range(len(ys)), key=lambda j: abs(ratios[j] - 1))
        bounded = [f"{what} scale x{v:.2f} at its bound" for what, v in (("compute", x[0]), ("prefill", x[1]))
                   if v in SCALE_RANGE]
        missed = sorted({which[j] for j in range(len(ys)) if abs(ratios[j] - 1) > ESTIMATE_BAND})
        poor = bounded + ([f"{labels[w]} predicted / measured {ratios[w]:.2f}"] if missed else [])
        if not poor or attempt == 2:
            break
        notes.append(f"the fit misses its own runs ({'; '.join(poor)}): timing "
                     + ("them all" if bounded else "those") + " again")
        runs.update(_fit_runs(spec, profile, store, list(range(len(FIT_RUNS))) if bounded else missed, True))
    per_op = [v for i in sorted(runs) for v in runs[i][1]]
    outside_s = statistics.median(per_op) if per_op else 0.0
    scale = x[0]
    cal = dataclasses.replace(profile.calibration, method="fit", compute_scale=scale, prefill_scale=x[1] / scale,
                              op_s=x[2] / scale, handoff_s=x[3] / scale, copy_share=x[4], disk_share=x[5],
                              cold_disk_share=x[6], threaded_share=x[7],
                              estimate=f"its fit missed its own engine runs twice ({'; '.join(poor)})" if poor else "")
    notes.append(f"fitted to {len(FIT_RUNS)} engine runs: compute x{scale:.3f} (prefill x{x[1]:.3f}), "
                 f"{x[2] * 1e6:.0f} us per op ({outside_s * 1e6:.0f} of them outside the op handlers), "
                 f"hand-off {cal.handoff_s * 1e6:.0f} us per op, threaded compute x{1 + cal.threaded_share:.2f}, "
                 f"compute loses {cal.copy_share:.2f} s per s of copy"
                 f", {cal.disk_share:.2f} per s of warm and {cal.cold_disk_share:.2f} per s of cold disk read; worst fitted point {labels[w]}: predicted / measured "
                 f"{ratios[w]:.2f}")
    if poor:
        notes.append(f"this profile is an estimate, not a promise: {cal.estimate}; other jobs were probably running, "
                     "measure again on a quiet machine")
    return dataclasses.replace(profile, calibration=cal)


def measure_profile(offload_dir: Path, name: str, models: list[ModelSpec] = (), method: str = "fit",
                    cache_dir: Path | None = None) -> tuple[HardwareProfile, list[str]]:
    """This machine's profile, calibrated for `models`, by `method` (METHODS)."""
    from runtime.profiler import measure

    if method not in METHODS:
        raise UserError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    prof, notes = measure(offload_dir, name=name, models=list(models))
    if method == "fit":
        prof = fit(prof, notes, cache_dir)
    return prof, notes


def for_models(profile: HardwareProfile, models: list[ModelSpec], notes: list[str] | None = None) -> HardwareProfile:
    """The profile with layer curves for every model in `models` (timed now for those it lacks)."""
    from runtime.profiler import add_models

    return add_models(profile, models, notes)


def check_machine(profile: HardwareProfile, what: str) -> None:
    """Refuse a profile measured on another machine where it must describe this one."""
    from runtime.profiler import machine

    diff = machine_mismatch(profile, machine())
    if diff:
        raise ProfileMachineError(f"{what} was measured on another machine (machine: {diff}): measure this one with "
                                  "`flexgen-graph profile`, or use --profile auto")


def auto_profile(cached: Path, offload_dir: Path, models: list[ModelSpec] = ()) -> HardwareProfile:
    """The cached profile of this machine, measured (again) when missing, from another version or machine,
    and extended with layer curves for `models`."""
    from flexgen_graph.hardware import BadProfileError
    from runtime.profiler import machine

    prof = None
    if cached.is_file():
        try:
            prof = load_profile(str(cached))
        except BadProfileError as e:  # another version, or a damaged file: measure again
            print(f"re-measuring this machine: the cached profile is unusable ({e})", file=sys.stderr)
        if prof is not None and (prof.calibration is None or machine_mismatch(prof, machine())):
            print(f"re-measuring this machine: the cached profile was measured on another one, or under other "
                  f"kernels "
                  f"({machine_mismatch(prof, machine()) or 'no calibration'})", file=sys.stderr)
            prof = None
    notes: list[str] = []
    if prof is None:
        print(f"measuring this machine (once; cached in {cached}) ...", file=sys.stderr)
        prof, notes = measure_profile(offload_dir, "auto", models)
    else:
        extended = for_models(prof, list(models), notes)
        if extended == prof:
            return prof
        prof = extended
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    cached.parent.mkdir(parents=True, exist_ok=True)
    save_profile(prof, cached)
    return prof
