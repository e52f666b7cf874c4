"""Cost model: per-layer stream times of prefill and of one decode step, read off the task graph.

A step is one graph layer for all gpu batches of the block. Its traffic is linear in the placement
fractions (FlexGen's model): the off-GPU fraction of a class crosses gpu<-cpu (loads) or cpu<-gpu
(stores), and its disk fraction also crosses cpu<-disk or disk<-cpu. Four streams run
concurrently (load: gpu<-cpu then cpu<-disk traffic; store: cpu<-gpu then disk<-cpu; compute;
cpu: CPU attention), so a step costs the MAX of the streams' busy times, not their sum.

Compute is a roofline per part: the matmuls against the weights they read (once per gpu batch),
attention against the cache it reads, plus a fixed cost per op. Flags:
- cpu_attention: in decode, cache homed on the CPU is attended there (FlexGen's delegation): it
  never crosses a link; the new token's q, k, v go to the host and the attention output comes
  back; the CPU reads the cache at cpu_mem_bytes_per_s and does its FLOPs at
  cpu_matmul_flops_per_s. The fraction delegated is the cache's CPU fraction, chosen by the LP.
  On a machine without a GPU the "GPU" is the CPU: the CPU attention joins the compute stream at
  the attention rate, and delegating saves only the copies into slots.
- compress_weights / compress_cache: 4-bit groups (planner.memory): homes, slots and link bytes
  at the compressed size; dequantization costs the dense bytes it produces at the profile's
  measured dequantization rate, on the device that reads them: a layer's weights once per step
  (the runtime reuses them across the gpu batches), each gpu batch's cache at every attention.

A profile measured by `flexgen-graph profile` carries a Calibration (flexgen_graph.hardware), and
then compute and transfers are priced from what was measured instead of the roofline above: a
compute op costs its layer's measured curve at its rows (or its FLOPs at the generic matmul curve),
plus attention per sequence and context token, plus a fixed cost per op, plus a hand-off per op when
the plan moves anything (the CPU backend then runs every op on worker threads: the pseudo-fraction
THREADED, 1 when any class leaves the GPU, a binary in the LP); a transfer costs the link's curve at
its own size, once per transfer; disk reads are warm or cold (the page cache holds the model or not).
Where transfers take the compute's cores (copy_share, disk_share, cold_disk_share) the compute stream
carries that share of them. On a machine without a GPU, a disk-tier item is read straight into its slot (no
second copy) and CPU attention moves nothing.

    >>> from flexgen_graph.catalog import catalog_spec
    >>> from flexgen_graph.ir import Block, Tier, Workload
    >>> from flexgen_graph.lower import lower
    >>> from flexgen_graph.hardware import load_profile
    >>> from flexgen_graph.policy import Placement, Policy
    >>> g = lower(catalog_spec("facebook/opt-125m"), Workload(32, 8), Block(4, 2))
    >>> on_gpu = Placement.all_on(Tier.GPU)
    >>> p = evaluate(g, load_profile("t4-flexgen"), Policy(4, 2, on_gpu, on_gpu, on_gpu))
    >>> p.binding, p.peak_bytes["disk"]
    ('compute', 0)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

import networkx as nx

from flexgen_graph.hardware import Calibration, Curve, HardwareProfile, packed_suffix
from flexgen_graph.ir import TIERS, LayerKind, NodeKind, Phase, Tier
from flexgen_graph.policy import Policy, assign_tiers
from flexgen_graph.spec import ModelSpec
from planner.figures import BlockFigures, LayerSums, figures_of
from planner.memory import Compression, needs_compression, peaks_of, policy_compression

CLASSES: tuple[str, ...] = ("weights", "cache", "hidden")  # Policy field names
FLAG_NAMES: tuple[str, ...] = ("cpu_attention", "compress_weights", "compress_cache", "packed_weights")  # Policy flags
# The cost terms of a step; "compute" first so that a tie names compute as binding.
TERMS: tuple[str, ...] = ("compute", "cpu compute", "gpu<-cpu link", "cpu<-disk link", "cpu<-gpu link",
                          "disk<-cpu link", "stage link")
# Delegated attention runs on the runtime's compute stream (one op per layer and gpu batch), so
# its CPU time adds to the GPU compute of the step rather than overlapping it.
STREAMS: dict[str, tuple[str, ...]] = {
    "compute": ("compute", "cpu compute"),
    "load": ("gpu<-cpu link", "cpu<-disk link"),
    "store": ("cpu<-gpu link", "disk<-cpu link"),
    # a pipeline stage receives and sends hidden states on streams of their own (zero for one process)
    "link": ("stage link",),
}
SIG_DIGITS = 6  # predictions are rounded so plans are byte-identical across runs
DELEGATED = "cache.cpu"  # the fraction CPU attention applies to
THREADED = "threaded"  # 1 when the plan moves anything (calibrated profiles price the worker-thread hand-off)


def frac_var(cls: str, tier: Tier) -> str:
    """Name of one placement fraction, e.g. "weights.gpu"."""
    return f"{cls}.{tier.value}"


FRAC_VARS: tuple[str, ...] = tuple(frac_var(c, t) for c in CLASSES for t in TIERS)


def sig(x: float, digits: int = SIG_DIGITS) -> float:
    return float(f"{x:.{digits}g}")


@dataclass(frozen=True, slots=True)
class Flags:
    """The policy switches that change what the cost and memory models count."""

    cpu_attention: bool = False
    compress_weights: bool = False
    compress_cache: bool = False
    packed_weights: bool = False  # compressed weights computed on packed (runtime.packed), never dequantized
    # the compression's bits (which packed curves, which dequantization rate price the weights): not a switch (no
    # part of equality), phase_costs takes it from the compression
    packed_bits: int = field(default=4, compare=False)

    @classmethod
    def of(cls, policy: Policy) -> "Flags":
        return cls(policy.cpu_attention, policy.compress_weights, policy.compress_cache, policy.packed_weights,
                   policy.compress_bits)

    @property
    def valid(self) -> bool:
        """Packed weights are compressed weights: the flag alone is no policy."""
        return self.compress_weights or not self.packed_weights

    def on(self) -> tuple[str, ...]:
        return tuple(n for n in FLAG_NAMES if getattr(self, n))

    def as_dict(self) -> dict[str, bool]:
        return {n: getattr(self, n) for n in FLAG_NAMES}


@dataclass(frozen=True, slots=True)
class Linear:
    """const + sum(coef * fraction); fractions are named by `frac_var`."""

    const: float = 0.0
    coefs: tuple[tuple[str, float], ...] = ()

    def at(self, fracs: Mapping[str, float]) -> float:
        return self.const + sum(c * fracs[v] for v, c in self.coefs)


@dataclass(frozen=True, slots=True)
class LayerFigures:
    """What one graph layer moves and computes in one step (all gpu batches of the block). Link
    bytes are as they cross (compressed when the flag is on); *_full_bytes as the compute reads them.
    kind / seqs / tokens / batches / ctx: what a calibrated profile prices compute by (the layer, the
    sequences of a gpu batch, the new tokens of each, gpu batches, the attended context)."""

    weight_bytes: float  # loaded once per step (shared by the gpu batches) when off the GPU
    cache_load_bytes: float
    cache_store_bytes: float
    hidden_load_bytes: float
    hidden_store_bytes: float
    dense_flops: float  # at gpu_matmul_flops_per_s
    attn_flops: float  # at gpu_attn_flops_per_s (decode attention: the flops_per_ctx part)
    compute_ops: float = 0.0  # compute nodes (one per gpu batch)
    weight_full_bytes: float = 0.0  # what the matmuls read, per gpu batch
    cache_full_bytes: float = 0.0  # what attention reads (and prefill writes): the cache at this context
    attn_to_cpu_bytes: float = 0.0  # CPU attention (decode, decoder layers): q, k, v of the new token
    attn_to_gpu_bytes: float = 0.0  # CPU attention: the attention output
    stage_link_bytes: float = 0.0  # pipeline: hidden states received from / sent to the neighbouring stages
    kind: LayerKind = LayerKind.DECODER
    seqs: int = 1
    tokens: int = 1
    batches: int = 1
    ctx: float = 0.0


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

    def compute_bound_s(self) -> float:
        """The least time of this step over every placement: its compute stream alone (GPU compute
        plus delegated CPU attention, which depend on the delegated fraction only), minimized over
        that fraction (a linear function: an end point). A calibrated profile's compute stream also
        carries shares of transfers and the hand-off, never negative: all on the GPU, they are 0."""
        a, c = self.terms[TERMS.index("compute")], self.terms[TERMS.index("cpu compute")]
        for lin in (a, c):
            assert all(v == DELEGATED or x >= 0 for v, x in lin.coefs), f"compute term depends on {lin.coefs}"
        a0, a1 = a.const, sum(x for v, x in a.coefs if v == DELEGATED)
        c0, c1 = c.const, sum(x for v, x in c.coefs if v == DELEGATED)
        return min(a0 + c0, a0 + a1 + c0 + c1)


@dataclass(frozen=True, slots=True)
class Predictions:
    """What a plan predicts; floats carry SIG_DIGITS significant digits."""

    tokens_per_s: float
    prefill_s: float
    decode_step_s: float
    total_s: float
    peak_bytes: dict[str, int]  # keyed by tier value: "gpu", "cpu", "disk"
    binding: str  # the term that binds most of the time: "compute", "gpu<-cpu link", ...
    tight: tuple[str, ...] = ()  # tiers too full to take one more item of a class that is on a slower tier

    @property
    def binding_constraint(self) -> str:
        """What limits throughput: compute, a link, or the capacity that pushes traffic onto the link."""
        if self.binding in ("gpu<-cpu link", "cpu<-gpu link") and "gpu" in self.tight:
            return "gpu capacity"
        if self.binding in ("cpu<-disk link", "disk<-cpu link") and "cpu" in self.tight:
            return "cpu capacity"
        return self.binding

    def to_dict(self) -> dict:
        return {
            "tokens_per_s": sig(self.tokens_per_s), "prefill_s": sig(self.prefill_s),
            "decode_step_s": sig(self.decode_step_s), "total_s": sig(self.total_s),
            "peak_bytes": {t.value: int(self.peak_bytes[t.value]) for t in TIERS},
            "binding": self.binding, "tight": list(self.tight), "binding_constraint": self.binding_constraint,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Predictions":
        return cls(
            tokens_per_s=sig(float(d["tokens_per_s"])), prefill_s=sig(float(d["prefill_s"])),
            decode_step_s=sig(float(d["decode_step_s"])), total_s=sig(float(d["total_s"])),
            peak_bytes={t.value: int(d["peak_bytes"][t.value]) for t in TIERS}, binding=str(d["binding"]),
            tight=tuple(str(t) for t in d.get("tight", ())),
        )


def decode_ctx(g: "nx.DiGraph | BlockFigures") -> float:
    """Average context length over the decode steps (FlexGen evaluates one step there)."""
    if isinstance(g, BlockFigures):
        return g.prompt_len + g.gen_len / 2
    return g.graph["prompt_len"] + g.graph["gen_len"] / 2


def layer_figures(figs: BlockFigures, ctx: float, flags: Flags = Flags(),
                  comp: Compression | None = None) -> dict[Phase, list[LayerFigures]]:
    """Per phase, per graph layer, the step figures; decode at context ctx."""
    nb = figs.num_gpu_batches
    cw = flags.compress_weights and comp is not None
    cc = flags.compress_cache and comp is not None
    cache_ratio = comp.cache_row_compressed / comp.cache_row_bytes if cc else 1.0
    out: dict[Phase, list[LayerFigures]] = {}
    for phase in (Phase.PREFILL, Phase.DECODE):
        at = ctx if phase is Phase.DECODE else 0.0  # prefill nodes carry absolute figures
        memo: dict[tuple, LayerFigures] = {}  # layers alike are figured once
        rows = []
        tokens = figs.prompt_len if phase is Phase.PREFILL else 1
        attended = at if phase is Phase.DECODE else float(figs.prompt_len)
        for j, ls in enumerate(figs.phase(phase)):
            # a phase that does not load the layer (a scoring graph's empty decode) moves nothing, compressed or not
            moved_w = comp.weight_bytes[figs.shape.first_layer + j] if cw and ls.weight_bytes else ls.weight_bytes
            f = memo.get((ls, moved_w))
            if f is None:
                f = memo[(ls, moved_w)] = _figures(ls, phase, at, nb, moved_w, cache_ratio, figs.gpu_batch_size,
                                                   tokens, attended)
            rows.append(f)
        out[phase] = rows
    return out


def _figures(ls: LayerSums, phase: Phase, at: float, nb: int, moved_w: int, cache_ratio: float, seqs: int = 1,
             tokens: int = 1, ctx: float = 0.0) -> LayerFigures:
    comp_sums = ls.of(NodeKind.COMPUTE)
    cl, cs = nb * ls.of(NodeKind.LOAD_CACHE).bytes_at(at), nb * ls.of(NodeKind.STORE_CACHE).bytes_at(at)
    hs = nb * ls.of(NodeKind.STORE_HIDDEN).bytes_at(at)
    link = nb * sum(ls.of(kind).bytes_at(at) for kind in (NodeKind.RECV_HIDDEN, NodeKind.SEND_HIDDEN,
                                                           NodeKind.RECV_TOKENS, NodeKind.SEND_TOKENS))
    delegable = phase is Phase.DECODE and ls.kind is LayerKind.DECODER
    return LayerFigures(
        weight_bytes=float(moved_w), cache_load_bytes=cl * cache_ratio, cache_store_bytes=cs * cache_ratio,
        hidden_load_bytes=nb * ls.of(NodeKind.LOAD_HIDDEN).bytes_at(at), hidden_store_bytes=hs,
        dense_flops=float(nb * comp_sums.flops), attn_flops=nb * comp_sums.flops_per_ctx * at,
        compute_ops=float(nb * comp_sums.count), weight_full_bytes=float(ls.weight_bytes), cache_full_bytes=cl + cs,
        # q goes as wide as the hidden state; k and v as the new cache row (uncompressed)
        attn_to_cpu_bytes=hs + cs if delegable else 0.0, attn_to_gpu_bytes=hs if delegable else 0.0,
        stage_link_bytes=link, kind=ls.kind, seqs=seqs, tokens=tokens, batches=nb, ctx=ctx,
    )


def _off_gpu(cls: str, nbytes: float, per_s: float) -> list[tuple[str, float]]:
    return [(frac_var(cls, Tier.CPU), nbytes / per_s), (frac_var(cls, Tier.DISK), nbytes / per_s)]


def _on(cls: str, tier: Tier, nbytes: float, per_s: float) -> list[tuple[str, float]]:
    return [(frac_var(cls, tier), nbytes / per_s)]


def compute_parts(f: LayerFigures, hw: HardwareProfile, rows: int, flags: Flags) -> tuple[float, float, float]:
    """(GPU time without attention, GPU attention time, CPU attention time) of one layer step. Small
    matmuls cost as much as matmul_min_rows rows. A calibrated profile prices them as measured
    (_calibrated_parts)."""
    if hw.calibration is not None:
        return _calibrated_parts(f, hw, hw.calibration, flags)
    gpu_bw, cpu_bw = hw.gpu_mem_bytes_per_s, hw.cpu_mem_bytes_per_s
    dense_s = f.dense_flops * max(1.0, hw.matmul_min_rows / rows) / hw.gpu_matmul_flops_per_s
    base = max(dense_s, f.compute_ops * f.weight_full_bytes / gpu_bw) + f.compute_ops * hw.compute_op_overhead_s
    base += weight_dequant_s(f, hw, flags)
    dequant = f.cache_full_bytes if flags.compress_cache else 0.0
    attn_gpu = max(f.attn_flops / hw.gpu_attn_flops_per_s, f.cache_full_bytes / gpu_bw) \
        + dequant / hw.gpu_dequant_bytes_per_s
    # without a GPU, "GPU" attention already runs on the CPU cores: delegating only saves the copies
    cpu_rate = hw.cpu_matmul_flops_per_s if hw.has_gpu else hw.gpu_attn_flops_per_s
    attn_cpu = max(f.attn_flops / cpu_rate, f.cache_full_bytes / cpu_bw) + dequant / hw.cpu_dequant_bytes_per_s
    return base, attn_gpu, attn_cpu


def op_rows(f: LayerFigures) -> int:
    """Rows of one compute op's matmuls: the head computes the last position of each sequence only."""
    return f.seqs if f.kind is LayerKind.HEAD else f.seqs * f.tokens


