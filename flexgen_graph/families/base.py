"""What a model family module provides: `Family`, its traits and its tables (see flexgen_graph.families).

Torch-free, and below flexgen_graph.spec: a family reads a transformers config into plain ModelSpec
fields and lists a layer's tensors for a spec it is handed, so the spec module can ask the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from flexgen_graph.errors import UserError
from flexgen_graph.ir import LayerKind

if TYPE_CHECKING:
    from flexgen_graph.spec import ModelSpec

NORMS = ("layernorm", "rmsnorm")  # layernorm: a weight and a bias; rmsnorm: a weight
ACTIVATIONS = ("relu", "silu")
MLPS = ("plain", "gated")  # plain: fc2(act(fc1 x)); gated: down(act(gate x) * up x)
POSITIONS = ("learned", "rope")


class UnsupportedModelError(UserError):
    """The config describes an architecture or option flexgen-graph does not implement."""


@dataclass(frozen=True, slots=True)
class Weight:
    """One tensor of a layer as the family's checkpoints hold it."""

    name: str  # the local name: the weight store's file, the kernels' key
    shape: tuple[int, ...]  # the checkpoint's shape (a linear map [out, in], as HF holds it)
    hf: str  # the name in a *ForCausalLM state_dict
    linear: bool = False  # used as a linear map (stored transposed, compressed along its input dim)


@dataclass(frozen=True, slots=True)
class Family:
    """A family's traits (what the shared kernels and the lowering select their behaviour by) and tables."""

    name: str  # ModelSpec.family
    model_types: tuple[str, ...]  # the transformers model_types it reads
    norm: str
    activation: str
    mlp: str
    positions: str
    position_offset: int  # first row of a learned position table used (OPT: 2, a fairseq legacy)
    query_prescaled: bool  # q is scaled by head_dim**-0.5 before q @ k^T (OPT, as HF does), not inside the softmax
    # a transformers config (or anything with its attributes) and the model's name -> ModelSpec fields
    # (all but name and dtype); refuses an option the family does not implement, by name
    spec_fields: Callable[[Any, str], dict[str, Any]]
    # (spec, layer kind, decoder index) -> the layer's tensors in layout order
    tensors: Callable[["ModelSpec", LayerKind, int], tuple[Weight, ...]]

    def __post_init__(self) -> None:
        for field, value, allowed in (("norm", self.norm, NORMS), ("activation", self.activation, ACTIVATIONS),
                                      ("mlp", self.mlp, MLPS), ("positions", self.positions, POSITIONS)):
            assert value in allowed, f"family {self.name}: {field} {value!r} is none of the kernels' {allowed}"


def eos_tuple(eos: Any) -> tuple[int, ...]:
    """A config's eos_token_id (None, one id or a list) as a tuple."""
    if eos is None:
        return ()
    if isinstance(eos, (list, tuple)):
        return tuple(int(e) for e in eos)
    return (int(eos),)


def token_fields(c: Any) -> dict[str, Any]:
    """The special token ids every family reads alike."""
    return dict(bos_token_id=getattr(c, "bos_token_id", None), pad_token_id=getattr(c, "pad_token_id", None),
                eos_token_ids=eos_tuple(getattr(c, "eos_token_id", None)))
