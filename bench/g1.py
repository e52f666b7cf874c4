"""Scenario G1: OPT-13B fp16 dummy weights, 16 GB GPU cap, prompt 512, generation 32.

Compiles a plan with the planner's policy for an H100 profile capped to 16 GB, runs one block
end to end, and prints tokens/s, the plan's prediction and the peak GPU bytes.

    python bench/g1.py                       # on the GPU machine
    python bench/g1.py --model facebook/opt-125m --gen-len 4 --device cpu   # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from flexgen_graph.app.api import compile_plan  # noqa: E402
from flexgen_graph.app.models import open_store  # noqa: E402
from flexgen_graph.catalog import catalog_spec  # noqa: E402
from flexgen_graph.hardware import load_profile  # noqa: E402
from flexgen_graph.ir import Workload  # noqa: E402
from runtime.engine import Engine  # noqa: E402


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="facebook/opt-13b")
    ap.add_argument("--profile", default="h100-pcie5")
    ap.add_argument("--cap-gb", type=float, default=16.0, help="GPU capacity the plan may use (GB)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "flexgen-graph-bench"))
    args = ap.parse_args(argv)
    if args.device == "auto" and not torch.cuda.is_available():
        # the scenario is defined on a GPU; on the CPU it would only measure a 26 GB disk stream
        print("G1 not run: no CUDA device here (pass --device cpu with a small --model for a smoke run)")
        return 0

    spec = catalog_spec(args.model, dtype="float16")
    profile = dataclasses.replace(load_profile(args.profile), gpu_bytes=int(args.cap_gb * 1e9))
    t = time.perf_counter()
    plan = compile_plan(spec, profile, Workload(args.prompt_len, args.gen_len), weights_source="dummy:0")
    print(f"compiled in {time.perf_counter() - t:.1f} s: block {plan.policy.gpu_batch_size} x "
          f"{plan.policy.num_gpu_batches}, weights {plan.policy.weights.as_tuple()}, cache "
          f"{plan.policy.cache.as_tuple()}, cpu attention {plan.policy.cpu_attention}")
    t = time.perf_counter()
    store = open_store("dummy:0", spec, Path(args.cache_dir))
    print(f"weights ready in {time.perf_counter() - t:.1f} s")
    prompts = [[(7 * i + j) % 50000 + 3 for j in range(args.prompt_len)] for i in range(plan.block_size)]
    with tempfile.TemporaryDirectory() as off, Engine(plan, store, off, device=args.device) as engine:
        t = time.perf_counter()
        gens = engine.generate(prompts, [args.gen_len] * len(prompts))
        wall = time.perf_counter() - t
        peak = engine.peak_bytes
    tokens = sum(len(g.token_ids) for g in gens)
    pred = plan.predictions["tokens_per_s"]
    print(f"{tokens} tokens in {wall:.1f} s: {tokens / wall:.1f} tokens/s; predicted {pred:.1f} "
          f"(measured/predicted {tokens / wall / pred:.2f}); peak gpu {peak['gpu'] / 1e9:.2f} GB "
          f"(cap {args.cap_gb} GB), cpu {peak['cpu'] / 1e9:.1f} GB, disk {peak['disk'] / 1e9:.1f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