def _calibrated_parts(f: LayerFigures, hw: HardwareProfile, cal: Calibration, flags: Flags) -> tuple[float, float, float]:
    """compute_parts from a Calibration: per op, the layer's measured curve at its rows (else its FLOPs at
    the generic matmul curve, no faster than reading its weights), attention per sequence and context
    token (prefill: per prompt_len squared) as measured for the layer (else the roofline), the fixed
    cost per op; dequantization at the measured rates (a compressed cache: prefill compresses its rows,
    decode restores the cache it attends). All times scaled by compute_scale, prefill's kernels by
    prefill_scale too."""
    n = f.compute_ops
    if not n:
        return 0.0, 0.0, 0.0
    rows, lc = op_rows(f), cal.layer(f.kind.value, int(f.weight_full_bytes))
    decode = f.tokens == 1 and f.attn_flops > 0
    packed = _packed_rows_s(f, cal, rows, flags.packed_bits) if flags.packed_weights else None
    if lc is not None:
        dense = lc.rows.at(rows) if packed is None else packed
        attn = (lc.attn_at(f.seqs) * f.seqs * f.ctx) if decode else lc.prefill_attn_s * f.seqs * f.tokens ** 2
        attn_cpu = lc.attn_cpu_s * f.seqs * f.ctx if decode else attn
    else:
        dense = max(f.dense_flops / n * cal.matmul_s_per_flop.at(rows), f.weight_full_bytes / hw.gpu_mem_bytes_per_s)
        cache_op = f.cache_full_bytes / n
        attn = max(f.attn_flops / n / hw.gpu_attn_flops_per_s, cache_op / hw.gpu_mem_bytes_per_s)
        cpu_rate = hw.cpu_matmul_flops_per_s if hw.has_gpu else hw.gpu_attn_flops_per_s
        attn_cpu = max(f.attn_flops / n / cpu_rate, cache_op / hw.cpu_mem_bytes_per_s)
    k = _kernel_scale(f, cal)
    base = k * n * dense + cal.compute_scale * n * cal.op_s + weight_dequant_s(f, hw, flags)
    dequant = f.cache_full_bytes if flags.compress_cache else 0.0
    # decode restores the cache it attends; prefill compresses its rows and reads them back
    c_deq = 0.0 if lc is None else lc.cache_dequant_s_per_byte if decode else lc.cache_quant_s_per_byte
    if flags.compress_cache and decode and lc is not None:  # each op compresses its new row and reads it back
        attn += lc.cache_store_s
        attn_cpu += lc.cache_store_s
    attn_gpu = k * (n * attn + dequant * (c_deq or 1.0 / hw.gpu_dequant_bytes_per_s))
    host_deq = 1.0 / hw.cpu_dequant_bytes_per_s if hw.has_gpu or not c_deq else c_deq
    attn_host = k * (n * attn_cpu + dequant * host_deq)
    return base, attn_gpu, attn_host


