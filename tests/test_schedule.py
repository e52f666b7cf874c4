"""Schedule: op orders are topological orders of the task graph, prefetch is real, no hazards."""

import itertools

import pytest

from flexgen_graph.catalog import catalog_spec
from flexgen_graph.ir import Block, Phase, Tier, Workload
from flexgen_graph.lower import lower
from flexgen_graph.policy import Placement, Policy, assign_tiers
from flexgen_graph.program import BufferRole, OpKind, Programs
from planner.memory import buffer_bytes, peak_bytes, workspace_bytes
from planner.schedule import build_buffers, emit_programs, graph_shape
from planner.verify import PlanHazardError, verify

PLACEMENTS = [Placement(1, 0, 0), Placement(0, 1, 0), Placement(0, 0, 1), Placement(0.5, 0.5, 0),
              Placement(0, 0.5, 0.5), Placement(0.3, 0.3, 0.4)]
SPEC = catalog_spec("facebook/opt-125m")


def label_index(ops):
    return {op.node: i for i, op in enumerate(ops)}


@pytest.mark.parametrize("nb", [1, 3])
def test_every_order_is_topological_and_hazard_free(nb):
    g = lower(SPEC, Workload(16, 4), Block(2, nb))
    for w, c, h in itertools.product(PLACEMENTS, repeat=3):
        programs = emit_programs(g, Policy(2, nb, w, c, h))
        verify(programs)
        for phase, ops in ((Phase.PREFILL, programs.prefill), (Phase.DECODE, programs.decode)):
            idx = label_index(ops)
            assert len(idx) == len(ops), "one op per graph node"
            for u, v in g.edges:
                if u.phase is phase and v.phase is phase and u.label() in idx and v.label() in idx:
                    assert idx[u.label()] < idx[v.label()], (u.label(), v.label())
            computes = [op for op in ops if op.kind in (OpKind.EMBED, OpKind.HEAD, OpKind.DECODER_PREFILL,
                                                        OpKind.DECODER_DECODE)]
            assert len(computes) == SPEC.num_graph_layers * nb


def test_transfers_only_for_tensors_off_the_gpu():
    g = lower(SPEC, Workload(16, 4), Block(2, 2))
    on_gpu = emit_programs(g, Policy(2, 2, Placement(1, 0, 0), Placement(1, 0, 0), Placement(1, 0, 0)))
    assert all(op.kind not in (OpKind.LOAD_WEIGHT, OpKind.LOAD_CACHE, OpKind.STORE_CACHE) for op in on_gpu.decode)
    streamed = emit_programs(g, Policy(2, 2, Placement(0, 1, 0), Placement(0, 0, 1), Placement(1, 0, 0)))
    kinds = [op.kind for op in streamed.decode]
    assert kinds.count(OpKind.LOAD_WEIGHT) == SPEC.num_graph_layers
    assert kinds.count(OpKind.LOAD_CACHE) == SPEC.num_layers * 2
    assert kinds.count(OpKind.STORE_CACHE) == SPEC.num_layers * 2


def test_prefetch_next_layer_while_this_one_computes():
    g = lower(SPEC, Workload(16, 4), Block(2, 2))
    ops = emit_programs(g, Policy(2, 2, Placement(0, 1, 0), Placement(0, 1, 0), Placement(1, 0, 0))).decode
    idx = label_index(ops)
    for j in range(1, SPEC.num_graph_layers - 1):
        load_next = idx[f"decode/load_weight/L{j + 1}/B*"]
        assert load_next < idx[f"decode/compute/L{j}/B0"], f"weights of layer {j + 1} not prefetched"
        # and it does not wait for layer j: only for the layer two back (double buffering)
        waits = {ops[w].node for w in ops[load_next].waits}
        assert all(f"/L{j}/" not in w for w in waits), waits
    for j in range(1, SPEC.num_layers):
        assert idx[f"decode/load_cache/L{j}/B1"] < idx[f"decode/compute/L{j}/B0"]


def test_verifier_catches_a_missing_wait():
    g = lower(SPEC, Workload(16, 4), Block(2, 1))
    p = emit_programs(g, Policy(2, 1, Placement(0, 1, 0), Placement(1, 0, 0), Placement(1, 0, 0)))
    i = next(i for i, op in enumerate(p.decode) if op.kind is OpKind.LOAD_WEIGHT and op.waits)
    broken = list(p.decode)
    broken[i] = type(broken[i])(**{**{f: getattr(broken[i], f) for f in broken[i].__slots__}, "waits": ()})
    with pytest.raises(PlanHazardError, match="overwrite"):
        verify(Programs(p.buffers, p.prefill, tuple(broken)))


