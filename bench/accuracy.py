"""Accuracy of group-wise compression on SmolLM2-135M-Instruct: perplexity on a public-domain text
and greedy agreement with the uncompressed model, for none / weights / cache / both.

    python bench/accuracy.py                                   # FlexGen's 4-bit, group 64
    python bench/accuracy.py --bits 4,8 --group-sizes 64,32 --breakdown --write BENCHMARKS.md

Weights: every 2-D weight (q, k, v, o, gate, up, down of each layer and the token embedding, which
SmolLM2 ties to lm_head) is quantized and dequantized once with runtime.quant, grouped along its
input dim (the last dim of [out, in]; the embedding's hidden dim), as FlexGen compresses every
matrix; the 1-D norm weights stay float32. Cache: a DynamicCache subclass fake-quantizes K (after
RoPE) and V along the head dim as they are stored, so attention reads every key and value, the
current token's included, from the compressed cache, as the runtime's store-then-read does.
Everything else runs in float32 through transformers' LlamaForCausalLM. --breakdown adds rows
that compress only the decoder matrices, only the embedding, only K or only V.

Perplexity: windows of --window tokens advancing by --stride; each window scores only the tokens
after the previous window's end (the first window scores all but its first token), so every
token is scored once with at least window - stride tokens of context (bar the first window).
Agreement on the first --prompts chat prompts of examples/sample_prompts.jsonl, --gen greedy
tokens each (left-padded batch, same batch for every row), against the uncompressed model's
tokens R cut after the first EOS: "prefix" = sum over prompts of the common prefix length / sum
of len(R); "token" = sum of positions i < len(R) where the tokens agree / sum of len(R).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from transformers import AutoConfig, AutoTokenizer, DynamicCache, LlamaForCausalLM  # noqa: E402

from flexgen_graph import catalog  # noqa: E402
from flexgen_graph.app import models  # noqa: E402
from runtime.quant import QuantConfig, fake_quantize  # noqa: E402
from runtime.weight_store import hf_state_dict  # noqa: E402

TEXT = ROOT / "bench" / "data" / "pride_and_prejudice_ch1-3.txt"
PROMPTS = ROOT / "examples" / "sample_prompts.jsonl"
SECTION = "## Compression accuracy (SmolLM2-135M)"
GATES_FRAC = {"cache": 0.05, "weights": 0.15, "both": 0.20}  # allowed perplexity increase


class FakeQuantCache(DynamicCache):
    """A DynamicCache that stores dequantize(quantize(k)), dequantize(quantize(v)): k, v: [B, KV, T, D]."""

    def __init__(self, qcfg: QuantConfig, config, keys: bool = True, values: bool = True) -> None:
        super().__init__(config=config)
        self.qcfg, self.quant_keys, self.quant_values = qcfg, keys, values

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k = fake_quantize(key_states, -1, self.qcfg) if self.quant_keys else key_states
        v = fake_quantize(value_states, -1, self.qcfg) if self.quant_values else value_states
        return super().update(k, v, layer_idx, *args, **kwargs)


@dataclass(frozen=True)
class Variant:
    kind: str  # none | weights | cache | both: the gated rows; breakdown rows add a detail
    cfg: QuantConfig | None
    weights: str = ""  # "" | all | decoder | embedding
    cache: str = ""  # "" | kv | k | v

    @property
    def label(self) -> str:
        detail = {"decoder": " (decoder matrices only)", "embedding": " (embedding/lm_head only)",
                  "k": " (K only)", "v": " (V only)"}
        return self.kind + detail.get(self.weights, "") + detail.get(self.cache, "")

    @property
    def gated(self) -> bool:
        return self.cfg is not None and self.cfg.bits == 4 and self.weights in ("", "all") and self.cache in ("", "kv")

    @property
    def weight_key(self) -> tuple:
        return (self.cfg, self.weights) if self.weights else (None, "")


def load_model(store, cfg: QuantConfig | None, which: str) -> tuple[LlamaForCausalLM, dict[str, tuple[float, float]]]:
    """The model with its `which` matrices fake-quantized, and per part (decoder, embedding) the
    fraction of elements quantization changed and the error's rms relative to the weights' rms."""
    config = AutoConfig.from_pretrained(store.path / "hf")
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(hf_state_dict(store), strict=True)
    acc: dict[str, list[float]] = {}  # part -> [changed, numel, err^2, w^2]
    if which:
        with torch.no_grad():
            for name, p in model.named_parameters():  # a tied lm_head is the embedding: seen once
                part = "embedding" if name == "model.embed_tokens.weight" else "decoder"
                if p.dim() == 2 and which in ("all", part):
                    q = fake_quantize(p, -1, cfg)
                    a = acc.setdefault(part, [0.0, 0.0, 0.0, 0.0])
                    a[0] += (q != p).sum().item()
                    a[1] += p.numel()
                    a[2] += (q - p).pow(2).sum().item()
                    a[3] += p.pow(2).sum().item()
                    p.copy_(q)
    return model, {part: (a[0] / a[1], math.sqrt(a[2] / a[3])) for part, a in acc.items()}


def new_cache(model, v: Variant) -> DynamicCache:
    if not v.cache:
        return DynamicCache(config=model.config)
    return FakeQuantCache(v.cfg, model.config, keys=v.cache in ("kv", "k"), values=v.cache in ("kv", "v"))


def cache_kwarg(model) -> str:
    """transformers 5 renamed past_key_values to cache."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, v: Variant, window: int, stride: int) -> float:
    """exp(mean NLL) over ids[1:], ids: [N]."""
    n, nll, count, prev_end = ids.numel(), 0.0, 0, 1
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        chunk = ids[begin:end][None]  # chunk: [1, T]
        logits = model(input_ids=chunk, use_cache=True, **{cache_kwarg(model): new_cache(model, v)}).logits
        logp = torch.log_softmax(logits[0, :-1].float(), -1)  # predicts chunk[1:]
        first = prev_end - begin  # score positions [prev_end, end): targets chunk[first:]
        tgt = chunk[0, first:]
        nll -= logp[first - 1:].gather(-1, tgt[:, None]).sum().item()
        count += tgt.numel()
        prev_end = end
        if end == n:
            break
    assert count == n - 1, f"perplexity: scored {count} tokens of {n - 1}"
    return math.exp(nll / count)


