"""How stable the fit's still-run constants are, and how well each version predicts runs it was not fitted on.

The fit (flexgen_graph.app.calibrate) takes a decode and a prefill compute scale and a cost per op from the
engine runs that move nothing (FIT_RUNS "in RAM": batch 1, 8, 32, 64 and 8 x 2, SmolLM2-135M with seeded
weights, FIT_WORKLOAD). This script times those runs --rounds times over, one round after the other, and on each
round fits the constants two ways: all three by least squares ("fitted"), and the two scales around the cost per
op the runs measured outside their op handlers ("measured", what `profile` does). Each fit is then judged on the
other rounds: the median and worst |predicted / measured - 1| over their prefill and decode-step times.

    python bench/fit_stability.py --profile p.json --rounds 4      # about 3 minutes on 2 cores; quiet machine
    python bench/fit_stability.py --profile p.json --save rounds.json   # the rounds too, to try other fits on

The profile supplies the layer curves (SmolLM2's are timed first where it lacks them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexgen_graph.app import calibrate  # noqa: E402
from flexgen_graph.app.api import compile_plan  # noqa: E402
from flexgen_graph.app.cli import _profile  # noqa: E402
from flexgen_graph.app.models import default_cache_dir, open_store  # noqa: E402
from flexgen_graph.catalog import DEFAULT_MODEL, catalog_spec  # noqa: E402
from flexgen_graph.ir import Phase  # noqa: E402


def still_rounds(profile, rounds: int) -> list[tuple[list[list[float]], list[float], float]]:
    """Per round: the still runs' feature rows (FEATURES), their measured times, the median cost per op outside
    the handlers."""
    spec = catalog_spec(DEFAULT_MODEL)
    profile = calibrate.for_models(profile, [spec])
    store = open_store("dummy:0", spec, default_cache_dir())
    rng = random.Random(0)
    runs = []
    for label, b, nb, fixed in calibrate.FIT_RUNS:
        if fixed.get("cold"):
            continue  # cold disk reads: not a still run
        plan = compile_plan(spec, profile, calibrate.FIT_WORKLOAD, gpu_batch_size=b, num_gpu_batches=nb,
                            fixed=dict(fixed), weights_source="dummy:0")
        feats = calibrate.features(plan)
        if any(feats[ph][f] for ph in feats for f in calibrate.FEATURES[calibrate.STILL:]):
            continue  # moves something: not a still run
        prompts = [[rng.randrange(3, spec.vocab) for _ in range(calibrate.FIT_WORKLOAD.prompt_len)]
                   for _ in range(b * nb)]
        runs.append((label, plan, prompts, feats))
    out = []
    for r in range(rounds):
        rows, ys, per_op = [], [], []
        for label, plan, prompts, feats in runs:
            measured, outside = calibrate._time(plan, store, prompts)
            for ph in (Phase.PREFILL, Phase.DECODE):
                rows.append([feats[ph][f] for f in calibrate.FEATURES])
                ys.append(measured[ph])
                per_op.append(outside[ph] / feats[ph]["ops"])
        out.append((rows, ys, statistics.median(per_op)))
        print(f"round {r + 1}: measured / unscaled curves "
              + " ".join(f"{y / (row[0] + row[1]):.2f}" for row, y in zip(rows, ys))
              + f"; {statistics.median(per_op) * 1e6:.0f} us per op outside the handlers; load {os.getloadavg()[0]:.1f}",
              file=sys.stderr, flush=True)
    return out


def errors(x: list[float], rows: list[list[float]], ys: list[float]) -> tuple[float, float]:
    """Median and worst |predicted / measured - 1| of the still constants x[:STILL] on these runs."""
    e = [abs(calibrate._still_time(r, x) / y - 1) for r, y in zip(rows, ys)]
    return statistics.median(e), max(e)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="auto", help="a measured profile (its layer curves price the runs)")
    ap.add_argument("--rounds", type=int, default=4, help="times the still runs are timed over (>= 2)")
    ap.add_argument("--save", metavar="FILE", help="also write the rounds (feature rows, times, cost per op) as JSON")
    args = ap.parse_args(argv)
    if args.rounds < 2:
        ap.error(f"--rounds must be at least 2 (each fit is judged on the other rounds), got {args.rounds}")
    data = still_rounds(_profile(args.profile, here=True), args.rounds)
    if args.save:
        Path(args.save).write_text(json.dumps([{"rows": r, "times": y, "per_op": p} for r, y, p in data]))
    print("| fitted on round | cost per op | scale | prefill scale | median error, other rounds | worst error |")
    print("|---|---|---|---|---|---|")
    for k, (rows, ys, per_op) in enumerate(data):
        for how, x in (("fitted", calibrate.fit_constants(rows, ys)),
                       ("measured", calibrate.fit_constants(rows, ys, per_op))):
            others = [errors(x, r, y) for j, (r, y, _) in enumerate(data) if j != k]
            print(f"| {k + 1} | {how}: {x[2] * 1e6:.0f} us | {x[0]:.3f} | {x[1] / x[0]:.3f} | "
                  f"{statistics.median(m for m, _ in others):.3f} | {max(w for _, w in others):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
