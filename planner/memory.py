"""Peak memory per tier of a policy: the buffers the runtime allocates plus the transients of the
compute that runs, and the sizes of 4-bit compressed weights and cache.

The runtime allocates exactly the buffer table (`schedule.build_buffers`, resized here for
compression), so this model and the runtime cannot drift apart. Transients are those of one
compute op at the longest context: attention scores and MLP intermediates of one gpu batch, the
logits (the graph's work bytes). The dequantization scratch is a buffer of the table, held the whole
run at the size of its largest use (schedule.scratch_bytes), so it counts as one.

4-bit (or 8-bit) compression (FlexGen's scheme): the compressed sizes are flexgen_graph.layout's,
the one definition the runtime's buffers follow too (weights along a linear map's input dimension or
an embedding's hidden dimension, the cache along its head dimension).

    >>> from flexgen_graph.catalog import catalog_spec
    >>> comp = compression_of(catalog_spec("facebook/opt-125m"))
    >>> comp.cache_row_compressed  # a 64-element head row: 64 / 2 code bytes + a float16 scale and minimum
    36
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import networkx as nx

from flexgen_graph.hardware import HardwareProfile
from flexgen_graph.ir import TIERS, LayerKind, NodeKind, Phase, Tier
from flexgen_graph.layout import (
    DEFAULT_BITS,
    DEFAULT_GROUP_SIZE,
    PACKED_TILE_BYTES,
    QuantConfig,
    compressed_nbytes,
)
from flexgen_graph.policy import Placement, Policy
from flexgen_graph.program import Buffer, BufferRole
from flexgen_graph.spec import ModelSpec
from planner.figures import BlockFigures, figures_of
from planner.schedule import BufferPlan, GraphShape, build_buffers, scratch_bytes

@dataclass(frozen=True, slots=True)
class Compression:
    """Compressed sizes of one model: per graph layer, and the cache's per-row ratio (exact: the
    cache is a whole number of head_dim rows)."""

    group_size: int
    bits: int
    weight_bytes: tuple[int, ...]  # per graph layer, compressed
    cache_row_bytes: int  # one head_dim row of k or v in the model dtype
    cache_row_compressed: int

    def cache(self, nbytes: int) -> int:
        assert nbytes % self.cache_row_bytes == 0, f"{nbytes} cache bytes are not whole rows of {self.cache_row_bytes}"
        return nbytes // self.cache_row_bytes * self.cache_row_compressed


def compression_of(spec: ModelSpec, group_size: int = DEFAULT_GROUP_SIZE, bits: int = DEFAULT_BITS) -> Compression:
    cfg = QuantConfig(bits, group_size)
    layers = tuple(spec.compressed_layer_bytes(j, cfg) for j in range(spec.num_graph_layers))
    return Compression(group_size, bits, layers, spec.head_dim * spec.dtype_bytes,
                       compressed_nbytes((spec.head_dim,), 0, cfg))


def policy_compression(spec: ModelSpec, policy: Policy) -> Compression:
    return compression_of(spec, policy.group_size, policy.compress_bits)


def needs_compression(policy: Policy, comp: Compression | None) -> None:
    if not policy.compresses:
        return
    if comp is None:
        raise ValueError("a policy with compress_weights or compress_cache needs the model spec "
                         "(pass spec= so the compressed sizes can be computed)")
    if (comp.bits, comp.group_size) != (policy.compress_bits, policy.group_size):
        raise ValueError(f"compressed sizes for {comp.bits} bits in groups of {comp.group_size} used for a policy "
                         f"with {policy.compress_bits} bits in groups of {policy.group_size}")


# ---------------------------------------------------------------- buffers


def sized_buffers(shape: GraphShape, policy: Policy, comp: Compression | None = None) -> BufferPlan:
    """schedule.build_buffers, with compressed tensors' buffers at their compressed size. Homes are
    assigned on the uncompressed sizes (fractions are of the uncompressed bytes, as in FlexGen), so
    the buffer ids and the programs do not depend on compression."""
    bp = build_buffers(shape, policy)
    needs_compression(policy, comp)
    if comp is None or not (policy.compress_weights or policy.compress_cache):
        return bp
    streamed = [comp.weight_bytes[shape.first_layer + j] for j, t in enumerate(bp.weight_tier) if t is not Tier.GPU]

    def size(b: Buffer) -> int:
        if policy.compress_weights and b.role is BufferRole.WEIGHT_HOME:
            return comp.weight_bytes[b.layer]
        if policy.compress_weights and b.role is BufferRole.WEIGHT_SLOT:
            return max(streamed)
        if policy.compress_cache and b.role in (BufferRole.CACHE_HOME, BufferRole.CACHE_SLOT):
            return comp.cache(b.nbytes)
        return b.nbytes

    return dataclasses.replace(bp, buffers=tuple(dataclasses.replace(b, nbytes=size(b)) for b in bp.buffers))


def buffer_bytes(buffers: tuple[Buffer, ...]) -> dict[Tier, int]:
    """The buffer table per tier (all of it is allocated once, for the whole run)."""
    out = {t: 0 for t in TIERS}
    for b in buffers:
        out[b.tier] += b.nbytes
    return out


def cache_slots_for_cpu_attention(shape: GraphShape) -> bool:
    """Whether schedule.build_buffers gives CPU-homed cache GPU slots under cpu_attention (asked of it,
    so the LP counts what the schedule allocates)."""
    if not shape.decoder_layers:
        return False
    gpu, cpu = Placement.all_on(Tier.GPU), Placement.all_on(Tier.CPU)
    one = dataclasses.replace(shape, num_gpu_batches=1)  # the rule does not depend on the block's size
    bp = build_buffers(one, Policy(1, 1, gpu, cpu, gpu, cpu_attention=True))
    return bool(bp.cache_slots)


# ---------------------------------------------------------------- transients


@dataclass(frozen=True, slots=True)
class Transient:
    """Bytes one compute op holds while it runs, beyond the buffer table."""

    gpu: int
    cpu: int  # CPU attention's scores


def compute_transient(work_bytes: int, policy: Policy, attends_on_cpu: bool) -> Transient:
    """The one rule for a compute op's transients (the memory model at the longest context, the
    verifier at every context). work_bytes: the graph's transient activations at the context.

    A CPU-attended op is charged its whole work bytes on both tiers: the graph does not split the
    attention's share from the MLP's, and an over-count keeps the prediction an upper bound."""
    # what it dequantizes goes into the plan's scratch buffers (counted with the buffer table). Packed weights
    # (runtime.packed) hold no dense layer: the int4 kernel's bfloat16 copies of the op's activations (at most its
    # work bytes again) and a TiledWeight's scratch, an upper bound
    packed = work_bytes + PACKED_TILE_BYTES
    gpu = work_bytes + (packed if policy.packed_weights else 0)
    return Transient(gpu, work_bytes if attends_on_cpu else 0)


def layer_transients(figs: BlockFigures, policy: Policy, ctx: int, cpu_attended_layers: frozenset[int],
                     gpu_attended_layers: frozenset[int]) -> Transient:
    """The largest transients of any compute op of the block at context ctx (decode) and in prefill."""
    cases = set()  # layers alike give one case (decoder layers are alike)
    for phase in (Phase.PREFILL, Phase.DECODE):
        decode = phase is Phase.DECODE
        for j, ls in enumerate(figs.phase(phase)):
            comp = ls.of(NodeKind.COMPUTE)
            if not comp.count:
                continue
            modes = (False,)
            if decode and ls.kind is LayerKind.DECODER:
                modes = tuple(m for m, on in ((True, j in cpu_attended_layers), (False, j in gpu_attended_layers))
                              if on)
            cases.add((comp.work_bytes_at(ctx if decode else 0), modes))
    gpu = cpu = 0
    for work, modes in cases:
        for on_cpu in modes:
            t = compute_transient(work, policy, on_cpu)
            gpu, cpu = max(gpu, t.gpu), max(cpu, t.cpu)
    return Transient(gpu, cpu)


def scratch_bound(shape: GraphShape, policy: Policy) -> tuple[int, int]:
    """(device, host) dequantization scratch whatever the placement: the device's if every cache attends
    there, the host's if every cache is attended on the CPU (for the LP, which places cache after)."""
    items = [(j, k) for j in shape.decoder_layers for k in range(shape.num_gpu_batches)]
    dev = scratch_bytes(shape, policy, dict.fromkeys(items, Tier.GPU))[0]
    host = scratch_bytes(shape, policy, dict.fromkeys(items, Tier.CPU))[1] if policy.cpu_attention else 0
    return dev, host


