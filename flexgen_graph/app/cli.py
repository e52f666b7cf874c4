"""flexgen-graph command line: compile a plan once, run it over JSONL batches, inspect it.

    flexgen-graph compile --model facebook/opt-1.3b --profile t4-flexgen --prompt-len 512 --gen-len 32 -o opt.fgplan
    flexgen-graph inspect opt.fgplan
    flexgen-graph run --plan opt.fgplan --weights dummy --input examples/sample_prompt_ids.jsonl --output out.jsonl
    flexgen-graph run --input examples/sample_prompts.jsonl --show      # embedded SmolLM2, plan compiled for this box
    flexgen-graph run --input examples/openai_batch.jsonl --output out.jsonl   # an OpenAI Batch API file, unchanged

Several GPUs or machines (torchrun; see the README):
    torchrun --nproc-per-node 2 -m flexgen_graph run --plan opt.fgplan --input in.jsonl --output out.jsonl
        data parallel: each process runs its shard of the input with the whole plan
    flexgen-graph compile ... --stages 2 -o pipe.fgplan
    torchrun --nproc-per-node 2 -m flexgen_graph run --plan pipe.fgplan --input in.jsonl --output out.jsonl
        pipeline: process i runs stage i (its share of the layers) of every block
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexgen_graph.app import bench_cmd, openai_batch
from flexgen_graph.catalog import DEFAULT_MODEL
from flexgen_graph.errors import UserError

EXIT_USAGE = 2
EXIT_LINE_ERRORS = 3  # run: the job ran, but some lines are in the errors file (OUT.errors.jsonl)

EPILOG = """\
models: a catalog id (e.g. facebook/opt-13b, meta-llama/Llama-2-7b-hf, HuggingFaceTB/SmolLM2-135M-Instruct),
        a Hugging Face id already in the local hub cache (HF_HUB_CACHE / HF_HOME), a local Hugging Face
        checkpoint folder, or a .gguf file.
profiles: local (the default: cpu-small's rates with this machine's RAM and disk), t4-flexgen, h100-pcie5,
          cpu-small, auto (this machine, measured once by `flexgen-graph profile` and cached), or a JSON file.
