"""Describe a compiled plan: policy, predictions, what binds, per-tier peaks (predicted by the
memory model and simulated by the verifier), and draw one decode step as a timeline of the
streams with the memory of each tier over it.

    >>> from flexgen_graph.app.api import compile_plan
    >>> from flexgen_graph.catalog import catalog_spec
    >>> from flexgen_graph.ir import Workload
    >>> from flexgen_graph.hardware import load_profile
    >>> plan = compile_plan(catalog_spec("facebook/opt-125m"), load_profile("cpu-small"), Workload(16, 4))
    >>> info = describe(plan)                      # a JSON-able dict
    >>> info["binding_constraint"], info["hazards"]
    ('compute', [])
    >>> text = describe_text(plan)                 # what `flexgen-graph inspect` prints
    >>> # plot(plan, "step.png")                   # needs matplotlib

The timeline is the planner's (planner.timeline): the decode program replayed on the cost model.
"""

from __future__ import annotations

from flexgen_graph.hardware import assumed_fields
from flexgen_graph.ir import TIERS, Phase, Tier
from flexgen_graph.planfile import Plan
from flexgen_graph.program import QCACHE_TWIN, OpKind
from planner.cost import Predictions
from planner.predict import BlockRun, full_block, predict_plan
from planner.timeline import Span, StepTimeline, plan_graph, step_timeline  # noqa: F401  (re-exported)
from planner.verify import simulate

GIB = float(1 << 30)


def _capacities(plan: Plan) -> dict[Tier, int]:
    p = plan.profile
    return {Tier.GPU: p.gpu_bytes, Tier.CPU: p.cpu_bytes, Tier.DISK: p.disk_bytes}


