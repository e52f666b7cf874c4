"""Peak memory per tier of a policy: the buffers the runtime allocates plus the GPU workspace.

The runtime allocates exactly the buffer table (`schedule.build_buffers`), so this model and
the runtime cannot drift apart; the workspace term is the largest transient of one compute.
"""

from __future__ import annotations

import networkx as nx

from flexgen_graph.ir import TIERS, NodeKind, Phase, Tier
from planner.policy import Policy
from planner.program import Buffer
from planner.schedule import build_buffers, graph_shape


def workspace_bytes(g: nx.DiGraph) -> int:
    """Largest transient activation of a single compute op, at the longest context."""
    max_ctx = g.graph["prompt_len"] + g.graph["gen_len"]
    best = 0
    for key, data in g.nodes(data=True):
        if key.kind is NodeKind.COMPUTE:
            n = data["node"]
            best = max(best, n.work_bytes_at(max_ctx if key.phase is Phase.DECODE else 0))
    return best


def buffer_bytes(buffers: tuple[Buffer, ...]) -> dict[Tier, int]:
    out = {t: 0 for t in TIERS}
    for b in buffers:
        out[b.tier] += b.nbytes
    return out


def peak_bytes(g: nx.DiGraph, policy: Policy) -> dict[Tier, int]:
    out = buffer_bytes(build_buffers(graph_shape(g), policy).buffers)
    out[Tier.GPU] += workspace_bytes(g)
    return out
