"""How steady this machine's compute is, and what a core fewer costs: the figures behind the profile's
typical (median) timings and behind the pipeline's stage pricing (BENCHMARKS.md, "Plan fidelity").

    python bench/machine_noise.py [--seconds 40]

- jitter: a SmolLM2-sized matmul pair (x[256, 576] @ [576, 1536] @ [1536, 576]), timed every 0.2 s for
  --seconds: best, p10, median, p90, worst ms. The profile keeps medians because a run takes the typical call.
- pairs: SmolLM2's decoder op as the engine calls it, against rows, alone with every core, then with the cores
  split between two processes, the other running the same op beside it (runtime.profiler.paired_curves, what
  `profile --model` measures for two pipeline stages sharing the machine): paired time over alone's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def median_s(fn, n: int = 7) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def jitter(seconds: float) -> list[float]:
    """ms of one matmul pair, sampled every 0.2 s for `seconds` (20 calls a sample, averaged)."""
    x, w1, w2 = torch.randn(256, 576), torch.randn(576, 1536), torch.randn(1536, 576)
    out, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for _ in range(20):
            (x @ w1) @ w2
        out.append((time.perf_counter() - t) / 20 * 1e3)
        time.sleep(0.2)
    return sorted(out)


def paired_over_alone() -> list[tuple[int, float, float]]:
    """(rows, ms alone with every core, ms with the cores split between two processes) for SmolLM2's decoder op,
    both curves as the profile measures them (runtime.profiler)."""
    from flexgen_graph.catalog import DEFAULT_MODEL, catalog_spec
    from runtime import profiler

    spec, cpu = catalog_spec(DEFAULT_MODEL), torch.device("cpu")
    _, decoder, _ = profiler._engine_ops(spec, [], profiler._copies(spec, 1, cpu), [], cpu)
    alone = profiler._grow(decoder)
    paired = profiler.paired_curves(spec)["decoder"]
    return [(int(r), alone.at(r) * 1e3, paired.at(r) * 1e3) for r in (1, 4, 16, 64, 256)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=40.0)
    args = ap.parse_args()
    cores = torch.get_num_threads()
    print(f"torch {torch.__version__}, {cores} threads, load average {os.getloadavg()[0]:.2f}")
    j = jitter(args.seconds)
    pick = {"best": j[0], "p10": j[len(j) // 10], "median": statistics.median(j), "p90": j[9 * len(j) // 10],
            "worst": j[-1]}
    print(f"jitter ({len(j)} samples over {args.seconds:.0f} s), ms: "
          + ", ".join(f"{k} {v:.2f}" for k, v in pick.items()))
    print("| rows | decoder op alone, every core, ms | one of two processes at once, ms | paired / alone |")
    print("|---|---|---|---|")
    for rows, alone, each in paired_over_alone():
        print(f"| {rows} | {alone:.2f} | {each:.2f} | {each / alone:.2f} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
