"""Scenario C2: the embedded SmolLM2-135M (float32) at batch 1 / 16 / 64 against transformers' generate.

Both systems run in this process on the same weights and prompts (the sample prompts, chat
templated and left-padded to a common length), alternating, several repetitions; each generates
exactly --gen-len tokens per sequence (EOS ignored). Throughput = generated tokens / wall time of
the whole generation (prefill + decode). Prints a markdown table of medians and ratios, and the
plan's predicted tokens/s.

    python bench/c2.py --profile auto --batches 1,16,64 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from flexgen_graph.app.api import compile_plan  # noqa: E402
from flexgen_graph.app.cli import _profile  # noqa: E402
from flexgen_graph.app.jobs import load_tokenizer  # noqa: E402
from flexgen_graph.app.models import default_cache_dir, open_store  # noqa: E402
from flexgen_graph.catalog import DEFAULT_MODEL, catalog_spec  # noqa: E402
from flexgen_graph.ir import Workload  # noqa: E402
from planner.predict import BlockRun, predict_plan  # noqa: E402
from runtime.engine import Engine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def prompts_for(tok, n: int) -> list[list[int]]:
    lines = [json.loads(x) for x in (ROOT / "examples/sample_prompts.jsonl").read_text().splitlines()]
    out = []
    for i in range(n):
        ids = tok.apply_chat_template(lines[i % len(lines)]["messages"], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def hf_model(store):
    from transformers import AutoConfig, LlamaForCausalLM

    from runtime.weight_store import hf_state_dict

    model = LlamaForCausalLM(AutoConfig.from_pretrained(store.path / "hf")).eval()
    model.load_state_dict(hf_state_dict(store), strict=True)
    return model


def run_hf(model, prompts, p_len: int, gen: int) -> float:
    ids = torch.full((len(prompts), p_len), 2)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, p_len - len(p):] = torch.tensor(p)
        mask[i, p_len - len(p):] = 1
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=gen, min_new_tokens=gen,
                             do_sample=False, pad_token_id=2)
    wall = time.perf_counter() - t
    assert out.shape[1] - p_len == gen
    return len(prompts) * gen / wall


def run_ours(engine, prompts, gen: int) -> float:
    t = time.perf_counter()
    gens = engine.generate(prompts, [gen] * len(prompts), ignore_eos=True)
    wall = time.perf_counter() - t
    assert all(len(g.token_ids) == gen for g in gens)
    return len(prompts) * gen / wall


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="auto")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--store", type=Path, default=None,
                    help="an imported weight store folder to use (default: the embedded GGUF's, imported once)")
    args = ap.parse_args(argv)

    spec = catalog_spec(DEFAULT_MODEL)
    t = time.perf_counter()
    if args.store is not None:
        from runtime.weight_store import WeightStore

        store = WeightStore(args.store)
    else:
        store = open_store("default", spec, default_cache_dir())
    print(f"weight store ready in {time.perf_counter() - t:.1f} s (the GGUF is imported once, then reused)")
    tok = load_tokenizer(store.path)
    model = hf_model(store)
    profile = _profile(args.profile)
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = prompts_for(tok, b)
        p_len = max(len(p) for p in prompts)
        plan = compile_plan(spec, profile, Workload(p_len, args.gen_len), gpu_batch_size=b, num_gpu_batches=1)
        ours, theirs = [], []
        with tempfile.TemporaryDirectory() as off, Engine(plan, store, off) as engine:
            run_ours(engine, prompts[:1], 2)  # warm-up, both systems
            run_hf(model, prompts[:1], p_len, 2)
            for _ in range(args.repeats):
                ours.append(run_ours(engine, prompts, args.gen_len))
                theirs.append(run_hf(model, prompts, p_len, args.gen_len))
        o, h = statistics.median(ours), statistics.median(theirs)
        pred = predict_plan(plan, [BlockRun(len(prompts), args.gen_len - 1)]).tokens_per_s  # the work run
        rows.append((b, p_len, o, h, o / h, pred, o / pred))
        print(f"batch {b}: ours {o:.1f} tokens/s, transformers {h:.1f} ({o / h:.2f}x), predicted {pred:.1f}")
    print(f"\nSmolLM2-135M float32, prompt ~{rows[0][1]}-{rows[-1][1]} tokens, {args.gen_len} new tokens, "
          f"medians of {args.repeats}; profile {profile.name}")
    print("| batch | flexgen-graph tokens/s | transformers tokens/s | ratio | predicted tokens/s | measured / predicted |")
    print("|---|---|---|---|---|---|")
    for b, _, o, h, r, pred, mp in rows:
        print(f"| {b} | {o:.1f} | {h:.1f} | {r:.2f}x | {pred:.1f} | {mp:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
