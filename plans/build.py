"""Regenerate the compiled plans in plans/ and their table in plans/README.md.

    python plans/build.py            # recompile every plan, rewrite the files and the table
    python plans/build.py --check    # exit 1 naming every plan whose bytes differ from its file

tests/test_golden_plans.py recompiles the same ENTRIES and fails on any byte that differs: a change
to lowering, cost model, LP, search, schedule or plan format shows up there, and is accepted by
running this script and committing the new files.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(HERE.parent))

from flexgen_graph import planfile  # noqa: E402
from flexgen_graph.app.api import compile_pipeline, compile_plan  # noqa: E402
from flexgen_graph.catalog import catalog_spec  # noqa: E402
from flexgen_graph.hardware import load_profile  # noqa: E402
from flexgen_graph.ir import TIERS, Workload  # noqa: E402
from planner.cost import Predictions  # noqa: E402

GIB = float(1 << 30)


@dataclass(frozen=True, slots=True)
class Entry:
    model: str
    profile: str
    dtype: str
    prompt_len: int
    gen_len: int
    weights_source: str
    stages: int = 1  # a pipeline of this many stages, all on one machine of the profile
    score: bool = False  # a scoring plan: gen_len positions of each prompt scored (log-likelihoods)

    @property
    def file_name(self) -> str:
        slug = self.model.split("/")[-1].lower()
        pipe = f"--{self.stages}stages" if self.stages > 1 else ""
        return f"{slug}--{self.profile}--{self.dtype}--p{self.prompt_len}{'s' if self.score else 'g'}{self.gen_len}{pipe}.fgplan"


ENTRIES: tuple[Entry, ...] = (
    Entry("facebook/opt-1.3b", "t4-flexgen", "float16", 512, 32, "dummy:0"),
    Entry("facebook/opt-13b", "t4-flexgen", "float16", 512, 32, "dummy:0"),
    Entry("facebook/opt-30b", "t4-flexgen", "float16", 512, 32, "dummy:0"),
    Entry("meta-llama/Llama-2-7b-hf", "t4-flexgen", "float16", 512, 32, "dummy:0"),
    Entry("facebook/opt-13b", "h100-pcie5", "float16", 512, 32, "dummy:0"),
    Entry("HuggingFaceTB/SmolLM2-135M-Instruct", "cpu-small", "float32", 64, 32, "default"),
    # FlexGen's multi-GPU setting: one T4 machine's 4 GPUs, a stage each
    Entry("facebook/opt-30b", "t4-flexgen", "float16", 512, 32, "dummy:0", stages=4),
    # lm-eval's log-likelihoods: 512-token prompts, their last 8 positions scored (a prefill-only plan)
    Entry("facebook/opt-13b", "t4-flexgen", "float16", 512, 8, "dummy:0", score=True),
)


def compile_entry(e: Entry) -> list[planfile.Plan]:
    spec, profile = catalog_spec(e.model).with_dtype(e.dtype), load_profile(e.profile)
    wl = Workload(e.prompt_len, e.gen_len, score=e.score)
    if e.stages > 1:
        return compile_pipeline(spec, profile, wl, e.stages, weights_source=e.weights_source)
    return [compile_plan(spec, profile, wl, weights_source=e.weights_source)]


def _frac(v: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.3g}" for x in v)


def table(rows: list[tuple[Entry, list[planfile.Plan]]]) -> str:
    out = [
        "| model | profile | dtype | prompt / gen | block | weights g/c/d | cache g/c/d | hidden g/c/d | flags "
        "| tokens/s | peak GPU / CPU / disk (GiB) | binding | file |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e, plans in rows:
        for p in plans:  # a pipeline: a row per stage
            pol, pred = p.policy, Predictions.from_dict(p.predictions)
            flags = "+".join(f for f in ("cpu_attention", "compress_weights", "compress_cache") if getattr(pol, f)) or "-"
            peaks = " / ".join(f"{pred.peak_bytes[t.value] / GIB:.2f}" for t in TIERS)
            st = f" (stage {p.stage.index}: layers {p.stage.first_layer}..{p.stage.end_layer - 1})" if p.stage else ""
            gen = f"{e.gen_len} scored" if e.score else f"{e.gen_len}"
            out.append(f"| {e.model}{st} | {p.profile.name} | {e.dtype} | {e.prompt_len} / {gen} "
                       f"| {pol.gpu_batch_size} x {pol.num_gpu_batches} | {_frac(pol.weights.as_tuple())} "
                       f"| {_frac(pol.cache.as_tuple())} | {_frac(pol.hidden.as_tuple())} | {flags} "
                       f"| {pred.tokens_per_s:.4g} | {peaks} | {pred.binding_constraint} | `{e.file_name}` |")
    return "\n".join(out)


README_HEAD = """# Compiled plans

Plans compiled from the catalog (no weights needed) for the builtin hardware profiles, by
`python plans/build.py`. `tests/test_golden_plans.py` recompiles each one and fails if a single
byte differs: rerun the script (and commit the files) when a change to the planner, the schedule
or the plan format is meant to change them.

Placements are fractions of each class's bytes on gpu / cpu / disk; tokens/s is the cost model's
prediction for one block (prefill plus every decode step; a scoring plan: its prefill, per scored token; a pipeline's rows, one per stage, show the
whole pipeline's tokens/s and each stage's own peaks and binding term); "binding" names what limits it
(compute, a link, or the capacity that pushes traffic onto the link). Inspect one with
`flexgen-graph inspect plans/FILE` (or `flexgen_graph.app.inspect.describe_text`).

"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
    args = ap.parse_args(argv)
    rows, stale = [], []
    for e in ENTRIES:
        plans = compile_entry(e)
        rows.append((e, plans))
        path = HERE / e.file_name
        data = planfile.dumps_set(plans)
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                stale.append(e.file_name)
        else:
            path.write_bytes(data)
        print(f"{'checked' if args.check else 'wrote'} {e.file_name}: {plans[0].predictions['tokens_per_s']} tokens/s")
    readme = README_HEAD + table(rows) + "\n"
    if args.check:
        if (HERE / "README.md").read_text() != readme:
            stale.append("README.md")
    else:
        (HERE / "README.md").write_text(readme)
    if stale:
        print(f"stale: {', '.join(stale)} (rerun python plans/build.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
