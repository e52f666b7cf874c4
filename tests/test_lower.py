"""Lowering: exact node counts, byte sums read back from the spec, well-formed graphs."""

from types import SimpleNamespace

import networkx as nx
import pytest

from flexgen_graph.catalog import catalog_spec
from flexgen_graph.ir import Block, NodeKey, NodeKind, Phase, Workload
from flexgen_graph.lower import lower, nodes_of
from flexgen_graph.spec import UnsupportedModelError, spec_from_config


def tiny_llama(**kw):
    cfg = dict(model_type="llama", hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=96, vocab_size=500, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
               hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(kw)
    return spec_from_config(SimpleNamespace(**cfg), name="tiny-llama")


@pytest.mark.parametrize("layers,nb", [(3, 1), (3, 2), (5, 3)])
def test_node_counts(layers, nb):
    spec = tiny_llama(num_hidden_layers=layers)
    g = lower(spec, Workload(8, 4), Block(2, nb))
    n_graph_layers = layers + 2
    per_phase = {
        NodeKind.LOAD_WEIGHT: n_graph_layers,
        NodeKind.COMPUTE: n_graph_layers * nb,
        NodeKind.LOAD_HIDDEN: (n_graph_layers - 1) * nb,
        NodeKind.STORE_HIDDEN: (n_graph_layers - 1) * nb,
        NodeKind.STORE_CACHE: layers * nb,
    }
    for phase in Phase:
        for kind, count in per_phase.items():
            assert len(nodes_of(g, phase, kind)) == count, (phase, kind)
    assert len(nodes_of(g, Phase.PREFILL, NodeKind.LOAD_CACHE)) == 0
    assert len(nodes_of(g, Phase.DECODE, NodeKind.LOAD_CACHE)) == layers * nb
    assert nx.is_directed_acyclic_graph(g)


def test_weight_bytes_sum_to_the_model():
    spec = catalog_spec("facebook/opt-125m")
    g = lower(spec, Workload(32, 8), Block(4, 2))
    total = sum(n.bytes for n in nodes_of(g, Phase.PREFILL, NodeKind.LOAD_WEIGHT))
    assert total == spec.weight_bytes()
    # every parameter counted: fp32 bytes >= 4 * params (alignment only adds)
    assert 4 * spec.num_params() <= total < 4 * spec.num_params() + 4 * spec.vocab * spec.hidden + 64 * 300


def test_cache_bytes_grow_with_context():
    spec = tiny_llama()
    g = lower(spec, Workload(8, 4), Block(2, 1))
    lc = g.nodes[NodeKey(Phase.DECODE, NodeKind.LOAD_CACHE, 1, 0)]["node"]
    per_token = 2 * spec.num_kv_heads * spec.head_dim * 4 * 2  # k+v, fp32, 2 sequences
    assert lc.bytes_at(10) == 9 * per_token  # the 9 earlier tokens cross; the new one is computed
    sc = g.nodes[NodeKey(Phase.PREFILL, NodeKind.STORE_CACHE, 1, 0)]["node"]
    assert sc.bytes == 8 * per_token


def test_gqa_and_swiglu_show_in_flops():
    gqa = tiny_llama(num_key_value_heads=1)
    mha = tiny_llama(num_key_value_heads=4)
    f = lambda s: lower(s, Workload(8, 4), Block(1, 1)).nodes[NodeKey(Phase.DECODE, NodeKind.COMPUTE, 1, 0)]["node"]
    assert f(gqa).flops < f(mha).flops
    h, ffn = 64, 96
    # decode dense flops = 2 * (qkv + o + 3 SwiGLU matrices) for one token
    assert f(mha).flops == 2 * (h * (h + 2 * h) + h * h + 3 * h * ffn)


def test_dependencies():
    spec = tiny_llama()
    g = lower(spec, Workload(8, 4), Block(2, 2))
    c = NodeKey(Phase.DECODE, NodeKind.COMPUTE, 2, 1)
    preds = set(g.predecessors(c))
    assert NodeKey(Phase.DECODE, NodeKind.LOAD_WEIGHT, 2, -1) in preds
    assert NodeKey(Phase.DECODE, NodeKind.LOAD_CACHE, 2, 1) in preds
    assert NodeKey(Phase.DECODE, NodeKind.LOAD_HIDDEN, 2, 1) in preds
    # decode reads the cache prefill stored
    assert g.has_edge(NodeKey(Phase.PREFILL, NodeKind.STORE_CACHE, 2, 1), NodeKey(Phase.DECODE, NodeKind.LOAD_CACHE, 2, 1))


def test_specs_of_the_families():
    qwen = tiny_llama(model_type="qwen2", use_sliding_window=False)
    assert qwen.qkv_bias and not qwen.o_bias
    assert {"q_b", "k_b", "v_b"} <= {t.name for t in qwen.layer_tensors(1)}
    opt = catalog_spec("facebook/opt-13b")
    assert opt.family == "opt" and opt.norm == "layernorm" and opt.positions == "learned"
    assert round(opt.num_params() / 1e9, 1) == 12.9
    assert round(catalog_spec("meta-llama/Llama-2-7b-hf").num_params() / 1e9, 2) == 6.74
    assert round(catalog_spec("meta-llama/Meta-Llama-3-8B").num_params() / 1e9, 2) == 8.03
    assert catalog_spec("HuggingFaceTB/SmolLM2-135M-Instruct").num_kv_heads == 3


def test_unsupported_configs_are_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        spec_from_config(SimpleNamespace(model_type="gpt2"))
    with pytest.raises(UnsupportedModelError, match="rope type 'llama3'"):
        tiny_llama(rope_scaling={"rope_type": "llama3", "factor": 8.0})