def _kernel_scale(f: LayerFigures, cal: Calibration) -> float:
    return cal.compute_scale * (cal.prefill_scale if f.tokens > 1 else 1.0)


def weight_dequant_s(f: LayerFigures, hw: HardwareProfile, flags: Flags) -> float:
    """One step's dequantization of the layer's compressed weights (the plan's DEQUANT_WEIGHT op: once per
    step, its gpu batches share the dense copy, planner.schedule.dequantizes); 0 for dense weights, an
    embedding's, and packed ones computed on as they are (uncalibrated, or with a measured packed curve;
    without one they are priced as dequantized)."""
    if not flags.compress_weights or not f.compute_ops or f.kind is LayerKind.EMBED:  # (it dequantizes rows)
        return 0.0
    cal = hw.calibration
    if cal is None:
        return 0.0 if flags.packed_weights else f.weight_full_bytes / hw.gpu_dequant_bytes_per_s
    if flags.packed_weights and _packed_rows_s(f, cal, op_rows(f), flags.packed_bits) is not None:
        return 0.0
    lc = cal.layer(f.kind.value, int(f.weight_full_bytes))
    w_deq = 0.0  # the layer's measured rate at these bits, else its 4-bit one, else the profile's scalar rate
    if lc is not None:
        w_deq = (flags.packed_bits == 8 and lc.dequant8_s_per_byte) or lc.dequant_s_per_byte
    w_deq = w_deq or 1.0 / hw.gpu_dequant_bytes_per_s
    return _kernel_scale(f, cal) * f.weight_full_bytes * w_deq


