"""Shared IR: frozen value types that cross the front end, planner and runtime.

No torch here: the planner imports this module and must stay torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from flexgen_graph.errors import UserError


class Tier(Enum):
    GPU = "gpu"
    CPU = "cpu"
    DISK = "disk"


TIERS: tuple[Tier, ...] = (Tier.GPU, Tier.CPU, Tier.DISK)


class TensorClass(Enum):
    WEIGHT = "weight"
    KV = "kv"
    HIDDEN = "hidden"


class Phase(Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class LayerKind(Enum):
    EMBED = "embed"
    DECODER = "decoder"
    HEAD = "head"


class NodeKind(Enum):
    LOAD_WEIGHT = "load_weight"
    LOAD_CACHE = "load_cache"
    LOAD_HIDDEN = "load_hidden"
    COMPUTE = "compute"
    STORE_CACHE = "store_cache"
    STORE_HIDDEN = "store_hidden"
    # pipeline stages: the hidden state of a gpu batch arrives from the previous stage's process, or
    # leaves for the next one (torch.distributed send/recv)
    RECV_HIDDEN = "recv_hidden"
    SEND_HIDDEN = "send_hidden"
    # pipeline stages: the head's tokens of a gpu batch go from the last stage straight to the first, which
    # embeds them in the next step while the later batches of this one are still on their way
    SEND_TOKENS = "send_tokens"
    RECV_TOKENS = "recv_tokens"


NODE_TENSOR: dict[NodeKind, TensorClass | None] = {
    NodeKind.LOAD_WEIGHT: TensorClass.WEIGHT,
    NodeKind.LOAD_CACHE: TensorClass.KV,
    NodeKind.LOAD_HIDDEN: TensorClass.HIDDEN,
    NodeKind.COMPUTE: None,
    NodeKind.STORE_CACHE: TensorClass.KV,
    NodeKind.STORE_HIDDEN: TensorClass.HIDDEN,
    NodeKind.RECV_HIDDEN: TensorClass.HIDDEN,
    NodeKind.SEND_HIDDEN: TensorClass.HIDDEN,
    NodeKind.SEND_TOKENS: None,
    NodeKind.RECV_TOKENS: None,
}


class NodeKey(NamedTuple):
    """Graph node key. `batch` is -1 for per-layer nodes (weight loads are shared by all gpu batches)."""

    phase: Phase
    kind: NodeKind
    layer: int
    batch: int

    def label(self) -> str:
        b = "*" if self.batch < 0 else str(self.batch)
        return f"{self.phase.value}/{self.kind.value}/L{self.layer}/B{b}"


@dataclass(frozen=True, slots=True)
class Node:
    """Payload of a task-graph node.

    Decode nodes depend on the context length `ctx` (tokens attended, the new one included):
    bytes at ctx = bytes + bytes_per_ctx * ctx, and likewise for flops and work bytes.
    Prefill nodes carry absolute figures (their *_per_ctx fields are 0).
    """

    key: NodeKey
    layer_kind: LayerKind
    tensor: TensorClass | None
    bytes: int = 0
    bytes_per_ctx: int = 0
    flops: int = 0
    flops_per_ctx: int = 0
    work_bytes: int = 0  # transient activations of one compute (scores, MLP intermediate, logits)
    work_bytes_per_ctx: int = 0

    def bytes_at(self, ctx: int) -> int:
        return self.bytes + self.bytes_per_ctx * ctx

    def flops_at(self, ctx: int) -> int:
        return self.flops + self.flops_per_ctx * ctx

    def work_bytes_at(self, ctx: int) -> int:
        return self.work_bytes + self.work_bytes_per_ctx * ctx


@dataclass(frozen=True, slots=True)
class Workload:
    """What one block looks like: every prompt padded to prompt_len, then gen_len tokens generated.

    A scoring workload (score=True) generates nothing: its prompts (a context and a continuation) go
    through one prefill, and the log-probabilities of the last gen_len positions of each (at most: the
    continuation's) are computed where the logits are and leave the device alone (log-likelihoods).
    """

    prompt_len: int
    gen_len: int
    score: bool = False

    def __post_init__(self) -> None:
        if type(self.prompt_len) is not int or type(self.gen_len) is not int:
            raise UserError(f"prompt_len and gen_len must be integers, got {self.prompt_len!r}, {self.gen_len!r}")
        if type(self.score) is not bool:
            raise UserError(f"score must be true or false, got {self.score!r}")
        if self.prompt_len < 1:
            raise UserError(f"prompt_len must be >= 1, got {self.prompt_len}")
        if self.gen_len < 1:
            raise UserError(f"gen_len must be >= 1, got {self.gen_len}")
        if self.score and self.gen_len > self.prompt_len:
            raise UserError(f"a scoring workload scores at most its prompt's positions: gen_len {self.gen_len} > "
                            f"prompt_len {self.prompt_len}")

    @property
    def max_seq_len(self) -> int:
        return self.prompt_len if self.score else self.prompt_len + self.gen_len

    def to_dict(self) -> dict:
        # the key only when set: generation plans keep the bytes they had before scoring existed
        return {"prompt_len": self.prompt_len, "gen_len": self.gen_len, **({"score": True} if self.score else {})}


@dataclass(frozen=True, slots=True)
class Block:
    """A block of sequences processed together: num_gpu_batches gpu batches of gpu_batch_size each."""

    gpu_batch_size: int
    num_gpu_batches: int

    def __post_init__(self) -> None:
        if self.gpu_batch_size < 1 or self.num_gpu_batches < 1:
            raise UserError(f"block sizes must be >= 1, got {self.gpu_batch_size} x {self.num_gpu_batches}")

    @property
    def size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches


@dataclass(frozen=True, slots=True)
class Stage:
    """One stage of a pipeline: graph layers [first_layer, end_layer) of the model, run by process
    `index` of `count`. Stage 0 holds the embedding, the last stage the head."""

    index: int
    count: int
    first_layer: int
    end_layer: int

    def __post_init__(self) -> None:
        for name in ("index", "count", "first_layer", "end_layer"):
            if type(getattr(self, name)) is not int:
                raise UserError(f"stage {name} must be an integer, got {getattr(self, name)!r}")
        if not (0 <= self.index < self.count and 0 <= self.first_layer < self.end_layer):
            raise UserError(f"stage {self.index} of {self.count} with layers [{self.first_layer}, "
                             f"{self.end_layer}) is not a stage")

    @property
    def num_layers(self) -> int:
        return self.end_layer - self.first_layer

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1

    def to_list(self) -> list[int]:
        return [self.index, self.count, self.first_layer, self.end_layer]

    @classmethod
    def from_list(cls, v: list) -> "Stage":
        if not isinstance(v, list) or len(v) != 4:
            raise UserError(f"a stage is [index, count, first_layer, end_layer], got {v!r}")
        return cls(*v)
