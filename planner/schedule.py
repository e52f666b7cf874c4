"""Schedule: task graph + policy -> buffer table and the prefill/decode programs.

The op order is a topological order of the task graph chosen by priority so that the load of
item x (layer j, gpu batch k, x = j * num_gpu_batches + k) is issued before the compute of
item x - 1: layer j+1's weights (and the next batch's cache) stream in while layer j computes.
Streamed tensors go through rings of two slots; a load into a slot waits for the slot's
previous occupant's readers (its compute and its store), never on a global barrier.

A pipeline stage's programs are batch-major instead (x = k * num_layers + j): gpu batch k goes
through all the stage's layers and is sent on while batch k + 1 arrives, so the next stage starts
on batch k while this one computes k + 1. Weights cannot stream through a 2-slot ring in that order
(each batch would reload every layer): a stage's weights stay on its GPU (planner.pipeline).
The programs name the model's layers (the stage graph's layer + first_layer). The first stage's
decode embedding of batch k waits for that batch's tokens from the last stage (RECV_TOKENS), which
sends them right after its head (SEND_TOKENS).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from flexgen_graph.ir import LayerKind, NodeKey, NodeKind, Phase, Tier
from flexgen_graph.layout import attend_scratch_bytes, dequant_scratch
from flexgen_graph.policy import Policy, assign_tiers
from flexgen_graph.program import QCACHE_TWIN, Buffer, BufferRole, Op, OpKind, Programs

NUM_SLOTS = 2  # double buffering


@dataclass(frozen=True, slots=True)
class GraphShape:
    """What the scheduler reads off a task graph (sizes come from its nodes)."""

    num_graph_layers: int
    num_gpu_batches: int
    prompt_len: int
    gen_len: int
    layer_kinds: tuple[LayerKind, ...]
    weight_bytes: tuple[int, ...]  # per graph layer
    cache_bytes: int  # one (decoder layer, gpu batch) cache at the longest length
    hidden_bytes: int  # one gpu batch's hidden state in prefill (the larger phase)
    first_layer: int = 0  # the model's graph layer of this graph's layer 0 (a pipeline stage)
    batch_major: bool = False  # a stage of a pipeline of several: programs in batch-major order
    score: bool = False  # a scoring workload: prefill alone, no cache kept (cache_bytes 0)

    @property
    def decoder_layers(self) -> list[int]:
        return [j for j, k in enumerate(self.layer_kinds) if k is LayerKind.DECODER]


def graph_shape(g: nx.DiGraph) -> GraphShape:
    nodes = {key: data["node"] for key, data in g.nodes(data=True)}
    n_layers = 1 + max(key.layer for key in nodes)
    nb = g.graph["num_gpu_batches"]
    max_seq = g.graph["prompt_len"] + g.graph["gen_len"]
    kinds = tuple(nodes[NodeKey(Phase.PREFILL, NodeKind.LOAD_WEIGHT, j, -1)].layer_kind for j in range(n_layers))
    wbytes = tuple(nodes[NodeKey(Phase.PREFILL, NodeKind.LOAD_WEIGHT, j, -1)].bytes for j in range(n_layers))
    first_dec = kinds.index(LayerKind.DECODER)
    score = g.graph.get("score", False)
    cache = 0 if score else nodes[NodeKey(Phase.DECODE, NodeKind.LOAD_CACHE, first_dec, 0)].bytes_per_ctx * max_seq
    hidden = nodes[NodeKey(Phase.PREFILL, NodeKind.STORE_HIDDEN, 0, 0)].bytes
    return GraphShape(n_layers, nb, g.graph["prompt_len"], g.graph["gen_len"], kinds, wbytes, cache, hidden,
                      g.graph.get("first_layer", 0), g.graph.get("stages", 1) > 1, score)


@dataclass(frozen=True, slots=True)
class BufferPlan:
    buffers: tuple[Buffer, ...]
    weight_tier: tuple[Tier, ...]  # per graph layer
    cache_tier: dict[tuple[int, int], Tier]  # (layer, batch)
    hidden_tier: tuple[Tier, ...]  # per gpu batch
    weight_home: dict[int, int]  # layer -> buffer id
    cache_home: dict[tuple[int, int], int]
    hidden_home: dict[int, int]
    weight_slots: tuple[int, ...]
    cache_slots: tuple[int, ...]
    hidden_slots: tuple[int, ...]
    scratch: int = -1  # the compute device's dequantization scratch (-1: none)
    host_scratch: int = -1  # the host's, for a compressed cache attended there


def build_buffers(shape: GraphShape, policy: Policy) -> BufferPlan:
    nb = shape.num_gpu_batches
    w_tier = tuple(assign_tiers(list(shape.weight_bytes), policy.weights))
    cache_items = [] if shape.score else [(j, k) for j in shape.decoder_layers for k in range(nb)]
    c_tier = dict(zip(cache_items, assign_tiers([shape.cache_bytes] * len(cache_items), policy.cache)))
    h_tier = tuple(assign_tiers([shape.hidden_bytes] * nb, policy.hidden))

    bufs: list[Buffer] = []

    def add(role: BufferRole, tier: Tier, nbytes: int, layer: int = -1, batch: int = -1, slot: int = -1) -> int:
        bufs.append(Buffer(len(bufs), role, tier, nbytes, layer, batch, slot))
        return len(bufs) - 1

    first = shape.first_layer  # buffers name the model's layers
    w_home = {j: add(BufferRole.WEIGHT_HOME, w_tier[j], shape.weight_bytes[j], layer=first + j)
              for j in range(shape.num_graph_layers)}
    c_home = {jk: add(BufferRole.CACHE_HOME, c_tier[jk], shape.cache_bytes, layer=first + jk[0], batch=jk[1])
              for jk in cache_items}
    h_home = {k: add(BufferRole.HIDDEN_HOME, h_tier[k], shape.hidden_bytes, batch=k) for k in range(nb)}

    def slots(role: BufferRole, sizes: list[int]) -> tuple[int, ...]:
        if not sizes:
            return ()
        return tuple(add(role, Tier.GPU, max(sizes), slot=s) for s in range(NUM_SLOTS))

    w_slots = slots(BufferRole.WEIGHT_SLOT, [shape.weight_bytes[j] for j, t in enumerate(w_tier) if t is not Tier.GPU])
    c_slots = slots(BufferRole.CACHE_SLOT, [shape.cache_bytes for t in c_tier.values() if streams_cache(t, policy)])
    h_slots = slots(BufferRole.HIDDEN_SLOT, [shape.hidden_bytes for t in h_tier if t is not Tier.GPU])
    gpu_scratch, host_scratch = scratch_bytes(shape, policy, c_tier)
    dev = add(BufferRole.DEQUANT_SCRATCH, Tier.GPU, gpu_scratch) if gpu_scratch else -1
    host = add(BufferRole.DEQUANT_HOST, Tier.CPU, host_scratch) if host_scratch else -1
    return BufferPlan(tuple(bufs), w_tier, c_tier, h_tier, w_home, c_home, h_home, w_slots, c_slots, h_slots,
                      dev, host)


def scratch_bytes(shape: GraphShape, policy: Policy, c_tier: dict[tuple[int, int], Tier]) -> tuple[int, int]:
    """(compute-device, host) bytes of the dequantization scratch: the largest layout.dequant_scratch of
    the block's compute ops (a compressed cache is attended a chunk of rows at a time, runtime.qattention).
    Sizes are the dense ones. Ops of the compute stream run one at a time, so one scratch per tier serves all."""
    needs = [(0, 0)]
    max_seq = shape.prompt_len + shape.gen_len
    chunk = attend_scratch_bytes(shape.cache_bytes // max_seq, max_seq) if shape.cache_bytes else 0
    for j, kind in enumerate(shape.layer_kinds):
        w = shape.weight_bytes[j] if dequantizes(kind, policy) else 0
        needs.append(dequant_scratch(w, 0, False))  # the layer's weights alone (the head; any prefill)
        if kind is LayerKind.DECODER and policy.compress_cache and not shape.score:
            for k in range(shape.num_gpu_batches):
                t = c_tier[(j, k)]
                needs.append(dequant_scratch(w, chunk, t is not Tier.GPU and not streams_cache(t, policy)))
    return max(n[0] for n in needs), max(n[1] for n in needs)


def dequantizes(kind: LayerKind, policy: Policy) -> bool:
    """Whether a layer's compressed weights are restored to a dense copy before it computes: not when they are
    packed (computed on as they are), nor an embedding's (it reads the rows of its ids, dequantizing those)."""
    return policy.compress_weights and not policy.packed_weights and kind is not LayerKind.EMBED