def _packed_rows_s(f: LayerFigures, cal: Calibration, rows: int, bits: int) -> float | None:
    """One compute op of the layer on packed weights, as measured (runtime.profiler.packed_layer_curves),
    or None where the calibration has no such curve (then the op is priced as dense plus dequantization)."""
    lc = cal.layer(f.kind.value + packed_suffix(bits), int(f.weight_full_bytes))
    return None if lc is None else lc.rows.at(rows)


def _lin(const: float, parts: list[tuple[str, float]]) -> Linear:
    merged: dict[str, float] = {}
    for v, c in parts:
        if c:
            merged[v] = merged.get(v, 0.0) + c
    return Linear(const, tuple(sorted(merged.items())))


def _terms(f: LayerFigures, hw: HardwareProfile, rows: int, flags: Flags, warm: bool = False) -> tuple[Linear, ...]:
    if hw.calibration is not None:
        return _calibrated_terms(f, hw, hw.calibration, flags, warm)
    delegate = flags.cpu_attention and f.attn_to_cpu_bytes > 0
    base, attn_gpu, attn_cpu = compute_parts(f, hw, rows, flags)
    ctog, dtoc = hw.gpu_from_cpu_bytes_per_s, hw.cpu_from_disk_bytes_per_s
    gtoc, ctod = hw.cpu_from_gpu_bytes_per_s, hw.disk_from_cpu_bytes_per_s
    cache_in = _on("cache", Tier.DISK, f.cache_load_bytes, ctog) + _on("cache", Tier.CPU, f.attn_to_gpu_bytes, ctog) \
        if delegate else _off_gpu("cache", f.cache_load_bytes, ctog)
    cache_out = _on("cache", Tier.DISK, f.cache_store_bytes, gtoc) + _on("cache", Tier.CPU, f.attn_to_cpu_bytes, gtoc) \
        if delegate else _off_gpu("cache", f.cache_store_bytes, gtoc)
    compute, cpu = [], []
    if delegate:
        compute.append((DELEGATED, -attn_gpu))
        # without a GPU the CPU attention runs on the cores that do the rest of the compute
        (cpu if hw.has_gpu else compute).append((DELEGATED, attn_cpu))
    by_name = {
        "compute": _lin(base + attn_gpu, compute),
        "cpu compute": _lin(0.0, cpu),
        "gpu<-cpu link": _lin(0.0, _off_gpu("weights", f.weight_bytes, ctog) + cache_in
                              + _off_gpu("hidden", f.hidden_load_bytes, ctog)),
        "cpu<-disk link": _lin(0.0, _on("weights", Tier.DISK, f.weight_bytes, dtoc)
                               + _on("cache", Tier.DISK, f.cache_load_bytes, dtoc)
                               + _on("hidden", Tier.DISK, f.hidden_load_bytes, dtoc)),
        "cpu<-gpu link": _lin(0.0, cache_out + _off_gpu("hidden", f.hidden_store_bytes, gtoc)),
        "disk<-cpu link": _lin(0.0, _on("cache", Tier.DISK, f.cache_store_bytes, ctod)
                               + _on("hidden", Tier.DISK, f.hidden_store_bytes, ctod)),
        "stage link": _lin(f.stage_link_bytes / hw.stage_link_bytes_per_s, []),
    }
    return tuple(by_name[n] for n in TERMS)


