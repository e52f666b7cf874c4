"""Does the planner rank policies as the engine does? Its fastest predicted policies and a few random
feasible ones, each run end to end, ranked by prediction and by measurement.

    python bench/ranking.py                       # SmolLM2 at batch 16, then C1's OPT-1.3B shape
    python bench/ranking.py --cases smollm2 --profile p.json
    flexgen-graph bench ranking ...

Candidates: every point the planner's search weighs (block shape of the job's size x CPU attention on
or off, each with its LP placement: planner.lp.solve_block), ranked by predicted tokens/s, the best
--top of them; then --random feasible policies drawn at random (block shape, placement fractions of
the classes the case leaves free, the flag). Each runs full-length generations of one full block
(EOS ignored; bench/fidelity.py's timing). Passes when the measured best is the planner's choice or
within 5% of it.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.fidelity import _prompts, time_engine, warm_files  # noqa: E402
from flexgen_graph.catalog import DEFAULT_MODEL, catalog_spec  # noqa: E402
from flexgen_graph.ir import TIERS, Block, Workload  # noqa: E402
from flexgen_graph.policy import Placement, Policy  # noqa: E402

DISK = Placement.all_on(TIERS[2])
TOLERANCE = 0.05


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    block: int  # sequences in the block (the job)
    prompt_len: int
    gen_len: int
    fixed: dict  # what the case fixes (C1: the weights on disk)
    warmup: bool = True


CASES = {
    "smollm2": Case("SmolLM2-135M at batch 16", DEFAULT_MODEL, 16, 48, 32, {}),
    "opt-1.3b": Case("OPT-1.3B dummy, weights on disk (C1's shape, a smaller job)", "facebook/opt-1.3b", 8, 64, 8,
                     {"weights": DISK}, warmup=False),
}
QUICK = {"smollm2": Case("SmolLM2-135M at batch 4 (quick)", DEFAULT_MODEL, 4, 8, 3, {})}


def shapes(n: int) -> list[tuple[int, int]]:
    """Block shapes (gpu batch size, gpu batches) of exactly n sequences."""
    return [(b, n // b) for b in (1 << i for i in range(n.bit_length())) if n % b == 0]


def _describe(p: Policy) -> str:
    f = lambda pl: "/".join(f"{x:.2g}" for x in pl.as_tuple())  # noqa: E731
    return (f"{p.gpu_batch_size} x {p.num_gpu_batches}, weights {f(p.weights)}, cache {f(p.cache)}, hidden "
            f"{f(p.hidden)}{', cpu attention' if p.cpu_attention else ''}")


def candidates(spec, profile, wl: Workload, case: Case, top: int, n_random: int, seed: int) -> list[tuple[str, Policy, dict]]:
    """(origin, policy, predictions): the planner's best `top` points and `n_random` random feasible policies."""
    from flexgen_graph.lower import lower
    from planner.errors import InfeasiblePlanError
    from planner.lp import solve_block

    points = []
    for b, nb in shapes(case.block):
        g = lower(spec, wl, Block(b, nb))
        for attn in (False, True):
            try:
                r = solve_block(g, profile, fixed={**case.fixed, "cpu_attention": attn}, spec=spec,
                                diagnose_infeasible=False)
            except InfeasiblePlanError:
                continue
            if r.feasible:
                points.append((r.predictions.tokens_per_s, r.policy, r.predictions.to_dict()))
    points.sort(key=lambda t: -t[0])
    seen, out = set(), []
    for _, pol, pred in points:
        if same_run(pol) not in seen and len(out) < top:
            seen.add(same_run(pol))
            out.append(("planner", pol, pred))
    rng = random.Random(seed)
    tries = 0
    while sum(o == "random" for o, _, _ in out) < n_random and tries < 200:
        tries += 1
        b, nb = rng.choice(shapes(case.block))
        fixed = {c: case.fixed.get(c) or _random_placement(rng) for c in ("weights", "cache", "hidden")}
        fixed["cpu_attention"] = rng.random() < 0.5
        r = solve_block(lower(spec, wl, Block(b, nb)), profile, fixed=fixed, spec=spec, diagnose_infeasible=False)
        if r.feasible and same_run(r.policy) not in seen:
            seen.add(same_run(r.policy))
            out.append(("random", r.policy, r.predictions.to_dict()))
    return out


