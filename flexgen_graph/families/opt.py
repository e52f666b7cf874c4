"""OPT (facebook/opt-*): pre-LayerNorm decoder, learned positions offset by 2, ReLU MLP, biases everywhere,
the query scaled before its product with the keys (modeling_opt.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flexgen_graph.families.base import Family, UnsupportedModelError, Weight, token_fields
from flexgen_graph.ir import LayerKind

if TYPE_CHECKING:
    from flexgen_graph.spec import ModelSpec

POSITION_OFFSET = 2


def spec_fields(c: Any, name: str) -> dict[str, Any]:
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
    return dict(
        family="opt", model_type="opt",
        num_layers=c.num_hidden_layers, hidden=c.hidden_size, num_heads=heads, num_kv_heads=heads,
        head_dim=c.hidden_size // heads, ffn=c.ffn_dim, vocab=c.vocab_size,
        max_positions=c.max_position_embeddings, norm_eps=1e-5, rope_theta=0.0,
        qkv_bias=True, o_bias=True, tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)), **token_fields(c),
    )


def tensors(s: "ModelSpec", kind: LayerKind, i: int) -> tuple[Weight, ...]:
    h, q_out, kv_out = s.hidden, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    if kind is LayerKind.EMBED:
        return (Weight("embed_tokens", (s.vocab, h), "model.decoder.embed_tokens.weight"),
                Weight("embed_positions", (s.max_positions + POSITION_OFFSET, h),
                       "model.decoder.embed_positions.weight"))
    if kind is LayerKind.HEAD:
        return (Weight("norm_w", (h,), "model.decoder.final_layer_norm.weight"),
                Weight("norm_b", (h,), "model.decoder.final_layer_norm.bias"),
                Weight("lm_head", (s.vocab, h), "lm_head.weight", linear=True))
    p = f"model.decoder.layers.{i}."
    return (
        Weight("ln1_w", (h,), p + "self_attn_layer_norm.weight"),
        Weight("ln1_b", (h,), p + "self_attn_layer_norm.bias"),
        Weight("q_w", (q_out, h), p + "self_attn.q_proj.weight", True),
        Weight("q_b", (q_out,), p + "self_attn.q_proj.bias"),
        Weight("k_w", (kv_out, h), p + "self_attn.k_proj.weight", True),
        Weight("k_b", (kv_out,), p + "self_attn.k_proj.bias"),
        Weight("v_w", (kv_out, h), p + "self_attn.v_proj.weight", True),
        Weight("v_b", (kv_out,), p + "self_attn.v_proj.bias"),
        Weight("o_w", (h, q_out), p + "self_attn.out_proj.weight", True),
        Weight("o_b", (h,), p + "self_attn.out_proj.bias"),
        Weight("ln2_w", (h,), p + "final_layer_norm.weight"),
        Weight("ln2_b", (h,), p + "final_layer_norm.bias"),
        Weight("fc1_w", (s.ffn, h), p + "fc1.weight", True),
        Weight("fc1_b", (s.ffn,), p + "fc1.bias"),
        Weight("fc2_w", (h, s.ffn), p + "fc2.weight", True),
        Weight("fc2_b", (h,), p + "fc2.bias"),
    )


FAMILY = Family(name="opt", model_types=("opt",), norm="layernorm", activation="relu", mlp="plain",
                positions="learned", position_offset=POSITION_OFFSET, query_prescaled=True,
                spec_fields=spec_fields, tensors=tensors)
