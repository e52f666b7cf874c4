"""`flexgen-graph bench SCENARIO [OPTIONS]`: run one of the benchmark scenarios of bench/.

Each scenario is a script in the source checkout's bench/ folder (they are not part of the
installed package: they need the peers, transformers and accelerate, and the repository's data);
this command loads the script and calls its `main(argv, prog)` with the options that follow the
scenario, so `flexgen-graph bench c1 --reps 1` is `python bench/c1.py --reps 1`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
SCENARIOS = {
    "c1": "OPT-1.3B with at most 1 GiB of weights in RAM vs transformers (all in RAM) and accelerate's disk "
          "offload (CPU)",
    "c2": "the embedded SmolLM2-135M at batch 1/16/64 vs transformers generate (CPU)",
    "g1": "OPT-13B fp16, 16 GB GPU cap, prompt 512, generation 32 (needs a CUDA GPU; prints 'not run' without one)",
    "compression": "4-bit / 8-bit weights and cache through the runtime vs uncompressed: tokens/s and agreement",
    "big_model": "Llama-2-7B's shape (dummy weights), past RAM as float32: 4-bit in RAM vs float32 homed on disk "
                 "(CPU; writes a 25 GiB store into the cache once)",
    "pipeline": "the same job as one process and as an S-stage pipeline under torchrun (outputs checked equal)",
    "fidelity": "the plans' predicted tokens/s, prefill and decode step against the engine's, scenario by scenario",
    "ranking": "the planner's fastest predicted policies and a few random ones, ranked as predicted and as measured",
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name}  {text}" for name, text in SCENARIOS.items())
    p = subparsers.add_parser(
        "bench", help="run a benchmark scenario against its peers (" + ", ".join(SCENARIOS) + ")",
        description=__doc__.splitlines()[0] + "\n\nscenarios:\n" + listing,
        epilog="`flexgen-graph bench SCENARIO --help` lists a scenario's options. The scripts live in the "
               "source checkout's bench/ folder; BENCHMARKS.md has their figures.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", type=str.lower, choices=sorted(SCENARIOS), metavar="SCENARIO",
                   help="one of: " + ", ".join(SCENARIOS))
    p.add_argument("options", nargs=argparse.REMAINDER, help="passed to the scenario's script")
    return p


def load_scenario(name: str):
    """The scenario script as a module (loaded by path: bench/ is not a package)."""
    path = BENCH_DIR / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"scenario {name!r}: {path} not found (the bench scripts ship with the source "
                                f"checkout, not the installed package)")
    spec = importlib.util.spec_from_file_location(f"flexgen_graph_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while a class is built
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> int:
    try:
        module = load_scenario(args.scenario)
    except FileNotFoundError as e:
        print(f"flexgen-graph bench: {e}", file=sys.stderr)
        return 2
    try:
        rc = module.main(list(args.options), prog=f"flexgen-graph bench {args.scenario}")
    except SystemExit as e:  # argparse inside the script: --help (0) or a bad option (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return 0 if rc is None else int(rc)