def chat_prompts(tok, count: int) -> list[list[int]]:
    out = []
    for line in PROMPTS.read_text().splitlines()[:count]:
        ids = tok.apply_chat_template(json.loads(line)["messages"], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


@torch.no_grad()
def greedy(model, prompts: list[list[int]], gen: int, v: Variant, eos: set[int],
           pad: int) -> list[list[int]]:
    p_len = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), p_len), pad)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, p_len - len(p):] = torch.tensor(p)
        mask[i, p_len - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=gen, do_sample=False, pad_token_id=pad,
                         **{cache_kwarg(model): new_cache(model, v)})
    rows = []
    for row in out[:, p_len:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[float, float]:
    """(prefix, token) agreement fractions, both weighted by the reference's lengths."""
    total = sum(len(r) for r in ref)
    prefix = token = 0
    for r, g in zip(ref, got):
        same = [i < len(g) and g[i] == t for i, t in enumerate(r)]
        prefix += next((i for i, s in enumerate(same) if not s), len(r))
        token += sum(same)
    return prefix / total, token / total


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        cpu = platform.processor() or "?"
    ram_gib = "?"
    try:
        kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                  if ln.startswith("MemTotal"))
        ram_gib = f"{kb / 2**20:.0f}"
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {ram_gib} GiB RAM, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def write_section(path: Path, body: str) -> None:
    """Replace (or append) this script's section of path, leaving every other section as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{SECTION}\n\n{body.rstrip()}\n"
    pat = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pat.search(text):
        text = pat.sub(lambda _: block + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="4", help="comma-separated widths (4, 8); the gates apply to 4")
    ap.add_argument("--group-sizes", default="64", help="comma-separated; 64 is FlexGen's")
    ap.add_argument("--breakdown", action="store_true", help="add decoder-only, embedding-only, K-only and V-only rows (4-bit)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, help="score only the text's first N tokens (smoke runs)")
    ap.add_argument("--write", type=Path, help="write the table into this markdown file's section")
    ap.add_argument("--check", action="store_true", help="exit 1 when a 4-bit row of the first group size misses its gate")
    args = ap.parse_args(argv)
    widths = [int(b) for b in args.bits.split(",")]
    groups = [int(g) for g in args.group_sizes.split(",")]

    spec = catalog.catalog_spec(catalog.DEFAULT_MODEL)
    store = models.open_store("default", spec, models.default_cache_dir())
    tok = AutoTokenizer.from_pretrained(store.path / "hf")
    ids = torch.tensor(tok(TEXT.read_text())["input_ids"][:args.max_tokens])
    prompts = chat_prompts(tok, args.prompts)
    eos = set(spec.eos_token_ids)
    pad = spec.pad_token_id if spec.pad_token_id is not None else 0

    variants = [Variant("none", None)]
    for bits in widths:
        for g in groups:
            cfg = QuantConfig(bits, g)
            variants += [Variant("weights", cfg, weights="all"), Variant("cache", cfg, cache="kv"),
                         Variant("both", cfg, weights="all", cache="kv")]
            if args.breakdown and bits == 4:
                variants += [Variant("weights", cfg, weights="decoder"), Variant("weights", cfg, weights="embedding"),
                             Variant("cache", cfg, cache="k"), Variant("cache", cfg, cache="v")]
    order = list(variants)  # table order; run order groups rows sharing weights on one loaded model
    variants.sort(key=lambda v: (v.kind != "none", str(v.weight_key)))

    results, ref, base_ppl, failed = {}, None, None, []
    loaded: tuple | None = None
    weight_stats: dict[QuantConfig, dict[str, tuple[float, float]]] = {}
    for v in variants:
        t0 = time.perf_counter()
        if loaded is None or loaded[0] != v.weight_key:
            model = loaded = None  # one model in memory at a time
            model, stats = load_model(store, v.cfg, v.weights)
            loaded = (v.weight_key, model)
            if v.weights == "all":
                weight_stats[v.cfg] = stats
        model = loaded[1]
        ppl = perplexity(model, ids, v, args.window, args.stride)
        toks = greedy(model, prompts, args.gen, v, eos, pad)
        if ref is None:
            ref, base_ppl = toks, ppl
        results[v] = (ppl, *agreement(ref, toks))
        print(f"{v.label} {v.cfg}: ppl {ppl:.3f} ({100 * (ppl / base_ppl - 1):+.2f}%), agreement prefix "
              f"{results[v][1]:.3f} token {results[v][2]:.3f} [{time.perf_counter() - t0:.0f} s]", file=sys.stderr)

    rows = []
    for v in order:
        ppl, pre, tokm = results[v]
        rel = ppl / base_ppl - 1
        gate = GATES_FRAC.get(v.kind) if v.gated else None
        verdict = "" if gate is None else ("pass" if rel <= gate else "FAIL")
        if verdict == "FAIL" and v.cfg.group_size == groups[0]:
            failed.append(f"{v.kind} g{v.cfg.group_size}")
        rows.append(f"| {v.label} | {v.cfg.bits if v.cfg else '-'} | {v.cfg.group_size if v.cfg else '-'} | "
                    f"{ppl:.3f} | {100 * rel:+.2f}% | {'' if gate is None else f'<= +{100 * gate:.0f}% {verdict}'} | "
                    f"{pre:.3f} | {tokm:.3f} |")

    order_cfgs = [v.cfg for v in order]
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    n_ref = sum(len(r) for r in ref)
    body = "\n".join([
        f"- Machine: {machine()}",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Command: `{cmd}`",
        "- Model: SmolLM2-135M-Instruct from the embedded GGUF (decoder matrices Q4_1 in blocks of 32, "
        "embedding Q8_0), dequantized to float32: that is the uncompressed baseline.",
        f"- Text: `{TEXT.relative_to(ROOT)}` ({ids.numel()} tokens), windows of {args.window} advancing by "
        f"{args.stride}. Agreement: first {len(prompts)} prompts of `{PROMPTS.relative_to(ROOT)}`, "
        f"{args.gen} greedy tokens ({n_ref} reference tokens after cutting at EOS).",
        "- Compression: group-wise asymmetric min-max (`runtime/quant.py`); weights: every matrix "
        "(embedding/lm_head included) along its input dim; cache: K and V along the head dim, fake-quantized "
        "as stored (a DynamicCache subclass). Gates are on the relative perplexity increase.",
        "",
        "| compressed | bits | group | perplexity | vs none | gate | agreement (prefix) | agreement (token) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Weight elements that quantization changed (fraction; error rms / weight rms): " + "; ".join(
            f"{c.bits}-bit g{c.group_size}: " + ", ".join(f"{part} {fr:.3f} ({rms:.3f})" for part, (fr, rms) in st.items())
            for c, st in sorted(weight_stats.items(), key=lambda kv: order_cfgs.index(kv[0]))) + ".",
        "The GGUF's decoder matrices are already 4-bit: Q4_1 blocks of 32 along the input dim, each with a "
        "float16 step and minimum, i.e. this very scheme at group 32. A 4-bit group-32 pass lands on those "
        "blocks and reproduces them (none changed), so its weights row measures the embedding alone; group 64 "
        "merges two Q4_1 blocks onto one coarser grid.",
    ])
    print(body)
    if args.write:
        write_section(args.write, body)
    if failed:
        print(f"gates missed at group {groups[0]}: {', '.join(failed)}", file=sys.stderr)
    return 1 if (args.check and failed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