def streams_cache(tier: Tier, policy: Policy) -> bool:
    """Whether a cache item passes through the compute device's slots (else it is used in place:
    on the GPU, or on the CPU when the plan delegates attention there)."""
    return tier is not Tier.GPU and not (tier is Tier.CPU and policy.cpu_attention)


def _ring(items: list) -> tuple[dict, dict]:
    """Slot index of each item in a 2-slot ring, and the item that last held the same slot."""
    slot = {it: i % NUM_SLOTS for i, it in enumerate(items)}
    prev = {it: items[i - NUM_SLOTS] for i, it in enumerate(items) if i >= NUM_SLOTS}
    return slot, prev


def _item(j: int, k: int, nb: int, n_layers: int, batch_major: bool) -> int:
    return k * n_layers + j if batch_major else j * nb + k


def _priority(key: NodeKey, nb: int, n_layers: int, batch_major: bool) -> tuple[float, str]:
    x = _item(key.layer, max(key.batch, 0), nb, n_layers, batch_major)
    if key.kind is NodeKind.COMPUTE:
        p = 3 * x + 1
    elif key.kind in (NodeKind.STORE_CACHE, NodeKind.STORE_HIDDEN, NodeKind.SEND_HIDDEN, NodeKind.SEND_TOKENS):
        p = 3 * x + 2
    elif key.kind is NodeKind.LOAD_WEIGHT:
        p = 3 * (x - (1 if batch_major else nb)) + 0.4  # before the first compute of the previous layer
    else:
        p = 3 * (x - 1) + 0.5  # before the compute of the previous item
    return (p, key.label())


