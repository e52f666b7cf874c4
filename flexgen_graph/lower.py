"""Lowering: ModelSpec + Workload + Block -> task graph (networkx DiGraph). Computes nothing.

One prefill step and one decode step; decode nodes carry their bytes and FLOPs as functions of
the context length (see `Node`). Every node key is a `NodeKey`; the payload is `graph.nodes[key]["node"]`.

A pipeline stage (`stage=`) is lowered alone, in its own layer numbering: key layer 0 is the stage's
first graph layer (graph attribute `first_layer` maps back to the model's); its hidden states arrive
through RECV_HIDDEN nodes (all stages but the first) and leave through SEND_HIDDEN nodes (all but the
last), so the planner prices the link between stages like any other transfer. The last stage sends
each gpu batch's tokens to the first (SEND_TOKENS, in both phases), which receives them before it
embeds that batch in decode (RECV_TOKENS): the steps of a pipeline overlap, no stage waits for a
whole step to end.

A scoring workload (Workload.score) is lowered as its prefill alone: no cache is kept (each decoder's
k, v of the prompt are a transient of its compute), and the head computes the logits of the scored
positions (gen_len per sequence) and their log-softmax.

    >>> from flexgen_graph.catalog import catalog_spec
    >>> from flexgen_graph.ir import Workload, Block
    >>> g = lower(catalog_spec("facebook/opt-125m"), Workload(32, 8), Block(4, 2))
    >>> g.number_of_nodes()
    260
"""

from __future__ import annotations

import networkx as nx

from flexgen_graph.errors import UserError
from flexgen_graph.ir import (
    NODE_TENSOR,
    Block,
    LayerKind,
    Node,
    NodeKey,
    NodeKind,
    Phase,
    Stage,
    Workload,
)
from flexgen_graph.spec import ModelSpec


class LoweringError(AssertionError):
    """The graph builder produced an ill-formed graph (a bug, not a user error)."""


def lower(spec: ModelSpec, workload: Workload, block: Block, stage: Stage | None = None) -> nx.DiGraph:
    stage = stage or Stage(0, 1, 0, spec.num_graph_layers)
    check_stage(spec, stage)
    if workload.score and stage.count > 1:
        raise UserError("a scoring workload runs in one process, not as a pipeline of stages")
    g = nx.DiGraph(spec=spec.name, prompt_len=workload.prompt_len, gen_len=workload.gen_len,
                   gpu_batch_size=block.gpu_batch_size, num_gpu_batches=block.num_gpu_batches,
                   first_layer=stage.first_layer, stages=stage.count, score=workload.score)
    for phase in (Phase.PREFILL,) if workload.score else (Phase.PREFILL, Phase.DECODE):
        _build_phase(g, spec, workload, block, phase, stage)
    if not workload.score:
        _link_phases(g, spec, block, stage)
    check_graph(g)
    return g


def check_stage(spec: ModelSpec, stage: Stage) -> None:
    """A stage's layers lie in the model, the first stage starts at the embedding, the last ends at the
    head, and every stage holds a decoder layer (a stage of only the embedding or the head would be all
    hand-off and no work)."""
    n = spec.num_graph_layers
    if stage.end_layer > n or (stage.first_layer == 0) != stage.is_first or (stage.end_layer == n) != stage.is_last:
        raise UserError(f"stage {stage.index} of {stage.count} with layers [{stage.first_layer}, {stage.end_layer}) "
                         f"does not fit {spec.name}'s {n} graph layers (stage 0 starts at 0, the last ends at {n})")
    if not any(spec.layer_kind(j) is LayerKind.DECODER for j in range(stage.first_layer, stage.end_layer)):
        raise UserError(f"stage {stage.index} (layers [{stage.first_layer}, {stage.end_layer})) holds no decoder layer")


def _add(g: nx.DiGraph, kind: LayerKind, key: NodeKey, **payload: int) -> NodeKey:
    g.add_node(key, node=Node(key=key, layer_kind=kind, tensor=NODE_TENSOR[key.kind], **payload))
    return key


TOKEN_BYTES = 8  # int64 token ids


