"""Layer kernels: pure torch functions that compute one graph layer from typed weight views.

Weights arrive as views over a layer's flat byte buffer (`layer_views`), so a weight slot filled
by any tier can be computed on without copies. The math follows transformers' modeling_opt.py and
modeling_llama.py op for op, so greedy tokens equal `generate` in float32.

    >>> w0, w1, wh = (layer_views(spec, j, bufs[j]) for j in (0, 1, spec.num_layers + 1))
    >>> pos = positions_from_mask(mask)                      # mask: [B, P], False = left padding
    >>> h = embed(spec, w0, tokens, pos)                     # h: [B, P, H]
    >>> h = decoder(spec, w1, h, cache, 0, pos, mask)        # cache: [S, 2, B, KV, D], rows [0, P) written
    >>> next_ids = head(spec, wh, h).argmax(-1)              # logits: [B, V] float32

Position convention (that of transformers' `generate`): a real token's position is the number of
real tokens before it (`cumsum(mask) - 1`); padding gets position 0, a valid index whose output
is never attended to. A learned position table's offset (OPT's 2) is added inside `embed`.

Behaviour follows the spec's fields and its family's traits (norm, activation, mlp, positions,
query_prescaled, the biases a layer has), never a family's name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexgen_graph.errors import UserError
from flexgen_graph.spec import ModelSpec

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ACTIVATIONS = {"relu": F.relu, "silu": F.silu}


def cpu_matmul_slowdown(dtype: torch.dtype) -> float:
    """How many times longer a decode-sized matmul (16 x 576 @ 576 x 576) takes in dtype than in float32 on this
    CPU, measured now (the least of 7 calls each, after 3 to warm up; once per process): bfloat16 is fast only
    with AVX512-BF16 or AMX, and float16 is slow on most CPUs, which a user choosing --dtype cannot see."""
    import time

    if dtype not in _SLOWDOWN:
        def least_s(dt: torch.dtype) -> float:
            x, w = torch.randn(16, 576, dtype=dt), torch.randn(576, 576, dtype=dt)
            for _ in range(3):
                x @ w
            ts = []
            for _ in range(7):
                t = time.perf_counter()
                x @ w
                ts.append(time.perf_counter() - t)
            return min(ts)
        least_s(torch.float32)  # the first float32 calls of a process pay the BLAS's start-up
        _SLOWDOWN[dtype] = least_s(dtype) / max(least_s(torch.float32), 1e-9)
    return _SLOWDOWN[dtype]


_SLOWDOWN: dict[torch.dtype, float] = {torch.float32: 1.0}


def layer_views(spec: ModelSpec, layer: int, buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """Typed views, one per local tensor name, into a flat uint8 layer buffer (no copies)."""
    need = spec.layer_bytes(layer)
    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        raise UserError(f"layer {layer}: buffer must be a flat contiguous uint8 tensor, "
                         f"got {buf.dtype} of shape {tuple(buf.shape)}")
    if buf.numel() < need:
        raise UserError(f"layer {layer}: buffer holds {buf.numel()} bytes, the layer needs {need}")
    dtype = TORCH_DTYPES[spec.dtype]
    return {s.name: buf[s.offset:s.offset + s.nbytes].view(dtype).view(s.shape)
            for s in spec.layer_layout(layer)}


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w (+ b) with w stored input-major, [in, out] (see ModelSpec.layer_tensors); w may be a packed
    weight (runtime.packed), which computes `x @ w` itself (__rmatmul__) on its compressed bytes."""
    y = x @ w
    return y if b is None else y + b


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a [B, S] key mask: cumsum(mask) - 1 for real tokens, 0 for padding."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(~mask.bool(), 0)


def embed(spec: ModelSpec, w: dict[str, torch.Tensor], tokens: torch.Tensor,
          positions: torch.Tensor) -> torch.Tensor:
    # table[ids], not F.embedding: a compressed table (runtime.packed.RowTable) dequantizes only those rows
    h = w["embed_tokens"][tokens]  # h: [B, T, H]
    if spec.positions == "learned":
        h = h + w["embed_positions"][positions + spec.position_offset]
    return h


def _norm(spec: ModelSpec, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if spec.norm == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, spec.norm_eps)
    # RMSNorm as HF computes it: statistics in float32, scale applied after casting back
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + spec.norm_eps)
    return weight * xf.to(x.dtype)


