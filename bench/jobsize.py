"""A small job on a large precompiled plan: 3 prompts on an OPT-125m-shaped plan (dummy weights) compiled for
blocks of 512 sequences, against a plan compiled for those 3 prompts. A block that is not full runs only
its filled gpu batches, at their filled rows, so the large plan should cost at most about 2x (target).

    python bench/jobsize.py                       # medians of 3 runs each, after a warm-up
    python bench/jobsize.py --block 64x8 --prompts 5

Both plans run the same prompts to full length (EOS ignored) and must give the same tokens; each line
also shows planner.predict's figure for the work run. Times are wall seconds of Engine.generate, the two
plans' runs alternating (so a change of load hits both), and the process's CPU seconds beside them
(steadier than the wall on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from flexgen_graph.app.api import compile_plan  # noqa: E402
from flexgen_graph.catalog import catalog_spec  # noqa: E402
from flexgen_graph.hardware import load_profile  # noqa: E402
from flexgen_graph.ir import Workload  # noqa: E402
from planner.predict import BlockRun, predict_plan  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.weight_store import make_dummy  # noqa: E402


def timed(plans: list, store, prompts: list[list[int]], repeats: int) -> list[tuple[float, float, list]]:
    """Per plan: median wall and CPU seconds of one generate over the prompts (after a warm-up, the plans
    taking turns), and the tokens."""
    with tempfile.TemporaryDirectory() as off:
        engines = [Engine(p, store, Path(off) / str(i)) for i, p in enumerate(plans)]
        try:
            for e in engines:
                e.generate(prompts, ignore_eos=True)  # warm-up: first touches of buffers and kernels
            wall: list[list[float]] = [[] for _ in plans]
            cpu: list[list[float]] = [[] for _ in plans]
            tokens: list = [None] * len(plans)
            for _ in range(repeats):
                for i, e in enumerate(engines):
                    t, c = time.perf_counter(), time.process_time()
                    gens = e.generate(prompts, ignore_eos=True)
                    wall[i].append(time.perf_counter() - t)
                    cpu[i].append(time.process_time() - c)
                    tokens[i] = [list(g.token_ids) for g in gens]
        finally:
            for e in engines:
                e.close()
    return [(statistics.median(w), statistics.median(c), t) for w, c, t in zip(wall, cpu, tokens)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="facebook/opt-125m")
    ap.add_argument("--profile", default="cpu-small")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--block", default="512", help="the large plan's block: a size the planner shapes (512), "
                                                    "or gpu batch size x gpu batches (64x8)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    spec, profile = catalog_spec(args.model), load_profile(args.profile)
    wl = Workload(args.prompt_len, args.gen_len)
    if "x" in args.block:
        b, n = (int(x) for x in args.block.split("x"))
        large = compile_plan(spec, profile, wl, gpu_batch_size=b, num_gpu_batches=n)
    else:
        large = compile_plan(spec, profile, wl, max_block_size=int(args.block))
    small = compile_plan(spec, profile, wl, job_prompts=args.prompts)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, spec.vocab, (max(1, args.prompt_len - 3 * i),), generator=g).tolist()
               for i in range(args.prompts)]
    with tempfile.TemporaryDirectory() as d:
        store = make_dummy(spec, Path(d) / "store")
        (w_big, c_big, tok_big), (w_sm, c_sm, tok_sm) = timed([large, small], store, prompts, args.repeats)
    assert tok_big == tok_sm, "the two plans generated different tokens"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{spec.name} (dummy weights, {spec.dtype}) on {profile.name}, {args.prompts} prompts, prompt "
          f"{args.prompt_len} / gen {args.gen_len}, medians of {args.repeats}; load average {load:.2f} "
          f"on {os.cpu_count()} cores")
    for label, plan, wall, cpu in (("precompiled", large, w_big, c_big), ("for the job", small, w_sm, c_sm)):
        pol = plan.policy
        pred = predict_plan(plan, [BlockRun(len(prompts), args.gen_len - 1)]).seconds
        print(f"  {label:<12} block {pol.gpu_batch_size} x {pol.num_gpu_batches}: {wall:.2f} s wall, {cpu:.2f} s "
              f"CPU (predicted {pred:.2f} s for this work)")
    print(f"ratio {w_big / w_sm:.2f} wall, {c_big / c_sm:.2f} CPU (target <= 2); the same "
          f"{sum(map(len, tok_big))} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
