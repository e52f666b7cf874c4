"""4- or 8-bit (--bits) compression through the runtime on this machine: tokens/s, measured / predicted, and
greedy agreement with the uncompressed run, for --compress off / weights / cache / both.

Default scenario: the embedded SmolLM2-135M (float32) on the sample prompts (chat templated), one block of
--prompts sequences, --gen-len tokens each (EOS ignored). `--disk`: OPT-1.3B with seeded dummy weights, every
weight homed on disk and read cold (page cache evicted after each read), off vs weights: what compression
buys when the disk binds. Engines of every mode are built once and run alternately, --repeats times;
the table holds medians.

    python bench/compression.py --prompts 64 --gen-len 32 --repeats 2
    python bench/compression.py --disk --prompts 8 --prompt-len 128 --gen-len 8 --repeats 2
    python bench/compression.py --prompts 1 --group-size 32 --modes off,weights,weights-packed,auto
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.c2 import prompts_for  # noqa: E402  (the sample prompts, chat templated)
from flexgen_graph.app.api import compile_plan  # noqa: E402
from flexgen_graph.app.cli import _profile  # noqa: E402
from flexgen_graph.app.jobs import load_tokenizer  # noqa: E402
from flexgen_graph.app.models import default_cache_dir, open_store  # noqa: E402
from flexgen_graph.catalog import DEFAULT_MODEL, catalog_spec  # noqa: E402
from flexgen_graph.ir import Workload  # noqa: E402
from flexgen_graph.policy import Placement  # noqa: E402
from planner.compile import COMPRESS_MODES  # noqa: E402
from runtime.engine import Engine  # noqa: E402


def prefix_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean share of each generation that equals the reference's before the first difference."""
    shares = []
    for x, y in zip(a, b):
        same = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        shares.append(same / max(len(y), 1))
    return statistics.mean(shares)


def cold_predictions(plan):
    """The plan's predictions (planner.cost.Predictions) with every disk read cold, as the --disk runs read
    (the plan's own prediction takes reads as warm wherever its profile's page cache holds the model)."""
    from planner.cost import evaluate
    from planner.timeline import plan_graph

    return evaluate(plan_graph(plan), plan.profile, plan.policy, spec=plan.spec, disk="cold")


def cold_prediction(plan) -> float:
    """tokens/s predicted with every disk read cold (cold_predictions)."""
    return cold_predictions(plan).tokens_per_s


def _chosen(policy) -> str:
    """What --compress auto chose, in the modes' words: off, weights, cache or both, + "-packed"."""
    mode = next(m for m, flags in COMPRESS_MODES.items()
                if flags is not None and all(getattr(policy, k) == v for k, v in flags.items()))
    return mode + ("-packed" if policy.packed_weights else "")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--disk", action="store_true", help="OPT-1.3B, weights on disk, read cold")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=0, help="padded prompt length (default: longest prompt)")
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--bits", type=int, choices=[4, 8], default=4)
    ap.add_argument("--modes", default="off,weights,cache,both",
                    help="comma-separated --compress modes; weights-packed, both-packed compute on packed weights; "
                         "auto: the planner's choice on the profile (its row names it)")
    ap.add_argument("--profile", default="cpu-small")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    profile = _profile(args.profile)
    modes = args.modes.split(",")
    cache = default_cache_dir()
    if args.disk:
        spec = catalog_spec("facebook/opt-1.3b").with_dtype("float32")
        store = open_store("dummy:0", spec, cache)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, spec.vocab, (args.prompt_len or 128,), generator=g).tolist()
                   for _ in range(args.prompts)]
        fixed = {"weights": Placement(0, 0, 1), "cache": Placement(1, 0, 0), "hidden": Placement(1, 0, 0)}
    else:
        spec = catalog_spec(DEFAULT_MODEL).with_dtype("float32")
        store = open_store("default", spec, cache)
        prompts = prompts_for(load_tokenizer(store.path), args.prompts)
        fixed = {"weights": Placement(1, 0, 0), "cache": Placement(1, 0, 0), "hidden": Placement(1, 0, 0)}
    p_len = args.prompt_len or max(map(len, prompts))
    wl = Workload(p_len, args.gen_len)
    # "<mode>-packed": the same compression, computed on packed weights (runtime.packed), not dequantized
    plans = {m: compile_plan(spec, profile, wl, gpu_batch_size=args.prompts, num_gpu_batches=1, fixed=fixed,
                             compress=m.removesuffix("-packed"), group_size=args.group_size, compress_bits=args.bits,
                             packed=m.endswith("-packed")) for m in modes}
    tps: dict[str, list[float]] = {m: [] for m in modes}
    tokens: dict[str, list[list[int]]] = {}
    with tempfile.TemporaryDirectory() as off:
        engines = {m: Engine(plans[m], store, Path(off) / m, cold_weights=args.disk) for m in modes}
        try:
            for _ in range(args.repeats):
                for m in modes:
                    t = time.perf_counter()
                    gens = engines[m].generate(prompts, [args.gen_len] * len(prompts), ignore_eos=True)
                    tps[m].append(len(prompts) * args.gen_len / (time.perf_counter() - t))
                    tokens[m] = [list(x.token_ids) for x in gens]
        finally:
            for e in engines.values():
                e.close()

    print(f"{spec.name} {spec.dtype}, {len(prompts)} prompts padded to {p_len}, {args.gen_len} tokens each, "
          f"block {args.prompts} x 1, weights {'on disk, cold' if args.disk else 'in RAM'}, profile "
          f"{profile.name}, {args.bits} bits in groups of {args.group_size}, {args.repeats} repetitions (medians)\n")
    print("| compress | weights home | tokens/s | vs off | predicted | measured / predicted | "
          "identical generations | agreement (prefix) |")
    print("|---|---|---|---|---|---|---|---|")
    base = statistics.median(tps["off"]) if "off" in tps else None
    for m in modes:
        med = statistics.median(tps[m])
        pred = cold_prediction(plans[m]) if args.disk else plans[m].predictions["tokens_per_s"]
        wbytes = sum(b.nbytes for b in plans[m].programs.buffers if b.role.value == "weight_home")
        ref = tokens.get("off")
        same = f"{sum(a == b for a, b in zip(tokens[m], ref))}/{len(ref)}" if ref else "-"
        agree = f"{prefix_agreement(tokens[m], ref):.1%}" if ref else "-"
        label = f"{m} (chose {_chosen(plans[m].policy)})" if m == "auto" else m
        print(f"| {label} | {wbytes / 2**30:.2f} GiB | {med:.1f} | {med / base:.2f}x | {pred:.1f} | {med / pred:.2f} | "
              f"{same} | {agree} |" if base else f"| {label} | {med:.1f} | - | {pred:.1f} | {med / pred:.2f} | - | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