"""
INPUT_HELP = (
    "JSONL, one request a line. Native: {\"id\": string or integer, one of \"prompt\": text | \"messages\": "
    "[{\"role\", \"content\"}, ...] (the chat template is applied) | \"prompt_ids\": [token ids], and optional "
    "\"max_tokens\", \"temperature\", \"top_p\", \"seed\"}. Or OpenAI Batch API lines {\"custom_id\", \"method\": "
    "\"POST\", \"url\": \"/v1/chat/completions\" or \"/v1/completions\", \"body\": {\"model\", \"messages\" or "
    "\"prompt\", \"max_tokens\" / \"max_completion_tokens\", \"temperature\", \"top_p\", \"seed\", \"stop\", "
    "\"n\": 1}} (see --format)")
OUTPUT_HELP = (
    "JSONL answers, appended as each block ends (re-running resumes: an id is done only when the file holds a "
    "valid answer for it). Native: {\"id\", \"text\", \"token_ids\", \"finish_reason\": \"stop\" or \"length\"}; "
    "OpenAI lines are answered in OpenAI's batch output shape {\"id\", \"custom_id\", \"response\", \"error\": "
    "null}. A line that gets no answer is in OUT.errors.jsonl beside it ({\"id\", \"line\": its line number, "
    "\"error\"}, without \"id\" when it has no usable one; OpenAI's error shape for OpenAI lines), and the run exits "
    "with status 3. Default: print the answers")


def _positive(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _seed(s: str) -> int:
    """A run seed as input lines take theirs: a whole number in [0, 2**64)."""
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
    if not 0 <= n < 2 ** 64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {n}")
    return n


def _version() -> str:
    from flexgen_graph import __version__

    return f"flexgen-graph {__version__}"


def _frac3(s: str) -> tuple[float, float, float]:
    parts = s.replace(",", " ").split()
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three fractions GPU,CPU,DISK (e.g. 0.5,0.5,0), got {s!r}")
    try:
        return tuple(float(p) for p in parts)  # type: ignore[return-value]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not numbers: {s!r}") from None


def _lengths(s: str) -> list[int]:
    try:
        out = sorted({int(x) for x in s.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected lengths like 512 or 128,512,2048, got {s!r}") from None
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {s}")
    return out


def _add_compile_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--profile", default=None,
                   help="hardware profile name or JSON file (default: local, cpu-small's rates with this machine's "
                        "RAM and disk" + ("" if required else "; with --plan, checked against the plan's") + ")")
    p.add_argument("--prompt-len", type=_lengths if required else _positive, required=required,
                   help="tokens every prompt is padded to" + ("; several (128,512,2048) compile a plan set whose "
                                                               "plans `run` picks from by prompt length" if required
                                                               else " (default: the job's longest prompt, rounded "
                                                               "up to 16)"))
    p.add_argument("--gen-len", type=_positive, required=required,
                   help="tokens generated per prompt (at most)" + ("" if required else "; default: the largest "
                                                                   "max_tokens of the job, at least 64"))
    p.add_argument("--compress", choices=["off", "auto", "weights", "cache", "both"], default="off",
                   help="4-bit group-wise compression of the weights and/or the KV cache: 'off' (default) keeps "
                        "the output identical to transformers; 'auto' lets the planner compress where that is "
                        "faster; the others force it (accuracy cost: BENCHMARKS.md)")
    p.add_argument("--group-size", type=int, default=64,
                   help="elements per compression group (default 64, FlexGen's; 32 loses less accuracy on small "
                        "models at 12%% more compressed bytes)")
    p.add_argument("--compress-bits", type=int, choices=[4, 8], default=4,
                   help="bits per compressed value: 4 (default, FlexGen's) or 8 (about half the savings, near "
                        "lossless)")
    p.add_argument("--packed", action="store_true",
                   help="compute on the packed 4- or 8-bit weights (CPU int4 kernel, bfloat16 arithmetic) instead of "
                        "dequantizing each layer; 'auto' chooses it by itself where the profile measured it faster")
    p.add_argument("--gpu-batch-size", type=int, help="fix the gpu batch size instead of searching")
    p.add_argument("--num-gpu-batches", type=int, help="fix the number of gpu batches per block")
    p.add_argument("--max-block-size", type=int, help="cap sequences per block (gpu batch size x gpu batches)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="weights, cache and compute dtype (default: float16 on a GPU profile, float32 without)")
    for cls in ("weights", "cache", "hidden"):
        p.add_argument(f"--{cls}-frac", type=_frac3, metavar="G,C,D",
                       help=f"force the {cls} placement over gpu,cpu,disk (fractions summing to 1)")
    p.add_argument("--stages", type=int, default=1,
                   help="pipeline stages: split the layers over this many processes (one per GPU or machine), "
                        "one plan per stage" + (" in the output file" if required else "") + "; run with torchrun, "
                        "one process per stage")
    p.add_argument("--stages-per-machine", type=int,
                   help="with --stages: how many stage processes share one machine's RAM and disk (and, without a "
                        "GPU, its cores); default: all of them")
    p.add_argument("--stage-link-gbps", type=float,
                   help="with --stages: GB/s of the link between stages (default: the profile's, which "
                        "`flexgen-graph profile` measures between two processes of the machine it runs on)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flexgen-graph", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    ap.add_argument("--version", action="version", version=_version(), help="print the version and exit")
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
    r.add_argument("--input", required=True, help=INPUT_HELP)
    r.add_argument("--format", choices=openai_batch.FORMATS, default="auto",
                   help="how --input's lines are read: native, openai (OpenAI's Batch API), or auto (the default: "
                        "by the file's first JSON object)")
    r.add_argument("--output", help=OUTPUT_HELP)
    r.add_argument("--tokenizer", metavar="FOLDER",
                   help="a Hugging Face tokenizer (a folder, or a model id in the hub cache) for weights that come "
                        "without one (dummy), so lines may give text; it must fit the model's vocabulary")
    r.add_argument("--show", action="store_true", help="print each answer as its block finishes")
    r.add_argument("--temperature", type=float, default=0.0, help="default for lines without one (0: greedy)")
    r.add_argument("--top-p", type=float, default=1.0, help="default nucleus mass for lines without one")
    r.add_argument("--seed", type=_seed, default=0, help="run seed; a line's own seed wins")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when the plan's profile has a GPU and one is visible, else the CPU backend")
    r.add_argument("--offload-dir", help="folder for disk-tier scratch files (default: a temporary folder)")
    r.add_argument("--cache-dir", help="where imported weights and compiled plans are cached "
                                       "(default: ~/.cache/flexgen-graph)")
    r.add_argument("--distributed", action="store_true",
                   help="data parallel: each process runs its shard of the input, rank 0 merges them into "
                        "--output; launch with torchrun (under torchrun this is the default, unless the plan or "
                        "--stages makes it a pipeline)")
    _add_compile_args(r, required=False)

    pr = sub.add_parser("profile", help="measure this machine into a hardware profile (a few minutes)",
                        description="Measure this machine: capacities, rates, and a calibration of the cost model "
                                    "(transfers by size, disk reads cold and warm, hand-offs, and each --model's "
                                    "layers at its own shapes), one progress line per stage. A fit that misses its "
                                    "own engine runs by more than 15% twice is saved marked as an estimate. `run` "
                                    "refuses a profile file measured on another machine or under other kernels; "
                                    "`compile` takes it (it compiles for that machine).")
    pr.add_argument("-o", "--output", help="profile file to write (JSON; default: print it)")
    pr.add_argument("--offload-dir", default=".", help="folder whose disk is measured (default: here)")
    pr.add_argument("--model", action="append", default=[],
                    help="calibrate for this model's shapes (a catalog id, checkpoint folder or .gguf; repeatable)")
    pr.add_argument("--method", choices=["curves", "fit"], default="fit",
                    help="fit (default): the measured curves, then how they combine fitted to short runs of the "
                         "engine; curves: the isolated measurements alone (BENCHMARKS.md compares them)")
    pr.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                    help="the --model dtype to calibrate (default: float16 with a GPU, float32 without)")

    i = sub.add_parser("inspect", help="show a plan's policy, predictions and memory peaks")
    i.add_argument("plan", help="a compiled .fgplan file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--plot", metavar="FILE.png", help="draw one decode step: the streams over time and the memory "
                                                      "of each tier (needs matplotlib: pip install 'flexgen-graph[plot]')")
    bench_cmd.add_parser(sub)
    return ap


def _profile(name: str | None, offload_dir: Path | None = None, models=(), here: bool = False):
    from flexgen_graph.app.plans import profile_for

    return profile_for(name, offload_dir, models, here)


def _fixed(args) -> dict:
    from flexgen_graph.policy import Placement

    fixed = {}
    for cls in ("weights", "cache", "hidden"):
        v = getattr(args, f"{cls}_frac")
        if v is not None:
            fixed[cls] = Placement(*v)
    return fixed


def _dtype(args) -> str:
    if args.dtype:
        return args.dtype
    from flexgen_graph.app.plans import default_dtype

    return default_dtype(_profile(args.profile))


def compile_options(args, source: str = ""):
    """The compile options the command line gives, built once (planner.compile's CompileOptions); `run`
    compiles them for its job's number of prompts (job_prompts)."""
    from planner.compile import CompileOptions

    link = args.stage_link_gbps
    if link is not None and not link > 0:
        raise UserError(f"--stage-link-gbps must be positive, got {link}")
    return CompileOptions(
        gpu_batch_size=args.gpu_batch_size, num_gpu_batches=args.num_gpu_batches,
        max_block_size=args.max_block_size, fixed=tuple(sorted(_fixed(args).items())),
        compress=args.compress, group_size=args.group_size, compress_bits=args.compress_bits, packed=args.packed,
        stages=args.stages,
        stages_per_machine=args.stages_per_machine, stage_link_bytes_per_s=None if link is None else link * 1e9,
        weights_source=source)


def cmd_compile(args) -> int:
    import planner
    from flexgen_graph import planfile
    from flexgen_graph.app.models import resolve_model, weights_source_for
    from flexgen_graph.ir import Workload

    spec, source = resolve_model(args.model, _dtype(args))
    if args.weights:
        source = weights_source_for(args.weights, source)
    options = compile_options(args, source)
    plans = planner.compile(spec, _profile(args.profile, models=[spec]), [Workload(n, args.gen_len) for n in args.prompt_len],
                            options)
    planfile.save_set(plans, args.output)
    for plan in plans:
        where = ""
        if plan.stage:
            where = (f" stage {plan.stage.index} (graph layers {plan.stage.first_layer}..{plan.stage.end_layer - 1}, "
                     f"its own {plan.predictions['stage_decode_step_s'] * 1e3:.1f} ms per decode step):")
        print(f"wrote {args.output}: prompt {plan.workload.prompt_len}:{where} {plan.policy.gpu_batch_size} x "
              f"{plan.policy.num_gpu_batches} sequences per block, predicted "
              f"{plan.predictions['tokens_per_s']:.1f} tokens/s")
    if plans[0].stage:
        print(f"run it with: torchrun --nproc-per-node {args.stages} -m flexgen_graph run --plan {args.output} "
              "--input IN.jsonl --output OUT.jsonl (several machines: see the README)")
    return 0


def _check_plan_args(plans, args) -> None:
    """With --plan, compile options given on the command line must agree with the plan's."""
    from flexgen_graph.planfile import PlanMismatchError

    if args.profile is not None:
        want = _profile(args.profile)
        if want.fingerprint() != plans[0].profile.fingerprint():
            raise PlanMismatchError(f"the plan was compiled for profile {plans[0].profile.name!r}, not "
                                    f"{want.name!r} (a differing capacity or rate); recompile it for this profile")
    lens = {(p.workload.prompt_len, p.workload.gen_len) for p in plans}
    for flag, value, idx in (("--prompt-len", args.prompt_len, 0), ("--gen-len", args.gen_len, 1)):
        if value is not None and value not in {w[idx] for w in lens}:
            raise PlanMismatchError(f"{flag} {value} does not match the plan's workload "
                                    f"({', '.join(f'prompt {a}, gen {b}' for a, b in sorted(lens))})")
    if args.dtype is not None and args.dtype != plans[0].spec.dtype:
        raise PlanMismatchError(f"--dtype {args.dtype} does not match the plan's {plans[0].spec.dtype}")


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_run(args) -> int:
    from contextlib import ExitStack

    with ExitStack() as owned:  # the output's (and a shard's) lock, held from before any work to the end
        return _cmd_run(args, owned)


def _cmd_run(args, owned) -> int:
    from flexgen_graph import planfile
    from flexgen_graph.app import distributed
    from flexgen_graph.app.jobs import OutputLock

    rank = distributed.from_env(required=args.distributed)  # set under torchrun: one shard of a data-parallel run
    compile_options(args)  # bad compile options fail before any rendezvous
    _check_files(args)
    if args.plan and args.stages > 1:
        raise UserError("--stages compiles a pipeline plan; a given --plan already says its stages")
    if args.output and (rank is None or rank.rank == 0):  # rank 0 writes the output
        owned.enter_context(OutputLock(Path(args.output)))
    given = planfile.load_set(args.plan) if args.plan else None  # a bad plan fails before any rendezvous
    stages = given[0].stage.count if given and given[0].stage else args.stages
    if stages > 1:  # a pipeline: process i runs stage i of every block
        pipe = distributed.Pipeline.for_launch(rank, stages, args.output)
        distributed.start(pipe.rank, cuda=args.device != "cpu" and _cuda_visible())
        try:
            return _run(args, given, pipeline=pipe)
        finally:
            distributed.stop()
    if rank is None:
        return _run(args, given)
    shard = distributed.Shard.for_output(args.output, rank)  # a bad --output fails before the rendezvous
    shard_lock = owned.enter_context(shard.lock())  # each rank owns its shard
    distributed.start(rank, cuda=args.device != "cpu" and _cuda_visible())
    try:
        return _run(args, given, shard, shard_lock)
    finally:
        distributed.stop()


def _check_files(args) -> None:
    """--input is a file, --output can be written (its folder exists and takes files, neither it nor its errors
    or lock file is the input), --format fits the file: found before anything is loaded, so no work is lost."""
    from flexgen_graph.app.jobs import refuse_input_as_output

    in_path = Path(args.input)
    if args.input == "-":
        raise UserError("--input -: standard input is not read (a resumed run must read the same lines again); "
                        "give a file")
    if in_path.is_dir():
        raise UserError(f"--input {in_path} is a folder; give a JSONL file")
    if in_path.exists() and not in_path.is_file():
        raise UserError(f"--input {in_path} is not a regular file (a pipe or a device: a resumed run could not read "
                        "it again); give a JSONL file")
    if not in_path.is_file():
        raise UserError(f"--input {in_path}: no such file")
    if args.output:
        out = Path(args.output)
        folder = out.parent
        if not folder.is_dir():
            raise UserError(f"--output {out}: folder {folder} does not exist")
        refuse_input_as_output(in_path, out)
        if out.is_dir():
            raise UserError(f"--output {out} is a folder: give a file name")
        if not os.access(folder, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
            raise UserError(f"--output {out}: {'the file' if out.exists() else f'the folder {folder}'} is not writable")
    args.format = openai_batch.resolve_format(args.format, in_path)


def _given_tokenizer(args, spec, source: str):
    """--tokenizer's tokenizer (None without one), and lines that need a tokenizer with weights that bring
    none: both before the weights are imported."""
    from flexgen_graph.app.models import has_tokenizer, tokenizer_folder

    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_folder(args.tokenizer))
        if len(tok) > spec.vocab:
            raise UserError(f"--tokenizer {args.tokenizer} has {len(tok)} tokens but {spec.name} only {spec.vocab}")
        return tok
    need = None if has_tokenizer(source) else openai_batch.needs_tokenizer(Path(args.input), args.format)
    if need:
        raise UserError(f"the weights {source} come without a tokenizer, but line {need[0]} of {args.input} gives "
                        f"{need[1]}: give \"prompt_ids\" (native lines), or a tokenizer with --tokenizer FOLDER")
    return None


@dataclass
class _Setup:
    """What a run needs before its first block, whatever its mode: the weights, tokenizer, input format
    and plans, and where this process writes (its device, offload folder, output and which lines)."""

    store: Any
    tokenizer: Any
    fmt: Any
    plans: list
    device: str = "auto"
    offload_dir: str | None = None
    out: Any = None
    mine: Any = None
    done_elsewhere: frozenset = frozenset()


def _run(args, plans=None, shard=None, shard_lock=None, pipeline=None) -> int:
    """One process's run: alone, as one shard of a data-parallel run, or as one pipeline stage.
    plans: those of --plan, loaded by cmd_run (None: compile one for the job)."""
    rank = shard.rank if shard else pipeline.rank if pipeline else None
    talk = rank is None or rank.rank == 0  # one copy of the setup lines, not one per rank
    setup = _prepare(args, plans, rank, pipeline, talk)
    if shard:
        _as_shard(setup, args, shard)
    elif pipeline:
        _as_stage(setup, args, pipeline)
    else:
        _alone(setup, args)
    summary, stop = _generate(setup, args, talk, shard, pipeline)
    if summary.interrupted:
        return _stopped(summary, stop, args, talk, rank, shard, pipeline)
    if pipeline and not talk:
        return 0  # stage 0 reports the run: every stage generated the same tokens
    if shard:
        summary = _merge_shards(summary, args, shard, shard_lock)
        if summary is None:
            return 0  # rank 0 reports the run
    return _report(summary, args, setup.plans, bool(shard or pipeline))


def _check_cache_dir(cache_dir: Path) -> None:
    """The cache folder can take files, found before any import or conversion (a read-only one failed after
    the GGUF conversion with raw errno text)."""
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UserError(f"--cache-dir {cache_dir} is a file, not a folder")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = cache_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--cache-dir {cache_dir} cannot take files ({e.strerror}): give a writable folder "
                        "(weights are imported and plans cached there)") from None