def _rope_cos_sin(spec: ModelSpec, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [B, T, D], computed in float32 as LlamaRotaryEmbedding does, then cast."""
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float, device=positions.device) / d))
    freqs = positions[..., None].float() * inv_freq  # freqs: [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention_mask(spec: ModelSpec, key_mask: torch.Tensor, start: int, t: int) -> torch.Tensor:
    """allowed: [B, 1, T, L] bool; causal within the new tokens, padding keys never attended."""
    L = start + t
    dev = key_mask.device
    q_rows = torch.arange(start, L, device=dev)[:, None]  # cache row of each query: [T, 1]
    k_rows = torch.arange(L, device=dev)[None, :]  # [1, L]
    allowed = k_rows <= q_rows
    if spec.sliding_window:
        # HF's sliding window counts cache rows (padding included), not position ids
        allowed = allowed & (k_rows > q_rows - spec.sliding_window)
    allowed = allowed[None] & key_mask.bool()[:, None, :]  # [B, T, L]
    # a padding query before its row's first real token has no valid key; let it see every key so
    # softmax stays finite (its output is never attended to by a real token)
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed[:, None]


def attention_inputs(spec: ModelSpec, w: dict[str, torch.Tensor], h: torch.Tensor,
                     positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q: [B, T, NH, D], k and v: [B, T, KV, D] of T new tokens (RoPE applied when the spec's positions are)."""
    B, T, _ = h.shape
    NH, KV, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    x = _norm(spec, h, w["ln1_w"], w.get("ln1_b"))
    q = _linear(x, w["q_w"], w.get("q_b"))
    if spec.query_prescaled:
        q = q * D ** -0.5  # scaled before q @ k^T (not inside the softmax), as HF's OPT does
    q = q.view(B, T, NH, D)
    k = _linear(x, w["k_w"], w.get("k_b")).view(B, T, KV, D)
    v = _linear(x, w["v_w"], w.get("v_b")).view(B, T, KV, D)
    if spec.positions == "rope":
        cos, sin = _rope_cos_sin(spec, positions, h.dtype)  # cos: [B, T, D]
        cos, sin = cos[:, :, None], sin[:, :, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
    return q, k, v


def attend(spec: ModelSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, start: int,
           key_mask: torch.Tensor) -> torch.Tensor:
    """Write k, v to cache rows [start, start + T), attend over rows [0, start + T): a: [B, T, NH * D].

    Runs wherever `cache` lives: on the compute device, or on the host when the plan delegates
    decode attention to the CPU (then q, k, v arrive on the host and the cache never moves).
    """
    B, T, NH, D = q.shape
    KV = spec.num_kv_heads
    G = NH // KV
    L = start + T
    assert cache.shape[1:] == (2, B, KV, D) and cache.shape[0] >= L, \
        f"attend: cache {tuple(cache.shape)} cannot hold rows [0, {L}) of [S, 2, {B}, {KV}, {D}]"
    assert key_mask.shape == (B, L), f"attend: key_mask {tuple(key_mask.shape)} != {(B, L)}"
    cache[start:L, 0] = k.transpose(0, 1)  # cache[:, 0]: [S, B, KV, D]
    cache[start:L, 1] = v.transpose(0, 1)
    keys = cache[:L, 0].permute(1, 2, 0, 3)  # keys: [B, KV, L, D]
    values = cache[:L, 1].permute(1, 2, 0, 3)
    if keys.dtype != q.dtype:  # half-precision host cache: attend in the query's precision
        keys, values = keys.to(q.dtype), values.to(q.dtype)

    # GQA without repeating k/v: query head n reads kv head n // G, so fold the G query heads of
    # one kv head into the query-length axis
    q = q.permute(0, 2, 1, 3).reshape(B, KV, G * T, D)  # q: [B, KV, G*T, D]
    allowed = _attention_mask(spec, key_mask, start, T)  # [B, 1, T, L]
    allowed = allowed[:, :, None].expand(B, 1, G, T, L).reshape(B, 1, G * T, L)
    scale = 1.0 if spec.query_prescaled else D ** -0.5
    a = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=scale)  # a: [B, KV, G*T, D]
    return a.view(B, NH, T, D).transpose(1, 2).reshape(B, T, NH * D)


def attention_output_and_mlp(spec: ModelSpec, w: dict[str, torch.Tensor], h: torch.Tensor,
                             a: torch.Tensor) -> torch.Tensor:
    """The rest of the layer after attention: o_proj + residual, then the MLP + residual."""
    h = h + _linear(a, w["o_w"], w.get("o_b"))
    x = _norm(spec, h, w["ln2_w"], w.get("ln2_b"))
    act = ACTIVATIONS[spec.activation]
    if spec.mlp == "gated":
        x = _linear(act(_linear(x, w["gate_w"])) * _linear(x, w["up_w"]), w["down_w"])
    else:
        x = _linear(act(_linear(x, w["fc1_w"], w.get("fc1_b"))), w["fc2_w"], w.get("fc2_b"))
    return h + x


def decoder(spec: ModelSpec, w: dict[str, torch.Tensor], h: torch.Tensor, cache: torch.Tensor, start: int,
            positions: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """One decoder layer over T new tokens; writes their k, v to cache rows [start, start + T)."""
    q, k, v = attention_inputs(spec, w, h, positions)
    return attention_output_and_mlp(spec, w, h, attend(spec, q, k, v, cache, start, key_mask))


def head(spec: ModelSpec, w: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """Logits of the last position: [B, V] float32."""
    x = _norm(spec, h[:, -1], w["norm_w"], w.get("norm_b"))  # x: [B, H]
    return _linear(x, w["lm_head"]).float()


def score_head(spec: ModelSpec, w: dict[str, torch.Tensor], h: torch.Tensor, targets: torch.Tensor,
               scored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """At the positions `scored` selects, the log-probability of the next token `targets` names and whether
    it is the argmax: [N] float32, [N] bool, row-major (h: [B, T, H]; targets: [B, T]; scored: [B, T] bool).
    Only those positions go through the head, and only these numbers are kept (log-softmax as HF's: float32)."""
    x = _norm(spec, h[scored], w["norm_w"], w.get("norm_b"))  # x: [N, H]
    logits = _linear(x, w["lm_head"]).float()  # logits: [N, V]
    t = targets[scored]
    greedy = logits.argmax(dim=-1) == t
    # log_softmax itself, not logit - logsumexp: the two round apart by ~1e-5 a token, always the same way
    return F.log_softmax(logits, dim=-1).gather(-1, t[:, None])[:, 0], greedy