def _per(curve: Curve, total: float, count: int) -> float:
    """Seconds of `count` transfers of total / count bytes each, on a link whose curve is by transfer size."""
    return count * curve.at(total / count) if total > 0 and count > 0 else 0.0


def _calibrated_terms(f: LayerFigures, hw: HardwareProfile, cal: Calibration, flags: Flags,
                      warm: bool) -> tuple[Linear, ...]:
    """_terms from a Calibration: each transfer at its link's curve at its own size (a layer's weights
    once per step, a cache or hidden state once per gpu batch), disk reads warm or cold; where the host
    runs copies and reads on the compute's cores their share joins the compute stream; the hand-off
    per op once anything moves (THREADED). Without a GPU a disk-tier item is read into its slot
    directly (one transfer, not two) and CPU attention moves nothing."""
    delegate = flags.cpu_attention and f.attn_to_cpu_bytes > 0
    base, attn_gpu, attn_cpu = _calibrated_parts(f, hw, cal, flags)
    nb, gpu = f.batches, hw.has_gpu
    read = cal.disk_read_warm_s if warm else cal.disk_read_cold_s
    c2g = {"weights": _per(cal.gpu_from_cpu_s, f.weight_bytes, 1),
           "cache": _per(cal.gpu_from_cpu_s, f.cache_load_bytes, nb),
           "hidden": _per(cal.gpu_from_cpu_s, f.hidden_load_bytes, nb)}
    g2c = {"cache": _per(cal.cpu_from_gpu_s, f.cache_store_bytes, nb),
           "hidden": _per(cal.cpu_from_gpu_s, f.hidden_store_bytes, nb)}
    d2c = {"weights": _per(read, f.weight_bytes, 1), "cache": _per(read, f.cache_load_bytes, nb),
           "hidden": _per(read, f.hidden_load_bytes, nb)}
    c2d = {"cache": _per(cal.disk_write_s, f.cache_store_bytes, nb),
           "hidden": _per(cal.disk_write_s, f.hidden_store_bytes, nb)}

    def via_host(cls: str, link: dict[str, float]) -> list[tuple[str, float]]:
        """An off-GPU item crosses the host link; from disk too only where a GPU is behind it."""
        t = link.get(cls, 0.0)
        return [(frac_var(cls, Tier.CPU), t)] + ([(frac_var(cls, Tier.DISK), t)] if gpu else [])

    if delegate:  # CPU-homed cache is attended in place: only q, k, v and the output cross, with a GPU
        cache_in = [(frac_var("cache", Tier.DISK), c2g["cache"] if gpu else 0.0)] + \
            ([(DELEGATED, _per(cal.gpu_from_cpu_s, f.attn_to_gpu_bytes, nb))] if gpu else [])
        cache_out = [(frac_var("cache", Tier.DISK), g2c["cache"] if gpu else 0.0)] + \
            ([(DELEGATED, _per(cal.cpu_from_gpu_s, f.attn_to_cpu_bytes, nb))] if gpu else [])
    else:
        cache_in, cache_out = via_host("cache", c2g), via_host("cache", g2c)
    links = {
        "gpu<-cpu link": via_host("weights", c2g) + cache_in + via_host("hidden", c2g),
        "cpu<-disk link": [(frac_var(c, Tier.DISK), d2c[c]) for c in CLASSES],
        "cpu<-gpu link": cache_out + via_host("hidden", g2c),
        "disk<-cpu link": [(frac_var(c, Tier.DISK), c2d[c]) for c in c2d],
    }
    compute, cpu = [], []
    if delegate:
        compute.append((DELEGATED, -attn_gpu))
        (cpu if gpu else compute).append((DELEGATED, attn_cpu))
    for name, share in (("gpu<-cpu link", cal.copy_share), ("cpu<-gpu link", cal.copy_share),
                        ("cpu<-disk link", cal.disk_share if warm else cal.cold_disk_share),
                        ("disk<-cpu link", cal.disk_share)):
        compute += [(v, share * c) for v, c in links[name]]
    ops = f.compute_ops  # each compute op waits for its stream's worker once the plan moves anything
    compute.append((THREADED, ops * cal.handoff_s * cal.compute_scale + cal.threaded_share * (base + attn_gpu)))
    by_name = {"compute": _lin(base + attn_gpu, compute), "cpu compute": _lin(0.0, cpu),
               **{n: _lin(0.0, parts) for n, parts in links.items()},
               "stage link": _lin(f.stage_link_bytes / hw.stage_link_bytes_per_s, [])}
    return tuple(by_name[n] for n in TERMS)