def _prepare(args, plans, rank, pipeline, talk: bool) -> _Setup:
    """The model, its weights and tokenizer, the input format, and the plans (compiled for the job when none
    was given). Every data-parallel rank compiles the same plan (the scan reads the whole input), a pipeline's
    stage 0 compiles for all stages; cache writes go one at a time."""
    from flexgen_graph.app import distributed
    from flexgen_graph.app.jobs import job_workload, load_tokenizer
    from flexgen_graph.app.models import default_cache_dir, open_store, resolve_model, weights_source_for
    from flexgen_graph.ir import Workload

    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    _check_cache_dir(cache_dir)
    if args.plan and args.model:
        raise UserError("give --plan or --model, not both (the plan names its model)")
    with distributed.leaders_first(rank):
        if plans is not None:
            _check_plan_args(plans, args)
            spec, source = plans[0].spec, plans[0].weights_source
        else:
            if args.profile not in (None, "auto", "local"):
                _profile(args.profile, here=True)  # a profile file of another machine fails before any work
            spec, source = resolve_model(args.model or DEFAULT_MODEL, _dtype(args))
        if args.weights:
            source = weights_source_for(args.weights, source)
        if not source:
            raise UserError(f"the plan names no weights for {spec.name}: pass --weights")
        given_tokenizer = _given_tokenizer(args, spec, source)
        if talk:
            print(f"model {spec.name} ({spec.num_params() / 1e6:.0f}M parameters, {spec.dtype}), weights {source}",
                  file=sys.stderr)
        store = open_store(source, spec, cache_dir)
        tokenizer = given_tokenizer if given_tokenizer is not None else load_tokenizer(store.path)
        fmt = openai_batch.for_run(args.format, spec.name, tokenizer)
        if plans is None and not (pipeline and rank.rank):
            # sized for the lines the model can take: a longer one gets an error record, not a refused job
            count, prompt_len, gen_len = job_workload(Path(args.input), tokenizer, _sampling(args), spec,
                                                      args.prompt_len, args.gen_len, fmt)
            # no block larger than the job; blocks sized to it where that is predicted faster
            plans = _cached_plans(spec, args, Workload(prompt_len, gen_len), source, cache_dir, max(count, 1))
    if pipeline:  # stage 0's plans on every stage
        plans = pipeline.my_stages(pipeline.same_plans(plans))
    if plans[0].profile.has_gpu and args.device != "cuda" and not _cuda_visible() and talk:
        print(f"note: the plan targets a GPU ({plans[0].profile.name}) but none is visible: running on the CPU "
              "backend, its GPU tier a budget of host memory", file=sys.stderr)
    for p in plans if talk else ():
        st = f", stage 0 of {p.stage.count} (graph layers 0..{p.stage.end_layer - 1})" if p.stage else ""
        print(f"plan: prompt {p.workload.prompt_len}, gen {p.workload.gen_len}, block {p.policy.gpu_batch_size} x "
              f"{p.policy.num_gpu_batches}, profile {p.profile.name}{st}", file=sys.stderr)
    return _Setup(store, tokenizer, fmt, plans, args.device, args.offload_dir)