def same_run(p: Policy) -> Policy:
    """The policy as the engine runs it: CPU attention with no cache on the CPU changes nothing."""
    import dataclasses

    return dataclasses.replace(p, cpu_attention=False) if p.cache.cpu_frac == 0 else p


def _random_placement(rng: random.Random) -> Placement:
    g = rng.choice((1.0, 1.0, 0.5, 0.0))
    c = rng.choice((1 - g, (1 - g) / 2, 0.0))
    return Placement.rounded(g, c)


def run_case(case: Case, profile, top: int, n_random: int, seed: int, cache_dir: Path) -> tuple[list[str], bool]:
    from flexgen_graph.app.models import open_store
    from flexgen_graph.planfile import Plan
    from planner.compile import programs_for

    spec = catalog_spec(case.model)
    wl = Workload(case.prompt_len, case.gen_len)
    cands = candidates(spec, profile, wl, case, top, n_random, seed)
    store = open_store("dummy:0", spec, cache_dir)
    if not case.warmup:
        warm_files(store.path)
    prompts = _prompts(case.block, wl.prompt_len, spec.vocab)
    rows = []
    for origin, pol, pred in cands:
        plan = Plan(spec=spec, profile=profile, workload=wl, weights_source="dummy:0", policy=pol, predictions=pred,
                    programs=programs_for(spec, wl, pol))
        t = time.perf_counter()
        m = time_engine(plan, store, prompts, warmup=case.warmup)
        rows.append((origin, pol, pred["tokens_per_s"], m["tokens_per_s"]))
        print(f"  {_describe(pol):70} predicted {pred['tokens_per_s']:8.2f} measured {m['tokens_per_s']:8.2f} "
              f"tokens/s ({time.perf_counter() - t:.0f} s, load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    by_pred = sorted(range(len(rows)), key=lambda i: -rows[i][2])
    by_meas = sorted(range(len(rows)), key=lambda i: -rows[i][3])
    choice, best = by_pred[0], by_meas[0]
    ok = rows[choice][3] >= (1 - TOLERANCE) * rows[best][3]
    lines = [f"### {case.name}", "",
             f"Prompt {case.prompt_len}, {case.gen_len} new tokens, {case.block} sequences; profile {profile.name}.", "",
             "| policy | from | predicted tokens/s | rank | measured tokens/s | rank |", "|---|---|---|---|---|---|"]
    for i in by_pred:
        o, pol, p, m = rows[i]
        lines.append(f"| {_describe(pol)} | {o} | {p:.2f} | {by_pred.index(i) + 1} | {m:.2f} | {by_meas.index(i) + 1} |")
    lines += ["", f"Planner's choice measured {rows[choice][3]:.2f} tokens/s; the measured best "
                  f"{rows[best][3]:.2f} ({'the same policy' if best == choice else _describe(rows[best][1])}): "
                  f"{'within' if ok else 'NOT within'} {TOLERANCE:.0%} ({rows[choice][3] / rows[best][3]:.3f}).", ""]
    return lines, ok


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="auto", help="profile to compile for (default: auto, this machine)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated, from: " + ", ".join(CASES))
    ap.add_argument("--top", type=int, default=5, help="the planner's fastest predicted policies to run")
    ap.add_argument("--random", type=int, default=3, help="random feasible policies to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="one tiny case (seconds; for tests)")
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args(argv)

    from flexgen_graph.app.cli import _profile
    from flexgen_graph.app.models import default_cache_dir

    table = QUICK if args.quick else CASES
    names = list(table) if args.quick else args.cases.split(",")
    bad = [n for n in names if n not in table]
    if bad:
        ap.error(f"unknown case(s) {', '.join(bad)}: choose from {', '.join(table)}")
    profile = _profile(args.profile, models=[catalog_spec(table[n].model) for n in names])
    out, all_ok = [], True
    for n in names:
        print(f"{table[n].name}:", file=sys.stderr)
        lines, ok = run_case(table[n], profile, args.top, args.random, args.seed, args.cache_dir or default_cache_dir())
        out += lines
        all_ok &= ok
    print("\n".join(out))
    print(f"ranking: {'pass' if all_ok else 'FAIL'} (the planner's choice is the measured best or within "
          f"{TOLERANCE:.0%} of it in {'every case' if all_ok else 'not every case'}); load average "
          f"{os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
