"""Attention over a compressed KV cache without a dense copy of it: the cache is read in chunks of rows,
each restored into a small scratch and folded into an online softmax (running maximum, sum and weighted
values, as flash attention), so only one chunk of the dense cache exists at a time.

    >>> codec = CacheCodec(spec, gpu_batch_size, cfg)             # runtime.compressed
    >>> scratch = torch.empty(chunk_scratch_bytes(spec, gpu_batch_size), dtype=torch.uint8, device=dev)
    >>> a_out = attend_quantized(spec, codec, q, k, v, cbuf, start, key_mask, scratch=scratch)  # [B, T, NH * D]

Same result as `codec.store_new` + `codec.load` of rows [0, start) + `kernels.attend`, within float32
rounding: the new tokens' k, v are stored first and attended as they read back (every token sees the same
cache values whenever it reads them), the mask is kernels' (causal within the new tokens, padding keys
never attended, a query without any valid key sees all keys). Prefill (start 0) reads no cache: it
attends over the new tokens in one call. Runs wherever q lives; the compressed records are moved there
chunk by chunk when the cache buffer lives elsewhere. Each chunk costs about fifteen torch ops: the default
rows (a few MiB of dense rows) suit a CPU; on a GPU, where each op is a kernel launch, pass more rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexgen_graph.layout import attend_chunk_bytes, attend_chunk_rows
from flexgen_graph.spec import ModelSpec
from runtime.compressed import CacheCodec
from runtime.kernels import TORCH_DTYPES, _attention_mask

__all__ = ["attend_quantized", "chunk_rows", "chunk_scratch_bytes"]

MASKED = torch.finfo(torch.float32).min  # finite: a chunk without a valid key gives no NaN, its weight is rescaled to 0


def chunk_rows(spec: ModelSpec, gpu_batch_size: int) -> int:
    """The default cache rows per chunk (layout.attend_chunk_rows: a few MiB of dense rows)."""
    return attend_chunk_rows(spec.kv_bytes_per_token(), gpu_batch_size)


def chunk_scratch_bytes(spec: ModelSpec, gpu_batch_size: int, rows: int | None = None) -> int:
    """Bytes of the scratch attend_quantized restores a chunk of `rows` (default: chunk_rows) into."""
    rows = chunk_rows(spec, gpu_batch_size) if rows is None else rows
    return attend_chunk_bytes(spec.kv_bytes_per_token(), gpu_batch_size, rows)


def _chunk_view(spec: ModelSpec, scratch: torch.Tensor | None, rows: int, batch: int,
                device: torch.device) -> torch.Tensor:
    """[rows, 2, batch, KV, D] in the model dtype: over the start of scratch (flat uint8), or new."""
    shape = (rows, 2, batch, spec.num_kv_heads, spec.head_dim)
    dtype = TORCH_DTYPES[spec.dtype]
    if scratch is None:
        return torch.empty(shape, dtype=dtype, device=device)
    need = chunk_scratch_bytes(spec, batch, rows)
    assert scratch.dtype == torch.uint8 and scratch.dim() == 1 and scratch.numel() >= need \
        and scratch.device == device, \
        f"attend_quantized: scratch {scratch.dtype} {tuple(scratch.shape)} on {scratch.device} cannot hold " \
        f"{need} bytes on {device}"
    return scratch[:need].view(dtype).view(shape)


def _attend_new_only(spec: ModelSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_mask: torch.Tensor) -> torch.Tensor:
    """Prefill: the new tokens attend to each other only (kernels.attend with start 0, no cache rows)."""
    B, T, NH, D = q.shape
    KV = spec.num_kv_heads
    G = NH // KV
    qf = q.permute(0, 2, 1, 3).reshape(B, KV, G * T, D)  # GQA folded as kernels.attend folds it
    allowed = _attention_mask(spec, key_mask, 0, T)[:, :, None].expand(B, 1, G, T, T).reshape(B, 1, G * T, T)
    scale = 1.0 if spec.query_prescaled else D ** -0.5
    a = F.scaled_dot_product_attention(qf, k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed, scale=scale)
    return a.view(B, NH, T, D).transpose(1, 2).reshape(B, T, NH * D)


def attend_quantized(spec: ModelSpec, codec: CacheCodec, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     cbuf: torch.Tensor, start: int, key_mask: torch.Tensor,
                     rows: int | None = None, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Store k_new, v_new ([B, T, KV, D]) at records [start, start + T) of cbuf, then attend q ([B, T, NH, D])
    over rows [0, start + T) `rows` at a time (default: chunk_rows of the codec's gpu batch): [B, T, NH * D].
    key_mask: [B, start + T]; scratch: flat uint8 on q's device, chunk_scratch_bytes(spec, B, min(rows,
    start + T)) bytes at least (else a new one)."""
    B, T, NH, D = q.shape
    KV = spec.num_kv_heads
    G, L = NH // KV, start + T
    assert key_mask.shape == (B, L), f"attend_quantized: key_mask {tuple(key_mask.shape)} != {(B, L)}"
    rows = chunk_rows(spec, codec.row_shape[1]) if rows is None else rows
    assert rows >= 1, f"attend_quantized: rows {rows} < 1"
    if start == 0:  # prefill: no cache rows to read; the new rows as they read back
        return _attend_new_only(spec, q, *codec.store_new(cbuf, k_new, v_new, 0), key_mask)
    codec.store_kv(cbuf, k_new, v_new, start)  # read back below with the cache rows, by the same restore
    c = min(rows, L)
    chunk = _chunk_view(spec, scratch, c, B, q.device)
    scale = 1.0 if spec.query_prescaled else D ** -0.5
    qf = (q * scale).permute(0, 2, 1, 3).reshape(B, KV, G * T, D)  # qf: [B, KV, G*T, D], G query heads per kv head
    blocked = ~_attention_mask(spec, key_mask, start, T)[:, :, None]  # [B, 1, 1, T, L]
    m = l = acc = None
    for s in range(0, L, c):
        e = min(s + c, L)
        dense = chunk[:e - s]  # dense: [n, 2, B, KV, D]
        codec.load_rows(cbuf, dense, s)
        keys = dense[:, 0].permute(1, 2, 3, 0)  # keys: [B, KV, D, n]
        values = dense[:, 1].permute(1, 2, 0, 3)  # values: [B, KV, n, D]
        sc = torch.matmul(qf, keys).float()  # sc: [B, KV, G*T, n]
        sc.view(B, KV, G, T, e - s).masked_fill_(blocked[..., s:e], MASKED)
        top = sc.amax(-1, keepdim=True)
        if m is None:
            m = top
        else:
            top = torch.maximum(m, top)
            alpha = (m - top).exp_()  # rescales what earlier chunks summed to the new maximum
            m = top
            l.mul_(alpha)
            acc.mul_(alpha)
        p = sc.sub_(m).exp_()
        pv = torch.matmul(p.to(values.dtype), values).float()  # [B, KV, G*T, D]
        if l is None:
            l, acc = p.sum(-1, keepdim=True), pv
        else:
            l.add_(p.sum(-1, keepdim=True))
            acc.add_(pv)
    out = (acc / l).to(q.dtype)
    return out.view(B, NH, T, D).transpose(1, 2).reshape(B, T, NH * D)