def staging_bytes(buffers: tuple[Buffer, ...]) -> int:
    """Pinned host bytes the CUDA backend keeps for copies between disk (or the weight store) and the
    GPU: one buffer per thread that makes them, as large as its largest copy. The main thread loads
    GPU-homed weights at allocation; the load stream reads disk homes; the store stream writes them.
    Whole homes bound each copy (a cache load reads at most the whole cache)."""
    def largest(roles: tuple[BufferRole, ...], tier: Tier) -> int:
        return max((b.nbytes for b in buffers if b.role in roles and b.tier is tier), default=0)

    homes = (BufferRole.WEIGHT_HOME, BufferRole.CACHE_HOME, BufferRole.HIDDEN_HOME)
    return largest((BufferRole.WEIGHT_HOME,), Tier.GPU) + largest(homes, Tier.DISK) + largest(homes[1:], Tier.DISK)


def attends_on_cpu(policy: Policy, home: Tier) -> bool:
    """CPU attention: decode attends cache homed on the CPU where it lives (it never crosses the link)."""
    return policy.cpu_attention and home is Tier.CPU


def peaks_of(figs: BlockFigures, policy: Policy, comp: Compression | None = None, *,
             pinned_staging: bool = False) -> dict[Tier, int]:
    """Peak bytes per tier of `policy` on the block `figs` describes; pinned_staging: the runtime's
    backend keeps staging buffers (the CUDA backend: profiles with a GPU)."""
    bp = sized_buffers(figs.shape, policy, comp)
    out = buffer_bytes(bp.buffers)
    if pinned_staging:
        out[Tier.CPU] += staging_bytes(bp.buffers)
    on_cpu = frozenset(j for (j, _), t in bp.cache_tier.items() if attends_on_cpu(policy, t))
    on_gpu = frozenset(j for (j, _), t in bp.cache_tier.items() if not attends_on_cpu(policy, t))
    t = layer_transients(figs, policy, figs.max_seq_len, on_cpu, on_gpu)
    out[Tier.GPU] += t.gpu
    out[Tier.CPU] += t.cpu
    return out


def peak_bytes(g: "nx.DiGraph | BlockFigures", policy: Policy, spec: ModelSpec | None = None, *,
               profile: "HardwareProfile | None" = None) -> dict[Tier, int]:
    """Peak bytes per tier; spec is needed only for a policy that compresses; profile: the machine the
    plan is for (a profile with a GPU adds the CUDA backend's pinned staging buffers)."""
    return peaks_of(figures_of(g), policy, policy_compression(spec, policy) if spec is not None else None,
                    pinned_staging=profile is not None and profile.has_gpu)


def workspace_bytes(g: "nx.DiGraph | BlockFigures") -> int:
    """Largest transient activation of a single compute op (uncompressed, GPU attention), at the
    longest context."""
    figs = figures_of(g)
    every = frozenset(range(len(figs.decode)))
    on_gpu = Placement.all_on(Tier.GPU)
    return layer_transients(figs, Policy(1, 1, on_gpu, on_gpu, on_gpu), figs.max_seq_len, frozenset(), every).gpu
