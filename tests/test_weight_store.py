"""Weight stores: HF round trips, tied heads, refusals naming the tensor at fault, dummies, GGUF import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from flexgen_graph.catalog import catalog_spec
from runtime.kernels import layer_views
from runtime.weight_store import (
    WeightStore,
    WeightStoreError,
    hf_state_dict,
    import_hf_folder,
    make_dummy,
)

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
             max_position_embeddings=128)


def _tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "opt":
        return OPTForCausalLM(OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **SMALL)).eval()
    if kind == "llama":  # untied head
        return LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, intermediate_size=128, **SMALL)).eval()
    return Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True,
                                        **SMALL)).eval()


def _saved(kind: str, folder: Path, **kw) -> torch.nn.Module:
    model = _tiny(kind)
    model.save_pretrained(folder, **kw)
    return model


@pytest.mark.parametrize("kind", ["opt", "llama", "qwen2"])
def test_round_trip_equals_hf_state_dict(kind, tmp_path):
    model = _saved(kind, tmp_path / "hf")
    store = import_hf_folder(tmp_path / "hf", tmp_path / "store")
    store.check()
    sd, ref = hf_state_dict(store), model.state_dict()
    assert set(sd) == set(ref)
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k
    clone = type(model)(model.config)
    clone.load_state_dict(sd, strict=True)
    assert store.spec.name == "hf" and store.source.startswith("hf:")
    assert WeightStore(tmp_path / "store").spec == store.spec


def test_tied_lm_head_is_the_embedding_stored_input_major(tmp_path):
    _saved("opt", tmp_path / "hf")
    store = import_hf_folder(tmp_path / "hf", tmp_path / "store")
    spec, last = store.spec, store.spec.num_layers + 1
    assert spec.tie_embeddings
    bufs = [torch.empty(spec.layer_bytes(j), dtype=torch.uint8) for j in (0, last)]
    store.read_layer_into(0, bufs[0])
    store.read_layer_into(last, bufs[1])
    embed = layer_views(spec, 0, bufs[0])["embed_tokens"]  # [V, H], rows gathered by token
    head = layer_views(spec, last, bufs[1])["lm_head"]  # [H, V], the same values for x @ head
    assert head.shape == embed.shape[::-1] and torch.equal(head, embed.t())


def test_untied_lm_head_has_its_own_file(tmp_path):
    model = _saved("llama", tmp_path / "hf")
    store = import_hf_folder(tmp_path / "hf", tmp_path / "store")
    last = store.spec.num_layers + 1
    assert store.tensor_file(last, "lm_head") != store.tensor_file(0, "embed_tokens")
    assert torch.equal(hf_state_dict(store)["lm_head.weight"], model.lm_head.weight)


def test_sharded_checkpoint_with_index_and_float16(tmp_path):
    model = _saved("llama", tmp_path / "hf", max_shard_size="100KB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    store = import_hf_folder(tmp_path / "hf", tmp_path / "store", dtype="float16", name="tiny")
    assert store.spec.dtype == "float16" and store.spec.name == "tiny"
    assert store.tensor_file(1, "q_w").stat().st_size == 64 * 64 * 2
    sd = hf_state_dict(store)
    for k, v in model.state_dict().items():
        assert sd[k].dtype == torch.float16 and torch.equal(sd[k], v.half()), k


def test_opt_keys_without_model_prefix(tmp_path):
    model = _saved("opt", tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    sd = load_file(f)
    save_file({k.removeprefix("model."): v for k, v in sd.items()}, f, metadata={"format": "pt"})
    store = import_hf_folder(tmp_path / "hf", tmp_path / "store")
    assert torch.equal(hf_state_dict(store)["model.decoder.layers.1.fc2.weight"],
                       model.model.decoder.layers[1].fc2.weight)


def test_tokenizer_files_are_copied(tmp_path):
    _saved("opt", tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"fake": true}')
    store = import_hf_folder(tmp_path / "hf", tmp_path / "store")
    assert (store.hf_dir / "tokenizer.json").read_text() == '{"fake": true}'
    assert json.loads((store.hf_dir / "config.json").read_text())["model_type"] == "opt"


def test_missing_tensor_is_refused_by_name(tmp_path):
    _saved("llama", tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(WeightStoreError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        import_hf_folder(tmp_path / "hf", tmp_path / "store")
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_untied_missing_lm_head_is_refused(tmp_path):
    _saved("llama", tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    sd = load_file(f)
    del sd["lm_head.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(WeightStoreError, match=r"lm_head\.weight"):
        import_hf_folder(tmp_path / "hf", tmp_path / "store")


def test_wrong_shape_in_checkpoint_is_refused(tmp_path):
    _saved("opt", tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    sd = load_file(f)
    sd["model.decoder.layers.0.fc1.weight"] = sd["model.decoder.layers.0.fc1.weight"][:, :32].contiguous()
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(WeightStoreError, match=r"'1\.fc1_w'"):
        import_hf_folder(tmp_path / "hf", tmp_path / "store")
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_wrong_size_and_missing_files_are_refused_by_name(tmp_path):
    _saved("opt", tmp_path / "hf")
    store = import_hf_folder(tmp_path / "hf", tmp_path / "store")
    buf = torch.empty(store.spec.layer_bytes(2), dtype=torch.uint8)
    f = store.tensor_file(2, "k_w")
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(WeightStoreError, match=r"'2\.k_w'.*k_w\.bin"):
        store.read_layer_into(2, buf)
    with pytest.raises(WeightStoreError, match=r"'2\.k_w'"):
        store.check()
    f.unlink()
    with pytest.raises(WeightStoreError, match=r"'2\.k_w'.*missing"):
        store.check()
    with pytest.raises(WeightStoreError, match="layer 1"):
        store.read_layer_into(1, buf[:16])


def test_bad_manifests_are_refused_by_field(tmp_path):
    store = make_dummy(_tiny_spec(), tmp_path / "s")
    mpath = store.path / "manifest.json"
    good = json.loads(mpath.read_text())
    for field, value in (("format", "other"), ("version", 1), ("fingerprint", "0" * 16)):
        mpath.write_text(json.dumps({**good, field: value}))
        with pytest.raises(WeightStoreError, match=f"'{field}'"):
            WeightStore(store.path)
    bad = json.loads(json.dumps(good))
    bad["tensors"]["1.q_w"]["shape"] = [1, 2]
    mpath.write_text(json.dumps(bad))
    with pytest.raises(WeightStoreError, match=r"'1\.q_w'"):
        WeightStore(store.path)
    mpath.unlink()
    with pytest.raises(WeightStoreError, match="manifest.json"):
        WeightStore(store.path)


def _tiny_spec():
    from types import SimpleNamespace

    from flexgen_graph.catalog import CATALOG
    from flexgen_graph.spec import spec_from_config

    cfg = dict(CATALOG["HuggingFaceTB/SmolLM2-135M-Instruct"], hidden_size=48, num_hidden_layers=2,
               num_attention_heads=3, num_key_value_heads=1, intermediate_size=96, vocab_size=300)
    return spec_from_config(SimpleNamespace(**cfg), name="tiny-smol")


def test_make_dummy_is_deterministic_and_sized(tmp_path):
    spec = _tiny_spec()
    a, b, c = (make_dummy(spec, tmp_path / name, seed=seed) for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    assert a.spec == spec and a.source == "dummy:seed=3"
    for j in range(spec.num_graph_layers):
        bufs = [torch.zeros(spec.layer_bytes(j), dtype=torch.uint8) for _ in range(3)]
        for s, buf in zip((a, b, c), bufs):
            s.read_layer_into(j, buf)
        assert torch.equal(bufs[0], bufs[1]), f"layer {j} differs for the same seed"
        assert not torch.equal(bufs[0], bufs[2]), f"layer {j} equal for different seeds"
        on_disk = {s.name: a.tensor_file(j, s.name).stat().st_size for s in spec.layer_layout(j)}
        assert on_disk == {s.name: s.nbytes for s in spec.layer_layout(j)}
        assert sum(on_disk.values()) <= spec.layer_bytes(j)
    a.check()


def test_make_dummy_streams_big_tensors_in_chunks(tmp_path, monkeypatch):
    import runtime.weight_store as ws

    monkeypatch.setattr(ws, "DUMMY_CHUNK_ELEMS", 100)  # many row chunks per matrix
    spec = _tiny_spec()
    store = make_dummy(spec, tmp_path / "d")
    store.check()
    buf = torch.zeros(spec.layer_bytes(1), dtype=torch.uint8)
    store.read_layer_into(1, buf)
    w = layer_views(spec, 1, buf)
    assert torch.equal(w["ln1_w"], torch.ones(spec.hidden))
    assert 0.015 < w["q_w"].std().item() < 0.025
    assert 0.015 < w["down_w"][-1].std().item() < 0.025  # the last chunk was written too


def test_make_dummy_half_precision(tmp_path):
    spec = _tiny_spec().with_dtype("bfloat16")
    store = make_dummy(spec, tmp_path / "d")
    assert store.tensor_file(1, "gate_w").stat().st_size == spec.ffn * spec.hidden * 2
    assert hf_state_dict(store)["model.layers.0.mlp.gate_proj.weight"].dtype == torch.bfloat16


@pytest.mark.real_model
def test_gguf_import_of_smollm2_matches_catalog_and_hf(smollm2_store):
    """The GGUF import (shared session fixture) has the catalog's architecture and loads strictly into HF."""
    from transformers import AutoConfig

    store = smollm2_store
    assert store.spec.fingerprint() == catalog_spec("HuggingFaceTB/SmolLM2-135M-Instruct").fingerprint()
    store.check()
    ref = LlamaForCausalLM(AutoConfig.from_pretrained(str(store.hf_dir))).eval()
    ref.load_state_dict(hf_state_dict(store), strict=True)
    assert (store.hf_dir / "tokenizer_config.json").is_file()
