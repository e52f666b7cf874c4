"""What overlapping disk reads with compute buys on the CPU backend.

Runs one block with the weights on the disk tier, alternating the normal engine (one worker
thread per stream: layer j+1 is read while layer j computes) with a serialized one (every op
inline, in program order), and prints the median prefill and decode-step times of each.

    python bench/overlap.py --model facebook/opt-1.3b --gpu-batch-size 16 --cold
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexgen_graph.app.api import compile_plan  # noqa: E402
from flexgen_graph.app.models import default_cache_dir, open_store  # noqa: E402
from flexgen_graph.catalog import catalog_spec  # noqa: E402
from flexgen_graph.hardware import load_profile  # noqa: E402
from flexgen_graph.ir import Workload  # noqa: E402
from flexgen_graph.policy import Placement  # noqa: E402
from runtime.engine import Engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="facebook/opt-1.3b")
    ap.add_argument("--gpu-batch-size", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cold", action="store_true", help="evict weight files from the page cache after each read")
    args = ap.parse_args()

    spec = catalog_spec(args.model)
    store = open_store("dummy:0", spec, default_cache_dir())
    plan = compile_plan(spec, load_profile("cpu-small"), Workload(args.prompt_len, args.gen_len),
                        gpu_batch_size=args.gpu_batch_size, num_gpu_batches=1,
                        fixed={"weights": Placement(0, 0, 1), "cache": Placement(1, 0, 0),
                               "hidden": Placement(1, 0, 0)})
    prompts = [[5 + i] * args.prompt_len for i in range(args.gpu_batch_size)]
    times: dict[bool, dict[str, list[float]]] = {True: {"prefill": [], "decode": []},
                                                 False: {"prefill": [], "decode": []}}
    for rep in range(args.repeats):
        for overlap in (True, False):
            with tempfile.TemporaryDirectory() as off, \
                    Engine(plan, store, off, overlap=overlap, cold_weights=args.cold) as engine:
                engine.generate(prompts)
                for name, secs in engine.step_times:
                    times[overlap][name].append(secs)
    print(f"{args.model} {spec.dtype}, weights on disk ({'cold' if args.cold else 'page cache'}), "
          f"batch {args.gpu_batch_size}, prompt {args.prompt_len}, {args.gen_len} tokens, {args.repeats} repeats")
    print("| engine | prefill s | decode step s |")
    print("|---|---|---|")
    for overlap in (True, False):
        t = times[overlap]
        print(f"| {'overlapped streams' if overlap else 'serialized'} | {statistics.median(t['prefill']):.3f} | "
              f"{statistics.median(t['decode']):.3f} |")
    ratio = statistics.median(times[False]["decode"]) / statistics.median(times[True]["decode"])
    print(f"serialized / overlapped decode step: {ratio:.2f}x")


if __name__ == "__main__":
    main()