def _sampling(args):
    from runtime.sampling import Sampling

    return Sampling(args.temperature, args.top_p, args.seed)


def _alone(setup: _Setup, args) -> None:
    from flexgen_graph.app.jobs import OutputFile

    setup.out = OutputFile(Path(args.output) if args.output else None)
    setup.mine = lambda key: True


def _as_shard(setup: _Setup, args, shard) -> None:
    """A data-parallel rank: its own device and offload folder, its shard file, the lines hashed to it."""
    from flexgen_graph.app import distributed

    setup.device = distributed.pick_device(shard.rank, setup.plans[0], args.device)
    setup.offload_dir = shard.offload_dir(args.offload_dir)
    setup.out = shard.open()
    shard.check_visible()
    setup.mine, setup.done_elsewhere = shard.mine, shard.done_in_output()


def _as_stage(setup: _Setup, args, pipeline) -> None:
    """A pipeline stage: every line runs on every stage; stage 0 writes, the others skip what it holds."""
    from flexgen_graph.app import distributed

    setup.device = distributed.pick_device(pipeline.rank, setup.plans[0], args.device)
    setup.offload_dir = pipeline.offload_dir(args.offload_dir)
    setup.out, setup.done_elsewhere = pipeline.open_output()
    setup.mine = lambda key: True


