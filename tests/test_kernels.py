"""Kernels against transformers: greedy tokens equal `generate` on left-padded batches, per family."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from runtime.kernels import (
    TORCH_DTYPES,
    decoder,
    embed,
    head,
    layer_views,
    positions_from_mask,
)
from runtime.weight_store import import_hf_folder

PROMPT_LENS = (5, 9, 12)
GEN = 8
VOCAB = 1000


def _opt() -> OPTForCausalLM:
    return OPTForCausalLM(OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                    vocab_size=VOCAB, word_embed_proj_dim=64, max_position_embeddings=128))


def _llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, vocab_size=VOCAB,
                                        max_position_embeddings=128, rope_theta=500.0))


def _qwen2() -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=1, intermediate_size=128, vocab_size=VOCAB,
                                        max_position_embeddings=128, tie_word_embeddings=True))


def _mistral() -> MistralForCausalLM:
    # a window shorter than the prompts, so the sliding-window mask decides tokens
    return MistralForCausalLM(MistralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=128, vocab_size=VOCAB,
                                            max_position_embeddings=128, sliding_window=5))


FAMILIES = {"opt": _opt, "llama": _llama, "qwen2": _qwen2, "mistral": _mistral}


def _random_init(model: torch.nn.Module) -> None:
    # HF initializes norms to ones and biases to zeros; random values there exercise every weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    torch.manual_seed(1234)
    model = FAMILIES[request.param]().eval()
    _random_init(model)
    model.generation_config.eos_token_id = None  # never stop early: compare all GEN tokens
    folder = tmp_path_factory.mktemp(f"hf-{request.param}")
    model.save_pretrained(folder)
    store = import_hf_folder(folder, tmp_path_factory.mktemp(f"store-{request.param}"))
    bufs = [torch.empty(store.spec.layer_bytes(j), dtype=torch.uint8) for j in range(store.spec.num_graph_layers)]
    for j, b in enumerate(bufs):
        store.read_layer_into(j, b)
    weights = [layer_views(store.spec, j, b) for j, b in enumerate(bufs)]
    return model, store.spec, weights, folder


def _left_padded_batch(pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    P = max(PROMPT_LENS)
    ids = torch.full((len(PROMPT_LENS), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(PROMPT_LENS), P, dtype=torch.bool)
    for b, n in enumerate(PROMPT_LENS):
        ids[b, P - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[b, P - n:] = True
    return ids, mask


def _prefill(spec, weights, ids, mask, S):
    B, P = ids.shape
    dtype = TORCH_DTYPES[spec.dtype]
    caches = [torch.zeros(S, 2, B, spec.num_kv_heads, spec.head_dim, dtype=dtype) for _ in range(spec.num_layers)]
    pos = positions_from_mask(mask)
    hs = [embed(spec, weights[0], ids, pos)]
    for j in range(1, spec.num_layers + 1):
        hs.append(decoder(spec, weights[j], hs[-1], caches[j - 1], 0, pos, mask))
    return hs, caches


def _greedy(spec, weights, ids, mask, gen):
    """Prefill then gen - 1 decode steps over a [S, 2, B, KV, D] cache per layer; the generated ids."""
    B, P = ids.shape
    key_mask = torch.zeros(B, P + gen, dtype=torch.bool)
    key_mask[:, :P] = mask
    hs, caches = _prefill(spec, weights, ids, mask, P + gen)
    logits = head(spec, weights[-1], hs[-1])
    out = []
    for step in range(gen):
        tok = logits.argmax(-1)  # tok: [B]
        out.append(tok)
        start = P + step
        key_mask[:, start] = True
        pos = positions_from_mask(key_mask[:, :start + 1])[:, start:]
        h = embed(spec, weights[0], tok[:, None], pos)
        for j in range(1, spec.num_layers + 1):
            h = decoder(spec, weights[j], h, caches[j - 1], start, pos, key_mask[:, :start + 1])
        logits = head(spec, weights[-1], h)
    return torch.stack(out, 1)


def test_greedy_tokens_equal_hf_generate_with_left_padding(family):
    model, spec, weights, _ = family
    ids, mask = _left_padded_batch(pad_id=spec.pad_token_id or 0)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask.long(), max_new_tokens=GEN, do_sample=False,
                             pad_token_id=spec.pad_token_id or 0)
        ours = _greedy(spec, weights, ids, mask, GEN)
    assert ref.shape == (len(PROMPT_LENS), ids.shape[1] + GEN)
    assert torch.equal(ours, ref[:, ids.shape[1]:]), f"{spec.model_type}: {ours} != {ref[:, ids.shape[1]:]}"


def test_prefill_hidden_states_logits_and_cache_match_hf(family):
    model, spec, weights, _ = family
    ids, mask = _left_padded_batch(pad_id=spec.pad_token_id or 0)
    pos = positions_from_mask(mask)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask.long(), position_ids=pos, output_hidden_states=True,
                    use_cache=True)
        hs, caches = _prefill(spec, weights, ids, mask, ids.shape[1] + 1)
        logits = head(spec, weights[-1], hs[-1])
    assert len(out.hidden_states) == spec.num_layers + 1
    for j in range(spec.num_layers):  # the last HF entry is after the final norm
        ref = out.hidden_states[j]
        err = (hs[j] - ref)[mask].abs().max().item()
        assert err < 1e-4, f"{spec.model_type} layer {j}: hidden states off by {err}"
    assert (logits - out.logits[:, -1]).abs().max().item() < 1e-4
    for j, cache in enumerate(caches):
        layer_cache = out.cache.layers[j]  # keys: [B, KV, P, D], after RoPE
        for kv, ref in ((0, layer_cache.keys), (1, layer_cache.values)):
            kept = ref.shape[2]  # HF's sliding-window cache keeps only the last rows
            ours = cache[ids.shape[1] - kept:ids.shape[1], kv].permute(1, 2, 0, 3)
            err = (ours - ref).permute(0, 2, 1, 3)[mask[:, -kept:]].abs().max().item()
            assert err < 1e-5, f"{spec.model_type} layer {j} cache[{kv}] off by {err}"
    assert not cache[ids.shape[1]:].any(), "decoder wrote past rows [start, start + T)"
    assert torch.isfinite(torch.stack([h.float() for h in hs])).all(), "padding rows produced NaN/inf"


def test_positions_from_mask_convention():
    mask = torch.tensor([[False, False, True, True, True], [True, True, True, True, True],
                         [False, False, False, False, False]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]


def test_layer_views_alias_the_buffer(family):
    _, spec, _, _ = family
    buf = torch.zeros(spec.layer_bytes(1), dtype=torch.uint8)
    views = layer_views(spec, 1, buf)
    assert [n for n in views] == [t.name for t in spec.layer_tensors(1)]
    for slot in spec.layer_layout(1):
        v = views[slot.name]
        assert v.shape == slot.shape and v.dtype == torch.float32
        assert v.data_ptr() == buf.data_ptr() + slot.offset
    views["q_w"].fill_(1.0)
    assert buf.view(torch.float32).sum().item() == views["q_w"].numel()
    with pytest.raises(ValueError, match="layer 1"):
        layer_views(spec, 1, buf[:-64])


def test_padding_only_query_rows_stay_finite(family):
    _, spec, weights, _ = family
    # a row that is all padding so far, and a decode step whose only valid key is itself
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    mask = torch.tensor([[False, False, False], [False, True, True]])
    hs, _ = _prefill(spec, weights, ids, mask, 3)
    assert torch.isfinite(hs[-1]).all()


@pytest.mark.parametrize("dtype, tol", [("float16", 5e-3), ("bfloat16", 3e-2)])
def test_half_precision_tracks_float32(family, dtype, tol, tmp_path):
    _, spec, weights, folder = family
    half = import_hf_folder(folder, tmp_path / dtype, dtype=dtype)
    half_weights = []
    for j in range(half.spec.num_graph_layers):
        buf = torch.empty(half.spec.layer_bytes(j), dtype=torch.uint8)
        half.read_layer_into(j, buf)
        half_weights.append(layer_views(half.spec, j, buf))
    ids, mask = _left_padded_batch(pad_id=0)
    hs, caches = _prefill(half.spec, half_weights, ids, mask, ids.shape[1])
    assert hs[-1].dtype == caches[0].dtype == TORCH_DTYPES[dtype]
    logits = head(half.spec, half_weights[-1], hs[-1])
    ref = head(spec, weights[-1], _prefill(spec, weights, ids, mask, ids.shape[1])[0][-1])
    assert logits.dtype == torch.float32
    assert (logits - ref).abs().max().item() < tol
