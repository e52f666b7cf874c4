"""Cost model: per-layer stream times of prefill and of one decode step, read off the task graph.

A step is one graph layer for all gpu batches of the block. Its traffic is linear in the placement
fractions (FlexGen's model): the off-GPU fraction of a class crosses gpu<-cpu (loads) or cpu<-gpu
(stores), and its disk fraction also crosses cpu<-disk or disk<-cpu. Three streams run
concurrently (load: gpu<-cpu then cpu<-disk traffic, store: cpu<-gpu then disk<-cpu, compute),
so a step costs the MAX of the streams' busy times, not their sum.

    >>> from flexgen_graph.catalog import catalog_spec
    >>> from flexgen_graph.ir import Block, Tier, Workload
    >>> from flexgen_graph.lower import lower
    >>> from planner.hardware import load_profile
    >>> from planner.policy import Placement, Policy
    >>> g = lower(catalog_spec("facebook/opt-125m"), Workload(32, 8), Block(4, 2))
    >>> on_gpu = Placement.all_on(Tier.GPU)
    >>> p = evaluate(g, load_profile("t4-flexgen"), Policy(4, 2, on_gpu, on_gpu, on_gpu))
    >>> p.binding, p.peak_bytes["cpu"]
    ('compute', 0)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping

import networkx as nx

from flexgen_graph.ir import TIERS, NodeKind, Phase, Tier
from planner.hardware import HardwareProfile
from planner.memory import peak_bytes
from planner.policy import Policy

CLASSES: tuple[str, ...] = ("weights", "cache", "hidden")  # Policy field names
# The cost terms of a step; "compute" first so that a tie names compute as binding.
TERMS: tuple[str, ...] = ("compute", "gpu<-cpu link", "cpu<-disk link", "cpu<-gpu link", "disk<-cpu link")
STREAMS: dict[str, tuple[str, ...]] = {
    "compute": ("compute",),
    "load": ("gpu<-cpu link", "cpu<-disk link"),
    "store": ("cpu<-gpu link", "disk<-cpu link"),
}
SIG_DIGITS = 6  # predictions are rounded so plans are byte-identical across runs


def frac_var(cls: str, tier: Tier) -> str:
    """Name of one placement fraction, e.g. "weights.gpu"."""
    return f"{cls}.{tier.value}"


FRAC_VARS: tuple[str, ...] = tuple(frac_var(c, t) for c in CLASSES for t in TIERS)


def sig(x: float, digits: int = SIG_DIGITS) -> float:
    return float(f"{x:.{digits}g}")


@dataclass(frozen=True, slots=True)
class Linear:
    """const + sum(coef * fraction); fractions are named by `frac_var`."""

    const: float = 0.0
    coefs: tuple[tuple[str, float], ...] = ()

    def at(self, fracs: Mapping[str, float]) -> float:
        return self.const + sum(c * fracs[v] for v, c in self.coefs)


@dataclass(frozen=True, slots=True)
class LayerFigures:
    """What one graph layer moves and computes in one step (all gpu batches of the block)."""

    weight_bytes: float  # loaded once per step (shared by the gpu batches) when off the GPU
    cache_load_bytes: float
    cache_store_bytes: float
    hidden_load_bytes: float
    hidden_store_bytes: float
    dense_flops: float  # at gpu_matmul_flops_per_s
    attn_flops: float  # at gpu_attn_flops_per_s (decode attention: the flops_per_ctx part)
    compute_ops: float = 0.0  # compute nodes (one per gpu batch)


@dataclass(frozen=True, slots=True)
class StepCost:
    """The cost terms (seconds, linear in the fractions) shared by the graph layers `layers`."""

    phase: Phase
    layers: tuple[int, ...]
    figures: LayerFigures
    terms: tuple[Linear, ...]  # aligned with TERMS

    @property
    def count(self) -> int:
        return len(self.layers)

    def term_times(self, fracs: Mapping[str, float]) -> dict[str, float]:
        return {name: lin.at(fracs) for name, lin in zip(TERMS, self.terms)}

    def stream_times(self, fracs: Mapping[str, float]) -> dict[str, float]:
        t = self.term_times(fracs)
        return {s: sum(t[n] for n in names) for s, names in STREAMS.items()}

    def time_s(self, fracs: Mapping[str, float]) -> float:
        return max(self.stream_times(fracs).values())


@dataclass(frozen=True, slots=True)
class Predictions:
    """What a plan predicts; floats carry SIG_DIGITS significant digits."""

    tokens_per_s: float
    prefill_s: float
    decode_step_s: float
    total_s: float
    peak_bytes: dict[str, int]  # keyed by tier value: "gpu", "cpu", "disk"
    binding: str  # the term that binds most of the time: "compute", "gpu<-cpu link", ...

    def to_dict(self) -> dict:
        return {
            "tokens_per_s": sig(self.tokens_per_s), "prefill_s": sig(self.prefill_s),
            "decode_step_s": sig(self.decode_step_s), "total_s": sig(self.total_s),
            "peak_bytes": {t.value: int(self.peak_bytes[t.value]) for t in TIERS},
            "binding": self.binding,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Predictions":
        return cls(
            tokens_per_s=sig(float(d["tokens_per_s"])), prefill_s=sig(float(d["prefill_s"])),
            decode_step_s=sig(float(d["decode_step_s"])), total_s=sig(float(d["total_s"])),
            peak_bytes={t.value: int(d["peak_bytes"][t.value]) for t in TIERS}, binding=str(d["binding"]),
        )


_FIGURE_NAMES = tuple(f.name for f in fields(LayerFigures))


def decode_ctx(g: nx.DiGraph) -> float:
    """Average context length over the decode steps (FlexGen evaluates one step there)."""
    return g.graph["prompt_len"] + g.graph["gen_len"] / 2


def layer_figures(g: nx.DiGraph, ctx: float) -> dict[Phase, list[LayerFigures]]:
    """Per phase, per graph layer, summed from the nodes (one pass); decode figures at context ctx."""
    acc: dict[tuple[Phase, int], dict[str, float]] = {}
    for key, data in g.nodes(data=True):
        n = data["node"]
        f = acc.get((key.phase, key.layer))
        if f is None:
            f = acc[(key.phase, key.layer)] = dict.fromkeys(_FIGURE_NAMES, 0.0)
        at = ctx if key.phase is Phase.DECODE else 0.0  # prefill nodes carry absolute figures
        kind = key.kind
        if kind is NodeKind.COMPUTE:
            f["dense_flops"] += n.flops
            f["attn_flops"] += n.flops_per_ctx * at
            f["compute_ops"] += 1
        else:
            f[_BYTES_FIGURE[kind]] += n.bytes + n.bytes_per_ctx * at
    return {ph: [LayerFigures(**acc[(ph, j)]) for j in sorted(j for p, j in acc if p is ph)]
            for ph in (Phase.PREFILL, Phase.DECODE)}


_BYTES_FIGURE = {
    NodeKind.LOAD_WEIGHT: "weight_bytes", NodeKind.LOAD_CACHE: "cache_load_bytes",
    NodeKind.STORE_CACHE: "cache_store_bytes", NodeKind.LOAD_HIDDEN: "hidden_load_bytes",
    NodeKind.STORE_HIDDEN: "hidden_store_bytes",
}


def _off_gpu(cls: str, nbytes: float, per_s: float) -> list[tuple[str, float]]:
    return [(frac_var(cls, Tier.CPU), nbytes / per_s), (frac_var(cls, Tier.DISK), nbytes / per_s)]


def _on_disk(cls: str, nbytes: float, per_s: float) -> list[tuple[str, float]]:
    return [(frac_var(cls, Tier.DISK), nbytes / per_s)]


def compute_s(f: LayerFigures, hw: HardwareProfile, rows: int) -> float:
    """Compute time of one layer step: a roofline of its matmul FLOPs (small matmuls cost as much
    as matmul_min_rows rows) against the bytes it must read (weights once per gpu batch, the
    cache), plus a fixed cost per op."""
    flops_s = f.dense_flops * max(1.0, hw.matmul_min_rows / rows) / hw.gpu_matmul_flops_per_s \
        + f.attn_flops / hw.gpu_attn_flops_per_s
    read_bytes = f.compute_ops * f.weight_bytes + f.cache_load_bytes + f.cache_store_bytes
    return max(flops_s, read_bytes / hw.gpu_mem_bytes_per_s) + f.compute_ops * hw.compute_op_overhead_s


def _terms(f: LayerFigures, hw: HardwareProfile, rows: int) -> tuple[Linear, ...]:
    loads = (("weights", f.weight_bytes), ("cache", f.cache_load_bytes), ("hidden", f.hidden_load_bytes))
    stores = (("cache", f.cache_store_bytes), ("hidden", f.hidden_store_bytes))

    def lin(parts: list[tuple[str, float]]) -> Linear:
        merged: dict[str, float] = {}
        for v, c in parts:
            if c:
                merged[v] = merged.get(v, 0.0) + c
        return Linear(0.0, tuple(sorted(merged.items())))

    by_name = {
        "compute": Linear(compute_s(f, hw, rows)),
        "gpu<-cpu link": lin([p for c, b in loads for p in _off_gpu(c, b, hw.gpu_from_cpu_bytes_per_s)]),
        "cpu<-disk link": lin([p for c, b in loads for p in _on_disk(c, b, hw.cpu_from_disk_bytes_per_s)]),
        "cpu<-gpu link": lin([p for c, b in stores for p in _off_gpu(c, b, hw.cpu_from_gpu_bytes_per_s)]),
        "disk<-cpu link": lin([p for c, b in stores for p in _on_disk(c, b, hw.disk_from_cpu_bytes_per_s)]),
    }
    return tuple(by_name[n] for n in TERMS)


def _group(phase: Phase, figures: list[LayerFigures], profile: HardwareProfile,
           rows: int) -> tuple[StepCost, ...]:
    groups: dict[LayerFigures, list[int]] = {}
    for j, f in enumerate(figures):
        groups.setdefault(f, []).append(j)
    return tuple(StepCost(phase, tuple(layers), f, _terms(f, profile, rows)) for f, layers in groups.items())


@dataclass(frozen=True, slots=True)
class PhaseCosts:
    """Step costs of prefill and of one decode step at the average decode context, with what the
    totals need. One StepCost per group of graph layers with identical figures."""

    prefill: tuple[StepCost, ...]
    decode: tuple[StepCost, ...]
    gen_len: int
    block_size: int

    def compute_only_s(self) -> float:
        """Total time if no byte crossed a link: a lower bound on total_s for any placement."""
        c = TERMS.index("compute")
        return (sum(s.count * s.terms[c].const for s in self.prefill)
                + (self.gen_len - 1) * sum(s.count * s.terms[c].const for s in self.decode))


def phase_costs(g: nx.DiGraph, profile: HardwareProfile) -> PhaseCosts:
    figs = layer_figures(g, decode_ctx(g))
    b = g.graph["gpu_batch_size"]
    return PhaseCosts(_group(Phase.PREFILL, figs[Phase.PREFILL], profile, b * g.graph["prompt_len"]),
                      _group(Phase.DECODE, figs[Phase.DECODE], profile, b),
                      g.graph["gen_len"], g.graph["gpu_batch_size"] * g.graph["num_gpu_batches"])


def policy_fracs(policy: Policy) -> dict[str, float]:
    out = {}
    for cls in CLASSES:
        for t, v in zip(TIERS, getattr(policy, cls).as_tuple()):
            out[frac_var(cls, t)] = v
    return out


def _check_modelled(policy: Policy) -> None:
    for flag in ("cpu_attention", "compress_weights", "compress_cache"):
        if getattr(policy, flag):
            raise NotImplementedError(f"the cost model does not model {flag}=True yet")


def evaluate(g: nx.DiGraph, profile: HardwareProfile, policy: Policy, *,
             peaks: Mapping[Tier, int] | None = None, costs: PhaseCosts | None = None) -> Predictions:
    """Predicted times of a fixed policy on the block the graph was lowered for (no LP).

    peaks / costs: planner.memory.peak_bytes(g, policy) and phase_costs(g, profile) when the
    caller has them already.
    """
    _check_modelled(policy)
    fracs = policy_fracs(policy)
    c = costs if costs is not None else phase_costs(g, profile)
    prefill_s = sum(s.count * s.time_s(fracs) for s in c.prefill)
    decode_step_s = sum(s.count * s.time_s(fracs) for s in c.decode)
    total_s = prefill_s + (c.gen_len - 1) * decode_step_s
    tokens_per_s = c.block_size * c.gen_len / total_s if total_s > 0 else float("inf")
    if peaks is None:
        peaks = peak_bytes(g, policy)
    return Predictions(
        tokens_per_s=sig(tokens_per_s), prefill_s=sig(prefill_s), decode_step_s=sig(decode_step_s),
        total_s=sig(total_s), peak_bytes={t.value: int(peaks[t]) for t in TIERS},
        binding=binding_term(c, fracs),
    )


def binding_term(costs: PhaseCosts, fracs: Mapping[str, float]) -> str:
    """The term that binds for most of the run: each step's time goes to the largest term of its
    slowest stream, weighted by how often the step runs."""
    share = dict.fromkeys(TERMS, 0.0)
    for steps, weight in ((costs.prefill, 1), (costs.decode, costs.gen_len - 1)):
        for s in steps:
            streams = s.stream_times(fracs)
            slow = max(STREAMS, key=lambda name: streams[name])  # first wins a tie: compute
            terms = s.term_times(fracs)
            top = max(STREAMS[slow], key=lambda name: terms[name])
            share[top] += weight * s.count * streams[slow]
    return max(TERMS, key=lambda name: share[name])