def transfer_s(hw: HardwareProfile, nbytes: float, far: Tier, inbound: bool, warm: bool = False) -> float:
    """Seconds of one transfer between the compute device and a tier (planner.timeline's op durations)."""
    if far is Tier.GPU or nbytes <= 0:
        return 0.0
    cal = hw.calibration
    if cal is None:
        s = nbytes / (hw.gpu_from_cpu_bytes_per_s if inbound else hw.cpu_from_gpu_bytes_per_s)
        if far is Tier.DISK:
            s += nbytes / (hw.cpu_from_disk_bytes_per_s if inbound else hw.disk_from_cpu_bytes_per_s)
        return s
    host = (cal.gpu_from_cpu_s if inbound else cal.cpu_from_gpu_s).at(nbytes)
    if far is Tier.CPU:
        return host
    disk = ((cal.disk_read_warm_s if warm else cal.disk_read_cold_s) if inbound else cal.disk_write_s).at(nbytes)
    return disk + (host if hw.has_gpu else 0.0)


def _group(phase: Phase, figures: list[LayerFigures], profile: HardwareProfile, rows: int,
           flags: Flags, warm: bool = False) -> tuple[StepCost, ...]:
    groups: dict[LayerFigures, list[int]] = {}
    for j, f in enumerate(figures):
        groups.setdefault(f, []).append(j)
    return tuple(StepCost(phase, tuple(layers), f, _terms(f, profile, rows, flags, warm))
                 for f, layers in groups.items())