def node_order(g: nx.DiGraph, phase: Phase) -> list[NodeKey]:
    sub = g.subgraph([key for key in g.nodes if key.phase is phase])
    nb, n_layers = g.graph["num_gpu_batches"], 1 + max(key.layer for key in g.nodes)
    batch_major = g.graph.get("stages", 1) > 1
    return list(nx.lexicographical_topological_sort(sub, key=lambda key: _priority(key, nb, n_layers, batch_major)))


def emit_programs(g: nx.DiGraph, policy: Policy) -> Programs:
    shape = graph_shape(g)
    bp = build_buffers(shape, policy)
    return Programs(bp.buffers, _emit(g, shape, bp, policy, Phase.PREFILL), _emit(g, shape, bp, policy, Phase.DECODE))


_QCACHE_OF = {dense: q for q, dense in QCACHE_TWIN.items()}  # a decoder kind -> the same over a compressed cache


def _compute_kind(kind: LayerKind, phase: Phase, host_cache: bool, score: bool = False,
                  qcache: bool = False) -> OpKind:
    if kind is LayerKind.EMBED:
        return OpKind.EMBED
    if kind is LayerKind.HEAD:
        return OpKind.HEAD_SCORE if score else OpKind.HEAD
    if score:
        return OpKind.DECODER_SCORE
    if phase is Phase.PREFILL:
        kind = OpKind.DECODER_PREFILL_HOST_CACHE if host_cache else OpKind.DECODER_PREFILL
    else:
        kind = OpKind.DECODER_DECODE_CPU_ATTN if host_cache else OpKind.DECODER_DECODE
    return _QCACHE_OF[kind] if qcache else kind