def test_assign_tiers_never_overfills_the_gpu_share():
    sizes = [7, 3, 9, 1, 4]
    tiers = assign_tiers(sizes, Placement(0.5, 0.25, 0.25))
    gpu = sum(s for s, t in zip(sizes, tiers) if t is Tier.GPU)
    assert gpu <= 0.5 * sum(sizes)
    assert assign_tiers(sizes, Placement(1, 0, 0)) == [Tier.GPU] * 5
    assert assign_tiers(sizes, Placement(0, 0, 1)) == [Tier.DISK] * 5


def test_memory_model_counts_slots_only_when_streaming():
    g = lower(SPEC, Workload(16, 4), Block(2, 1))
    shape = graph_shape(g)
    all_gpu = Policy(2, 1, Placement(1, 0, 0), Placement(1, 0, 0), Placement(1, 0, 0))
    peaks = peak_bytes(g, all_gpu)
    assert peaks[Tier.GPU] == SPEC.weight_bytes() + SPEC.num_layers * shape.cache_bytes + shape.hidden_bytes \
        + workspace_bytes(g)
    assert peaks[Tier.CPU] == peaks[Tier.DISK] == 0
    w_cpu = Policy(2, 1, Placement(0, 1, 0), Placement(1, 0, 0), Placement(1, 0, 0))
    bufs = build_buffers(shape, w_cpu).buffers
    slots = [b for b in bufs if b.role is BufferRole.WEIGHT_SLOT]
    assert len(slots) == 2 and all(b.nbytes == max(shape.weight_bytes) for b in slots)
    assert buffer_bytes(bufs)[Tier.CPU] == SPEC.weight_bytes()


@pytest.mark.parametrize("weights,cache", [(True, False), (False, True), (True, True)])
def test_compression_arrives_as_op_kinds(weights, cache):
    """The runtime decides nothing about compression: compressed weights get one DEQUANT_WEIGHT per layer and
    step (the embedding's excepted), into the scratch that layer's computes name as their weights; a compressed cache gets the *_QCACHE
    kinds, decode naming the scratch it restores cache rows into."""
    from flexgen_graph.program import QCACHE_TWIN

    spec = catalog_spec("facebook/opt-125m")
    g = lower(spec, Workload(8, 4), Block(2, 3))
    pol = Policy(2, 3, Placement(0.0, 0.5, 0.5), Placement(0.5, 0.5, 0.0), Placement.all_on(Tier.GPU),
                 cpu_attention=True, compress_weights=weights, compress_cache=cache)
    programs = emit_programs(g, pol)
    verify(programs)
    scratch = {b.role: b.id for b in programs.buffers if b.role in (BufferRole.DEQUANT_SCRATCH, BufferRole.DEQUANT_HOST)}
    for ops in (programs.prefill, programs.decode):
        deq = [i for i, op in enumerate(ops) if op.kind is OpKind.DEQUANT_WEIGHT]
        # an embedding reads the rows of its ids from the compressed table: no dense copy of it
        assert [ops[i].layer for i in deq] == (list(range(1, spec.num_graph_layers)) if weights else [])
        for i in deq:  # before the layer's first compute, after its load
            first = next(j for j, op in enumerate(ops) if op.layer == ops[i].layer and op.weight >= 0)
            assert i < first and ops[i].dst == scratch[BufferRole.DEQUANT_SCRATCH]
            assert all(w < i for w in ops[i].waits) and programs.buffers[ops[i].src].layer in (ops[i].layer, -1)
        computes = [op for op in ops if op.weight >= 0]
        assert all((op.weight == scratch.get(BufferRole.DEQUANT_SCRATCH)) == (weights and op.kind is not OpKind.EMBED)
                   for op in computes)
        decoders = [op for op in computes if op.cache >= 0]
        assert decoders and all((op.kind in QCACHE_TWIN) == cache for op in decoders)
        for op in decoders:  # decode restores the rows it attends, a chunk at a time; prefill none
            want = {OpKind.DECODER_DECODE_QCACHE: BufferRole.DEQUANT_SCRATCH,
                    OpKind.DECODER_DECODE_CPU_ATTN_QCACHE: BufferRole.DEQUANT_HOST}.get(op.kind)
            assert op.scratch == (scratch[want] if want else -1), op.node
