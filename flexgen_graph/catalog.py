"""Known model sizes by Hugging Face id, so plans compile without weights or network.

Entries are the relevant fields of each model's published config.json.

    >>> from flexgen_graph.catalog import catalog_spec, CATALOG
    >>> catalog_spec("meta-llama/Llama-2-7b-hf").num_params() // 10**8
    67
"""

from __future__ import annotations

from types import SimpleNamespace

from flexgen_graph.errors import UserError
from flexgen_graph.spec import ModelSpec, spec_from_config

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _opt(h: int, layers: int, heads: int) -> dict:
    return dict(model_type="opt", hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                ffn_dim=4 * h, vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=h,
                do_layer_norm_before=True, activation_function="relu", enable_bias=True,
                tie_word_embeddings=True, bos_token_id=2, eos_token_id=2, pad_token_id=1)


def _llama(h: int, layers: int, heads: int, kv: int, ffn: int, vocab: int, theta: float, max_pos: int,
           tied: bool = False, model_type: str = "llama", bos: int = 1, eos: int | list[int] = 2,
           pad: int | None = None, **extra) -> dict:
    return dict(model_type=model_type, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, intermediate_size=ffn, vocab_size=vocab, rope_theta=theta,
                max_position_embeddings=max_pos, rms_norm_eps=1e-5, hidden_act="silu",
                tie_word_embeddings=tied, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, **extra)


CATALOG: dict[str, dict] = {
    "facebook/opt-125m": _opt(768, 12, 12),
    "facebook/opt-1.3b": _opt(2048, 24, 32),
    "facebook/opt-2.7b": _opt(2560, 32, 32),
    "facebook/opt-6.7b": _opt(4096, 32, 32),
    "facebook/opt-13b": _opt(5120, 40, 40),
    "facebook/opt-30b": _opt(7168, 48, 56),
    "facebook/opt-66b": _opt(9216, 64, 72),
    "facebook/opt-175b": _opt(12288, 96, 96),
    "meta-llama/Llama-2-7b-hf": _llama(4096, 32, 32, 32, 11008, 32000, 10000.0, 4096),
    "meta-llama/Llama-2-13b-hf": _llama(5120, 40, 40, 40, 13824, 32000, 10000.0, 4096),
    "meta-llama/Llama-2-70b-hf": _llama(8192, 80, 64, 8, 28672, 32000, 10000.0, 4096),
    "meta-llama/Meta-Llama-3-8B": _llama(4096, 32, 32, 8, 14336, 128256, 500000.0, 8192, bos=128000, eos=128001),
    "meta-llama/Meta-Llama-3-70B": _llama(8192, 80, 64, 8, 28672, 128256, 500000.0, 8192, bos=128000, eos=128001),
    "mistralai/Mistral-7B-v0.1": _llama(4096, 32, 32, 8, 14336, 32000, 10000.0, 32768, model_type="mistral",
                                        sliding_window=4096),
    "Qwen/Qwen2-0.5B": _llama(896, 24, 14, 2, 4864, 151936, 1000000.0, 32768, tied=True, model_type="qwen2",
                              bos=151643, eos=151643, use_sliding_window=False),
    "Qwen/Qwen2-7B": _llama(3584, 28, 28, 4, 18944, 152064, 1000000.0, 32768, model_type="qwen2",
                            bos=151643, eos=151643, use_sliding_window=False),
    "HuggingFaceTB/SmolLM2-135M-Instruct": _llama(576, 30, 9, 3, 1536, 49152, 100000.0, 8192, tied=True,
                                                  bos=1, eos=2, pad=2),
    "HuggingFaceTB/SmolLM2-360M-Instruct": _llama(960, 32, 15, 5, 2560, 49152, 100000.0, 8192, tied=True,
                                                  bos=1, eos=2, pad=2),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": _llama(2048, 24, 32, 32, 8192, 49152, 130000.0, 8192, tied=True,
                                                  bos=1, eos=2, pad=2),
}


class UnknownModelError(UserError):
    pass


def catalog_spec(model_id: str, dtype: str = "float32") -> ModelSpec:
    try:
        cfg = CATALOG[model_id]
    except KeyError:
        close = [k for k in CATALOG if model_id.lower() in k.lower()]
        hint = f" (did you mean {', '.join(close)}?)" if close else f" (known: {', '.join(CATALOG)})"
        raise UnknownModelError(f"unknown model {model_id!r}{hint}") from None
    return spec_from_config(SimpleNamespace(**cfg), name=model_id, dtype=dtype)
