"""Data-parallel throughput: the same job under torchrun with 1 process and with 2, on one machine.

Each configuration runs `torchrun --standalone --nproc-per-node P -m flexgen_graph run` on the same
plan (compiled afresh before each launch) and input (the embedded SmolLM2-135M by default, or --model dummy: a seeded random one of its
shape, no download), --repeats times, alternating. Reported per configuration (medians):
generation throughput = tokens / wall time of the slowest rank's job (what rank 0 prints: plan
replay only), and end to end = tokens / the whole command's wall time (start-up, rendezvous, weight
loading and the merge included). Each rank runs cores // processes torch threads; one more row runs
1 process pinned to one core (taskset), to tell the gain of a second process from that of a second
thread. The merged outputs of all configurations are checked equal, id by id.

    python bench/data_parallel.py --prompts 36 --gen-len 32 --block 8 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexgen_graph.catalog import DEFAULT_MODEL  # noqa: E402

SUMMARY = re.compile(r"(\d+) prompts .*?, (\d+) tokens in ([\d.]+) s: ([\d.]+) tokens/s")


def flexgen(*args: str) -> list[str]:
    return [sys.executable, "-m", "flexgen_graph", *args]


def write_input(path: Path, n: int, dummy: bool) -> None:
    lines = [json.loads(x) for x in (ROOT / "examples/sample_prompts.jsonl").read_text().splitlines()]
    with open(path, "w") as f:
        for i in range(n):
            if dummy:  # dummy weights come without a tokenizer: token ids of 20-49 tokens
                f.write(json.dumps({"id": f"d{i}", "prompt_ids": [3 + (7 * i + j) % 500 for j in range(20 + i % 30)]})
                        + "\n")
            else:  # beyond the sample file's 36 lines, its prompts again under new ids
                line = lines[i % len(lines)]
                f.write(json.dumps({**line, "id": f"{line['id']}-{i // len(lines)}"}) + "\n")


def compile_plan(plan: Path, args) -> None:
    subprocess.run(flexgen("compile", "--model", DEFAULT_MODEL, "--profile", "cpu-small", "--prompt-len", "64",
                           "--gen-len", str(args.gen_len), "--gpu-batch-size", str(args.block),
                           "--num-gpu-batches", "1", "--dtype", "float32", "-o", str(plan)),
                   cwd=ROOT, check=True, capture_output=True)


def launch(cmd: list[str]) -> tuple[re.Match, subprocess.CompletedProcess, float]:
    """Run a `flexgen-graph run` command line: (its summary line, the process, the whole command's seconds)."""
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    m = SUMMARY.search(done.stdout)
    if m is None:
        sys.exit(f"no summary line in the output of {' '.join(cmd)}:\n{done.stdout}")
    return m, done, wall


def run(procs: int, one_core: bool, plan: Path, inp: Path, out: Path,
        weights: list[str]) -> tuple[float, float, int, str]:
    """(generation tokens/s, end-to-end tokens/s, tokens, rank lines) of one launch."""
    out.unlink(missing_ok=True)
    cmd = (["taskset", "-c", str(min(os.sched_getaffinity(0)))] if one_core else []) + [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), "-m",
           "flexgen_graph", "run", "--plan", str(plan), "--input", str(inp), "--output", str(out), *weights]
    m, done, wall = launch(cmd)
    tokens = int(m.group(2))
    ranks = "; ".join(re.findall(r"rank \d+/\d+: \d+ prompts, \d+ tokens in [\d.]+ s", done.stderr))
    return float(m.group(4)), tokens / wall, tokens, ranks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["default", "dummy"], default="default",
                    help=f"default: {DEFAULT_MODEL} from the embedded GGUF; dummy: random weights of its shape")
    ap.add_argument("--prompts", type=int, default=36)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--block", type=int, default=8, help="sequences per block (one gpu batch)")
    ap.add_argument("--procs", default="1,2", help="process counts to compare")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    cores = len(os.sched_getaffinity(0))
    weights = ["--weights", "dummy"] if args.model == "dummy" else []
    configs = [(int(x), False) for x in args.procs.split(",")]
    configs.insert(1, (configs[0][0], True))  # the first process count again, on one core
    with tempfile.TemporaryDirectory(prefix="bench-dp-") as tmp:
        d = Path(tmp)
        plan, inp = d / "plan.fgplan", d / "in.jsonl"
        write_input(inp, args.prompts, args.model == "dummy")
        compile_plan(plan, args)
        # warm-up: imports the weights into the cache once, outside the timings
        warm = d / "warm.jsonl"
        write_input(warm, 1, args.model == "dummy")
        subprocess.run(flexgen("run", "--plan", str(plan), "--input", str(warm), "--output", str(d / "w.out"),
                               *weights), cwd=ROOT, check=True, capture_output=True)
        results: dict[tuple[int, bool], list[tuple[float, float]]] = {c: [] for c in configs}
        outputs, ranks = {}, {}
        load = [os.getloadavg()[0]]
        for rep in range(args.repeats):
            for c in configs:
                out = d / f"out-{c[0]}-{c[1]}.jsonl"
                compile_plan(plan, args)  # afresh: a plan compiled by other code may not load any more
                gen, e2e, tokens, ranks[c] = run(*c, plan, inp, out, weights)
                results[c].append((gen, e2e))
                print(f"repeat {rep + 1}, {label(c)}: {gen:.1f} tokens/s generating, {e2e:.1f} end to end "
                      f"({tokens} tokens; {ranks[c]}; load average {os.getloadavg()[0]:.1f})", file=sys.stderr)
                load.append(os.getloadavg()[0])
                recs = [json.loads(x) for x in out.read_text().splitlines()]
                if any("error" in r for r in recs):
                    sys.exit(f"error records in {out}: {[r for r in recs if 'error' in r][:3]}")
                outputs[c] = {r["id"]: r["token_ids"] for r in recs}
        for c in configs[1:]:
            if outputs[c] != outputs[configs[0]]:
                sys.exit(f"the output of {label(c)} differs from that of {label(configs[0])}")
    base = configs[0]
    g0 = statistics.median(g for g, _ in results[base])
    e0 = statistics.median(e for _, e in results[base])
    name = DEFAULT_MODEL if args.model == "default" else f"{DEFAULT_MODEL} shape, dummy weights"
    print(f"{name}, float32, {args.prompts} prompts, {args.gen_len} new tokens at most, blocks of {args.block}, "
          f"profile cpu-small; {cores} cores; medians of {args.repeats}; 1-minute load average "
          f"{min(load):.1f}-{max(load):.1f} during the runs")
    print(f"| processes | torch threads each | generation tokens/s | vs {label(base)} | end-to-end tokens/s | "
          f"vs {label(base)} |")
    print("|---|---|---|---|---|---|")
    for c in configs:
        g = statistics.median(x for x, _ in results[c])
        e = statistics.median(x for _, x in results[c])
        print(f"| {label(c)} | {1 if c[1] else max(1, cores // c[0])} | {g:.1f} | {g / g0:.2f}x | {e:.1f} | "
              f"{e / e0:.2f}x |")
    print("rank split of the last repeat: " + " / ".join(f"{label(c)}: {ranks[c]}" for c in configs))
    return 0


def label(config: tuple[int, bool]) -> str:
    procs, one_core = config
    return f"{procs} on one core" if one_core else str(procs)


if __name__ == "__main__":
    sys.exit(main())
