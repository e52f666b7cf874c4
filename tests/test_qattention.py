"""Attention over a compressed cache chunk by chunk (runtime.qattention) equals restoring the whole cache
(codec.load) and attending it (kernels.attend), for decode and prefill, MHA and GQA, padded masks, chunk
sizes that do and do not divide the cache, 4 and 8 bits; and it restores no more than a chunk at a time."""

import dataclasses

import pytest
import torch

from flexgen_graph.catalog import catalog_spec
from flexgen_graph.layout import attend_chunk_bytes, attend_chunk_rows
from runtime import kernels
from runtime.compressed import CacheCodec
from runtime.qattention import attend_quantized, chunk_rows, chunk_scratch_bytes
from runtime.quant import QuantConfig

SPECS = {
    "opt": catalog_spec("facebook/opt-125m"),  # MHA, query scaled before q @ k^T
    "smollm2": catalog_spec("HuggingFaceTB/SmolLM2-135M-Instruct"),  # GQA 9 / 3
    "mistral-window": dataclasses.replace(catalog_spec("mistralai/Mistral-7B-v0.1"), sliding_window=5),  # GQA 32 / 8
}
B = 3


def _case(spec, cfg: QuantConfig, a: int, t: int, seed: int = 0):
    """A cache buffer holding a rows, the new tokens' q, k, v and a left-padded key mask [B, a + t]."""
    g = torch.Generator().manual_seed(seed)
    KV, D, NH = spec.num_kv_heads, spec.head_dim, spec.num_heads
    codec = CacheCodec(spec, B, cfg)
    cbuf = torch.zeros((a + t) * codec.row_bytes, dtype=torch.uint8)
    if a:
        codec.store(cbuf, torch.randn(a, 2, B, KV, D, generator=g) * 2, 0)
    q, k, v = (torch.randn(B, t, n, D, generator=g) for n in (NH, KV, KV))
    mask = torch.ones(B, a + t, dtype=torch.bool)
    mask[1, : (a + t) // 3] = False  # left padding
    mask[2, : a + t // 2] = False  # padding over the whole cache (and, in prefill, queries without a valid key)
    return codec, cbuf, q, k, v, mask


def _restore_and_attend(spec, codec, q, k, v, cbuf, a, mask):
    """Today's path: store the new rows, restore rows [0, a) whole, attend with the new rows as they read back."""
    t = q.shape[1]
    dense = torch.empty(a + t, 2, B, spec.num_kv_heads, spec.head_dim, dtype=q.dtype)
    k, v = codec.store_new(cbuf, k, v, a)
    codec.load(cbuf, dense, a)
    return kernels.attend(spec, q, k, v, dense, a, mask)


def _check(spec, cfg, a, t, chunk=None, scratch=False, seed=0):
    codec, cbuf, q, k, v, mask = _case(spec, cfg, a, t, seed)
    want_buf = cbuf.clone()
    want = _restore_and_attend(spec, codec, q, k, v, want_buf, a, mask)
    rows = chunk_rows(spec, B) if chunk is None else chunk
    s = torch.empty(chunk_scratch_bytes(spec, B, min(rows, a + t)), dtype=torch.uint8) if scratch else None
    got = attend_quantized(spec, codec, q, k, v, cbuf, a, mask, chunk, s)
    assert got.shape == want.shape == (B, t, spec.num_heads * spec.head_dim)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(cbuf, want_buf), "the new rows are stored as store_new stores them"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("model", list(SPECS))
@pytest.mark.parametrize("a, chunk", [(1, 1), (17, 4), (17, 18), (40, 7), (40, 64), (64, 16), (64, 32)])
def test_decode_equals_restore_and_attend(model, bits, a, chunk):
    _check(SPECS[model], QuantConfig(bits, 64), a, 1, chunk, scratch=True)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("model", list(SPECS))
@pytest.mark.parametrize("t", [1, 6, 13])
def test_prefill_equals_restore_and_attend(model, bits, t):
    _check(SPECS[model], QuantConfig(bits, 64), 0, t, 4)


@pytest.mark.parametrize("group", [32, 48])  # 48: head dim 64 is not a multiple, the last group is padded
@pytest.mark.parametrize("chunk", [5, 32])
def test_group_sizes(group, chunk):
    _check(SPECS["smollm2"], QuantConfig(4, group), 37, 1, chunk)


@pytest.mark.parametrize("model", list(SPECS))
@pytest.mark.parametrize("chunk", [3, 8, 100])
def test_several_new_tokens_over_a_cache(model, chunk):
    """t > 1 after cached rows: causal within the new tokens, chunks with no valid key for some queries."""
    _check(SPECS[model], QuantConfig(4, 64), 11, 5, chunk, seed=1)


def test_half_precision_tracks_restore_and_attend():
    spec = SPECS["smollm2"].with_dtype("float16")
    codec, cbuf, q, k, v, mask = _case(spec, QuantConfig(4, 64), 30, 1)
    q, k, v = q.half(), k.half(), v.half()
    want = _restore_and_attend(spec, codec, q, k, v, cbuf.clone(), 30, mask)
    got = attend_quantized(spec, codec, q, k, v, cbuf, 30, mask, 8)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("a, chunk", [(40, 7), (40, 64), (0, 4)])
def test_restores_at_most_a_chunk_at_a_time(monkeypatch, a, chunk):
    """Every row [0, a + 1) (the new one as it reads back) is restored exactly once, in pieces of at most chunk
    rows; prefill restores none."""
    spec = SPECS["smollm2"]
    codec, cbuf, q, k, v, mask = _case(spec, QuantConfig(4, 64), a, 1)
    seen = []
    real = CacheCodec.load_rows

    def spy(self, buf, out, start):
        seen.append((start, out.shape[0]))
        real(self, buf, out, start)

    monkeypatch.setattr(CacheCodec, "load_rows", spy)
    monkeypatch.setattr(CacheCodec, "load", lambda *_: pytest.fail("the whole cache was restored"))
    attend_quantized(spec, codec, q, k, v, cbuf, a, mask, chunk)
    assert all(n <= chunk for _, n in seen)
    assert sorted(r for s, n in seen for r in range(s, s + n)) == list(range(a + 1 if a else 0))


def test_scratch_bytes_by_hand():
    spec = SPECS["smollm2"]  # 3 kv heads of 64, float32: 1536 bytes of k and v per token and sequence
    assert chunk_scratch_bytes(spec, 16, 128) == 128 * 16 * 2 * 3 * 64 * 4
    assert attend_chunk_bytes(spec.kv_bytes_per_token(), 16, 128) == chunk_scratch_bytes(spec, 16, 128)


@pytest.mark.parametrize("model", list(SPECS))
def test_default_chunk(model):
    _check(SPECS[model], QuantConfig(4, 64), 50, 1, scratch=True)


def test_default_rows_fill_a_few_mib_by_hand():
    kv = SPECS["smollm2"].kv_bytes_per_token()  # 1536
    assert attend_chunk_rows(kv, 16) == 160  # 4 MiB / (16 x 1536) = 170.7, down to a multiple of 16
    assert attend_chunk_rows(kv, 64) == 32  # 42.7
    assert attend_chunk_rows(kv, 4096) == 16  # never below 16 rows
    assert chunk_rows(SPECS["smollm2"], 16) == 160
    assert chunk_scratch_bytes(SPECS["smollm2"], 16) == 160 * 16 * kv <= 4 << 20