def _generate(setup: _Setup, args, talk: bool, shard, pipeline):
    """Run the job's blocks; a SIGINT or SIGTERM lets the block in flight finish. (summary, signals seen)."""
    from flexgen_graph.app.jobs import run_job
    from flexgen_graph.errors import DiskFullError
    from runtime.engine import Engine

    stop: list[int] = []  # the signal that asked us to stop; the current block still finishes

    def asked(signum, _frame) -> None:
        if not stop:  # said at once: the block in flight may take minutes
            print(f"\n{signal.Signals(signum).name}: stopping once the block in flight is answered (nothing is lost; "
                  "kill -9 stops at once, and a re-run redoes that block)", file=sys.stderr, flush=True)
        stop.append(signum)
    previous = {sig: signal.signal(sig, asked) for sig in (signal.SIGINT, signal.SIGTERM)}
    store, device, offload_dir = setup.store, setup.device, setup.offload_dir
    try:
        should_stop = (lambda: pipeline.agree(stop)) if pipeline else (lambda: bool(stop))
        open_engine = (lambda p: Engine(p, store, offload_dir, device=device, link=pipeline.link(p))) if pipeline \
            else (lambda p: Engine(p, store, offload_dir, device=device))
        summary = run_job(setup.plans, open_engine, setup.tokenizer, Path(args.input), setup.out,
                          defaults=_sampling(args), show=talk and (args.show or not args.output),
                          should_stop=should_stop, mine=setup.mine, done_elsewhere=setup.done_elsewhere, fmt=setup.fmt)
    except DiskFullError as e:
        raise UserError(f"{e}; finished answers are in {shard.path if shard else args.output or 'stdout'} and scratch "
                        "files were removed: re-run the same command to resume") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(e.errno, f"the offload folder ran out of space ({e.filename or args.offload_dir or 'temp'}); "
                          f"finished records are in {args.output}, scratch files were removed: free space or "
                          "pick another --offload-dir, then re-run the same command to resume") from None
        raise
    finally:
        setup.out.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return summary, stop


