"""Pipeline throughput: the same job as one process and as an S-stage pipeline (torchrun, one process per stage).

Both plans are compiled with the same block (--gpu-batch-size x --num-gpu-batches) and profile; the
single-process plan keeps the weights on the GPU, as the stages do. Each configuration runs
--repeats times, alternating; reported: generation tokens/s (what process 0 prints: plan replay only,
medians), the plan's prediction, and the pipeline's ratio to the single process. The outputs are
checked equal, id by id. On a machine with S GPUs, pass a GPU profile (e.g. --profile auto) and the
stages run on cuda:0..S-1 over nccl; without GPUs they share the CPU cores over gloo, each process
with cores / S torch threads (so the figure there tells what the hand-offs cost, not a speed-up).

    python bench/pipeline.py --stages 2 --prompts 32 --gen-len 16 --gpu-batch-size 4 --num-gpu-batches 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.data_parallel import flexgen, launch, write_input  # noqa: E402
from flexgen_graph.catalog import DEFAULT_MODEL  # noqa: E402


def compile_plan(path: Path, args, stages: int) -> float:
    """Compiles; returns the predicted tokens/s."""
    extra = ["--stages", str(stages)] if stages > 1 else ["--weights-frac", "1,0,0"]
    done = subprocess.run(flexgen("compile", "--model", DEFAULT_MODEL, "--profile", args.profile, "--prompt-len", "64",
                                  "--gen-len", str(args.gen_len), "--gpu-batch-size", str(args.gpu_batch_size),
                                  "--num-gpu-batches", str(args.num_gpu_batches), "--dtype", args.dtype, *extra,
                                  "-o", str(path)), cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"compile failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.split("predicted ")[-1].split(" tokens/s")[0])


def run(stages: int, plan: Path, inp: Path, out: Path, weights: list[str]) -> tuple[float, int, float]:
    """(generation tokens/s, tokens, whole-command seconds) of one launch."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(stages)] \
        if stages > 1 else [sys.executable]
    cmd += ["-m", "flexgen_graph", "run", "--plan", str(plan), "--input", str(inp), "--output", str(out), *weights]
    m, _, wall = launch(cmd)
    return float(m.group(4)), int(m.group(2)), wall


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["default", "dummy"], default="default",
                    help=f"default: {DEFAULT_MODEL} from the embedded GGUF; dummy: random weights of its shape")
    ap.add_argument("--profile", default="cpu-small", help="hardware profile both plans are compiled for")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--gpu-batch-size", type=int, default=4)
    ap.add_argument("--num-gpu-batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    weights = ["--weights", "dummy"] if args.model == "dummy" else []
    configs = (1, args.stages)
    with tempfile.TemporaryDirectory(prefix="bench-pp-") as tmp:
        d = Path(tmp)
        inp = d / "in.jsonl"
        write_input(inp, args.prompts, args.model == "dummy")
        plans = {s: d / f"plan-{s}.fgplan" for s in configs}
        predicted = {s: compile_plan(plans[s], args, s) for s in configs}
        warm = d / "warm.jsonl"  # imports the weights into the cache once, outside the timings
        write_input(warm, 1, args.model == "dummy")
        subprocess.run(flexgen("run", "--plan", str(plans[1]), "--input", str(warm), "--output", str(d / "w.out"),
                               *weights), cwd=ROOT, check=True, capture_output=True)
        results: dict[int, list[float]] = {s: [] for s in configs}
        outputs = {}
        for rep in range(args.repeats):
            for s in configs:
                out = d / f"out-{s}.jsonl"
                gen, tokens, wall = run(s, plans[s], inp, out, weights)
                results[s].append(gen)
                print(f"repeat {rep + 1}, {s} process(es): {gen:.1f} tokens/s generating ({tokens} tokens, "
                      f"{wall:.1f} s whole command; load average {os.getloadavg()[0]:.1f})", file=sys.stderr)
                recs = [json.loads(x) for x in out.read_text().splitlines()]
                if any("error" in r for r in recs):
                    sys.exit(f"error records in {out}: {[r for r in recs if 'error' in r][:3]}")
                outputs[s] = {r["id"]: r["token_ids"] for r in recs}
        if outputs[args.stages] != outputs[1]:
            sys.exit("the pipeline's output differs from the single process's")
    base = statistics.median(results[1])
    print(f"{DEFAULT_MODEL}{' shape, dummy weights' if weights else ''}, {args.dtype}, {args.prompts} prompts, "
          f"{args.gen_len} new tokens at most, blocks of {args.gpu_batch_size} x {args.num_gpu_batches}, profile "
          f"{args.profile}; {len(os.sched_getaffinity(0))} cores; medians of {args.repeats}; outputs identical")
    print("| processes | generation tokens/s | vs 1 process | predicted tokens/s | measured / predicted |")
    print("|---|---|---|---|---|")
    for s in configs:
        g = statistics.median(results[s])
        print(f"| {s}{' (pipeline)' if s > 1 else ''} | {g:.1f} | {g / base:.2f}x | {predicted[s]:.1f} | "
              f"{g / predicted[s]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
