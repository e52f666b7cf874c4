"""ModelSpec: an architecture-neutral description of a decoder-only model, built from a HF config.

Layers are numbered as the task graph numbers them: 0 is the embedding, 1..num_layers the
decoder layers, num_layers + 1 the head (final norm and lm_head). Each layer's weights have
local names (`q_w`, `fc1_b`, ...) and a fixed order; `layer_layout` packs them into one flat
byte buffer so a weight slot can hold any layer.

    >>> from flexgen_graph.catalog import catalog_spec
    >>> spec = catalog_spec("facebook/opt-125m")
    >>> spec.num_layers, spec.layer_kind(0).value, spec.weight_bytes() // 2**20
    (12, 'embed', 625)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from flexgen_graph.errors import UserError
from flexgen_graph.ir import LayerKind

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
ALIGN_BYTES = 64  # tensor offsets inside a flat layer buffer are aligned for vectorized kernels


LINEAR_WEIGHTS = frozenset({"q_w", "k_w", "v_w", "o_w", "fc1_w", "fc2_w", "gate_w", "up_w", "down_w", "lm_head"})


def is_linear(name: str) -> bool:
    """A weight used as a linear map (stored [in, out]); embeddings and norms are not."""
    return name in LINEAR_WEIGHTS


def quant_dim(name: str) -> int:
    """The dim of a stored matrix that 4-bit compression groups along: a linear map's input dim (dim 0
    of [in, out], as FlexGen groups), an embedding's hidden dim (its last). Vectors stay uncompressed."""
    return 0 if is_linear(name) else -1