def _stopped(summary, stop: list[int], args, talk: bool, rank, shard, pipeline) -> int:
    """A run stopped by a signal at a block boundary: say where its answers are; exit 128 + the signal."""
    from flexgen_graph.app import distributed

    name = signal.Signals(stop[0]).name
    # a stopped data-parallel rank does not wait for the others: torchrun stops them too, and nothing is merged
    if talk or not pipeline:  # pipeline: stage 0 wrote the blocks and says so
        who = "" if not rank else "pipeline: " if pipeline else f"rank {rank.rank}: "
        print(f"{who}stopped by {name} after {summary.tokens} tokens; finished blocks are in "
              f"{shard.path if shard else args.output or 'stdout'}, scratch files removed. Re-run the same "
              "command to resume.", file=sys.stderr)
    if pipeline:
        distributed.sync()  # torchrun stops the others at the first exit: not before stage 0 has said it
    return 128 + stop[0]


def _merge_shards(summary, args, shard, shard_lock):
    """A data-parallel rank's end: its shard whole, rank 0 merges them all (None on the other ranks)."""
    from flexgen_graph.app import distributed

    rank = shard.rank
    print(f"rank {rank.rank}/{rank.world_size}: {summary.prompts} prompts, {summary.tokens} tokens in "
          f"{summary.wall_s:.1f} s", file=sys.stderr)
    shard_lock.release()  # the shard is whole; rank 0 merges it under the output's lock
    summary, merged = distributed.finish(shard, summary)
    if merged is None:
        return None
    print(f"merged {rank.world_size} shards into {args.output}: {merged.appended} records"
          + (f" ({merged.already} were there already)" if merged.already else ""), file=sys.stderr)
    return summary