@dataclass(frozen=True, slots=True)
class _Rings:
    """Which items of a phase pass through each 2-slot ring: their slot, and the item that held it before."""

    w_slot: dict[int, int]  # layer -> weight slot index
    w_prev: dict[int, int]
    c_slot: dict[tuple[int, int], int]  # (layer, batch) -> cache slot index
    c_prev: dict[tuple[int, int], tuple[int, int]]
    h_slot: dict[tuple[int, int], int]  # (layer, batch) -> hidden slot index
    h_prev: dict[tuple[int, int], tuple[int, int]]
    host_cache: frozenset[tuple[int, int]]  # cache used in place off the GPU (CPU attention)
    dequant: frozenset[int] = frozenset()  # layers whose compressed weights are restored before computing
    qcache: bool = False  # the cache is compressed


def _rings(shape: GraphShape, bp: BufferPlan, policy: Policy) -> _Rings:
    nb, first = shape.num_gpu_batches, shape.first_layer
    items = sorted(((j, k) for j in range(shape.num_graph_layers) for k in range(nb)),
                   key=lambda jk: _item(*jk, nb, shape.num_graph_layers, shape.batch_major))  # program order
    w_stream = [j for j in range(shape.num_graph_layers) if bp.weight_tier[j] is not Tier.GPU]
    if shape.batch_major and w_stream:
        raise ValueError("a pipeline stage keeps its weights on its GPU: batch-major programs cannot stream "
                         f"weights through a 2-slot ring (layers {[first + j for j in w_stream]} are off the GPU)")
    c_stream = [jk for jk in items if streams_cache(bp.cache_tier.get(jk, Tier.GPU), policy)]
    host_cache = frozenset(jk for jk, t in bp.cache_tier.items() if t is not Tier.GPU and not streams_cache(t, policy))
    h_stream = [jk for jk in items if bp.hidden_tier[jk[1]] is not Tier.GPU]
    dequant = frozenset(j for j, kind in enumerate(shape.layer_kinds) if dequantizes(kind, policy))
    return _Rings(*_ring(w_stream), *_ring(c_stream), *_ring(h_stream), host_cache, dequant,
                  policy.compress_cache and not shape.score)