class UnsupportedModelError(UserError):
    """The config describes an architecture or option flexgen-graph does not implement."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True)
class TensorSlot:
    """Where one tensor of a layer sits in the layer's flat byte buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    family: str  # "opt" | "llama"
    model_type: str  # the HF model_type the spec came from: opt, llama, mistral, qwen2
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    max_positions: int
    norm_eps: float
    rope_theta: float
    qkv_bias: bool
    o_bias: bool
    tie_embeddings: bool
    dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    sliding_window: int | None = None

    @property
    def norm(self) -> str:
        return "layernorm" if self.family == "opt" else "rmsnorm"

    @property
    def activation(self) -> str:
        return "relu" if self.family == "opt" else "silu"

    @property
    def positions(self) -> str:
        return "learned" if self.family == "opt" else "rope"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def num_graph_layers(self) -> int:
        return self.num_layers + 2

    def layer_kind(self, layer: int) -> LayerKind:
        if layer == 0:
            return LayerKind.EMBED
        if 1 <= layer <= self.num_layers:
            return LayerKind.DECODER
        if layer == self.num_layers + 1:
            return LayerKind.HEAD
        raise IndexError(f"layer {layer} out of range 0..{self.num_layers + 1}")

    def layer_tensors(self, layer: int) -> tuple[TensorSpec, ...]:
        """The layer's tensors in layout order. Linear weights are stored input-major, [in, out] (the
        transpose of HF's [out, in]): `x @ w` on a contiguous [in, out] matrix runs up to 5x faster
        than F.linear at decode batch sizes on the CPU (measured: 0.16 vs 0.81 ms for 16 x 576 x 1536)."""
        return tuple(TensorSpec(t.name, t.shape[::-1]) if is_linear(t.name) else t
                     for t in self.hf_layer_tensors(layer))

    def hf_layer_tensors(self, layer: int) -> tuple[TensorSpec, ...]:
        """The layer's tensors with checkpoint shapes (linear weights [out, in], as HF holds them)."""
        kind = self.layer_kind(layer)
        h, v, hd = self.hidden, self.vocab, self.head_dim
        q_out, kv_out = self.num_heads * hd, self.num_kv_heads * hd
        t: list[TensorSpec] = []
        if kind is LayerKind.EMBED:
            t.append(TensorSpec("embed_tokens", (v, h)))
            if self.family == "opt":
                # OPT's learned positions are offset by 2 (a fairseq legacy)
                t.append(TensorSpec("embed_positions", (self.max_positions + 2, h)))
        elif kind is LayerKind.HEAD:
            t.append(TensorSpec("norm_w", (h,)))
            if self.family == "opt":
                t.append(TensorSpec("norm_b", (h,)))
            t.append(TensorSpec("lm_head", (v, h)))
        elif self.family == "opt":
            t += [
                TensorSpec("ln1_w", (h,)), TensorSpec("ln1_b", (h,)),
                TensorSpec("q_w", (q_out, h)), TensorSpec("q_b", (q_out,)),
                TensorSpec("k_w", (kv_out, h)), TensorSpec("k_b", (kv_out,)),
                TensorSpec("v_w", (kv_out, h)), TensorSpec("v_b", (kv_out,)),
                TensorSpec("o_w", (h, q_out)), TensorSpec("o_b", (h,)),
                TensorSpec("ln2_w", (h,)), TensorSpec("ln2_b", (h,)),
                TensorSpec("fc1_w", (self.ffn, h)), TensorSpec("fc1_b", (self.ffn,)),
                TensorSpec("fc2_w", (h, self.ffn)), TensorSpec("fc2_b", (h,)),
            ]
        else:
            t.append(TensorSpec("ln1_w", (h,)))
            t.append(TensorSpec("q_w", (q_out, h)))
            if self.qkv_bias:
                t.append(TensorSpec("q_b", (q_out,)))
            t.append(TensorSpec("k_w", (kv_out, h)))
            if self.qkv_bias:
                t.append(TensorSpec("k_b", (kv_out,)))
            t.append(TensorSpec("v_w", (kv_out, h)))
            if self.qkv_bias:
                t.append(TensorSpec("v_b", (kv_out,)))
            t.append(TensorSpec("o_w", (h, q_out)))
            if self.o_bias:
                t.append(TensorSpec("o_b", (h,)))
            t += [
                TensorSpec("ln2_w", (h,)),
                TensorSpec("gate_w", (self.ffn, h)),
                TensorSpec("up_w", (self.ffn, h)),
                TensorSpec("down_w", (h, self.ffn)),
            ]
        return tuple(t)

    def layer_layout(self, layer: int) -> tuple[TensorSlot, ...]:
        out, off = [], 0
        for ts in self.layer_tensors(layer):
            nbytes = ts.numel * self.dtype_bytes
            out.append(TensorSlot(ts.name, ts.shape, off, nbytes))
            off += -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES
        return tuple(out)

    def layer_bytes(self, layer: int) -> int:
        """Bytes of the layer's flat buffer (aligned), what a weight slot must hold."""
        lay = self.layer_layout(layer)
        last = lay[-1]
        return -(-(last.offset + last.nbytes) // ALIGN_BYTES) * ALIGN_BYTES

    def weight_bytes(self) -> int:
        return sum(self.layer_bytes(j) for j in range(self.num_graph_layers))

    def num_params(self) -> int:
        """Parameters of the model as checkpoints count them (a tied lm_head counted once)."""
        n = sum(ts.numel for j in range(self.num_graph_layers) for ts in self.layer_tensors(j))
        return n - (self.vocab * self.hidden if self.tie_embeddings else 0)

    def kv_bytes_per_token(self) -> int:
        """Cache bytes one sequence adds per token in one decoder layer (k and v)."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        """Strict: plan files and weight manifests are untrusted, so every field must have its type."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"unknown ModelSpec fields: {sorted(unknown)}")
        d = dict(d)
        eos = d.get("eos_token_ids", ())
        if not isinstance(eos, (list, tuple)) or not all(_is_int(e) for e in eos):
            raise UserError(f"ModelSpec field eos_token_ids must be a list of integers, got {eos!r}")
        d["eos_token_ids"] = tuple(eos)
        for f in fields(cls):
            if f.name in d and f.name != "eos_token_ids" and not _TYPE_CHECKS[f.type](d[f.name]):
                raise UserError(f"ModelSpec field {f.name} must be {f.type}, got {d[f.name]!r}")
        spec = cls(**d)
        if spec.family not in ("opt", "llama") or spec.dtype not in DTYPE_BYTES:
            raise UserError(f"ModelSpec: unknown family {spec.family!r} or dtype {spec.dtype!r}")
        for name in ("num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim", "ffn", "vocab", "max_positions"):
            if getattr(spec, name) < 1:
                raise UserError(f"ModelSpec field {name} must be >= 1, got {getattr(spec, name)}")
        if spec.num_heads % spec.num_kv_heads:
            raise UserError(f"ModelSpec: num_heads {spec.num_heads} is not a multiple of num_kv_heads "
                             f"{spec.num_kv_heads}")
        return spec

    def fingerprint(self) -> str:
        """Hash of the architecture (not the name): plans and weights must agree on it."""
        d = self.to_dict()
        d.pop("name")
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def with_dtype(self, dtype: str) -> "ModelSpec":
        if dtype not in DTYPE_BYTES:
            raise UserError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
        d = self.to_dict()
        d["dtype"] = dtype
        return ModelSpec.from_dict(d)


def _is_int(v: Any) -> bool:
    return type(v) is int


_TYPE_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "int": _is_int,
    "float": lambda v: type(v) in (int, float) and v == v,
    "bool": lambda v: isinstance(v, bool),
    "int | None": lambda v: v is None or _is_int(v),
}