def _build_phase(g: nx.DiGraph, spec: ModelSpec, wl: Workload, block: Block, phase: Phase, stage: Stage) -> None:
    b, d = block.gpu_batch_size, spec.dtype_bytes
    ring = stage.count > 1
    tokens = wl.prompt_len if phase is Phase.PREFILL else 1
    hidden_bytes = b * tokens * spec.hidden * d
    kv_tok = b * spec.kv_bytes_per_token()
    last = stage.num_layers - 1
    for layer in range(stage.num_layers):  # the stage's numbering
        kind = spec.layer_kind(stage.first_layer + layer)
        lw = _add(g, kind, NodeKey(phase, NodeKind.LOAD_WEIGHT, layer, -1),
                  bytes=spec.layer_bytes(stage.first_layer + layer))
        for k in range(block.num_gpu_batches):
            comp = _add(g, kind, NodeKey(phase, NodeKind.COMPUTE, layer, k),
                        **_compute_cost(spec, kind, phase, b, wl.prompt_len, wl.gen_len if wl.score else 0))
            g.add_edge(lw, comp)
            if kind is LayerKind.EMBED and ring and phase is Phase.DECODE:
                g.add_edge(_add(g, kind, NodeKey(phase, NodeKind.RECV_TOKENS, layer, k), bytes=b * TOKEN_BYTES), comp)
            if kind is LayerKind.HEAD and ring:
                g.add_edge(comp, _add(g, kind, NodeKey(phase, NodeKind.SEND_TOKENS, layer, k), bytes=b * TOKEN_BYTES))
            if kind is not LayerKind.EMBED:
                lh = _add(g, kind, NodeKey(phase, NodeKind.LOAD_HIDDEN, layer, k), bytes=hidden_bytes)
                g.add_edge(lh, comp)
                if layer == 0:  # from the previous stage
                    g.add_edge(_add(g, kind, NodeKey(phase, NodeKind.RECV_HIDDEN, layer, k), bytes=hidden_bytes), lh)
                else:
                    g.add_edge(NodeKey(phase, NodeKind.STORE_HIDDEN, layer - 1, k), lh)
            if kind is not LayerKind.HEAD:
                sh = _add(g, kind, NodeKey(phase, NodeKind.STORE_HIDDEN, layer, k), bytes=hidden_bytes)
                g.add_edge(comp, sh)
                if layer == last:  # to the next stage
                    g.add_edge(sh, _add(g, kind, NodeKey(phase, NodeKind.SEND_HIDDEN, layer, k), bytes=hidden_bytes))
            if kind is LayerKind.DECODER and not wl.score:
                if phase is Phase.DECODE:
                    # the cache of ctx - 1 earlier tokens crosses; the new token's k/v is computed
                    lc = _add(g, kind, NodeKey(phase, NodeKind.LOAD_CACHE, layer, k), bytes=-kv_tok,
                              bytes_per_ctx=kv_tok)
                    g.add_edge(lc, comp)
                sc = _add(g, kind, NodeKey(phase, NodeKind.STORE_CACHE, layer, k), bytes=kv_tok * tokens)
                g.add_edge(comp, sc)


def _compute_cost(spec: ModelSpec, kind: LayerKind, phase: Phase, b: int, prompt_len: int,
                  scored: int = 0) -> dict[str, int]:
    """scored: positions per sequence a scoring head computes (0: a generating plan)."""
    d, h = spec.dtype_bytes, spec.hidden
    if kind is LayerKind.EMBED:
        return {}
    if kind is LayerKind.HEAD and scored:
        # logits of the scored positions in float32, and log-softmax's temporary of the same size
        return dict(flops=2 * b * scored * h * spec.vocab, work_bytes=2 * b * scored * spec.vocab * 4)
    if kind is LayerKind.HEAD:
        # logits only for the last position of each sequence, kept in float32
        return dict(flops=2 * b * h * spec.vocab, work_bytes=b * spec.vocab * 4)
    t = prompt_len if phase is Phase.PREFILL else 1
    q_out, kv_out = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    dense = 2 * b * t * spec.linear_params(1)  # decoder layers are alike
    attn_per_ctx = 4 * b * spec.num_heads * t * spec.head_dim  # q.k and p.v, per attended token
    mlp_work = b * t * spec.ffn * d * (2 if spec.mlp == "gated" else 1)  # a gated MLP holds gate and up outputs
    qkv_work = b * t * (q_out + 2 * kv_out) * d
    scores_per_ctx = b * spec.num_heads * t * 4  # softmax in float32
    if phase is Phase.PREFILL:
        kv = b * prompt_len * spec.kv_bytes_per_token() if scored else 0  # no cache: the prompt's k, v are transient
        return dict(flops=dense + attn_per_ctx * prompt_len,
                    work_bytes=mlp_work + qkv_work + scores_per_ctx * prompt_len + kv)
    return dict(flops=dense, flops_per_ctx=attn_per_ctx, work_bytes=mlp_work + qkv_work,
                work_bytes_per_ctx=scores_per_ctx)


def _link_phases(g: nx.DiGraph, spec: ModelSpec, block: Block, stage: Stage) -> None:
    """Decode reads what prefill wrote: the cache, and the token the head picked (within one stage:
    across stages the token travels outside the step programs)."""
    last = stage.num_layers - 1
    for k in range(block.num_gpu_batches):
        if stage.count == 1:
            g.add_edge(NodeKey(Phase.PREFILL, NodeKind.COMPUTE, last, k), NodeKey(Phase.DECODE, NodeKind.COMPUTE, 0, k))
        for layer in range(stage.num_layers):
            if spec.layer_kind(stage.first_layer + layer) is LayerKind.DECODER:
                g.add_edge(NodeKey(Phase.PREFILL, NodeKind.STORE_CACHE, layer, k),
                           NodeKey(Phase.DECODE, NodeKind.LOAD_CACHE, layer, k))


def check_graph(g: nx.DiGraph) -> None:
    """Stage-boundary check: acyclic, every node has a payload, every read has a producer."""
    for key, data in g.nodes(data=True):
        if "node" not in data:
            raise LoweringError(f"edge names node {key} that was never built")
        if key.kind in (NodeKind.LOAD_HIDDEN, NodeKind.STORE_CACHE, NodeKind.STORE_HIDDEN) and g.in_degree(key) == 0:
            raise LoweringError(f"{key.label()} has no producer")
    if not nx.is_directed_acyclic_graph(g):
        raise LoweringError("task graph has a cycle")


def nodes_of(g: nx.DiGraph, phase: Phase, kind: NodeKind) -> list[Node]:
    return [data["node"] for key, data in g.nodes(data=True) if key.phase is phase and key.kind is kind]
