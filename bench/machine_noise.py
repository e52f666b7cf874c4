"""How steady this machine's compute is, and what a core fewer costs: the figures behind the profile's
typical (median) timings and behind the pipeline's stage pricing (BENCHMARKS.md, "Plan fidelity").

    python bench/machine_noise.py [--seconds 40]

- jitter: a SmolLM2-sized matmul pair (x[256, 576] @ [576, 1536] @ [1536, 576]), timed every 0.2 s for
  --seconds: best, p10, median, p90, worst ms. The profile keeps medians because a run takes the typical call.
- threads: x[rows, 2048] @ eight 2048 x 2048 weights, alone with every core, then as two Python threads at
  once with cores // 2 torch threads each (two pipeline stages sharing the machine): their time over alone's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
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


def shared_over_alone(rows: int, cores: int) -> tuple[float, float]:
    """(ms alone with every core, ms each of two at once with cores // 2 threads each)."""
    ws = [torch.randn(2048, 2048) for _ in range(8)]
    x = torch.randn(rows, 2048)

    def work() -> None:
        for w in ws:
            x @ w
    torch.set_num_threads(cores)
    alone = median_s(work)
    torch.set_num_threads(max(1, cores // 2))
    each: list[float] = []
    threads = [threading.Thread(target=lambda: each.append(median_s(work))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.set_num_threads(cores)
    return alone * 1e3, statistics.fmean(each) * 1e3


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
    print("| rows | alone, every core, ms | each of two at once, ms | shared / alone |")
    print("|---|---|---|---|")
    for rows in (1, 4, 16, 64, 256):
        alone, each = shared_over_alone(rows, cores)
        print(f"| {rows} | {alone:.2f} | {each:.2f} | {each / alone:.2f} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
