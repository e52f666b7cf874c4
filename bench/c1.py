"""Scenario C1 (reduced): OPT-1.3B with at most 1 GiB of weights in RAM vs transformers with all in RAM.

Our engine keeps every weight on the disk tier (only its two weight slots, 0.86 GB in float32, are in
RAM) and the KV cache in the "GPU" budget of host memory; transformers' `generate` holds the whole
model in RAM. Both in this process on the same seeded dummy weights, greedy, EOS ignored. Cold: the
weight files' pages are evicted after every read (our engine only: transformers reads nothing).

    python bench/c1.py --prompts 32 --prompt-len 128 --gen-len 32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from flexgen_graph.api import compile_plan  # noqa: E402
from flexgen_graph.catalog import catalog_spec  # noqa: E402
from flexgen_graph.ir import Workload  # noqa: E402
from flexgen_graph.models import default_cache_dir, open_store  # noqa: E402
from planner.hardware import load_profile  # noqa: E402
from planner.policy import Placement  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.weight_store import hf_state_dict  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--profile", default="auto")
    ap.add_argument("--hf-batch", type=int, default=32)
    args = ap.parse_args()

    from flexgen_graph.cli import _profile

    spec = catalog_spec("facebook/opt-1.3b")
    store = open_store("dummy:0", spec, default_cache_dir())
    prompts = [[(97 * i + 13 * j) % 50000 + 3 for j in range(args.prompt_len)] for i in range(args.prompts)]
    plan = compile_plan(spec, _profile(args.profile), Workload(args.prompt_len, args.gen_len),
                        max_block_size=args.prompts,
                        fixed={"weights": Placement(0, 0, 1), "cache": Placement(1, 0, 0),
                               "hidden": Placement(1, 0, 0)})
    slots = sum(b.nbytes for b in plan.programs.buffers if b.role.value == "weight_slot")
    print(f"plan: block {plan.policy.gpu_batch_size} x {plan.policy.num_gpu_batches}, weights on disk, "
          f"{slots / 2**30:.2f} GiB of weight slots in RAM; predicted {plan.predictions['tokens_per_s']:.1f} tokens/s")
    rows = []
    for cold in (False, True):
        with tempfile.TemporaryDirectory() as off, Engine(plan, store, off, cold_weights=cold) as engine:
            t = time.perf_counter()
            n = 0
            for s in range(0, len(prompts), plan.block_size):
                gens = engine.generate(prompts[s:s + plan.block_size], ignore_eos=True)
                n += sum(len(g.token_ids) for g in gens)
            wall = time.perf_counter() - t
        rows.append((f"flexgen-graph, weights on disk ({'cold' if cold else 'warm'})", n / wall))
        print(rows[-1])

    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192, vocab_size=50272,
                    max_position_embeddings=2048, word_embed_proj_dim=2048, pad_token_id=1, bos_token_id=2,
                    eos_token_id=2)
    model = OPTForCausalLM(cfg).eval()
    model.load_state_dict(hf_state_dict(store), strict=True)
    t = time.perf_counter()
    n = 0
    with torch.no_grad():
        for s in range(0, len(prompts), args.hf_batch):
            ids = torch.tensor(prompts[s:s + args.hf_batch])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.gen_len,
                                 min_new_tokens=args.gen_len, do_sample=False, pad_token_id=1)
            n += (out.shape[1] - args.prompt_len) * len(ids)
    rows.append((f"transformers, all in RAM, batch {args.hf_batch}", n / (time.perf_counter() - t)))
    print(rows[-1])
    base = rows[-1][1]
    print(f"\nOPT-1.3B float32, {args.prompts} prompts x {args.prompt_len} tokens, {args.gen_len} new tokens")
    print("| system | tokens/s | vs transformers |")
    print("|---|---|---|")
    for name, tps in rows:
        print(f"| {name} | {tps:.2f} | {tps / base:.2f}x |")


if __name__ == "__main__":
    main()