@dataclass(frozen=True, slots=True)
class PhaseCosts:
    """Step costs of prefill and of one decode step at the average decode context, with what the
    totals need. One StepCost per group of graph layers with identical figures."""

    prefill: tuple[StepCost, ...]
    decode: tuple[StepCost, ...]
    gen_len: int
    block_size: int
    flags: Flags = Flags()

    def compute_only_s(self) -> float:
        """Total time if no byte crossed a link: a lower bound on total_s for any placement."""
        return (sum(s.count * s.compute_bound_s() for s in self.prefill)
                + (self.gen_len - 1) * sum(s.count * s.compute_bound_s() for s in self.decode))


def warm_reads(figs: BlockFigures, profile: HardwareProfile, disk: str | None = None) -> bool:
    """Whether disk reads come from the page cache: disk="warm" / "cold" says so (a benchmark that evicts
    what it reads); by default, when the model's weights and the block's cache fit in the page cache the
    calibration measured (a profile without one prices every read at its one disk rate)."""
    if disk is not None:
        if disk not in ("warm", "cold"):
            raise ValueError(f"disk must be 'warm' or 'cold', got {disk!r}")
        return disk == "warm"
    cal = profile.calibration
    if cal is None:
        return False
    shape = figs.shape
    held = sum(shape.weight_bytes) + len(shape.decoder_layers) * shape.num_gpu_batches * shape.cache_bytes
    return held <= cal.page_cache_bytes


def phase_costs(g: "nx.DiGraph | BlockFigures", profile: HardwareProfile, flags: Flags = Flags(),
                comp: Compression | None = None, disk: str | None = None) -> PhaseCosts:
    figs = figures_of(g)
    if comp is not None and flags.packed_bits != comp.bits:
        flags = dataclasses.replace(flags, packed_bits=comp.bits)
    lf = layer_figures(figs, decode_ctx(figs), flags, comp)
    b, warm = figs.gpu_batch_size, warm_reads(figs, profile, disk)
    return PhaseCosts(_group(Phase.PREFILL, lf[Phase.PREFILL], profile, b * figs.prompt_len, flags, warm),
                      _group(Phase.DECODE, lf[Phase.DECODE], profile, b, flags, warm),
                      figs.gen_len, figs.block_size, flags)


def moves_anything(policy: Policy) -> bool:
    """Whether the plan's programs hold a transfer (the CPU backend then runs its streams on worker
    threads): any class off the GPU, except a cache attended in place on the CPU."""
    in_place = policy.cpu_attention and policy.cache.disk_frac == 0
    return policy.weights.gpu_frac < 1 or policy.hidden.gpu_frac < 1 or (policy.cache.gpu_frac < 1 and not in_place)