def _report(summary, args, plans, under_torchrun: bool) -> int:
    """The run's summary lines and peaks; exit 3 when some lines are in the errors file."""
    from flexgen_graph.app.jobs import errors_path

    print("\n".join(summary.lines(errors_path(Path(args.output)) if args.output else None)))
    if summary.plans and plans[0].profile.calibration is None:  # a promise needs this machine's measurements
        print(f"  (profile {plans[0].profile.name} was not measured on this machine: its predictions are estimates from "
              "assumed rates, not promises; --profile auto measures it once)")
    elif summary.plans and plans[0].profile.calibration.estimate:
        print(f"  (profile {plans[0].profile.name} cannot vouch for itself, {plans[0].profile.calibration.estimate}: its "
              "predictions are estimates, not promises; measure it again on a quiet machine)")
    if summary.peak_bytes:
        caps = {t: max(p.predictions["peak_bytes"][t] for p in plans) for t in ("gpu", "cpu", "disk")}
        print("peak bytes " + ", ".join(f"{t}: {summary.peak_bytes[t] / 2**20:.0f} MiB (plan {caps[t] / 2**20:.0f})"
                                        for t in ("gpu", "cpu", "disk")))
    # under torchrun any non-zero exit reads as a crashed worker: there the summary alone names the errors file
    return EXIT_LINE_ERRORS if summary.errors and not under_torchrun else 0