class _Emitter:
    """Builds one phase's ops in node order; each op waits on the earlier ops it depends on, found by
    (node kind, layer, batch) in the ops emitted so far."""

    def __init__(self, shape: GraphShape, bp: BufferPlan, rings: _Rings, phase: Phase) -> None:
        self.shape, self.bp, self.r, self.phase = shape, bp, rings, phase
        self.ops: list[Op] = []
        self._index: dict[tuple[NodeKind, int, int], int] = {}  # (kind, layer, batch) -> op index
        self._dense_layer = -1  # the layer whose weights the scratch holds

    def idx(self, kind: NodeKind, layer: int, batch: int) -> list[int]:
        i = self._index.get((kind, layer, batch))
        return [] if i is None else [i]

    def freed(self, prev: dict, jk: tuple[int, int], *kinds: NodeKind) -> list[int]:
        """Ops that read the slot's previous occupant (a new writer must wait for them)."""
        if jk not in prev:
            return []
        pj, pk = prev[jk]
        return [i for kind in kinds for i in self.idx(kind, pj, pk)]

    def emit(self, key: NodeKey) -> None:
        gj = self.shape.first_layer + key.layer  # programs name the model's layers
        if key.kind is NodeKind.COMPUTE and key.layer in self.r.dequant and self._dense_layer != key.layer:
            self.ops.append(self._dequant_weight(key.layer, gj))
            self._dense_layer = key.layer
        op = self.BUILD[key.kind](self, key.layer, key.batch, gj, key._replace(layer=gj).label())
        if op is None:  # the tensor stays where it is used: no op
            return
        for w in op.waits:
            assert w < len(self.ops), f"{op.node} waits on op {w} that is not earlier in program order"
        self._index[(key.kind, key.layer, key.batch)] = len(self.ops)
        self.ops.append(op)

    # -- transfers between a home and its slot ---------------------------------------------------
    def _load_weight(self, j: int, k: int, gj: int, label: str) -> Op | None:
        if self.bp.weight_tier[j] is Tier.GPU:
            return None
        waits = []
        if j in self.r.w_prev:  # the slot's previous layer is done when its last gpu batch's compute is
            waits = self.idx(NodeKind.COMPUTE, self.r.w_prev[j], self.shape.num_gpu_batches - 1)
        return Op(OpKind.LOAD_WEIGHT, gj, -1, tuple(waits), src=self.bp.weight_home[j],
                  dst=self.bp.weight_slots[self.r.w_slot[j]], node=label)

    def _load_cache(self, j: int, k: int, gj: int, label: str) -> Op | None:
        if (j, k) not in self.r.c_slot:
            return None
        waits = self.freed(self.r.c_prev, (j, k), NodeKind.COMPUTE, NodeKind.STORE_CACHE)
        return Op(OpKind.LOAD_CACHE, gj, k, tuple(waits), src=self.bp.cache_home[(j, k)],
                  dst=self.bp.cache_slots[self.r.c_slot[(j, k)]], node=label)

    def _load_hidden(self, j: int, k: int, gj: int, label: str) -> Op | None:
        if (j, k) not in self.r.h_slot:
            return None
        waits = self.idx(NodeKind.STORE_HIDDEN, j - 1, k) + self.idx(NodeKind.RECV_HIDDEN, j, k) \
            + self.freed(self.r.h_prev, (j, k), NodeKind.COMPUTE, NodeKind.STORE_HIDDEN)
        return Op(OpKind.LOAD_HIDDEN, gj, k, tuple(waits), src=self.bp.hidden_home[k],
                  dst=self.bp.hidden_slots[self.r.h_slot[(j, k)]], node=label)

    def _store_cache(self, j: int, k: int, gj: int, label: str) -> Op | None:
        if (j, k) not in self.r.c_slot:
            return None
        return Op(OpKind.STORE_CACHE, gj, k, tuple(self.idx(NodeKind.COMPUTE, j, k)),
                  src=self.bp.cache_slots[self.r.c_slot[(j, k)]], dst=self.bp.cache_home[(j, k)], node=label)

    def _store_hidden(self, j: int, k: int, gj: int, label: str) -> Op | None:
        if (j, k) not in self.r.h_slot:
            return None
        return Op(OpKind.STORE_HIDDEN, gj, k, tuple(self.idx(NodeKind.COMPUTE, j, k)),
                  src=self.bp.hidden_slots[self.r.h_slot[(j, k)]], dst=self.bp.hidden_home[k], node=label)

    # -- the link between pipeline stages ------------------------------------------------------------
    def _recv_hidden(self, j: int, k: int, gj: int, label: str) -> Op:
        # into the home: a slot, if any, is filled by LOAD_HIDDEN after
        return Op(OpKind.RECV_HIDDEN, gj, k, (), dst=self.bp.hidden_home[k], node=label)

    def _send_hidden(self, j: int, k: int, gj: int, label: str) -> Op:
        waits = self.idx(NodeKind.COMPUTE, j, k) + self.idx(NodeKind.STORE_HIDDEN, j, k)
        return Op(OpKind.SEND_HIDDEN, gj, k, tuple(waits), src=self.bp.hidden_home[k], node=label)

    def _recv_tokens(self, j: int, k: int, gj: int, label: str) -> Op:
        return Op(OpKind.RECV_TOKENS, gj, k, (), node=label)

    def _send_tokens(self, j: int, k: int, gj: int, label: str) -> Op:
        return Op(OpKind.SEND_TOKENS, gj, k, tuple(self.idx(NodeKind.COMPUTE, j, k)), node=label)

    # -- compute ---------------------------------------------------------------------------------------
    def _weight(self, j: int) -> int:
        """Where layer j's compressed or dense weights are when it computes: its slot, else its home."""
        return self.bp.weight_slots[self.r.w_slot[j]] if j in self.r.w_slot else self.bp.weight_home[j]

    def _dequant_weight(self, j: int, gj: int) -> Op:
        """Layer j's weights restored into the scratch before its first compute (after their load)."""
        return Op(OpKind.DEQUANT_WEIGHT, gj, -1, tuple(self.idx(NodeKind.LOAD_WEIGHT, j, -1)), src=self._weight(j),
                  dst=self.bp.scratch, node=f"dequant_weight:L{gj}")

    def _compute(self, j: int, k: int, gj: int, label: str) -> Op:
        jk, r, bp = (j, k), self.r, self.bp
        waits = self.idx(NodeKind.LOAD_WEIGHT, j, -1) + self.idx(NodeKind.LOAD_CACHE, j, k) \
            + self.idx(NodeKind.LOAD_HIDDEN, j, k)
        if jk not in r.h_slot:
            waits += self.idx(NodeKind.RECV_HIDDEN, j, k)
        waits += self.idx(NodeKind.RECV_TOKENS, j, k)
        if jk in r.c_slot and not self.idx(NodeKind.LOAD_CACHE, j, k):
            waits += self.freed(r.c_prev, jk, NodeKind.STORE_CACHE)  # prefill writes the slot without a load
        if jk in r.h_slot and not self.idx(NodeKind.LOAD_HIDDEN, j, k):
            waits += self.freed(r.h_prev, jk, NodeKind.STORE_HIDDEN)  # the embedding writes the slot without a load
        lkind = self.shape.layer_kinds[j]
        weight = bp.scratch if j in r.dequant else self._weight(j)
        cache = -1
        if lkind is LayerKind.DECODER and not self.shape.score:  # a scoring plan keeps no cache
            cache = bp.cache_slots[r.c_slot[jk]] if jk in r.c_slot else bp.cache_home[jk]
        hidden = bp.hidden_slots[r.h_slot[jk]] if jk in r.h_slot else bp.hidden_home[k]
        kind = _compute_kind(lkind, self.phase, jk in r.host_cache, self.shape.score, r.qcache and cache >= 0)
        return Op(kind, gj, k, tuple(sorted(waits)), weight=weight, cache=cache, hidden=hidden, node=label,
                  scratch=self._cache_scratch(kind))

    def _cache_scratch(self, kind: OpKind) -> int:
        """The buffer a compressed cache's decode restores the rows it attends into, a chunk at a time
        (prefill attends its new rows alone: none)."""
        return {OpKind.DECODER_DECODE_QCACHE: self.bp.scratch,
                OpKind.DECODER_DECODE_CPU_ATTN_QCACHE: self.bp.host_scratch}.get(kind, -1)

    BUILD = {
        NodeKind.LOAD_WEIGHT: _load_weight,
        NodeKind.LOAD_CACHE: _load_cache,
        NodeKind.LOAD_HIDDEN: _load_hidden,
        NodeKind.STORE_CACHE: _store_cache,
        NodeKind.STORE_HIDDEN: _store_hidden,
        NodeKind.RECV_HIDDEN: _recv_hidden,
        NodeKind.SEND_HIDDEN: _send_hidden,
        NodeKind.RECV_TOKENS: _recv_tokens,
        NodeKind.SEND_TOKENS: _send_tokens,
        NodeKind.COMPUTE: _compute,
    }


def _emit(g: nx.DiGraph, shape: GraphShape, bp: BufferPlan, policy: Policy, phase: Phase) -> tuple[Op, ...]:
    e = _Emitter(shape, bp, _rings(shape, bp, policy), phase)
    for key in node_order(g, phase):
        e.emit(key)
    return tuple(e.ops)