def policy_fracs(policy: Policy) -> dict[str, float]:
    out = {}
    for cls in CLASSES:
        for t, v in zip(TIERS, getattr(policy, cls).as_tuple()):
            out[frac_var(cls, t)] = v
    out[THREADED] = 1.0 if moves_anything(policy) else 0.0
    return out


def next_items(figs: BlockFigures, policy: Policy, comp: Compression | None) -> dict[tuple[str, Tier], int]:
    """Per class, the stored size of the item that would move up next (homes are assigned in order, so
    the first item off the GPU, and the first on disk), when there is one."""
    shape = figs.shape
    cw = policy.compress_weights and comp is not None
    cache = comp.cache(shape.cache_bytes) if policy.compress_cache and comp is not None else shape.cache_bytes
    n_cache = len(shape.decoder_layers) * shape.num_gpu_batches
    sizes = {"weights": (list(shape.weight_bytes), list(comp.weight_bytes) if cw else list(shape.weight_bytes)),
             "cache": ([shape.cache_bytes] * n_cache, [cache] * n_cache),
             "hidden": ([shape.hidden_bytes] * shape.num_gpu_batches, [shape.hidden_bytes] * shape.num_gpu_batches)}
    out = {}
    for c, (raw, stored) in sizes.items():
        tiers = assign_tiers(raw, getattr(policy, c))
        for up, below in ((Tier.GPU, (Tier.CPU, Tier.DISK)), (Tier.CPU, (Tier.DISK,))):
            first = next((i for i, t in enumerate(tiers) if t in below), None)
            if first is not None:
                out[(c, up)] = stored[first]
    return out


def tight_tiers(peaks: Mapping[Tier, int], profile: HardwareProfile, nxt: Mapping[tuple[str, Tier], int]) -> tuple[str, ...]:
    """A tier is tight when the next item of some class waiting below it does not fit in its free bytes."""
    caps = {Tier.GPU: profile.gpu_bytes, Tier.CPU: profile.cpu_bytes}
    return tuple(t.value for t in (Tier.GPU, Tier.CPU)
                 if any(n > caps[t] - peaks[t] for (_, up), n in nxt.items() if up is t))


def evaluate(g: "nx.DiGraph | BlockFigures", profile: HardwareProfile, policy: Policy, *,
             peaks: Mapping[Tier, int] | None = None, costs: PhaseCosts | None = None,
             spec: ModelSpec | None = None, comp: Compression | None = None, disk: str | None = None) -> Predictions:
    """Predicted times of a fixed policy on the block the graph was lowered for (no LP).

    peaks / costs / comp: planner.memory.peaks_of, phase_costs and compression_of(spec) when the
    caller has them already; spec (or comp) is needed only for a policy that compresses. disk: "warm" or
    "cold" fixes where disk reads come from (see warm_reads).
    """
    figs = figures_of(g)
    if comp is None and spec is not None:
        comp = policy_compression(spec, policy)
    needs_compression(policy, comp)
    flags = Flags.of(policy)
    fracs = policy_fracs(policy)
    c = costs if costs is not None else phase_costs(figs, profile, flags, comp, disk)
    assert c.flags == flags, f"costs for {c.flags} used for a policy with {flags}"
    prefill_s = sum(s.count * s.time_s(fracs) for s in c.prefill)
    decode_step_s = sum(s.count * s.time_s(fracs) for s in c.decode)
    total_s = prefill_s + (c.gen_len - 1) * decode_step_s
    tokens_per_s = c.block_size * c.gen_len / total_s if total_s > 0 else float("inf")
    if peaks is None:
        peaks = peaks_of(figs, policy, comp, pinned_staging=profile.has_gpu)
    return Predictions(
        tokens_per_s=sig(tokens_per_s), prefill_s=sig(prefill_s), decode_step_s=sig(decode_step_s),
        total_s=sig(total_s), peak_bytes={t.value: int(peaks[t]) for t in TIERS},
        binding=binding_term(c, fracs), tight=tight_tiers(peaks, profile, next_items(figs, policy, comp)),
    )


def stream_sums(g: "nx.DiGraph | BlockFigures", profile: HardwareProfile, policy: Policy, *,
                comp: Compression | None = None, disk: str | None = None) -> dict[Phase, dict[str, float]]:
    """Per phase (prefill, one decode step at the average context), each stream's busy time summed over
    the layers: what a fit of the calibration's constants reads (app.calibrate)."""
    fracs = policy_fracs(policy)
    c = phase_costs(figures_of(g), profile, Flags.of(policy), comp, disk)
    out = {}
    for phase, steps in ((Phase.PREFILL, c.prefill), (Phase.DECODE, c.decode)):
        sums = dict.fromkeys(STREAMS, 0.0)
        for s in steps:
            for name, t in s.stream_times(fracs).items():
                sums[name] += s.count * t
        out[phase] = sums
    return out


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

