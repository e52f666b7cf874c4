"""Llama and the models shaped like it (Mistral, Qwen2): pre-RMSNorm decoder, RoPE, SwiGLU MLP, no
biases but Qwen2's on q, k and v (and Llama's optional attention_bias), Mistral's sliding window
(modeling_llama.py, modeling_mistral.py, modeling_qwen2.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flexgen_graph.families.base import Family, UnsupportedModelError, Weight, token_fields
from flexgen_graph.ir import LayerKind

if TYPE_CHECKING:
    from flexgen_graph.spec import ModelSpec


def _rope_theta(c: Any) -> float:
    # transformers 5 moved rope_theta into rope_parameters; accept both
    params = getattr(c, "rope_parameters", None) or {}
    scaling = getattr(c, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported (default RoPE only)")
    theta = params.get("rope_theta", getattr(c, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def spec_fields(c: Any, name: str) -> dict[str, Any]:
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
    sliding = None
    if mt in ("mistral", "qwen2") and getattr(c, "use_sliding_window", mt == "mistral"):
        sliding = getattr(c, "sliding_window", None)
    return dict(
        family="llama", model_type=mt,
        num_layers=c.num_hidden_layers, hidden=c.hidden_size, num_heads=heads, num_kv_heads=kv,
        head_dim=head_dim, ffn=c.intermediate_size, vocab=c.vocab_size,
        max_positions=c.max_position_embeddings, norm_eps=float(c.rms_norm_eps), rope_theta=_rope_theta(c),
        qkv_bias=mt == "qwen2" or attn_bias, o_bias=attn_bias and mt == "llama",
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)), sliding_window=sliding, **token_fields(c),
    )


def tensors(s: "ModelSpec", kind: LayerKind, i: int) -> tuple[Weight, ...]:
    h, q_out, kv_out = s.hidden, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    if kind is LayerKind.EMBED:
        return (Weight("embed_tokens", (s.vocab, h), "model.embed_tokens.weight"),)
    if kind is LayerKind.HEAD:
        return (Weight("norm_w", (h,), "model.norm.weight"),
                Weight("lm_head", (s.vocab, h), "lm_head.weight", linear=True))
    p = f"model.layers.{i}."
    t = [Weight("ln1_w", (h,), p + "input_layernorm.weight")]
    for x, out in (("q", q_out), ("k", kv_out), ("v", kv_out)):
        t.append(Weight(f"{x}_w", (out, h), f"{p}self_attn.{x}_proj.weight", True))
        if s.qkv_bias:
            t.append(Weight(f"{x}_b", (out,), f"{p}self_attn.{x}_proj.bias"))
    t.append(Weight("o_w", (h, q_out), p + "self_attn.o_proj.weight", True))
    if s.o_bias:
        t.append(Weight("o_b", (h,), p + "self_attn.o_proj.bias"))
    return (*t, Weight("ln2_w", (h,), p + "post_attention_layernorm.weight"),
            Weight("gate_w", (s.ffn, h), p + "mlp.gate_proj.weight", True),
            Weight("up_w", (s.ffn, h), p + "mlp.up_proj.weight", True),
            Weight("down_w", (h, s.ffn), p + "mlp.down_proj.weight", True))


FAMILY = Family(name="llama", model_types=("llama", "mistral", "qwen2"), norm="rmsnorm", activation="silu",
                mlp="gated", positions="rope", position_offset=0, query_prescaled=False,
                spec_fields=spec_fields, tensors=tensors)
