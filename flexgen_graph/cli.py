"""flexgen-graph command line: compile a plan once, run it over JSONL batches, inspect it.

    flexgen-graph compile --model facebook/opt-1.3b --profile t4-flexgen --prompt-len 512 --gen-len 32 -o opt.fgplan
    flexgen-graph inspect opt.fgplan
    flexgen-graph run --plan opt.fgplan --weights dummy --input prompts.jsonl --output out.jsonl
    flexgen-graph run --input examples/sample_prompts.jsonl --show      # embedded SmolLM2, plan compiled for this box
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from flexgen_graph.catalog import DEFAULT_MODEL

EXIT_USAGE = 2

EPILOG = """\
models: a catalog id (e.g. facebook/opt-13b, meta-llama/Llama-2-7b-hf, HuggingFaceTB/SmolLM2-135M-Instruct),
        a local Hugging Face checkpoint folder, or a .gguf file.
profiles: t4-flexgen, h100-pcie5, cpu-small, local (cpu-small's rates with this machine's RAM and disk),
          or a JSON profile file.
"""


def _frac3(s: str) -> tuple[float, float, float]:
    parts = s.replace(",", " ").split()
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three fractions GPU,CPU,DISK (e.g. 0.5,0.5,0), got {s!r}")
    try:
        return tuple(float(p) for p in parts)  # type: ignore[return-value]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not numbers: {s!r}") from None


def _add_compile_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--profile", default="local" if not required else "cpu-small",
                   help="hardware profile name or JSON file (default: %(default)s)")
    p.add_argument("--prompt-len", type=int, required=required, help="tokens every prompt is padded to")
    p.add_argument("--gen-len", type=int, required=required, help="tokens generated per prompt (at most)")
    p.add_argument("--gpu-batch-size", type=int, help="fix the gpu batch size instead of searching")
    p.add_argument("--num-gpu-batches", type=int, help="fix the number of gpu batches per block")
    p.add_argument("--max-block-size", type=int, help="cap sequences per block (gpu batch size x gpu batches)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="weights, cache and compute dtype (default: float16 on a GPU profile, float32 without)")
    for cls in ("weights", "cache", "hidden"):
        p.add_argument(f"--{cls}-frac", type=_frac3, metavar="G,C,D",
                       help=f"force the {cls} placement over gpu,cpu,disk (fractions summing to 1)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flexgen-graph", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compile", help="compile a plan for (model, hardware profile, workload)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    c.add_argument("--model", required=True, help="catalog id, checkpoint folder or .gguf file")
    c.add_argument("--weights", help="weights to record in the plan for `run`: dummy, dummy:SEED, a folder or .gguf "
                                     "(default: the model's own)")
    _add_compile_args(c, required=True)
    c.add_argument("-o", "--output", required=True, help="plan file to write (.fgplan)")

    r = sub.add_parser("run", help="generate for every line of a JSONL file",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    r.add_argument("--plan", help="a compiled .fgplan (default: compile one for this machine and cache it)")
    r.add_argument("--model", help=f"model when no plan is given (default: {DEFAULT_MODEL}, embedded)")
    r.add_argument("--weights", help="dummy, dummy:SEED, a checkpoint folder or .gguf (default: the plan's)")
    r.add_argument("--input", required=True, help="JSONL: {\"id\", \"prompt\"|\"messages\"|\"prompt_ids\"[, \"max_tokens\"]}")
    r.add_argument("--output", help="JSONL results {\"id\", \"text\", \"token_ids\", \"finish_reason\"}")
    r.add_argument("--show", action="store_true", help="print each answer as its block finishes")
    r.add_argument("--offload-dir", help="folder for disk-tier scratch files (default: a temporary folder)")
    r.add_argument("--cache-dir", help="where imported weights and compiled plans are cached "
                                       "(default: ~/.cache/flexgen-graph)")
    _add_compile_args(r, required=False)

    i = sub.add_parser("inspect", help="show a plan's policy, predictions and memory peaks")
    i.add_argument("plan")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    return ap


def _profile(name: str, offload_dir: Path | None = None):
    from planner.hardware import load_profile

    if name != "local":
        return load_profile(name)
    from planner.hardware import BUILTIN_PROFILES

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    disk = shutil.disk_usage(offload_dir or Path.cwd()).free
    base = BUILTIN_PROFILES["cpu-small"]
    from dataclasses import replace

    # the "gpu" tier is host memory on a CPU-only box: give it a third of RAM, the cpu tier half
    return replace(base, name="local", gpu_bytes=ram // 3, cpu_bytes=ram // 2, disk_bytes=int(disk * 0.8))


def _fixed(args) -> dict | None:
    from planner.policy import Placement

    fixed = {}
    for cls in ("weights", "cache", "hidden"):
        v = getattr(args, f"{cls}_frac")
        if v is not None:
            fixed[cls] = Placement(*v)
    return fixed or None


def _dtype(args) -> str:
    if args.dtype:
        return args.dtype
    return "float16" if _profile(args.profile).has_gpu else "float32"


def _compile(spec, args, workload, source: str, max_block_size: int | None = None):
    from flexgen_graph.api import compile_plan

    return compile_plan(spec, _profile(args.profile), workload, gpu_batch_size=args.gpu_batch_size,
                        num_gpu_batches=args.num_gpu_batches, fixed=_fixed(args), weights_source=source,
                        max_block_size=args.max_block_size or max_block_size)


def cmd_compile(args) -> int:
    from flexgen_graph.ir import Workload
    from flexgen_graph.models import resolve_model, weights_source_for
    from planner import plan as planfile

    spec, source = resolve_model(args.model, _dtype(args))
    if args.weights:
        source = weights_source_for(args.weights, source)
    plan = _compile(spec, args, Workload(args.prompt_len, args.gen_len), source)
    planfile.save(plan, args.output)
    pred = plan.predictions
    print(f"wrote {args.output}: {plan.policy.gpu_batch_size} x {plan.policy.num_gpu_batches} sequences per block, "
          f"predicted {pred['tokens_per_s']:.1f} tokens/s")
    return 0


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def cmd_run(args) -> int:
    from flexgen_graph.ir import Workload
    from flexgen_graph.jobs import load_tokenizer, read_requests, run_requests
    from flexgen_graph.models import default_cache_dir, open_store, resolve_model, weights_source_for
    from planner import plan as planfile
    from runtime.engine import Engine

    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    if args.plan and args.model:
        raise SystemExit("give --plan or --model, not both (the plan names its model)")
    plan = planfile.load(args.plan) if args.plan else None
    if plan is not None:
        spec, source = plan.spec, plan.weights_source
    else:
        spec, source = resolve_model(args.model or DEFAULT_MODEL, _dtype(args))
    if args.weights:
        source = weights_source_for(args.weights, source)
    if not source:
        raise SystemExit(f"the plan names no weights for {spec.name}: pass --weights")
    print(f"model {spec.name} ({spec.num_params() / 1e6:.0f}M parameters, {spec.dtype}), weights {source}",
          file=sys.stderr)
    store = open_store(source, spec, cache_dir)
    tokenizer = load_tokenizer(store.path)
    reqs, errors = read_requests(Path(args.input), tokenizer)
    if plan is None:
        longest = max((len(r.prompt_ids) for r in reqs), default=1)
        wanted = max((r.max_tokens or 0 for r in reqs), default=0)
        workload = Workload(args.prompt_len or _round_up(longest, 16), args.gen_len or max(wanted, 64))
        # a block larger than the job would only add padding
        plan = _cached_plan(spec, args, workload, source, cache_dir, 1 << max(len(reqs) - 1, 0).bit_length())
    print(f"plan: prompt {plan.workload.prompt_len}, gen {plan.workload.gen_len}, block "
          f"{plan.policy.gpu_batch_size} x {plan.policy.num_gpu_batches}, profile {plan.profile.name}", file=sys.stderr)
    out = open(args.output, "a", encoding="utf-8") if args.output else None
    try:
        with Engine(plan, store, args.offload_dir) as engine:
            summary = run_requests(engine, tokenizer, reqs, errors, out, show=args.show or not args.output)
            peaks = engine.peak_bytes
    finally:
        if out is not None:
            out.close()
    pred = plan.predictions
    print(f"{summary.prompts} prompts ({summary.errors} errors), {summary.tokens} tokens in {summary.wall_s:.1f} s: "
          f"{summary.tokens_per_s:.1f} tokens/s (plan predicted {pred['tokens_per_s']:.1f})")
    print("peak bytes " + ", ".join(f"{t}: {peaks[t] / 2**20:.0f} MiB (plan {pred['peak_bytes'][t] / 2**20:.0f})"
                                    for t in ("gpu", "cpu", "disk")))
    return 0


def _cached_plan(spec, args, workload, source: str, cache_dir: Path, max_block_size: int):
    from planner import plan as planfile

    profile = _profile(args.profile)
    key = json.dumps([spec.fingerprint(), profile.fingerprint(), workload.to_dict(), source, args.gpu_batch_size,
                      args.num_gpu_batches, args.max_block_size or max_block_size,
                      [getattr(args, f"{c}_frac") for c in ("weights", "cache", "hidden")]])
    path = cache_dir / "plans" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".fgplan")
    if path.is_file():
        return planfile.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plan = _compile(spec, args, workload, source, max_block_size)
    planfile.save(plan, path)
    return plan


def cmd_inspect(args) -> int:
    from planner import plan as planfile

    plan = planfile.load(args.plan)
    pol, pred = plan.policy, plan.predictions
    info = {
        "model": plan.spec.name, "dtype": plan.spec.dtype, "profile": plan.profile.name,
        "workload": plan.workload.to_dict(), "weights_source": plan.weights_source, "policy": pol.to_dict(),
        "predictions": pred, "ops": {"prefill": len(plan.programs.prefill), "decode": len(plan.programs.decode)},
        "buffers": len(plan.programs.buffers),
    }
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    fmt = lambda p: "/".join(f"{x:g}" for x in p.as_tuple())  # noqa: E731
    print(f"model     {plan.spec.name} ({plan.spec.dtype}), weights {plan.weights_source or '(none recorded)'}")
    print(f"profile   {plan.profile.name}")
    print(f"workload  prompt {plan.workload.prompt_len}, gen {plan.workload.gen_len}")
    print(f"block     {pol.gpu_batch_size} x {pol.num_gpu_batches} gpu batches = {plan.block_size} sequences")
    print(f"placement (gpu/cpu/disk) weights {fmt(pol.weights)}, cache {fmt(pol.cache)}, hidden {fmt(pol.hidden)}")
    print(f"predicted {pred['tokens_per_s']:.2f} tokens/s; prefill {pred['prefill_s']:.3f} s, decode step "
          f"{pred['decode_step_s']:.4f} s; bound by {pred.get('binding', '?')}")
    caps = {"gpu": plan.profile.gpu_bytes, "cpu": plan.profile.cpu_bytes, "disk": plan.profile.disk_bytes}
    for t in ("gpu", "cpu", "disk"):
        print(f"peak {t:<4}  {pred['peak_bytes'][t] / 2**30:8.3f} GiB of {caps[t] / 2**30:.1f} GiB")
    print(f"programs  prefill {len(plan.programs.prefill)} ops, decode {len(plan.programs.decode)} ops, "
          f"{len(plan.programs.buffers)} buffers")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flexgen_graph.errors import USER_ERRORS

    try:
        return {"compile": cmd_compile, "run": cmd_run, "inspect": cmd_inspect}[args.cmd](args)
    except USER_ERRORS as e:
        print(f"flexgen-graph {args.cmd}: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
