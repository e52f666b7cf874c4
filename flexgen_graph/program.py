"""Program IR: what a plan tells the runtime to allocate and do. Frozen data, no torch.

A program is a flat list of ops. Op i records event i when it finishes; `waits` lists the
indices of earlier ops it must wait for (on other streams; ops on one stream run in order).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from flexgen_graph.ir import Tier


def strict_int(v: object, what: str) -> int:
    """Plan files are untrusted: an int field must hold an int (not a bool, float or string)."""
    if type(v) is not int:
        raise ValueError(f"{what} must be an integer, got {type(v).__name__} {v!r}")
    return v


class Stream(Enum):
    LOAD = "load"
    COMPUTE = "compute"
    STORE = "store"
    # pipeline stages: hidden states from the previous stage and to the next, each on its own stream so
    # that a blocking receive never holds up a send (or the other way round)
    RECV = "recv"
    SEND = "send"


class OpKind(Enum):
    LOAD_WEIGHT = "load_weight"
    LOAD_CACHE = "load_cache"
    LOAD_HIDDEN = "load_hidden"
    STORE_CACHE = "store_cache"
    STORE_HIDDEN = "store_hidden"
    EMBED = "embed"
    DECODER_PREFILL = "decoder_prefill"
    DECODER_DECODE = "decoder_decode"
    # the cache of this (layer, gpu batch) lives on the CPU and stays there: prefill writes it
    # from the compute device, decode attends on the CPU (FlexGen's attention delegation)
    DECODER_PREFILL_HOST_CACHE = "decoder_prefill_host_cache"
    DECODER_DECODE_CPU_ATTN = "decoder_decode_cpu_attn"
    # the same four over a compressed cache: decode restores the rows it attends, a chunk at a time, into its
    # `scratch` buffer (prefill attends its new rows as they read back)
    DECODER_PREFILL_QCACHE = "decoder_prefill_qcache"
    DECODER_DECODE_QCACHE = "decoder_decode_qcache"
    DECODER_PREFILL_HOST_QCACHE = "decoder_prefill_host_qcache"
    DECODER_DECODE_CPU_ATTN_QCACHE = "decoder_decode_cpu_attn_qcache"
    # compressed weights `src` (a layer's home or slot) dequantized into `dst`, the scratch the layer's
    # compute ops then name as their weights (once per layer: its gpu batches share the dense copy)
    DEQUANT_WEIGHT = "dequant_weight"
    HEAD = "head"
    # a scoring plan (Workload.score): prefill without a cache, the prompt's k, v live only while the op
    # runs; its head gives the log-probabilities of the scored positions' next tokens, not a token
    DECODER_SCORE = "decoder_score"
    HEAD_SCORE = "head_score"
    RECV_HIDDEN = "recv_hidden"  # into `dst`, from the previous stage's process
    SEND_HIDDEN = "send_hidden"  # `src`, to the next stage's process
    SEND_TOKENS = "send_tokens"  # the last stage: the head's tokens of `batch`, to the first stage
    RECV_TOKENS = "recv_tokens"  # the first stage: the tokens of `batch` it embeds next, from the last


OP_STREAM: dict[OpKind, Stream] = {
    OpKind.LOAD_WEIGHT: Stream.LOAD,
    OpKind.LOAD_CACHE: Stream.LOAD,
    OpKind.LOAD_HIDDEN: Stream.LOAD,
    OpKind.STORE_CACHE: Stream.STORE,
    OpKind.STORE_HIDDEN: Stream.STORE,
    OpKind.EMBED: Stream.COMPUTE,
    OpKind.DECODER_PREFILL: Stream.COMPUTE,
    OpKind.DECODER_DECODE: Stream.COMPUTE,
    OpKind.DECODER_PREFILL_HOST_CACHE: Stream.COMPUTE,
    OpKind.DECODER_DECODE_CPU_ATTN: Stream.COMPUTE,
    OpKind.DECODER_PREFILL_QCACHE: Stream.COMPUTE,
    OpKind.DECODER_DECODE_QCACHE: Stream.COMPUTE,
    OpKind.DECODER_PREFILL_HOST_QCACHE: Stream.COMPUTE,
    OpKind.DECODER_DECODE_CPU_ATTN_QCACHE: Stream.COMPUTE,
    OpKind.DEQUANT_WEIGHT: Stream.COMPUTE,
    OpKind.HEAD: Stream.COMPUTE,
    OpKind.DECODER_SCORE: Stream.COMPUTE,
    OpKind.HEAD_SCORE: Stream.COMPUTE,
    OpKind.RECV_HIDDEN: Stream.RECV,
    OpKind.SEND_HIDDEN: Stream.SEND,
    OpKind.SEND_TOKENS: Stream.SEND,
    OpKind.RECV_TOKENS: Stream.RECV,
}

# the ops that realize the task graph's compute nodes (a weight's dequantization serves them, on their stream)
COMPUTE_KINDS = frozenset(k for k, s in OP_STREAM.items() if s is Stream.COMPUTE and k is not OpKind.DEQUANT_WEIGHT)
# compute over a compressed cache -> the same compute over a dense one
QCACHE_TWIN = {OpKind.DECODER_PREFILL_QCACHE: OpKind.DECODER_PREFILL, OpKind.DECODER_DECODE_QCACHE: OpKind.DECODER_DECODE,
               OpKind.DECODER_PREFILL_HOST_QCACHE: OpKind.DECODER_PREFILL_HOST_CACHE,
               OpKind.DECODER_DECODE_CPU_ATTN_QCACHE: OpKind.DECODER_DECODE_CPU_ATTN}
QCACHE_KINDS = frozenset(QCACHE_TWIN)


class BufferRole(Enum):
    WEIGHT_HOME = "weight_home"
    WEIGHT_SLOT = "weight_slot"
    CACHE_HOME = "cache_home"
    CACHE_SLOT = "cache_slot"
    HIDDEN_HOME = "hidden_home"
    HIDDEN_SLOT = "hidden_slot"
    DEQUANT_SCRATCH = "dequant_scratch"  # compressed weights / cache dequantized on the compute device
    DEQUANT_HOST = "dequant_host"  # a compressed cache dequantized for CPU-attended decode


SCRATCH_ROLES = frozenset({BufferRole.DEQUANT_SCRATCH, BufferRole.DEQUANT_HOST})


@dataclass(frozen=True, slots=True)
class Buffer:
    """One allocation. Homes belong to a layer and/or gpu batch (-1 when not); slots carry a ring index."""

    id: int
    role: BufferRole
    tier: Tier
    nbytes: int
    layer: int = -1
    batch: int = -1
    slot: int = -1

    def to_list(self) -> list:
        return [self.id, self.role.value, self.tier.value, self.nbytes, self.layer, self.batch, self.slot]

    @classmethod
    def from_list(cls, v: list) -> "Buffer":
        i, role, tier, nbytes, layer, batch, slot = v
        ints = [strict_int(x, f"buffer field {n}") for n, x in
                (("id", i), ("nbytes", nbytes), ("layer", layer), ("batch", batch), ("slot", slot))]
        if ints[1] < 0:
            raise ValueError(f"buffer {i}: negative size {nbytes}")
        return cls(ints[0], BufferRole(role), Tier(tier), ints[1], ints[2], ints[3], ints[4])


@dataclass(frozen=True, slots=True)
class Op:
    """One instruction. Transfers (and DEQUANT_WEIGHT) read `src` and write `dst`; computes use `weight`,
    `cache` (-1 for none) and `hidden` buffers, and a compressed cache's compute the dense `scratch`.
    `node` names the task-graph node it realizes."""

    kind: OpKind
    layer: int
    batch: int
    waits: tuple[int, ...] = ()
    src: int = -1
    dst: int = -1
    weight: int = -1
    cache: int = -1
    hidden: int = -1
    node: str = ""
    scratch: int = -1

    @property
    def stream(self) -> Stream:
        return OP_STREAM[self.kind]

    def to_list(self) -> list:
        return [self.kind.value, self.layer, self.batch, list(self.waits), self.src, self.dst,
                self.weight, self.cache, self.hidden, self.node, self.scratch]

    @classmethod
    def from_list(cls, v: list) -> "Op":
        kind, layer, batch, waits, src, dst, weight, cache, hidden, node, scratch = v
        if not isinstance(waits, list) or not isinstance(node, str):
            raise ValueError(f"op {node!r}: waits must be a list and node a string")
        f = [strict_int(x, f"op field {n}") for n, x in (("layer", layer), ("batch", batch), ("src", src),
                                                          ("dst", dst), ("weight", weight), ("cache", cache),
                                                          ("hidden", hidden), ("scratch", scratch))]
        return cls(OpKind(kind), f[0], f[1], tuple(strict_int(w, "op wait") for w in waits), f[2], f[3], f[4], f[5],
                   f[6], node, f[7])


@dataclass(frozen=True, slots=True)
class Programs:
    buffers: tuple[Buffer, ...]
    prefill: tuple[Op, ...]
    decode: tuple[Op, ...]