def _cached_plans(spec, args, workload, source: str, cache_dir: Path, prompts: int):
    """The plan for this job of `prompts` prompts (a plan per stage with --stages), compiled once and cached."""
    from flexgen_graph.app.session import PlanCache

    profile = _profile(args.profile, models=[spec], here=True)
    return PlanCache(spec, profile, compile_options(args, source), cache_dir).get(workload, job_prompts=prompts)


def cmd_profile(args) -> int:
    from flexgen_graph.app.calibrate import measure_profile
    from flexgen_graph.app.models import resolve_model
    from flexgen_graph.hardware import save_profile

    t = time.perf_counter()
    dtype = args.dtype or ("float16" if _cuda_visible() else "float32")
    models = [resolve_model(m, dtype)[0] for m in args.model]  # a bad --model fails before any measuring
    prof, notes = measure_profile(Path(args.offload_dir), Path(args.output).stem if args.output else "measured",
                                  models, method=args.method)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    if args.output:
        save_profile(prof, args.output)
        print(f"wrote {args.output} in {time.perf_counter() - t:.0f} s; use it with compile --profile {args.output}")
    else:
        print(json.dumps(prof.to_dict(), indent=2, sort_keys=True))
    return 0


def cmd_inspect(args) -> int:
    from flexgen_graph import planfile
    from flexgen_graph.app.inspect import describe, describe_text, plot

    if args.plot:
        try:
            import matplotlib  # noqa: F401  (only to say what is missing before the plan is read)
        except ImportError:
            raise UserError("--plot needs matplotlib: pip install 'flexgen-graph[plot]'") from None
    plans = planfile.load_set(args.plan)
    if args.plot:
        for i, p in enumerate(plans):
            path = Path(args.plot) if len(plans) == 1 else Path(args.plot).with_stem(f"{Path(args.plot).stem}-{i}")
            plot(p, path)
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        infos = [describe(p) for p in plans]
        print(json.dumps(infos if len(infos) > 1 else infos[0], indent=2, sort_keys=True))
        return 0
    print("\n\n".join(describe_text(p) for p in plans))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:  # a bare command asks what this is
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    try:
        return {"compile": cmd_compile, "run": cmd_run, "inspect": cmd_inspect,
                "profile": cmd_profile, "bench": bench_cmd.run}[args.cmd](args)
    except (UserError, OSError) as e:  # anything else is our bug: its traceback, exit 1
        print(f"flexgen-graph {args.cmd}: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