def describe(plan: Plan, *, with_simulation: bool = True) -> dict:
    """A JSON-able description of a plan (what `inspect --json` prints)."""
    pred = Predictions.from_dict(plan.predictions)
    caps = _capacities(plan)
    roles: dict[str, dict[str, int]] = {}
    for b in plan.programs.buffers:
        r = roles.setdefault(f"{b.role.value}@{b.tier.value}", {"count": 0, "bytes": 0})
        r["count"] += 1
        r["bytes"] += b.nbytes
    ops = {}
    for name, prog in (("prefill", plan.programs.prefill), ("decode", plan.programs.decode)):
        kinds: dict[str, int] = {}
        for op in prog:
            kinds[op.kind.value] = kinds.get(op.kind.value, 0) + 1
        ops[name] = dict(sorted(kinds.items()))
    tiers = {t.value: {"capacity_bytes": caps[t], "predicted_peak_bytes": pred.peak_bytes[t.value]} for t in TIERS}
    out = {
        "model": plan.spec.name, "dtype": plan.spec.dtype, "profile": plan.profile.name,
        "profile_assumed": list(assumed_fields(plan.profile)),  # builtin figures never measured
        "workload": plan.workload.to_dict(), "weights_source": plan.weights_source,
        "policy": plan.policy.to_dict(), "block_size": plan.block_size, "predictions": pred.to_dict(),
        "binding": pred.binding, "binding_constraint": pred.binding_constraint, "tight": list(pred.tight),
        "tiers": tiers, "buffers": dict(sorted(roles.items())), "ops": ops, "blocks": block_predictions(plan),
        "stage": None if plan.stage is None else {
            "index": plan.stage.index, "count": plan.stage.count, "first_layer": plan.stage.first_layer,
            "end_layer": plan.stage.end_layer, "prefill_s": plan.predictions.get("stage_prefill_s"),
            "decode_step_s": plan.predictions.get("stage_decode_step_s")},
    }
    if with_simulation:
        g = plan_graph(plan)
        sim = simulate(plan.programs, g, plan.policy, pinned_staging=plan.profile.has_gpu)
        for t in TIERS:
            tiers[t.value]["simulated_peak_bytes"] = sim.peaks[t]
            tiers[t.value]["static_bytes"] = sim.static_bytes[t]
        out["hazards"] = list(sim.hazards)
        out["decode_step_replayed_s"] = step_timeline(plan, Phase.DECODE, plan.workload.prompt_len
                                                      + plan.workload.gen_len // 2, graph=g).end_s
    return out


def block_predictions(plan: Plan) -> list[dict]:
    """Predicted seconds of one block of full-length generations, full and with fewer sequences (a block
    that is not full runs only its filled rows): planner.predict, as `run` reports it."""
    sizes = sorted({plan.block_size, plan.policy.gpu_batch_size, 1}, reverse=True)
    out = []
    for n in sizes:
        w = predict_plan(plan, [full_block(plan) if n == plan.block_size else BlockRun(n, plan.workload.gen_len - 1)])
        out.append({"sequences": n, "seconds": w.seconds, "tokens_per_s": w.tokens_per_s})
    return out


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def describe_text(plan: Plan, *, with_simulation: bool = True) -> str:
    d = describe(plan, with_simulation=with_simulation)
    pol, pred = d["policy"], d["predictions"]
    flags = [f for f in ("cpu_attention", "compress_weights", "compress_cache", "packed_weights") if pol.get(f)]

    def frac(v: list[float]) -> str:
        return " / ".join(f"{x:.3g}" for x in v)

    lines = [
        f"model     {d['model']} ({d['dtype']}), weights {d['weights_source'] or '(none recorded)'}",
        f"profile   {d['profile']}" + (f" (assumed, never measured: {', '.join(d['profile_assumed'])})"
                                         if d["profile_assumed"] else ""),
        f"workload  prompt {d['workload']['prompt_len']}, " + (f"score its last {d['workload']['gen_len']} positions "
                                                               "(prefill alone)" if d["workload"].get("score") else
                                                               f"generate {d['workload']['gen_len']}"),
        f"block     {pol['gpu_batch_size']} x {pol['num_gpu_batches']} gpu batches = {d['block_size']} sequences",
        "placement gpu / cpu / disk",
        f"  weights {frac(pol['weights'])}",
        f"  cache   {frac(pol['cache'])}",
        f"  hidden  {frac(pol['hidden'])}",
        f"flags     {', '.join(flags) or 'none'}"
        + (f" ({pol['compress_bits']}-bit, groups of {pol['group_size']})"
           if pol["compress_weights"] or pol["compress_cache"] else ""),
        *([] if d["stage"] is None else [
            f"stage     {d['stage']['index']} of {d['stage']['count']}: graph layers {d['stage']['first_layer']}.."
            f"{d['stage']['end_layer'] - 1}; alone it takes prefill {d['stage']['prefill_s']:.4g} s, decode step "
            f"{d['stage']['decode_step_s']:.4g} s (the pipeline's figures below)"]),
        f"predicted {pred['tokens_per_s']:.4g} tokens/s; prefill {pred['prefill_s']:.4g} s, "
        f"decode step {pred['decode_step_s']:.4g} s, total {pred['total_s']:.4g} s",
        f"binding   {d['binding_constraint']} (slowest term: {d['binding']}; full tiers: {', '.join(d['tight']) or 'none'})",
        "blocks    " + "; ".join(f"{b['sequences']} sequence{'s' * (b['sequences'] != 1)} {b['seconds']:.4g} s "
                                 f"({b['tokens_per_s']:.4g} tokens/s)" for b in d["blocks"])
        + " (predicted per block; one not full runs its filled rows)",
        "memory    tier   capacity      predicted peak" + ("   simulated peak" if with_simulation else ""),
    ]
    for t, v in d["tiers"].items():
        row = f"          {t:<5}  {_gib(v['capacity_bytes']):>12}  {_gib(v['predicted_peak_bytes']):>14}"
        if with_simulation:
            row += f"  {_gib(v['simulated_peak_bytes']):>15}"
        lines.append(row)
    if with_simulation:
        lines.append(f"replayed  decode step {d['decode_step_replayed_s']:.4g} s (ops scheduled on their streams)")
        lines.append(f"hazards   {len(d['hazards'])}" + (f": {d['hazards'][0]}" if d["hazards"] else ""))
    return "\n".join(lines)


# one colour per op kind: matplotlib's tab20 palette, its ten strong colours first (neighbouring kinds differ)
_TAB20 = ("#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896", "#9467bd",
          "#c5b0d5", "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7", "#bcbd22", "#dbdb8d",
          "#17becf", "#9edae5")
# (a plan compresses its cache or does not: a compressed-cache kind takes its dense twin's colour)
COLORS = {k.value: (_TAB20[0::2] + _TAB20[1::2])[i] for i, k in enumerate(k for k in OpKind if k not in QCACHE_TWIN)}
COLORS.update({q.value: COLORS[d.value] for q, d in QCACHE_TWIN.items()})


def plot(plan: Plan, path, *, ctx: int | None = None):
    """Draw one decode step (context ctx, the last step by default): the ops of the load, compute and
    store streams over time (one colour per op kind, the legend beside the lanes), and the bytes each
    tier holds, against its capacity and the peak `inspect` prints (the verifier's, over the whole
    run). Returns the matplotlib Figure it saved."""
    try:
        from matplotlib.figure import Figure  # imported here: plotting is optional
    except ImportError:
        raise ImportError("plot() needs matplotlib, which is not installed: pip install matplotlib") from None
    tl = step_timeline(plan, Phase.DECODE, ctx)
    caps = _capacities(plan)
    used = [t for t in TIERS if t is Tier.GPU or any(m[t] for _, m in tl.memory)]
    lanes = ["store", "compute", "load"] + [x for x in ("send", "recv") if any(sp.stream == x for sp in tl.spans)]
    fig = Figure(figsize=(12, 3 + 1.6 * len(used)))
    axes = fig.subplots(1 + len(used), 1, sharex=True, gridspec_kw={"height_ratios": [2] + [1] * len(used)})
    ax = axes[0]
    for y, lane in enumerate(lanes):
        for kind in sorted({s.kind for s in tl.spans if s.stream == lane}):
            bars = [(s.start_s, s.end_s - s.start_s) for s in tl.spans if s.stream == lane and s.kind == kind]
            ax.broken_barh(bars, (y - 0.35, 0.7), color=COLORS.get(kind, "black"), label=kind)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="op", frameon=False)
    pol = plan.policy
    ax.set_title(f"{plan.spec.name} on {plan.profile.name}: decode step at context {tl.ctx}, block "
                 f"{pol.gpu_batch_size} x {pol.num_gpu_batches}; replayed {tl.end_s:.3g} s, cost model "
                 f"{plan.predictions['stage_decode_step_s' if plan.stage else 'decode_step_s']:.3g} s (average "
                 f"context{f'; stage {plan.stage.index} of {plan.stage.count}' if plan.stage else ''})",
                 fontsize="medium")
    xs = [t for t, _ in tl.memory] + [tl.end_s]  # compute ops run one at a time: events are in time order
    peaks = simulate(plan.programs, plan_graph(plan), plan.policy, pinned_staging=plan.profile.has_gpu).peaks
    for mem, tier in zip(axes[1:], used):
        ys = [m[tier] / GIB for _, m in tl.memory]
        cap, peak = caps[tier] / GIB, peaks[tier] / GIB
        mem.step(xs, ys + ys[-1:], where="post", color="tab:blue", label=f"{tier.value} held")
        mem.axhline(cap, color="tab:red", linestyle="--", linewidth=0.8, label=f"{tier.value} capacity")
        mem.axhline(peak, color="black", linestyle=":", linewidth=1.0, label=f"peak {_gib(peaks[tier])} (inspect)")
        lo, hi = min(min(ys), peak), max(max(ys), cap, peak)
        pad = 0.08 * (hi - lo) or 0.05 * hi
        mem.set_ylim(max(0.0, lo - pad), hi + pad)
        mem.set_ylabel(f"{tier.value} GiB")
        mem.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    axes[-1].set_xlabel("seconds into the step")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legends stand beside the axes: keep them in
    return fig