def _eos_tuple(eos: Any) -> tuple[int, ...]:
    if eos is None:
        return ()
    if isinstance(eos, (list, tuple)):
        return tuple(int(e) for e in eos)
    return (int(eos),)


def spec_from_config(config: Any, name: str = "", dtype: str = "float32") -> ModelSpec:
    """Build a ModelSpec from a transformers PretrainedConfig (or anything with the same attributes)."""
    mt = getattr(config, "model_type", None)
    name = name or getattr(config, "_name_or_path", "") or str(mt)
    if mt == "opt":
        return _opt_spec(config, name, dtype)
    if mt in ("llama", "mistral", "qwen2"):
        return _llama_spec(config, name, dtype)
    raise UnsupportedModelError(
        f"model_type {mt!r} is not supported (supported: opt, llama, mistral, qwen2)"
    )


def _opt_spec(c: Any, name: str, dtype: str) -> ModelSpec:
    if getattr(c, "word_embed_proj_dim", c.hidden_size) != c.hidden_size:
        raise UnsupportedModelError(
            f"{name}: OPT with word_embed_proj_dim={c.word_embed_proj_dim} != hidden_size={c.hidden_size} "
            "(opt-350m's projection layers) is not supported"
        )
    if not getattr(c, "do_layer_norm_before", True):
        raise UnsupportedModelError(f"{name}: OPT with do_layer_norm_before=False (opt-350m) is not supported")
    if getattr(c, "activation_function", "relu") != "relu":
        raise UnsupportedModelError(f"{name}: OPT activation {c.activation_function!r} is not supported (relu only)")
    if not getattr(c, "enable_bias", True):
        raise UnsupportedModelError(f"{name}: OPT with enable_bias=False is not supported")
    heads = c.num_attention_heads
    return ModelSpec(
        name=name, family="opt", model_type="opt",
        num_layers=c.num_hidden_layers, hidden=c.hidden_size, num_heads=heads, num_kv_heads=heads,
        head_dim=c.hidden_size // heads, ffn=c.ffn_dim, vocab=c.vocab_size,
        max_positions=c.max_position_embeddings, norm_eps=1e-5, rope_theta=0.0,
        qkv_bias=True, o_bias=True, tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        dtype=dtype, bos_token_id=getattr(c, "bos_token_id", None),
        eos_token_ids=_eos_tuple(getattr(c, "eos_token_id", None)), pad_token_id=getattr(c, "pad_token_id", None),
    )


def _rope_theta(c: Any) -> float:
    # transformers 5 moved rope_theta into rope_parameters; accept both
    params = getattr(c, "rope_parameters", None) or {}
    scaling = getattr(c, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported (default RoPE only)")
    theta = params.get("rope_theta", getattr(c, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _llama_spec(c: Any, name: str, dtype: str) -> ModelSpec:
    mt = c.model_type
    if getattr(c, "mlp_bias", False):
        raise UnsupportedModelError(f"{name}: mlp_bias=True is not supported")
    act = getattr(c, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{name}: hidden_act {act!r} is not supported (silu only)")
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    attn_bias = bool(getattr(c, "attention_bias", False))
    qkv_bias = mt == "qwen2" or attn_bias
    sliding = None
    if mt in ("mistral", "qwen2") and getattr(c, "use_sliding_window", mt == "mistral"):
        sliding = getattr(c, "sliding_window", None)
    return ModelSpec(
        name=name, family="llama", model_type=mt,
        num_layers=c.num_hidden_layers, hidden=c.hidden_size, num_heads=heads, num_kv_heads=kv,
        head_dim=head_dim, ffn=c.intermediate_size, vocab=c.vocab_size,
        max_positions=c.max_position_embeddings, norm_eps=float(c.rms_norm_eps), rope_theta=_rope_theta(c),
        qkv_bias=qkv_bias, o_bias=attn_bias and mt == "llama",
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)), dtype=dtype,
        bos_token_id=getattr(c, "bos_token_id", None), eos_token_ids=_eos_tuple(getattr(c, "eos_token_id", None)),
        pad_token_id=getattr(c, "pad_token_id", None), sliding_window=sliding,
    )
