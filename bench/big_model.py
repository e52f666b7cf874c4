"""A model larger than RAM on a CPU box: Llama-2-7B's shape (seeded dummy weights), whose float32 weights
(25 GiB) this machine cannot hold, run in RAM as 4-bit against the same model's float32 plan with every
weight homed on disk and read cold. Reports tokens/s of both, their ratio, measured / predicted (the
float32 row predicted with every disk read cold, bench.compression.cold_predictions), and prefill and
decode step seconds beside the predicted ones.

The dummy store is written once into the product's cache (flexgen_graph.app.models.default_cache_dir(),
weights/<key>: one file per tensor, streamed in row chunks) and its 4-bit copy is built once beside it,
one layer at a time; later runs reuse both. The profile is `local` (cpu-small's rates, this machine's RAM
and disk). --layers N keeps only the first N decoder layers (a smaller store to try the script on);
the output names the cut.

    python bench/big_model.py                                   # the 7B: writes 25 GiB once
    python bench/big_model.py --layers 2 --prompts 4 --gen-len 2   # a quick try
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.compression import cold_predictions  # noqa: E402
from bench.report import cpu_name, usable_cores  # noqa: E402
from flexgen_graph.app.api import compile_plan  # noqa: E402
from flexgen_graph.app.cli import _profile  # noqa: E402
from flexgen_graph.app.models import default_cache_dir, open_store  # noqa: E402
from flexgen_graph.catalog import catalog_spec  # noqa: E402
from flexgen_graph.ir import Workload  # noqa: E402
from flexgen_graph.planfile import Plan  # noqa: E402
from flexgen_graph.policy import Placement  # noqa: E402
from flexgen_graph.spec import ModelSpec  # noqa: E402
from runtime.compressed import compressed_layers  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from planner.cost import Predictions  # noqa: E402
from runtime.quant import QuantConfig  # noqa: E402

GiB = 2**30
IN_RAM = Placement(1, 0, 0)  # on a CPU-only profile the "gpu" tier is host memory the compute reads in place
ON_DISK = Placement(0, 0, 1)


def with_layers(spec: ModelSpec, n: int) -> ModelSpec:
    """spec cut to its first n decoder layers (same shapes otherwise), named so."""
    if not 1 <= n <= spec.num_layers:
        raise SystemExit(f"--layers must be 1..{spec.num_layers}, got {n}")
    name = f"{spec.name}[{n} of {spec.num_layers} layers]"
    return ModelSpec.from_dict({**spec.to_dict(), "num_layers": n, "name": name})


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def evict(store) -> None:
    """Drop the store's files from the page cache, so the first pass reads the disk as every later one does
    (the engine's cold_weights evicts only after each read; the freshly written store may still be cached)."""
    for layer in range(store.spec.num_graph_layers):
        for slot in store.spec.layer_layout(layer):
            fd = os.open(store.tensor_file(layer, slot.name), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    plan: Plan
    cold: bool  # weights read from the disk, evicted after each read


@dataclass(frozen=True, slots=True)
class Run:
    tokens_per_s: float
    prefill_s: float
    decode_step_s: float  # mean over the run's decode steps


def timed_run(engine: Engine, prompts: list[list[int]], gen_len: int, evict_first=None) -> Run:
    """One block through the engine, timed whole and by program (the engine's step_times)."""
    if evict_first is not None:
        evict(evict_first)
    engine.step_times.clear()
    t = time.perf_counter()
    engine.generate(prompts, [gen_len] * len(prompts), ignore_eos=True)
    wall = time.perf_counter() - t
    decode = [s for k, s in engine.step_times if k == "decode"] or [0.0]
    return Run(len(prompts) * gen_len / wall, sum(s for k, s in engine.step_times if k == "prefill"),
               statistics.mean(decode))


def weight_home_bytes(plan) -> int:
    return sum(b.nbytes for b in plan.programs.buffers if b.role.value == "weight_home")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="meta-llama/Llama-2-7b-hf", help="a catalog id")
    ap.add_argument("--layers", type=int, default=0, help="keep only the first N decoder layers (default: all)")
    ap.add_argument("--prompts", type=int, default=8, help="sequences, one gpu batch")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--no-packed", action="store_true",
                    help="the 4-bit row dequantizes each layer to float32 (default: computes on packed int4)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--profile", default="local")
    args = ap.parse_args(argv)
    spec = catalog_spec(args.model).with_dtype("float32")
    if args.layers:
        spec = with_layers(spec, args.layers)
    profile = _profile(args.profile)
    packed = not args.no_packed
    cfg = QuantConfig(4, args.group_size)

    t = time.perf_counter()
    store = open_store("dummy:0", spec, default_cache_dir())  # written on first use, then reused
    t_store = time.perf_counter() - t
    t = time.perf_counter()
    compressed_layers(store, cfg, packed)  # built on first use beside the store, a layer at a time
    t_copy = time.perf_counter() - t

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, spec.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    wl = Workload(args.prompt_len, args.gen_len)
    common = dict(gpu_batch_size=args.prompts, num_gpu_batches=1)
    rows = [
        Row("float32, weights on disk (cold)", compile_plan(
            spec, profile, wl, fixed={"weights": ON_DISK, "cache": IN_RAM, "hidden": IN_RAM}, **common), True),
        Row(f"4-bit g{args.group_size}{', packed' if packed else ''}, weights in RAM", compile_plan(
            spec, profile, wl, fixed={"weights": IN_RAM, "cache": IN_RAM, "hidden": IN_RAM}, compress="weights",
            compress_bits=4, group_size=args.group_size, packed=packed, **common), False),
    ]
    runs: dict[str, list[Run]] = {r.name: [] for r in rows}
    with tempfile.TemporaryDirectory() as off:
        engines = {}
        try:
            for i, r in enumerate(rows):
                engines[r.name] = Engine(r.plan, store, Path(off) / str(i), cold_weights=r.cold)
            for _ in range(args.repeats):
                for r in rows:
                    runs[r.name].append(timed_run(engines[r.name], prompts, args.gen_len, store if r.cold else None))
        finally:
            for e in engines.values():
                e.close()

    print(f"command: {prog or 'python bench/big_model.py'} " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"{spec.name} (dummy weights, seed 0): float32 {spec.weight_bytes() / GiB:.1f} GiB, this machine's RAM "
          f"{ram_bytes() / GiB:.1f} GiB; {cpu_name()}, {usable_cores()} cores; profile {profile.name}; "
          f"{args.prompts} prompts of {args.prompt_len} tokens, {args.gen_len} new tokens each, block "
          f"{args.prompts} x 1; {args.repeats} repetition(s) (medians); {datetime.date.today()}")
    print(f"store {store.path} ready in {t_store:.0f} s, its 4-bit copy in {t_copy:.0f} s (both written on first "
          f"use only); peak RSS {peak_rss() / GiB:.1f} GiB\n")
    print("| weights | weights home | tokens/s | vs float32 on disk | predicted | measured / predicted | "
          "prefill s (predicted) | decode s a step (predicted) |")
    print("|---|---|---|---|---|---|---|---|")
    base = statistics.median(x.tokens_per_s for x in runs[rows[0].name])
    for r in rows:
        tps = statistics.median(x.tokens_per_s for x in runs[r.name])
        pre = statistics.median(x.prefill_s for x in runs[r.name])
        dec = statistics.median(x.decode_step_s for x in runs[r.name])
        p = cold_predictions(r.plan) if r.cold else Predictions.from_dict(r.plan.predictions)
        print(f"| {r.name} | {weight_home_bytes(r.plan) / GiB:.2f} GiB | {tps:.3f} | {tps / base:.2f}x | "
              f"{p.tokens_per_s:.3f} | {tps / p.tokens_per_s:.2f} | {pre:.1f} ({p.prefill_s:.1f}) | "
              f"{dec:.1f} ({p.decode_step_s:.1f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
