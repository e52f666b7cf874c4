"""What the planner reads off a task graph: per graph layer, the weight bytes and the per-gpu-batch
sums of each node kind's bytes, FLOPs and transient bytes, for prefill and for one decode step.

Lowering a graph per block made the search slow (OPT-175B: 28k nodes for a 16 x 32 block). The
figures of a block follow from two tiny lowerings: every node figure is linear in the gpu batch
size, and gpu batches are alike, so blocks 1 x 1 and 2 x 1 give any block; a third lowering
(3 x 2) checks both facts, so a change in lowering that breaks them fails loudly.

    >>> from functools import partial
    >>> from flexgen_graph.catalog import catalog_spec
    >>> from flexgen_graph.ir import Block, Workload
    >>> from flexgen_graph.lower import lower
    >>> lower_fn = partial(lower, catalog_spec("facebook/opt-125m"), Workload(32, 8))
    >>> model = FigureModel.sample(lower_fn)
    >>> model.at(Block(4, 2)) == block_figures(lower_fn(Block(4, 2)))
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Callable

import networkx as nx

from flexgen_graph.ir import Block, LayerKind, NodeKind, Phase
from planner.schedule import GraphShape, graph_shape

BATCH_KINDS: tuple[NodeKind, ...] = tuple(k for k in NodeKind if k is not NodeKind.LOAD_WEIGHT)
_KIND_INDEX = {k: i for i, k in enumerate(BATCH_KINDS)}


@dataclass(frozen=True, slots=True)
class Sums:
    """Sums over the nodes of one kind, one layer, one phase and one gpu batch (integers, as lowered)."""

    bytes: int = 0
    bytes_per_ctx: int = 0
    flops: int = 0
    flops_per_ctx: int = 0
    work_bytes: int = 0
    work_bytes_per_ctx: int = 0
    count: int = 0

    def bytes_at(self, ctx: float) -> float:
        return self.bytes + self.bytes_per_ctx * ctx

    def work_bytes_at(self, ctx: float) -> float:
        return self.work_bytes + self.work_bytes_per_ctx * ctx


_SUM_FIELDS = tuple(f.name for f in fields(Sums))
ZERO = Sums()


@dataclass(frozen=True, slots=True)
class LayerSums:
    """One graph layer in one phase: its weight bytes (loaded once for all gpu batches) and, by node
    kind (BATCH_KINDS order), the sums of one gpu batch."""

    kind: LayerKind
    weight_bytes: int
    batch: tuple[Sums, ...]

    def of(self, kind: NodeKind) -> Sums:
        return self.batch[_KIND_INDEX[kind]]


@dataclass(frozen=True, slots=True)
class BlockFigures:
    """Everything the cost model, the memory model and the LP read about one block."""

    prompt_len: int
    gen_len: int
    gpu_batch_size: int
    num_gpu_batches: int
    prefill: tuple[LayerSums, ...]
    decode: tuple[LayerSums, ...]
    shape: GraphShape  # what planner.schedule.build_buffers sizes the buffers from

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    @property
    def max_seq_len(self) -> int:
        return self.prompt_len + self.gen_len

    def phase(self, phase: Phase) -> tuple[LayerSums, ...]:
        return self.prefill if phase is Phase.PREFILL else self.decode


def block_figures(g: nx.DiGraph) -> BlockFigures:
    """Read a lowered graph (one pass). Gpu batches must be alike: checked here, a lowering bug otherwise."""
    nb = g.graph["num_gpu_batches"]
    acc: dict[tuple[Phase, int, int, int], list[int]] = {}
    weights: dict[tuple[Phase, int], int] = {}
    kinds: dict[int, LayerKind] = {}
    for key, data in g.nodes(data=True):
        n = data["node"]
        kinds[key.layer] = n.layer_kind
        if key.kind is NodeKind.LOAD_WEIGHT:
            weights[(key.phase, key.layer)] = weights.get((key.phase, key.layer), 0) + n.bytes
            continue
        a = acc.get((key.phase, key.layer, key.batch, _KIND_INDEX[key.kind]))
        if a is None:
            a = acc[(key.phase, key.layer, key.batch, _KIND_INDEX[key.kind])] = [0] * len(_SUM_FIELDS)
        for i, v in enumerate((n.bytes, n.bytes_per_ctx, n.flops, n.flops_per_ctx, n.work_bytes,
                               n.work_bytes_per_ctx, 1)):
            a[i] += v
    for (ph, j, k, ki), a in acc.items():
        if k != 0:
            assert acc.get((ph, j, 0, ki)) == a, f"{ph.value} layer {j} gpu batch {k} differs from gpu batch 0"
    n_layers = 1 + max(kinds)

    def phase_sums(ph: Phase) -> tuple[LayerSums, ...]:
        return tuple(LayerSums(kinds[j], weights.get((ph, j), 0),
                               tuple(Sums(*acc[(ph, j, 0, ki)]) if (ph, j, 0, ki) in acc else ZERO
                                     for ki in range(len(BATCH_KINDS))))
                     for j in range(n_layers))

    return BlockFigures(g.graph["prompt_len"], g.graph["gen_len"], g.graph["gpu_batch_size"], nb,
                        phase_sums(Phase.PREFILL), phase_sums(Phase.DECODE), graph_shape(g))


def figures_of(x: "nx.DiGraph | BlockFigures") -> BlockFigures:
    return x if isinstance(x, BlockFigures) else block_figures(x)


def _line(a, b, x: int):
    """The value at gpu batch size x of a field that is a at size 1 and b at size 2 (ints: linear)."""
    if a == b:
        return a
    if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool):
        return a + (x - 1) * (b - a)
    raise AssertionError(f"block figure {a!r} -> {b!r} is neither constant nor linear in the gpu batch size")


def _extrapolate(one, two, b: int, overrides: dict):
    """A frozen dataclass's fields extrapolated field by field (tuples element-wise)."""
    vals = {}
    for f in fields(one):
        if f.name in overrides:
            vals[f.name] = overrides[f.name]
            continue
        a, c = getattr(one, f.name), getattr(two, f.name)
        if isinstance(a, tuple) and a != c:
            vals[f.name] = tuple(_extrapolate(x, y, b, {}) if dataclasses.is_dataclass(x) else _line(x, y, b)
                                 for x, y in zip(a, c, strict=True))
        elif dataclasses.is_dataclass(a) and a != c:
            vals[f.name] = _extrapolate(a, c, b, {})
        else:
            vals[f.name] = _line(a, c, b)
    return type(one)(**vals)


class FigureModel:
    """Block figures of any block, from the figures of blocks 1 x 1 and 2 x 1 (a memo per gpu batch size:
    the search asks for every block)."""

    def __init__(self, one: BlockFigures, two: BlockFigures) -> None:
        self.one, self.two = one, two
        self._by_size: dict[int, BlockFigures] = {}

    @classmethod
    def sample(cls, lower_fn: Callable[[Block], nx.DiGraph]) -> "FigureModel":
        model = cls(block_figures(lower_fn(Block(1, 1))), block_figures(lower_fn(Block(2, 1))))
        probe = Block(3, 2)
        got = block_figures(lower_fn(probe))
        assert model.at(probe) == got, "task-graph figures are not linear in the gpu batch size (lowering changed?)"
        return model

    def at(self, block: Block) -> BlockFigures:
        b, nb = block.gpu_batch_size, block.num_gpu_batches
        one = self._by_size.get(b)
        if one is None:
            one = self._by_size[b] = _extrapolate(self.one, self.two, b, {"gpu_batch_size": b})
        shape = dataclasses.replace(one.shape, num_gpu_batches=nb)
        return dataclasses.replace(one, num_gpu_batches=nb, shape=shape)
