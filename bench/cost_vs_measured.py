"""The cost model's predictions next to measured step times, for a small model under several policies.

    python bench/cost_vs_measured.py                      # SmolLM2-135M (embedded GGUF) on cpu-small
    python bench/cost_vs_measured.py --model facebook/opt-125m --weights dummy:0
    python bench/cost_vs_measured.py --write BENCHMARKS.md

Each policy is forced (placements, flags and block) and compiled for the profile; the engine replays
it once to warm up and once timed. Prefill is one run of the prefill program; a decode step is one
run of the decode program, averaged over every step (the cost model evaluates one step at the
average context, which is also the average over steps of a cost linear in the context).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import cpu_name, usable_cores, write_section  # noqa: E402

from flexgen_graph.app.api import compile_plan  # noqa: E402
from flexgen_graph.app.models import default_cache_dir, open_store  # noqa: E402
from flexgen_graph.catalog import DEFAULT_MODEL, catalog_spec  # noqa: E402
from flexgen_graph.hardware import load_profile  # noqa: E402
from flexgen_graph.ir import TIERS, Workload  # noqa: E402
from flexgen_graph.policy import Placement  # noqa: E402

GPU, CPU, DISK = (Placement.all_on(t) for t in TIERS)
POLICIES = {  # name -> (description, forced policy)
    "all-gpu": ("all in the GPU budget", {"weights": GPU, "cache": GPU, "hidden": GPU}),
    "stream-cpu": ("weights and cache streamed from the CPU", {"weights": CPU, "cache": CPU, "hidden": GPU}),
    "cpu-attention": ("cache on the CPU, CPU attention",
                      {"weights": GPU, "cache": CPU, "hidden": GPU, "cpu_attention": True}),
    "half-disk": ("half the weights on disk", {"weights": Placement(0.5, 0.0, 0.5), "cache": GPU, "hidden": GPU}),
}
SECTION = "## Cost model vs measured"


def measure(plan, store, prompts) -> tuple[float, list[float]]:
    """(prefill seconds, seconds of each decode step) of the second of two generations."""
    from runtime.engine import Engine

    with Engine(plan, store) as eng:
        eng.generate(prompts)  # warm up (page cache, allocator, kernels)
        eng.step_times.clear()  # the engine records (program, wall seconds) of every program run
        eng.generate(prompts)
        times = list(eng.step_times)
    prefill = [s for n, s in times if n == "prefill"]
    return prefill[0], [s for n, s in times if n == "decode"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--weights", default=None, help="weights source (default: the embedded GGUF for SmolLM2, "
                                                     "dummy:0 otherwise)")
    ap.add_argument("--profile", default="cpu-small")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--gpu-batch-size", type=int, default=8)
    ap.add_argument("--num-gpu-batches", type=int, default=2)
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated, from: " + ", ".join(POLICIES))
    ap.add_argument("--write", type=Path, default=None, help="replace the section of this markdown file")
    args = ap.parse_args(argv)

    spec = catalog_spec(args.model)
    source = args.weights or ("default" if args.model == DEFAULT_MODEL else "dummy:0")
    store = open_store(source, spec, default_cache_dir())
    profile = load_profile(args.profile)
    wl = Workload(args.prompt_len, args.gen_len)
    rng = random.Random(0)
    n = args.gpu_batch_size * args.num_gpu_batches
    prompts = [[rng.randrange(3, spec.vocab) for _ in range(args.prompt_len)] for _ in range(n)]

    rows = []
    for key in args.policies.split(","):
        name, fixed = POLICIES[key]
        plan = compile_plan(spec, profile, wl, gpu_batch_size=args.gpu_batch_size,
                            num_gpu_batches=args.num_gpu_batches, fixed=fixed, weights_source=source)
        prefill_s, decode = measure(plan, store, prompts)
        pred = plan.predictions
        row = (name, pred["prefill_s"], prefill_s, pred["decode_step_s"], statistics.fmean(decode), len(decode),
               pred["binding"])
        rows.append(row)
        print(f"{name:<38} prefill predicted {row[1]:8.3f} s measured {row[2]:8.3f} s ({row[2] / row[1]:5.2f}x)   "
              f"decode step predicted {row[3]:7.4f} s measured {row[4]:7.4f} s ({row[4] / row[3]:5.2f}x, "
              f"{row[5]} steps)   binding {row[6]}", flush=True)

    command = "python bench/cost_vs_measured.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = [
        f"Model {spec.name} ({spec.dtype}, weights `{source}`), profile `{args.profile}`, prompt {args.prompt_len}, "
        f"generation {args.gen_len}, block {args.gpu_batch_size} x {args.num_gpu_batches}. Machine: "
        f"{cpu_name()}, {usable_cores()} cores, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.2f} at the end (other jobs share the cores). "
        f"Command: `{command.strip()}`. Date: {datetime.date.today().isoformat()}.",
        "",
        "| policy | prefill predicted (s) | prefill measured (s) | ratio | decode step predicted (s) "
        "| decode step measured (s) | ratio | binding (predicted) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, pp, pm, dp, dm, _, binding in rows:
        table.append(f"| {name} | {pp:.3f} | {pm:.3f} | {pm / pp:.2f} | {dp:.4f} | {dm:.4f} | {dm / dp:.2f} | {binding} |")
    table += ["", "Measured is the second of two generations; a decode step is the mean over the steps; the cost model "
              "evaluates one step at the average context. The machine must be quiet: with two other jobs on its two "
              "cores the same runs measured 2-10x slower (torch's two intra-op threads wait for each other)."]
    text = "\n".join(table)
    print("\n" + text)
    if args.write is not None:
        write_section(args.write, SECTION, text)
    return 0



if __name__ == "__main__":
    sys.exit(main())
